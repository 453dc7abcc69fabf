"""ScheduleFreeAdamW: AdamW without a learning-rate schedule (Defazio et al., 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.precision import BF16_METHODS
from kaon.state.codecs import FloatCodec
from kaon.validation import boolean, choice, integer, pair, real

__all__ = ["ScheduleFreeAdamW"]

_MODE = "train_mode"
_TRAIN_POINT = "y"  # the training weights, held in the state while in eval mode


class ScheduleFreeAdamW(KaonOptimizer, names=("ScheduleFreeAdamW", "schedule_free_adamw")):
    r"""Schedule-Free AdamW: iterate averaging instead of a learning-rate schedule.

    Three sequences share the memory of two: ``z`` (the base AdamW-like iterate, in the state),
    ``x`` (a weighted average of the ``z`` iterates, the point to evaluate) and
    ``y = (1 - beta1) z + beta1 x`` (the point where gradients are taken, held in the parameter
    in training mode). ``x`` is never stored; it follows from ``y`` and ``z``. Per parameter, at
    its ``k``-th step (``k = 0, 1, ...``, a per-parameter counter):

    1. warmup: ``lr_k = lr * min(1, (k + 1) / warmup_steps)`` (``lr_k = lr`` without warmup)
    2. ``lr_max <- max(lr_max, lr_k)``; weight ``w = (k + 1)^r * lr_max^weight_lr_power``
       (``w = 0`` when ``lr_k = 0``: a step at learning rate 0 changes no weight at all);
       ``weight_sum <- weight_sum + w``; ``c = w / weight_sum`` (``0`` while ``weight_sum = 0``)
    3. ``v <- beta2 v + (1 - beta2) g^2``; ``u = g / (sqrt(v / (1 - beta2^(k+1))) + eps)
       + weight_decay * y`` (weight decay at the interpolation point ``y``)
    4. ``y <- (1 - c) y + c z - lr_k (1 - beta1 (1 - c)) u`` (this is ``p <- p - delta``, written
       with ``bf16_method`` for low-precision parameters), then ``z <- z - lr_k u``

    This is the update of ``schedulefree.AdamWScheduleFree`` (its defaults ``r = 0``,
    ``weight_lr_power = 2``), with the counters kept per parameter (a parameter that starts
    receiving gradients late gets its own warmup and bias correction, and a skipped non-finite
    step advances nothing) and the ``lr = 0`` rule above (the reference keeps averaging toward
    ``z`` at ``lr = 0``).

    **Train and eval.** Call ``opt.eval()`` (alias ``eval_params()``) before evaluating or
    saving the evaluation weights: the parameters then hold ``x = y + (1 - 1/beta1)(z - y)`` and
    the training weights ``y`` are kept, exactly, in the state key ``y`` (one copy of the weights
    in their dtype, freed by ``train()``). ``opt.train()`` (alias ``train_params()``) restores
    ``y`` bit for bit. ``step()`` in eval mode raises ``RuntimeError``. The mode is saved with
    the groups (``train_mode``), so a checkpoint saved in either mode, loaded together with the
    model weights saved with it, resumes exactly; ``load_state_dict`` takes the checkpoint's
    mode. A new optimizer starts in training mode.

    Args:
        params: parameters or parameter groups.
        lr (float, default 0.025): learning rate (constant: no schedule needed).
        betas (tuple, default (0.9, 0.999)): ``beta1`` in (0, 1), the interpolation between
            ``z`` and ``x``; ``beta2`` in [0, 1), the second-moment decay.
        eps (float, default 1e-8): added to the root of the second moment, > 0.
        weight_decay (float, default 0.0): weight decay, computed at ``y`` and added to the
            normalized gradient.
        warmup_steps (int, default 0): linear learning-rate warmup over this many steps.
        r (float, default 0.0): polynomial weighting ``(k + 1)^r`` of the average.
        weight_lr_power (float, default 2.0): the average weights ``lr_max`` to this power.
        maximize (bool, default False): maximize the objective instead.
        bf16_method (str, default "stochastic_rounding"): "stochastic_rounding", "kahan" or
            "none" for bf16/fp16 parameters.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.

    State per parameter (the checkpoint format): ``z`` and ``v`` fp32 shaped like the parameter;
    ``step``, ``weight_sum`` and ``lr_max`` fp32 ``[1]``; ``shift`` (parameter dtype) with
    ``bf16_method="kahan"`` on a low-precision parameter; in eval mode also ``y`` (parameter
    dtype). Group key ``train_mode`` (bool).

    Bytes per parameter: 8 (``z`` and ``v``) plus 12 per tensor; plus 2 for Kahan on bf16; in
    eval mode plus the parameter's own size (4 fp32, 2 bf16).

    Example::

        opt = kaon.ScheduleFreeAdamW(model.parameters(), lr=0.025, warmup_steps=1000)
        opt.train()
        loss.backward(); opt.step(); opt.zero_grad()
        opt.eval()   # evaluate / save here
        opt.train()

    Reference: A. Defazio et al., "The Road Less Scheduled", 2024.
    """

    #: not on the compiled path by default (``fused=None``): not yet validated on the fused path
    fusable = False

    hyperparameter_checks = {
        "lr": real(0.0),
        "betas": pair(real(0.0, 1.0, low_inclusive=False, high_inclusive=False),
                      real(0.0, 1.0, high_inclusive=False)),
        "eps": real(0.0, low_inclusive=False),
        "weight_decay": real(0.0),
        "warmup_steps": integer(0),
        "r": real(0.0),
        "weight_lr_power": real(0.0),
        "maximize": boolean(),
        "bf16_method": choice(*BF16_METHODS),
        _MODE: boolean(),
    }
    layout_keys = ("bf16_method",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        *,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        maximize: bool = False,
        bf16_method: str = "stochastic_rounding",
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, warmup_steps=warmup_steps,
            r=r, weight_lr_power=weight_lr_power, maximize=maximize, bf16_method=bf16_method,
            **{_MODE: True},
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
        )

    # ------------------------------------------------------------------------ layout and rule
    #: the training point ``y`` is held in the state while in eval mode (saved with it)
    extra_state_keys = ("accumulated_grad", _TRAIN_POINT)

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        return [
            Slot("z", FloatCodec(), view),
            Slot("v", FloatCodec(), view),
            Slot("step", FloatCodec(), (1,)),
            Slot("weight_sum", FloatCodec(), (1,)),
            Slot("lr_max", FloatCodec(), (1,)),
        ]

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        beta1, beta2 = group["betas"]
        lr, warmup = group["lr"], group["warmup_steps"]
        g, y = batch.grad, batch.param
        per_slice = (batch.size,) + (1,) * (g.ndim - 1)

        # per-parameter scalars in float64 ([N, 1]): 1 - beta2^(k+1) cancels badly in fp32
        step = state["step"]
        k = step.double()
        sched = ((k + 1) / warmup).clamp_(max=1.0) if warmup > 0 else torch.ones_like(k)
        lr_k = (sched * lr).float()
        lr_max = torch.maximum(state["lr_max"], lr_k)
        weight = (k + 1).pow(group["r"]) * lr_max.double().pow(group["weight_lr_power"])
        weight = torch.where(lr_k > 0, weight, 0.0)
        weight_sum = state["weight_sum"].double() + weight
        ckp1 = torch.where(weight_sum > 0, weight / weight_sum, 0.0)
        bias_correction2 = (1 - torch.pow(beta2, k + 1)).float().view(per_slice)
        c_interp = ckp1.float().view(per_slice)
        c_grad = (lr_k.double() * (1 - beta1 * (1 - ckp1))).float().view(per_slice)
        c_z = lr_k.view(per_slice)

        # z starts at the parameter (fresh state decodes to zero): lerp with weight 1 is exact
        z = state["z"].lerp_(y, (step == 0).float().view(per_slice))
        v = state["v"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = torch.div(v, bias_correction2, out=batch.scratch("denom"))
        u = torch.div(g, denom.sqrt_().add_(group["eps"]), out=denom)
        if group["weight_decay"] != 0:
            u.add_(y, alpha=group["weight_decay"])
        delta = torch.sub(y, z, out=batch.scratch("delta")).mul_(c_interp).addcmul_(u, c_grad)
        z.addcmul_(u, c_z, value=-1.0)
        new_state = {
            "z": z, "v": v, "step": step.add_(1.0), "weight_sum": weight_sum.float(),
            "lr_max": lr_max,
        }
        return delta, new_state

    # ------------------------------------------------------------------------ train / eval
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; it joins in the optimizer's current mode."""
        if isinstance(param_group, dict) and self.param_groups:
            mode = self.param_groups[0][_MODE]
            param_group = {_MODE: mode, **param_group}
            if param_group[_MODE] is not mode:
                raise ValueError(
                    f"ScheduleFreeAdamW: a group added with {_MODE}={param_group[_MODE]!r} while "
                    f"the optimizer is in {'train' if mode else 'eval'} mode (leave the key out)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One step; raises ``RuntimeError`` in eval mode (call ``train()`` first)."""
        self._require_train_mode("step()")
        return super().step(closure)

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Step one parameter (see :meth:`KaonOptimizer.step_param`); not in eval mode."""
        self._require_train_mode("step_param()")
        super().step_param(p, group)

    @torch.no_grad()
    def train(self, mode: bool = True) -> ScheduleFreeAdamW:
        """Parameters to the training point ``y`` (``mode=False``: to ``x``, as ``eval()``)."""
        if not isinstance(mode, bool):
            raise TypeError(f"train: mode must be True or False; got {mode!r}")
        for group in self.param_groups:
            if group[_MODE] == mode:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "z" not in state:
                    continue
                z = state["z"]
                if mode:
                    saved = state.pop(_TRAIN_POINT, None)
                    if saved is None:  # not saved by eval() (e.g. a reference checkpoint)
                        x = p.detach().float().reshape(z.shape)
                        saved = torch.where(state["step"] > 0, x.lerp(z, 1.0 - beta1), x)
                    p.copy_(saved.view_as(p))
                else:
                    y = p.detach().clone()
                    # x = y + (1 - 1/beta1)(z - y); a parameter never stepped has x = y
                    y32 = y.float().reshape(z.shape)
                    x = torch.where(state["step"] > 0, y32.lerp(z, 1.0 - 1.0 / beta1), y32)
                    p.copy_(x.view_as(p))
                    state[_TRAIN_POINT] = y
            group[_MODE] = mode
        return self

    def eval_params(self) -> ScheduleFreeAdamW:
        """Alias of ``eval()``: parameters to the averaged point ``x``."""
        return self.eval()

    def train_params(self) -> ScheduleFreeAdamW:
        """Alias of ``train()``: parameters back to the training point ``y``."""
        return self.train()

    @property
    def training(self) -> bool:
        """Whether the optimizer is in training mode (parameters at ``y``)."""
        return all(group[_MODE] for group in self.param_groups)

    def _require_train_mode(self, what: str) -> None:
        if not self.training:
            raise RuntimeError(
                f"ScheduleFreeAdamW.{what} called in eval mode: the parameters hold the averaged "
                "point x, not the training point y. Call optimizer.train() (or train_params()) "
                "before training steps, and optimizer.eval() before evaluation or saving."
            )
