"""AdamW (Loshchilov & Hutter) with torch's arguments, quantized state and torch's fused kernel.

The Adam moment math lives once, in :func:`adam_direction`; :class:`AdamW` and the AdamW path of
:class:`kaon.Muon` both call it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam

from kaon import engine
from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.precision import BF16_METHODS
from kaon.state.codecs import (
    Codec,
    FloatCodec,
    LogSpace4BitCodec,
    LogSpace8BitCodec,
    momentum_codec,
)
from kaon.validation import Check, boolean, choice, optional, pair, real

__all__ = [
    "AdamW",
    "STATE_DTYPES",
    "SECOND_MOMENT_DTYPES",
    "adam_direction",
    "adam_state_slots",
    "check_state_dtype",
    "decoupled_decay_",
]

#: storage of both moments (``state_dtype="int8"`` / ``"4bit"`` store the second moment in the
#: log-space codec of that width: a linear code would round small ``v`` to zero)
STATE_DTYPES = ("float32", "bfloat16", "int8", "4bit")
#: storage of the second moment when ``state_dtype`` is a pair
SECOND_MOMENT_DTYPES = ("float32", "bfloat16", "log8", "log4", "int8", "4bit")
_SECOND_MOMENT_ALIASES = {"int8": "log8", "4bit": "log4"}
_LOG_BLOCK = 256


def check_state_dtype(name: str, value: Any) -> None:
    """A :mod:`kaon.validation` check: one of STATE_DTYPES, or a pair (first moment dtype,
    second moment dtype)."""
    if isinstance(value, (tuple, list)):
        pair(choice(*STATE_DTYPES), choice(*SECOND_MOMENT_DTYPES))(name, value)
        return
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be one of {', '.join(map(repr, STATE_DTYPES))} or a pair "
            f"(first moment, second moment); got {value!r}"
        )
    choice(*STATE_DTYPES)(name, value)


def _unsupported(name: str, value: Any) -> None:
    if value is not False:
        raise ValueError(f"{name} must be False (accepted for torch compatibility, not "
                         f"supported); got {value!r}")


def _moment_dtypes(state_dtype: str | tuple[str, str]) -> tuple[str, str]:
    if isinstance(state_dtype, str):
        first, second = state_dtype, state_dtype
    else:
        first, second = state_dtype
    return first, _SECOND_MOMENT_ALIASES.get(second, second)


def _second_moment_codec(dtype: str) -> Codec:
    if dtype == "log8":
        return LogSpace8BitCodec(_LOG_BLOCK)
    if dtype == "log4":
        return LogSpace4BitCodec(_LOG_BLOCK)
    return momentum_codec(dtype)  # float32 / bfloat16


def adam_state_slots(
    view: tuple[int, ...], state_dtype: str | tuple[str, str], amsgrad: bool
) -> list[Slot]:
    """The Adam state of one parameter, under torch's key names: ``step`` (fp32 scalar),
    ``exp_avg``, ``exp_avg_sq`` and, with ``amsgrad``, ``max_exp_avg_sq``."""
    first, second = _moment_dtypes(state_dtype)
    slots = [
        Slot("step", FloatCodec(), ()),
        Slot("exp_avg", momentum_codec(first), view),
        Slot("exp_avg_sq", _second_moment_codec(second), view),
    ]
    if amsgrad:
        slots.append(Slot("max_exp_avg_sq", _second_moment_codec(second), view))
    return slots


def _bias_correction(beta: float, step: Tensor) -> Tensor:
    """``1 - beta**step`` without the cancellation of fp32 ``1 - 0.999**1``."""
    beta = float(beta)
    if beta == 0.0:
        return torch.ones_like(step)
    return torch.expm1(step * math.log(beta)).neg_()


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    betas: tuple[float, float],
    eps: float,
    *,
    max_exp_avg_sq: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    r"""Advance the Adam moments in place and return the bias-corrected direction.

    For a batch ``[N, ...]`` (``step`` is ``[N]``)::

        step <- step + 1
        exp_avg    <- beta1 exp_avg    + (1 - beta1) g
        exp_avg_sq <- beta2 exp_avg_sq + (1 - beta2) g^2
        (amsgrad)  max_exp_avg_sq <- max(max_exp_avg_sq, exp_avg_sq); v = max_exp_avg_sq
        direction  = (exp_avg / (1 - beta1^step)) / (sqrt(v / (1 - beta2^step)) + eps)

    The caller multiplies by the learning rate and adds weight decay. ``out`` (optional) is a
    scratch tensor shaped like ``grad`` that receives the direction.
    """
    beta1, beta2 = float(betas[0]), float(betas[1])
    step.add_(1.0)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        second = torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    shape = (step.shape[0],) + (1,) * (grad.ndim - 1)
    bc1 = _bias_correction(beta1, step).view(shape)
    bc2_sqrt = _bias_correction(beta2, step).sqrt_().view(shape)
    denom = torch.sqrt(second, out=out).div_(bc2_sqrt).add_(eps)
    return torch.div(exp_avg, denom, out=denom).div_(bc1)


def decoupled_decay_(
    delta: Tensor, param: Tensor, lr: float | Tensor, weight_decay: float,
    out: Tensor | None = None,
) -> Tensor:
    """``delta += p - p * (1 - lr * weight_decay)``, in place.

    This is ``lr * weight_decay * p`` computed the way ``torch.optim.AdamW`` applies it
    (``p.mul_(1 - lr * wd)`` with the factor rounded to the parameter's precision), so kaon's
    fp32 result follows torch's rounding; ``p - p * c`` is exact for ``c`` near 1. ``out`` is an
    optional scratch tensor shaped like ``param``.
    """
    if weight_decay == 0:
        return delta
    kept = torch.mul(param, 1.0 - lr * weight_decay, out=out)
    return delta.add_(torch.sub(param, kept, out=kept))


class AdamW(KaonOptimizer, names=("AdamW",)):
    r"""AdamW with torch's arguments, a choice of state storage and torch's fused kernel.

    For a gradient ``g`` (negated with ``maximize``), per parameter::

        t <- t + 1
        m <- beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2          (amsgrad: v_max <- max(v_max, v), use v_max)
        p <- p - lr * weight_decay * p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    written into bf16/fp16 parameters with ``bf16_method``. With ``state_dtype="float32"`` this
    is ``torch.optim.AdamW`` (same arguments, defaults and state keys); where nothing
    kaon-specific is needed (float32 state, fp32 parameters, a device with a fused kernel) the
    step runs torch's fused AdamW kernel on the same state tensors (``fused=None``: automatic).

    Args:
        params: parameters or parameter groups.
        lr (float or Tensor, default 1e-3): learning rate.
        betas (tuple, default (0.9, 0.999)): decay of the two moments, each in [0, 1).
        eps (float, default 1e-8): added to ``sqrt(v_hat)``.
        weight_decay (float, default 1e-2): decoupled weight decay (``p <- p - lr wd p``).
        amsgrad (bool, default False): use the running maximum of ``v``.
        maximize (bool, default False): maximize the objective.
        foreach (bool or None, default None): batch same-shaped tensors on the engine path
            (None = True).
        fused (bool or None, default None): None: torch's fused kernel whenever it computes
            exactly this step (float32 state, fp32 parameters and gradients, a device torch has
            the kernel for, all gradients finite under ``nonfinite_grad="skip"``), else kaon's
            compiled path (:mod:`kaon.fused`: quantized state, bf16 weights) under its default
            policy, else the engine's eager rule; True: torch's kernel where exact, else always
            the compiled path; False: neither (the eager rule). kaon's hand-written Triton
            kernel is not chosen by ``fused``; see docs/kernels.md.
        capturable, differentiable (bool, default False): accepted for torch compatibility;
            True raises ``ValueError`` (not supported).
        state_dtype (str or pair, default "float32"): storage of the moments: "float32",
            "bfloat16", "int8" or "4bit" for both, or a pair (first, second). The second moment
            in "int8" / "4bit" uses the log-space codec of that width ("log8" / "log4": per
            block of 256, exact zero, never rounds a small value to zero); a pair may also name
            "log8" / "log4" or a float dtype for it.
        bf16_method (str, default "stochastic_rounding"): write-back of bf16/fp16 parameters:
            "stochastic_rounding", "kahan" or "none".
        foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.

    State per parameter (torch's keys): ``step`` fp32 scalar, ``exp_avg``, ``exp_avg_sq``
    (plus ``_scale`` / ``_offset`` for quantized ones), ``max_exp_avg_sq`` with amsgrad, and
    ``shift`` with Kahan on a bf16 parameter.

    Bytes per parameter (both moments, large matrices): float32 8, bfloat16 4, int8
    ``2 + 4/C + 8/256`` (about 2.035), 4bit ``1 + 8/256 + 4/128`` (about 1.06); +50 % of that
    for amsgrad, +2 for Kahan on bf16.

    Example::

        opt = kaon.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, state_dtype="int8")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    hyperparameter_checks: dict[str, Check] = {
        "lr": real(0.0),
        "betas": pair(real(0.0, 1.0, high_inclusive=False), real(0.0, 1.0, high_inclusive=False)),
        "eps": real(0.0),
        "weight_decay": real(0.0),
        "amsgrad": boolean(),
        "maximize": boolean(),
        "fused": optional(boolean()),
        "capturable": _unsupported,
        "differentiable": _unsupported,
        "state_dtype": check_state_dtype,
        "bf16_method": choice(*BF16_METHODS),
    }
    layout_keys = ("state_dtype", "amsgrad", "bf16_method")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: str | tuple[str, str] = "float32",
        bf16_method: str = "stochastic_rounding",
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
    ) -> None:
        optional(boolean())("foreach", foreach)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, fused=fused, capturable=capturable, differentiable=differentiable,
            state_dtype=state_dtype, bf16_method=bf16_method,
        )
        super().__init__(
            params, defaults, foreach=True if foreach is None else foreach,
            foreach_batch_cutoff=foreach_batch_cutoff, foreach_stack_budget=foreach_stack_budget,
            nonfinite_grad=nonfinite_grad, seed=seed,
            # what torch's kernel cannot run exactly (quantized state, bf16 weights) runs on
            # kaon's compiled path (kaon.fused) under its policy: always if True, never if False
            fused=fused,
        )

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        return adam_state_slots(view, group["state_dtype"], group["amsgrad"])

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        delta = adam_direction(
            batch.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["betas"],
            group["eps"], max_exp_avg_sq=state.get("max_exp_avg_sq"),
            out=batch.scratch("direction"),
        )
        delta.mul_(group["lr"])
        decoupled_decay_(delta, batch.param, group["lr"], group["weight_decay"],
                         out=batch.scratch("decay"))
        return delta, state

    # ------------------------------------------------------------------ torch's fused kernel
    def fused_blocker(self, group: dict[str, Any], params: list[Tensor]) -> str | None:
        """Why torch's fused kernel cannot run this step of ``params`` exactly (None: it can)."""
        if _moment_dtypes(group["state_dtype"]) != ("float32", "float32"):
            return f"state_dtype={group['state_dtype']!r} (the kernel keeps float32 state)"
        for p in params:
            blocker = self._param_blocker(p)
            if blocker is not None:
                return blocker
        return None

    @staticmethod
    def _param_blocker(p: Tensor, with_grad: bool = True) -> str | None:
        """Why the fused kernel cannot run ``p`` exactly; decided per parameter, so that a
        parameter takes the same kernel in ``step()`` as in ``step_param()`` whatever its
        neighbours in the group are (issue 17, case 11). ``with_grad=False``: the parameter
        alone (when its group is made)."""
        grad = p.grad if with_grad else p
        if p.dtype is not torch.float32 or grad.dtype is not torch.float32:
            return (f"a parameter or gradient is {p.dtype}/{grad.dtype} (the kernel "
                    "would round bf16 weights to nearest; kaon's write-back runs instead)")
        if type(p) not in (Tensor, torch.nn.Parameter) or p.device.type not in _fused_devices():
            return f"a parameter is a {type(p).__name__} on {p.device.type}"
        if p.ndim == 0:
            return "a parameter is 0-D (its state is stored as shape (1,))"
        if not (p.is_contiguous() and grad.is_contiguous()):
            # torch's fused CPU kernel walks the storage linearly: on a strided view it
            # writes into the neighbouring elements of the base tensor
            return "a parameter or gradient is not contiguous"
        return None

    def fused_step(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        if group["fused"] is False:
            return False
        if _moment_dtypes(group["state_dtype"]) != ("float32", "float32"):
            return False  # the engine runs the rule: compiled (kaon.fused) or eager
        fusable = [p for p in params if self._param_blocker(p) is None]
        if fusable and self.nonfinite_grad != "none":
            # one read of the gradients (their largest magnitudes, which cannot overflow): a
            # non-finite one, or one so large that its square would overflow the kernel's fp32
            # second moment, sends its parameter to the engine, which skips it exactly or
            # scales it into range (kaon.engine.screen_gradients)
            peaks = torch.stack(torch._foreach_norm([p.grad for p in fusable], ord=math.inf))
            safe = (peaks <= engine.GRAD_SAFE_MAX).tolist()  # NaN compares false
            fusable = [p for p, ok in zip(fusable, safe) if ok]
        if not fusable:
            return False
        if len(fusable) < len(params):
            # the others run the engine's rule (its fused_step call declines them: each has a
            # blocker or an unsafe gradient), the same per parameter as under step_param
            chosen = {id(p) for p in fusable}
            engine.run_group(self, group, [p for p in params if id(p) not in chosen])
        states = [self.state[p] for p in fusable]
        beta1, beta2 = group["betas"]
        _torch_adam(  # torch.optim.adam.adam, the functional API; fused=True runs torch._fused_adamw_
            fusable, [p.grad for p in fusable], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s["step"] for s in states], fused=True, decoupled_weight_decay=True,
            amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
        )
        return True


def _fused_devices() -> tuple[str, ...]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return tuple(_get_fused_kernels_supported_devices())
