"""Muon (Keller Jordan et al.): orthogonalized momentum for hidden matrices, AdamW for the rest.

Decisions (see ``docs/muon.md``): EMA momentum with Nesterov by default (torch.optim.Muon's and
Keller Jordan's form), quintic Newton-Schulz in bf16 with tall matrices transposed, torch's
``adjust_lr_fn`` scales (default ``sqrt(max(1, R/C))``) on the whole parameter's matrix view,
conv kernels seen as ``[out, in*kh*kw]``, decoupled weight decay ``p <- p - lr wd p``.
Parameters that are not hidden matrices take an AdamW path (:func:`kaon.optim.adamw.
adam_direction`) inside the same optimizer, so their state is ordinary per-parameter state and
part of ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

from kaon import distributed, ops
from kaon.engine import Batch, Slot
from kaon.optim.adamw import adam_direction, adam_state_slots, check_state_dtype, decoupled_decay_
from kaon.optimizer import KaonOptimizer
from kaon.precision import BF16_METHODS
from kaon.state import factored
from kaon.state.codecs import MOMENTUM_DTYPES, momentum_codec
from kaon.validation import Check, boolean, check_all, choice, integer, optional, pair, real

__all__ = ["Muon", "ADJUST_LR_FNS", "MAX_ASPECT_RATIO", "is_hidden_matrix", "update_scale"]

#: torch.optim.Muon's learning-rate adjustments (None means "original")
ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral_unclamped")
#: a matrix whose sides differ by more than this factor is not treated as a hidden matrix
MAX_ASPECT_RATIO = 10.0
_NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def is_hidden_matrix(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether ``muon=None`` routes a parameter of this shape to the orthogonalized path:
    ndim >= 2 and, in the ``[out, in*kh*kw]`` view, ``max(R, C) / min(R, C) <= 10``."""
    if len(shape) < 2:
        return False
    rows, cols = factored.matrix_shape(tuple(shape))
    if min(rows, cols) == 0:
        return False
    return max(rows, cols) / min(rows, cols) <= MAX_ASPECT_RATIO


def update_scale(rows: int, cols: int, adjust_lr_fn: str | None) -> float:
    """The shape-dependent factor on the orthogonalized update (torch's ``adjust_lr_fn``).

    ``"original"`` / None: ``sqrt(max(1, R / C))`` (Keller Jordan); ``"match_rms_adamw"``:
    ``0.2 sqrt(max(R, C))`` (Moonshot; reuses AdamW's lr and weight decay);
    ``"spectral_unclamped"``: ``sqrt(R / C)`` (Bernstein).
    """
    if adjust_lr_fn in (None, "original"):
        return max(1.0, rows / cols) ** 0.5
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, cols) ** 0.5
    if adjust_lr_fn == "spectral_unclamped":
        return (rows / cols) ** 0.5
    raise ValueError(f"adjust_lr_fn must be None or one of {ADJUST_LR_FNS}; got {adjust_lr_fn!r}")


#: bound on each Newton-Schulz coefficient: larger ones overflow the iteration's matrices
_MAX_NS_COEFFICIENT = 100.0


def _coefficients(name: str, value: Any) -> None:
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be a triple of three real numbers (a, b, c); got "
                        f"{value!r}")
    for label, v in zip("abc", value):
        real(-_MAX_NS_COEFFICIENT, _MAX_NS_COEFFICIENT)(f"{name}[{label}]", v)
    if not _bounded_iteration(*(float(v) for v in value)):
        raise ValueError(
            f"{name} must keep the Newton-Schulz iteration bounded (the quintic "
            f"a s + b s^3 + c s^5 must map some interval [0, B], 1 <= B <= 2, into [-B, B]); "
            f"got {value!r}, whose iteration diverges")


def _bounded_iteration(a: float, b: float, c: float) -> bool:
    """Whether ``s -> a s + b s^3 + c s^5`` maps ``[0, B]`` into ``[-B, B]`` for some ``B`` in
    [1, 2]: the singular values (at most 1 after the normalization) then stay at most ``B``
    for any number of steps."""
    grid = [2.0 * i / 4000 for i in range(4001)]
    peaks = []
    worst = 0.0
    for s in grid:
        worst = max(worst, abs(a * s + b * s**3 + c * s**5))
        peaks.append((s, worst))
    return any(bound >= 1.0 and worst <= bound for bound, worst in peaks)


def _routed(params: Any, muon: bool) -> list[dict[str, Any]]:
    """``params`` (tensors or group dicts) as groups with ``muon`` set (a group's own ``muon``
    key is overridden: the list it came in decides)."""
    if isinstance(params, Tensor):
        params = [params]
    items = list(params)
    if items and all(isinstance(item, dict) for item in items):
        return [{**item, "muon": muon} for item in items]
    if any(isinstance(item, dict) for item in items):
        raise TypeError("Muon(muon_params, adam_params): each list must hold tensors or groups, "
                        "not both")
    return [{"params": items, "muon": muon}] if items else []


class Muon(KaonOptimizer, names=("Muon",)):
    r"""Muon: momentum orthogonalized by Newton-Schulz for hidden matrices, AdamW for the rest.

    Orthogonalized path (a parameter seen as the matrix ``[R, C] = [out, in*kh*kw]``)::

        B <- momentum B + (1 - momentum) g                       (EMA momentum)
        U = g + momentum (B - g)  if nesterov  else  B
        O = NS(U): X = U / max(||U||_F, eps); ns_steps times A = X X^T, X <- a X + (b A + c A^2) X
            (in ns_dtype; a tall U is transposed first so A is the smaller Gram matrix)
        p <- p - lr weight_decay p - lr scale(R, C) O

    with ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` and ``scale`` from ``adjust_lr_fn``
    (default ``sqrt(max(1, R/C))``). With float32 momentum and ``ns_dtype="float32"`` on both
    sides this is ``torch.optim.Muon`` on 2-D parameters; with the defaults it agrees to bf16
    rounding.

    AdamW path (1-D parameters, embeddings, output heads, matrices with aspect ratio > 10)::

        AdamW (:func:`kaon.optim.adamw.adam_direction`) with lr ``adam_lr * lr / base_lr``,
        ``adam_betas``, ``adam_eps`` and the group's weight_decay (decoupled)

    ``base_lr`` is the group's lr when it was added, so an lr scheduler acting on ``lr`` scales
    both paths alike (and ``lr = 0`` freezes both).

    Routing is the per-group key ``muon``: True (orthogonalized; a parameter with fewer than 2
    dimensions raises ``ValueError``), False (AdamW path), None (default: per parameter,
    :func:`is_hidden_matrix`). :func:`kaon.build_optimizer` sets it from the model (embeddings
    and the output head to False).

    Args:
        params: parameters or parameter groups.
        lr (float, default 0.02): learning rate of the orthogonalized path.
        momentum (float, default 0.95): EMA coefficient of the momentum, in [0, 1).
        weight_decay (float, default 0.0): decoupled weight decay of both paths.
        nesterov (bool, default True): Nesterov momentum.
        ns_steps (int, default 5): Newton-Schulz iterations (>= 1).
        ns_coefficients (tuple, default (3.4445, -4.7750, 2.0315)): quintic coefficients.
        eps (float, default 1e-7): floor of the Frobenius norm before the iteration.
        adjust_lr_fn (str or None, default "original"): the update scale, see
            :func:`update_scale`.
        ns_dtype (str, default "bfloat16"): "bfloat16" or "float32" for the iteration.
        momentum_dtype (str, default "bfloat16"): storage of the momentum: "float32",
            "bfloat16", "int8" or "4bit".
        adam_lr (float or None, default 3e-4): lr of the AdamW path at the group's initial lr;
            None: the group's lr itself.
        adam_betas (tuple, default (0.9, 0.95)), adam_eps (float, default 1e-8): AdamW path.
        adam_state_dtype (str or pair, default "float32"): AdamW path state, as
            :class:`kaon.AdamW`'s ``state_dtype``.
        muon (bool or None, default None): routing, see above.
        maximize (bool, default False): maximize the objective.
        bf16_method (str, default "stochastic_rounding"): write-back of bf16/fp16 parameters.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.

    State per parameter: orthogonalized path ``momentum_buffer`` ``[R, C]`` in
    ``momentum_dtype`` (+ ``momentum_buffer_scale`` for int8 / 4bit); AdamW path ``step``,
    ``exp_avg``, ``exp_avg_sq`` (torch's keys); ``shift`` with Kahan on a bf16 parameter.

    Bytes per parameter: orthogonalized path 4 / 2 / ``1 + 4/C`` / ``0.53`` (float32 /
    bfloat16 / int8 / 4bit momentum); AdamW path as :class:`kaon.AdamW` (8 with float32).

    Example::

        opt = kaon.build_optimizer(model, "Muon", lr=0.02, weight_decay=0.01)
        # or by hand: hidden matrices and the rest in one optimizer
        opt = kaon.Muon([{"params": hidden, "muon": True},
                         {"params": others, "muon": False}], lr=0.02, adam_lr=3e-4)
    """

    #: not on the compiled path by default (``fused=None``): Newton-Schulz is matmul-bound (nothing to fuse) and runs slice by slice
    fusable = False

    supports_muon_routing: ClassVar[bool] = True

    hyperparameter_checks: ClassVar[dict[str, Check]] = {
        "lr": real(0.0),
        "momentum": real(0.0, 1.0, high_inclusive=False),
        "weight_decay": real(0.0),
        "nesterov": boolean(),
        "ns_steps": integer(1, 100),
        "ns_coefficients": _coefficients,
        "eps": real(0.0),
        "adjust_lr_fn": optional(choice(*ADJUST_LR_FNS)),
        "ns_dtype": choice(*_NS_DTYPES),
        "momentum_dtype": choice(*MOMENTUM_DTYPES),
        "adam_lr": optional(real(0.0)),
        "adam_betas": pair(real(0.0, 1.0, high_inclusive=False),
                           real(0.0, 1.0, high_inclusive=False)),
        "adam_eps": real(0.0),
        "adam_state_dtype": check_state_dtype,
        "muon": optional(boolean()),
        "maximize": boolean(),
        "bf16_method": choice(*BF16_METHODS),
    }
    layout_keys = ("muon", "momentum_dtype", "adam_state_dtype", "bf16_method")

    @classmethod
    def upstream_call(cls, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """KempnerForge's two-list call ``Muon(muon_params, adam_params, lr=0.02, ...)``.

        The first list's parameters (tensors or groups) take the orthogonalized path
        (``muon=True``), the second's the AdamW path (``muon=False``), and KempnerForge's
        meanings of the defaults apply unless given: ``adam_lr=None`` (the AdamW path at the
        Muon lr, as upstream's ``adam_lr or lr``) and ``nesterov=False`` (upstream's plain
        heavy-ball momentum: after the Frobenius normalization kaon's EMA buffer gives the same
        update) and ``ns_dtype="float32"`` (upstream iterates in float32).
        """
        if len(args) < 2 or isinstance(args[1], (int, float, Tensor)):
            return args, kwargs
        groups = [*_routed(args[0], True), *_routed(args[1], False)]
        kwargs = {"adam_lr": None, "nesterov": False, "ns_dtype": "float32", **kwargs}
        return (groups, *args[2:]), kwargs

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_coefficients: tuple[float, float, float] = ops.NS_COEFFICIENTS,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = "original",
        ns_dtype: str = "bfloat16",
        momentum_dtype: str = "bfloat16",
        adam_lr: float | None = 3e-4,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        adam_state_dtype: str | tuple[str, str] = "float32",
        muon: bool | None = None,
        maximize: bool = False,
        bf16_method: str = "stochastic_rounding",
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
    ) -> None:
        check_all({"ns_coefficients": _coefficients}, {"ns_coefficients": ns_coefficients},
                  type(self).__name__)  # before tuple() below, so the message names it
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients), eps=eps,
            adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, momentum_dtype=momentum_dtype,
            adam_lr=adam_lr, adam_betas=adam_betas, adam_eps=adam_eps,
            adam_state_dtype=adam_state_dtype, muon=muon, maximize=maximize,
            bf16_method=bf16_method,
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "base_lr" not in group:
            group["base_lr"] = float(group["lr"])

    def check_group(self, group: dict[str, Any], owner: str) -> None:
        """``muon=True`` only over parameters of 2 or more dimensions (checked when the group is
        added or loaded, not at the first step)."""
        super().check_group(group, owner)
        if group.get("muon") is True:
            for p in group.get("params", []):
                if isinstance(p, Tensor):
                    self.orthogonalized(p, group)

    # ------------------------------------------------------------------------ layout
    def orthogonalized(self, p: Tensor, group: dict[str, Any]) -> bool:
        """Whether ``p`` takes the orthogonalized path under ``group``'s ``muon`` key."""
        route = group["muon"]
        if route is None:  # by the whole tensor's shape (a FSDP2 shard's stand-in: its DTensor)
            return is_hidden_matrix(distributed.original(p).shape)
        if route and p.ndim < 2:
            raise ValueError(
                f"Muon: a parameter of shape {tuple(p.shape)} is in a group with muon=True, but "
                "only parameters with 2 or more dimensions can be orthogonalized (use muon=False "
                "or None for it)"
            )
        return route

    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        if self.orthogonalized(p, group):
            return factored.matrix_shape(tuple(p.shape))
        return super().view_shape(p, group)

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        if self.orthogonalized(p, group):
            return [Slot("momentum_buffer", momentum_codec(group["momentum_dtype"]), view)]
        return adam_state_slots(view, group["adam_state_dtype"], amsgrad=False)

    # -------------------------------------------------------------------------- rule
    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if "momentum_buffer" in batch.slots:
            return self._orthogonalized_update(batch)
        return self._adamw_update(batch)

    def _orthogonalized_update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, g = batch.group, batch.grad
        mu, lr = group["momentum"], group["lr"]
        buffer = batch.state["momentum_buffer"].lerp_(g, 1.0 - mu)
        direction = torch.lerp(g, buffer, mu) if group["nesterov"] else buffer
        delta = ops.newton_schulz(
            direction, group["ns_steps"], dtype=_NS_DTYPES[group["ns_dtype"]],
            eps=group["eps"], coefficients=tuple(group["ns_coefficients"]),
        )
        rows, cols = batch.view
        delta.mul_(lr * update_scale(rows, cols, group["adjust_lr_fn"]))
        decoupled_decay_(delta, batch.param, lr, group["weight_decay"],
                         out=batch.scratch("decay"))
        return delta, {"momentum_buffer": buffer}

    def _adamw_update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        lr = adamw_path_lr(group)
        delta = adam_direction(
            batch.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
            group["adam_betas"], group["adam_eps"], out=batch.scratch("direction"),
        )
        delta.mul_(lr)
        decoupled_decay_(delta, batch.param, lr, group["weight_decay"],
                         out=batch.scratch("decay"))
        return delta, state


def adamw_path_lr(group: dict[str, Any]) -> float | Tensor:
    """The AdamW path's lr: ``adam_lr * lr / base_lr`` (``lr`` itself when adam_lr is None)."""
    lr, adam_lr = group["lr"], group["adam_lr"]
    if adam_lr is None:
        return lr
    base = group.get("base_lr", lr)
    if isinstance(base, Tensor):
        base = float(base)
    if base == 0:
        return adam_lr * (lr != 0)  # created at lr 0: full adam_lr once lr is non-zero
    return adam_lr * (lr / base)
