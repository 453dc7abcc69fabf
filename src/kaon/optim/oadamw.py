"""OAdamW: StableAdamW with an optional Muon (Newton-Schulz) transform of matrix gradients."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from kaon import ops, upstream
from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.precision import BF16_METHODS
from kaon.state import factored
from kaon.state.codecs import FloatCodec
from kaon.validation import Check, boolean, choice, integer, optional, pair, real

__all__ = ["OAdamW"]

NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NS_EPS = 1e-7
_FACTOR = "ns_factor"
_FACTOR_AGE = "ns_factor_age"  # Python int: steps since the cached factor was computed


_OPTIMI = "optimi / OAdamW"


def _kahan_sum(value: Any) -> str:
    """optimi's ``kahan_sum`` as ``bf16_method``: None (Kahan for bf16/fp16 weights) and True
    are kaon's ``"kahan"``, False is the plain low-precision add, ``"none"``."""
    if value is None or value is True:
        return "kahan"
    if value is False:
        return "none"
    raise upstream.UnsupportedError("kahan_sum must be None, True or False (or use bf16_method)")


def _foreach(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    raise upstream.UnsupportedError("foreach must be None, True or False")


class OAdamW(KaonOptimizer, names=("OAdamW", "StableAdamW")):
    r"""OAdamW: optimi's StableAdamW, with Muon orthogonalization for chosen groups.

    For a gradient ``g`` (fp32), at the parameter's ``t``-th step (``t = 1, 2, ...``, a
    per-parameter counter):

    0. Muon groups (``muon=True``), parameters with two or more dimensions: ``g <- NS(g)``, the
       Newton-Schulz orthogonalization of the matrix view ``[out, numel/out]`` (conv kernels as
       ``[out, in*kh*kw]``): ``X = G / max(||G||_F, 1e-7)``, then ``ns_steps`` times
       ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` and Keller Jordan's coefficients
       ``(3.4445, -4.7750, 2.0315)``, computed on the wide orientation (tall matrices
       transposed). With ``update_proj_gap = n > 1`` the full iteration runs every ``n`` steps and
       keeps its left factor ``L`` (``X_out = L X``, ``L`` a polynomial of ``X X^T``, about
       ``(X X^T)^(-1/2)``); the steps in between orthogonalize the *fresh* gradient with the cached
       factor, ``NS(g) ~ L (G / ||G||_F)``: one matmul instead of ``3 ns_steps``.
    1. debiased betas ``beta_hat = (beta^t - beta) / (beta^t - 1)`` (0 at ``t = 1``), so the EMAs
       below are the bias-corrected moments: ``m <- lerp(m, g, 1 - beta1_hat)``,
       ``v <- beta2_hat v + (1 - beta2_hat) g^2``
    2. update-RMS stabilized step size: ``eta = lr / max(1, sqrt(mean(g^2 / max(v, eps^2))))``
    3. ``delta = scale * eta * m / (sqrt(v) + eps)`` (``scale`` only for the orthogonalized
       parameters of Muon groups, 1 elsewhere) plus weight decay ``eta * weight_decay * p``, or
       fully decoupled ``(eta / max_lr) * weight_decay * p`` with ``decouple_lr=True``
    4. ``p <- p - delta``, written with ``bf16_method``: the default ``"kahan"`` keeps the
       rounding error of bf16/fp16 weights in a compensation buffer (optimi's Kahan summation).

    With ``muon=False`` this is ``optimi.StableAdamW`` (torch-optimi 0.3.3).

    Args:
        params: parameters, parameter groups, or an ``nn.Module``. A module is grouped
            automatically: every trainable parameter with two or more dimensions goes to a
            Muon group, except embedding weights (``nn.Embedding`` / ``nn.EmbeddingBag``, and
            anything tied to them) and the weight of the model's last ``nn.Linear`` (taken to
            be the output head); everything else goes to an Adam group (``muon=False``).
        lr (float, default 1e-3): learning rate.
        betas (tuple, default (0.9, 0.99)): moment decays, each in [0, 1).
        weight_decay (float, default 1e-2): decoupled weight decay, scaled by the stabilized
            ``eta``.
        eps (float, default 1e-6): added to ``sqrt(v)``; ``eps^2`` floors ``v`` in the RMS, > 0.
        decouple_lr (bool, default False): fully decoupled weight decay (divided by ``max_lr``).
        max_lr (float | None, default None): the largest scheduled lr for ``decouple_lr``;
            ``None`` takes the group's ``lr`` when the group is added.
        maximize (bool, default False): maximize the objective instead.
        muon (bool, default False): orthogonalize the gradients of matrix parameters.
        ns_steps (int, default 5): Newton-Schulz iterations, >= 1.
        update_proj_gap (int, default 1): run the full iteration every this many steps and reuse
            its factor in between (see above), >= 1.
        scale (float, default 1.0): multiplies the update of orthogonalized parameters, >= 0.
        ns_dtype (str, default "float32"): "float32" or "bfloat16", the precision of the
            Newton-Schulz matmuls.
        bf16_method (str, default "kahan"): "kahan", "stochastic_rounding" or "none" for
            bf16/fp16 parameters.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.

    State per parameter (the checkpoint format): ``exp_avg`` and ``exp_avg_sq`` fp32 in the
    matrix view ``[out, numel/out]`` (1-D: the parameter's shape); ``step`` fp32 ``[1]``;
    ``shift`` (parameter dtype) with ``bf16_method="kahan"`` on a low-precision parameter; for
    Muon matrices with ``update_proj_gap > 1`` also ``ns_factor`` fp32 ``[k, k]``
    (``k = min(out, numel/out)``; the cached factor minus the identity, so fresh zeros are the
    identity) and ``ns_factor_age`` (int, steps since the factor was computed; a host-side
    count, so a step skipped for a non-finite gradient still counts).

    Bytes per parameter: 8 plus 4 per tensor; plus 2 for Kahan on bf16; plus ``4 k^2 / numel``
    for a cached factor.

    Example::

        opt = kaon.OAdamW(model, lr=1e-3)             # matrices to Muon, the rest to Adam
        loss.backward(); opt.step(); opt.zero_grad()

    References: M. Wortsman et al., "Stable and low-precision training for large-scale
    vision-language models", 2023 (StableAdamW); B. Warner, optimi; K. Jordan, "Muon", 2024.
    """

    #: not on the compiled path by default (``fused=None``): its rule reads per-parameter state outside the batch (``batch.params``)
    fusable = False

    #: the age of the cached Newton-Schulz factor (update_proj_gap), kept beside the slots
    extra_state_keys = ("accumulated_grad", "ns_factor_age")

    #: build_optimizer may set the per-group ``muon`` key
    supports_muon_routing = True

    hyperparameter_checks: dict[str, Check] = {
        "lr": real(0.0),
        "betas": pair(real(0.0, 1.0, high_inclusive=False), real(0.0, 1.0, high_inclusive=False)),
        "weight_decay": real(0.0),
        "eps": real(0.0, 1e18, low_inclusive=False),  # eps**2 floors v: finite in float32
        "decouple_lr": boolean(),
        "max_lr": optional(real(0.0, low_inclusive=False)),
        "maximize": boolean(),
        "muon": boolean(),
        "ns_steps": integer(1, 100),
        "update_proj_gap": integer(1),
        "scale": real(0.0),
        "ns_dtype": choice(*NS_DTYPES),
        "bf16_method": choice(*BF16_METHODS),
    }
    layout_keys = ("muon", "update_proj_gap", "bf16_method")
    #: optimi StableAdamW / OAdamW arguments kaon maps or refuses (docs/migrating.md);
    #: ``training_args`` is read by :meth:`upstream_call`
    upstream_arguments = {
        "kahan_sum": upstream.rename(
            _OPTIMI, "bf16_method", _kahan_sum,
            "`bf16_method`: None / True -> 'kahan' (the default), False -> 'none'"),
        "foreach": upstream.rename(
            _OPTIMI, "foreach", _foreach, "`foreach`: None -> True (kaon batches every path)"),
        "triton": upstream.ignored(
            _OPTIMI, "kaon picks its own execution path; the math is the same",
            when=lambda v: v is None or isinstance(v, bool),
            use="triton must be None, True or False"),
        "gradient_release": upstream.ignored(
            _OPTIMI, "every kaon optimizer steps one parameter at a time when "
            "kaon.prepare_for_gradient_release(model, opt) registers the hooks (optimi's "
            "prepare_for_gradient_release call becomes kaon's)",
            when=lambda v: isinstance(v, bool), use="gradient_release must be True or False"),
    }

    @classmethod
    def upstream_call(cls, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """OAdamW's ``OAdamW(params, training_args, ...)``: an object passed second (or as
        ``training_args=``) with ``learning_rate`` / ``weight_decay`` attributes overrides
        ``lr`` / ``weight_decay`` where those attributes are not None, as upstream."""
        if len(args) >= 2 and not isinstance(args[1], (int, float, Tensor)):
            if "training_args" in kwargs:
                raise TypeError("OAdamW: training_args given twice (positionally and by name)")
            kwargs = {**kwargs, "training_args": args[1]}
            args = (args[0], *args[2:])
        training_args = kwargs.pop("training_args", None)
        if training_args is not None:
            for attribute, key in (("learning_rate", "lr"), ("weight_decay", "weight_decay")):
                if not hasattr(training_args, attribute):
                    raise TypeError(f"OAdamW: training_args has no attribute {attribute!r} "
                                    "(a transformers.TrainingArguments-like object is expected)")
                value = getattr(training_args, attribute)
                if value is not None:
                    kwargs[key] = value
        return args, kwargs

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1e-2,
        eps: float = 1e-6,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        *,
        maximize: bool = False,
        muon: bool = False,
        ns_steps: int = 5,
        update_proj_gap: int = 1,
        scale: float = 1.0,
        ns_dtype: str = "float32",
        bf16_method: str = "kahan",
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
    ) -> None:
        if isinstance(params, nn.Module):
            params = _module_groups(params)
        defaults = dict(
            lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, decouple_lr=decouple_lr,
            max_lr=max_lr, maximize=maximize, muon=muon, ns_steps=ns_steps,
            update_proj_gap=update_proj_gap, scale=scale, ns_dtype=ns_dtype,
            bf16_method=bf16_method,
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with ``decouple_lr`` and no ``max_lr``, ``max_lr`` is the group's lr."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["decouple_lr"] and group["max_lr"] is None:
            group["max_lr"] = group["lr"]

    # ------------------------------------------------------------------------ layout and rule
    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return factored.matrix_shape(tuple(p.shape))

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        slots = [
            Slot("exp_avg", FloatCodec(), view),
            Slot("exp_avg_sq", FloatCodec(), view),
            Slot("step", FloatCodec(), (1,)),
        ]
        if _orthogonalized(group, view) and group["update_proj_gap"] > 1:
            k = min(view)
            slots.append(Slot(_FACTOR, FloatCodec(), (k, k)))
        return slots

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        beta1, beta2 = group["betas"]
        eps = float(group["eps"])  # an int eps (2**40) would square past int64
        per_slice = (batch.size,) + (1,) * len(batch.view)
        new_state: dict[str, Tensor] = {}

        g = batch.grad
        muon = _orthogonalized(group, batch.view)
        if muon:
            g = self._orthogonalize(batch, new_state)

        # debiased betas per parameter, in float64 ([N, 1])
        step = state["step"].add_(1.0)
        t = step.double()
        beta1_hat = ((beta1**t - beta1) / (beta1**t - 1)).float().view(per_slice)
        beta2_hat = ((beta2**t - beta2) / (beta2**t - 1)).float().view(per_slice)

        m = state["exp_avg"].lerp_(g, 1 - beta1_hat)
        squared = torch.mul(g, g, out=batch.scratch("squared"))
        v = state["exp_avg_sq"].mul_(beta2_hat).addcmul_(squared, 1 - beta2_hat)

        # eta = lr / max(1, RMS(g / sqrt(max(v, eps^2)))), per tensor, on the device
        floor = torch.clamp_min(v, eps * eps, out=batch.scratch("floor"))
        ratio = squared.div_(floor).reshape(batch.size, -1)
        rms = ops.mean(ratio).sqrt_().clamp_min_(1.0).view(per_slice)
        eta = rms.reciprocal_().mul_(group["lr"])

        denom = torch.sqrt(v, out=floor).add_(eps)
        delta = torch.div(m, denom, out=denom)
        delta.mul_(eta * group["scale"] if muon else eta)
        decay = group["weight_decay"]
        if group["decouple_lr"]:  # fully decoupled: eta / max_lr is the schedule's factor
            max_lr = group["max_lr"] if group["max_lr"] is not None else group["lr"]
            decay = decay / max_lr if isinstance(max_lr, Tensor) or max_lr > 0 else 0.0
        if decay != 0:
            delta.addcmul_(batch.param, eta * decay)
        new_state.update({"exp_avg": m, "exp_avg_sq": v, "step": step})
        return delta, new_state

    def _orthogonalize(self, batch: Batch, new_state: dict[str, Tensor]) -> Tensor:
        """``NS(g)`` for a batch of matrices; with a gap, the cached-factor form in between."""
        group = batch.group
        steps, dtype = group["ns_steps"], NS_DTYPES[group["ns_dtype"]]
        g = batch.grad
        gap = group["update_proj_gap"]
        if gap == 1:
            return ops.newton_schulz(g, steps, dtype=dtype, eps=_NS_EPS)
        states = [self.state[p] for p in batch.params]
        ages = [s.get(_FACTOR_AGE) for s in states]
        refresh = [age is None or age + 1 >= gap for age in ages]
        for s, fresh, age in zip(states, refresh, ages):
            s[_FACTOR_AGE] = 0 if fresh else age + 1
        # the slot holds L - I, so fresh state (zeros) is the identity factor
        offset = batch.state[_FACTOR]
        def iterate(m: Tensor) -> tuple[Tensor, Tensor]:
            return _newton_schulz_with_factor(m, steps, dtype)

        def apply(m: Tensor, o: Tensor) -> Tensor:
            return _apply_factor(m, o, dtype)

        # slice_by_slice: CPU batched matmuls would make the result depend on the batch
        if all(refresh):
            out, new_offset = ops.slice_by_slice(iterate, g)
        elif not any(refresh):
            out, new_offset = ops.slice_by_slice(apply, g, offset), offset
        else:  # parameters of one chunk on different schedules (one joined later)
            fresh_out, fresh_offset = ops.slice_by_slice(iterate, g)
            mask = torch.tensor(refresh, device=g.device).view(-1, 1, 1)
            out = torch.where(mask, fresh_out, ops.slice_by_slice(apply, g, offset))
            new_offset = torch.where(mask, fresh_offset, offset)
        new_state[_FACTOR] = new_offset
        return out


def _orthogonalized(group: dict[str, Any], view: tuple[int, ...]) -> bool:
    return bool(group["muon"]) and len(view) == 2


def _normalized_wide(matrix: Tensor, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``M / max(||M||_F, eps)`` per slice in ``dtype``, transposed when tall."""
    norm = ops.sum_squares(matrix.reshape(matrix.shape[0], -1), dim=-1).sqrt_()
    x = (matrix / norm.clamp_min_(_NS_EPS).view(-1, 1, 1)).to(dtype)
    tall = matrix.shape[-2] > matrix.shape[-1]
    return (x.mT if tall else x), tall


def _newton_schulz_with_factor(
    matrix: Tensor, steps: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Newton-Schulz (as :func:`kaon.ops.newton_schulz`) that also returns its left factor.

    Every iteration multiplies ``X`` on the left by ``P = a I + b A + c A^2`` (``A = X X^T``), so
    the result is ``L X_0`` with ``L`` the product of the ``P``. Returns the fp32 result and
    ``L - I`` ``[N, k, k]`` (fp32), the form ``update_proj_gap`` caches.
    """
    a, b, c = ops.NS_COEFFICIENTS
    x, tall = _normalized_wide(matrix, dtype)
    factor = torch.eye(x.shape[-2], dtype=dtype, device=x.device).expand(x.shape[0], -1, -1)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        poly.diagonal(dim1=-2, dim2=-1).add_(a)
        x = poly @ x
        factor = poly @ factor
    if tall:
        x = x.mT
    offset = factor.float()
    offset.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return x.float().contiguous(), offset


def _apply_factor(matrix: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    """``L (G / ||G||_F)`` with ``L = offset + I``: the fresh gradient, cached factor."""
    x, tall = _normalized_wide(matrix, dtype)
    factor = offset.clone()
    factor.diagonal(dim1=-2, dim2=-1).add_(1.0)
    x = factor.to(dtype) @ x
    return (x.mT if tall else x).float().contiguous()


def _module_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Muon and Adam groups for a module (see the ``params`` argument of :class:`OAdamW`)."""
    adam_only: set[int] = set()
    linears = []
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            adam_only.add(id(module.weight))
        elif isinstance(module, nn.Linear):
            linears.append(module)
    if linears:
        adam_only.add(id(linears[-1].weight))  # the output head
    hidden, rest = [], []
    for p in model.parameters():  # tied parameters appear once
        if p.requires_grad:
            (hidden if p.ndim >= 2 and id(p) not in adam_only else rest).append(p)
    groups = [{"params": hidden, "muon": True}, {"params": rest, "muon": False}]
    return [g for g in groups if g["params"]]
