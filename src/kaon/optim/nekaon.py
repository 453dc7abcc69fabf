"""Nekaon: Adakaon with a k-step negative-momentum lookahead carried in the weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kaon.engine import SHIFT, Batch, Slot
from kaon.optim.adakaon import Adakaon
from kaon.state.codecs import FloatCodec
from kaon.validation import check_all, integer, real

__all__ = ["Nekaon"]

_RECORD = "climb"
# in an eval-mode state dict: the fix-ups train() needs to restore the live weights exactly
# (indices into the flattened parameter, int64, and the live values there, parameter dtype)
_EVAL_INDEX, _EVAL_VALUES = "eval_fixup_index", "eval_fixup_values"


def _displacement(m: Tensor, record: Tensor, out: Tensor | None = None) -> Tensor:
    """``clamp(-scale * m, -bound, bound)`` per slice, NaN -> 0 and +-inf -> +-bound.

    ``m`` is the decoded momentum ``[N, *view]``, ``record`` the ``[N, 2]`` climb record
    ``(scale, bound) = (k lr, k clip lr)`` of each slice. Every elementwise step is exactly
    rounded, so the climb and its removal (one step later, from the same stored momentum and
    record) compute the same bits whatever the batching.
    """
    per_slice = (-1,) + (1,) * (m.ndim - 1)
    scale = record[:, 0].view(per_slice)
    bound = record[:, 1].view(per_slice)
    e = torch.mul(m, scale.neg(), out=out)
    return e.nan_to_num_(nan=0.0).clamp_(min=bound.neg(), max=bound)


class Nekaon(Adakaon, names=("Nekaon",)):
    r"""Nekaon: Adakaon whose gradient is taken about ``k`` optimizer steps ahead.

    Between steps the weights carry the displacement ``e = clamp(-k lr m, -k c lr, +k c lr)``
    (per element; ``m`` is Adakaon's momentum as stored, in unit-RMS update space, ``c`` the
    group's ``clip_threshold``, ``lr`` and ``c`` frozen when the displacement is applied; NaN
    becomes 0 and infinities the bound), i.e. the live weights are ``w = p + e``: about ``k``
    more steps along the current update direction. The user's forward/backward therefore
    computes the gradient at the look-ahead point, with no extra pass. Each ``step()`` runs,
    per parameter, as ONE write of the weights:

    1. remove the old displacement: ``p = w - e_old`` (recomputed from the stored momentum and
       the stored climb record; no copy of the weights is kept)
    2. Adakaon's update at ``p`` with the look-ahead gradient: ``p' = p - Delta`` (the rule of
       :class:`kaon.Adakaon`, run unchanged; its weight decay sees ``p``, not ``w``)
    3. climb along the new momentum as it will be stored: ``w' = p' + e_new``

    written as ``w <- w - (Delta + e_old - e_new)`` with one rounding (one stochastic rounding
    for bf16), so on low-precision weights the climb and its removal cancel exactly in the
    arithmetic instead of adding two independent roundings per step. ``k = 0`` is Adakaon.

    Evaluation: ``eval()`` removes the displacement (the weights become the true iterate, the
    ones to sample, validate and save); ``train()`` restores the live weights bit for bit
    (fp32 and bf16; see docs/nekaon.md); ``step()`` in eval mode raises ``RuntimeError``.

    Args:
        params: parameters or parameter groups.
        lr (float, default 1e-3): learning rate.
        k (float, default 1.5): look-ahead in optimizer steps, >= 0 (per group); the
            loss-versus-generalization dial.
        betas (tuple, default (0.5, 0.999)): Adakaon's betas; ``betas[0] > 0`` is required (the
            look-ahead rides on the momentum). beta1 is the regime knob: 0.2 anti-memorization,
            0.5 balanced, 0.9 fidelity.
        weight_decay (float, default 0.1): Adakaon's decoupled weight decay.
        momentum_dtype (str, default "4bit"): Adakaon's momentum storage.
        low_vram_above (int | None, default None): with a flat list of parameters, those with
            more elements than this go to a second group without momentum
            (``betas=(0, beta2)``, no displacement) at ``lr * low_vram_lr_ratio``; param-group
            dicts raise ``TypeError``.
        low_vram_lr_ratio (float, default 0.5): lr ratio of that group, > 0.
        **adakaon_kwargs: every other argument of :class:`kaon.Adakaon` (eps, maximize,
            clip_threshold, momentum_4bit_block, cautious, gradient_centralization,
            bf16_method, foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad,
            seed) with Adakaon's defaults.

    State per parameter: Adakaon's (``row``/``col`` or ``v``; ``m`` and ``m_scale``; ``shift``
    with Kahan) plus ``climb``, fp32 ``[2]``: ``(k lr, k clip lr)`` of the displacement the
    weights carry now (zeros: none). No per-element state is added. A group with
    ``betas[0] = 0`` (the low-VRAM group) is plain Adakaon: no ``m``, no ``climb``.

    Bytes per parameter: Adakaon's (0.53 + 4 (R + C) / (R C) at the 4-bit default) plus 8 bytes
    per tensor.

    Checkpoints: the ``climb`` record travels in the state dict, so a state dict saved in
    train mode (displaced weights) and loaded into a fresh optimizer together with those
    weights knows the displacement is there and removes it at the next ``step()`` or
    ``eval()``; resume is bit-identical. A state dict saved in eval mode (the order trainers
    use: evaluate, save, continue) holds the true weights' record of the displacement that
    ``train()`` puts back, plus its fix-ups (``eval_fixup_index``, ``eval_fixup_values``);
    loading it leaves the optimizer in eval mode, and ``train()`` then restores the live weights
    bit for bit, so resume is bit-identical too. Save the weights and the optimizer at the same
    moment.

    Example::

        opt = kaon.Nekaon(model.parameters(), lr=1e-4)   # k=1.5, betas=(0.5, 0.999), 4bit
        loss.backward(); opt.step(); opt.zero_grad()
        opt.eval(); validate(model); torch.save(model.state_dict(), "w.pt"); opt.train()
    """

    #: not on the compiled path by default (``fused=None``): its displacement is derived from the stored momentum codes, and the compiled
    #: division may round a code one level away from the eager one (a weight difference of that
    #: level times k lr); fused=True runs it so
    fusable = False

    hyperparameter_checks = {**Adakaon.hyperparameter_checks, "k": real(0.0)}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        k: float = 1.5,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.1,
        momentum_dtype: str = "4bit",
        *,
        low_vram_above: int | None = None,
        low_vram_lr_ratio: float = 0.5,
        **adakaon_kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        check_all({"k": real(0.0), "betas": Adakaon.hyperparameter_checks["betas"],
                   "lr": real(0.0), "low_vram_lr_ratio": real(0.0, low_inclusive=False)},
                  {"k": k, "betas": betas, "lr": lr, "low_vram_lr_ratio": low_vram_lr_ratio},
                  owner)
        if betas[0] <= 0:
            raise ValueError(
                f"{owner}: betas[0] must be > 0 (the look-ahead rides on the momentum); got "
                f"{betas[0]!r}. For no momentum use kaon.Adakaon with betas=(0.0, beta2)."
            )
        if low_vram_above is not None:
            check_all({"low_vram_above": integer(0)}, {"low_vram_above": low_vram_above}, owner)
            params = _split_low_vram(owner, params, low_vram_above, lr * low_vram_lr_ratio,
                                     betas)
        # the mode and the eval-mode stash live in one shared dict, so a wrapper that delegates
        # attribute reads to this optimizer (Lightning's LightningOptimizer subclasses the
        # optimizer's class and forwards unknown attributes) switches this optimizer's mode
        # when its train() / eval() run, instead of setting attributes on itself
        self._mode: dict[str, Any] = {"training": True, "stash": {}}
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay,
                         momentum_dtype=momentum_dtype, **adakaon_kwargs)
        self.low_vram_above = low_vram_above
        self.low_vram_lr_ratio = low_vram_lr_ratio
        # k is a group key: Adakaon's constructor does not know it
        self.defaults["k"] = k
        for group in self.param_groups:
            group.setdefault("k", k)
        # a pre-hook rather than an override of step(): torch wraps each class's step() with
        # the hook machinery, and an override calling super().step() would run hooks twice
        self.register_step_pre_hook(_refuse_step_in_eval_mode)

    # ----------------------------------------------------------------------- the rule
    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        slots = super().state_slots(p, group, view)
        if group["betas"][0] > 0:
            slots.append(Slot(_RECORD, FloatCodec(), (2,)))
        return slots

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        if "m" not in state:  # a group without momentum: plain Adakaon, never displaced
            return super().update(batch)
        # before Adakaon's rule, which updates the momentum in place
        old = _displacement(state["m"], state[_RECORD], out=batch.scratch("nekaon:old"))
        inner = batch
        if group["weight_decay"] != 0:  # the only use of the weights in Adakaon's rule
            inner = batch.with_param(
                torch.sub(batch.param, old, out=batch.scratch("nekaon:true")))
        delta, new_state = super().update(inner)
        delta = delta.add_(old)

        k, lr = group["k"], group["lr"]
        record = torch.empty((batch.size, 2), dtype=torch.float32, device=delta.device)
        record[:, 0].fill_(k * lr)
        record[:, 1].fill_(k * group["clip_threshold"] * lr)
        if k != 0:
            # the momentum exactly as the next step (or eval()) will decode it
            stored = batch.as_stored("m", new_state["m"])
            delta = delta.sub_(_displacement(stored, record, out=stored))
        new_state[_RECORD] = record
        return delta, new_state

    # --------------------------------------------------------------- train / eval modes
    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        self._require_training("step_param()")
        super().step_param(p, group)

    def train(self, mode: bool = True) -> Nekaon:
        """``train()``: put the displacement back (the live weights are restored bit for bit);
        ``train(False)`` / ``eval()``: remove it, leaving the true weights."""
        if mode and not self._training:
            self._restore()
        elif not mode and self._training:
            self._remove()
        self._training = bool(mode)
        return self

    @property
    def training(self) -> bool:
        """Whether the optimizer is in train mode (the weights carry the displacement)."""
        return self._training

    @property
    def _training(self) -> bool:
        return self._mode["training"]

    @_training.setter
    def _training(self, value: bool) -> None:
        self._mode["training"] = value

    @property
    def _eval_stash(self) -> dict[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Eval mode: per parameter (climb record, fix-up indices, fix-up values)."""
        return self._mode["stash"]

    @_eval_stash.setter
    def _eval_stash(self, value: dict[Tensor, tuple[Tensor, Tensor, Tensor]]) -> None:
        self._mode["stash"] = value

    @torch.no_grad()
    def displacement(self, p: Tensor) -> Tensor:
        """The displacement ``e`` that ``p``'s weights carry now, fp32 shaped like ``p``
        (zeros in eval mode, before the first step and for parameters without momentum)."""
        group = self._group_of(p)
        state = self.state.get(p, {})
        if _RECORD not in state or "m" not in state:
            return torch.zeros(p.shape, device=p.device)
        return self._computed_displacement(p, group, state[_RECORD])

    extra_state_keys = (*Adakaon.extra_state_keys, _EVAL_INDEX, _EVAL_VALUES)

    def state_dict(self) -> dict[str, Any]:
        """The state dict; in eval mode each displaced parameter's entry holds the record of
        the displacement ``train()`` restores (not zeros) and the fix-ups (issue 17, case 10)."""
        state_dict = super().state_dict()
        if not self._training and self._eval_stash:
            ids = {id(p): i for i, p in enumerate(p for g in self.param_groups
                                                   for p in g["params"])}
            for p, (record, index, values) in self._eval_stash.items():
                entry = state_dict["state"].get(ids.get(id(p)))
                if entry is not None:
                    state_dict["state"][ids[id(p)]] = {
                        **entry, _RECORD: record, _EVAL_INDEX: index, _EVAL_VALUES: values}
        return state_dict

    def _checked_param_state(self, p: Tensor, group: dict[str, Any], state: Any,
                             owner: str) -> dict[str, Any]:
        state = super()._checked_param_state(p, group, state, owner)
        index, values = state.get(_EVAL_INDEX), state.get(_EVAL_VALUES)
        if index is None and values is None:
            return state
        where = f"{owner}: the state of a parameter of shape {tuple(p.shape)}"
        ok = (isinstance(index, Tensor) and isinstance(values, Tensor)
              and index.dtype == torch.int64 and index.ndim == 1 and values.ndim == 1
              and values.dtype == p.dtype and len(index) == len(values) and _RECORD in state)
        if ok and len(index):
            ok = int(index.min()) >= 0 and int(index.max()) < p.numel() and \
                bool(torch.isfinite(values.float()).all())
        if not ok:
            raise ValueError(f"{where}: {_EVAL_INDEX!r} / {_EVAL_VALUES!r} are not the fix-ups of "
                             "an eval-mode checkpoint of this parameter")
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (see :class:`Nekaon` for how displacements travel). It takes the
        checkpoint's mode: after an eval-mode checkpoint the optimizer is in eval mode (the
        weights loaded with it are the true ones) and ``train()`` puts the displacement back."""
        super().load_state_dict(state_dict)
        stash = {}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                index, values = state.pop(_EVAL_INDEX, None), state.pop(_EVAL_VALUES, None)
                if index is not None and values is not None:
                    stash[p] = (state[_RECORD], index, values)
                    state[_RECORD] = torch.zeros_like(state[_RECORD])
        self._eval_stash = stash
        self._training = not stash

    # ----------------------------------------------------------------------- internals
    def _require_training(self, what: str) -> None:
        if not self._training:
            raise RuntimeError(
                f"{type(self).__name__}.{what} called in eval mode: the weights are the true "
                "iterate without the look-ahead displacement; call opt.train() first"
            )

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("the parameter is not in any of the optimizer's groups")

    def _computed_displacement(self, p: Tensor, group: dict[str, Any], record: Tensor) -> Tensor:
        view = tuple(self.view_shape(p, group))
        slot = next(s for s in self.state_slots(p, group, view) if s.name == "m")
        state = self.state[p]
        stored = {sfx: state["m" + sfx].unsqueeze(0) for sfx in slot.codec.suffixes}
        m = slot.codec.decode(stored, slot.shape)
        return _displacement(m, record.unsqueeze(0)).reshape(p.shape)

    def _displaced(self) -> Iterable[tuple[Tensor, dict[str, Any], dict[str, Tensor]]]:
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and _RECORD in state and "m" in state:
                    yield p, group, state

    @staticmethod
    def _moved(weights: Tensor, e: Tensor, shift: Tensor | None, sign: float) -> Tensor:
        """``weights (+ shift) + sign * e`` in fp32, rounded to nearest in the weights' dtype.

        Applied with ``sign=-1`` (eval) and ``sign=+1`` (train, as a first guess of the live
        weights; the fix-ups make it exact). ``shift`` is the Kahan buffer, if any.
        """
        x = weights.float()
        if shift is not None:  # stored in the view's shape
            compensation = shift.float().reshape(weights.shape)
            x = x + compensation if sign < 0 else x - compensation
        return x.add(e, alpha=sign).to(weights.dtype)

    @torch.no_grad()
    def _remove(self) -> None:
        stash = {}
        for p, group, state in self._displaced():
            record = state[_RECORD]
            e = self._computed_displacement(p, group, record)
            shift = state.get(SHIFT)
            live = p.detach()
            true = self._moved(live, e, shift, -1.0)
            # train() recomputes this guess from the true weights; where it misses the live
            # weights (a rounding that is not undone), keep the live value to put back
            guess = self._moved(true, e, shift, +1.0)
            bits = torch.int32 if p.element_size() == 4 else torch.int16
            if p.element_size() in (2, 4):
                missed = guess.view(bits).ne(live.view(bits)).flatten()
            else:
                missed = guess.ne(live).flatten()
            index = missed.nonzero().flatten()
            values = live.flatten()[index].clone()
            p.copy_(true)
            stash[p] = (record, index, values)
            # an eval-mode state dict records no displacement: the weights are the true ones
            state[_RECORD] = torch.zeros_like(record)
        self._eval_stash = stash

    @torch.no_grad()
    def _restore(self) -> None:
        for p, group, state in self._displaced():
            if p not in self._eval_stash:
                continue
            record, index, values = self._eval_stash[p]
            state[_RECORD] = record
            e = self._computed_displacement(p, group, record)
            guess = self._moved(p.detach(), e, state.get(SHIFT), +1.0)
            guess.view(-1)[index] = values
            p.copy_(guess)
        self._eval_stash = {}


def _refuse_step_in_eval_mode(opt: Nekaon, args: Any, kwargs: Any) -> None:
    opt._require_training("step()")


def _split_low_vram(owner: str, params: Any, above: int, lr: float,
                    betas: tuple[float, float]) -> list[dict[str, Any]]:
    """Split a flat parameter list into the momentum group and the big no-momentum group."""
    if isinstance(params, Tensor):
        return params  # the base class raises its usual error
    params = list(params)
    if any(isinstance(p, dict) for p in params):
        raise TypeError(
            f"{owner}: low_vram_above needs a flat list of parameters, not param-group dicts "
            f"(got {len(params)} entries including dicts); build the groups yourself with "
            "betas=(0, beta2) for the large tensors instead"
        )
    small = [p for p in params if p.numel() <= above]
    big = [p for p in params if p.numel() > above]
    groups: list[dict[str, Any]] = []
    if small:
        groups.append({"params": small})
    if big:
        groups.append({"params": big, "lr": lr, "betas": (0.0, betas[1])})
    return groups or params
