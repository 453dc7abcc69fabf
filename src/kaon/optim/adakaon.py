"""Adakaon: conv-aware factored second moment, RMS clip, momentum of the normalized step."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kaon import ops, upstream
from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.state import factored
from kaon.state.codecs import momentum_codec
from kaon.validation import BETAS, boolean, memory_checks, pair, real

__all__ = ["Adakaon"]


class Adakaon(KaonOptimizer, names=("Adakaon", "Adafusion")):
    r"""Adakaon: Adafactor's factored second moment with momentum taken after normalization.

    For a gradient ``g`` (fp32; seen as the matrix ``[R, C] = [shape[0], numel/shape[0]]`` when
    the parameter has two or more dimensions, so conv kernels factor as ``[out, in*kh*kw]``):

    1. gradient centralization (optional, ndim >= 2): ``g <- g - mean_row(g)`` (on a copy; the
       caller's ``p.grad`` is never modified)
    2. second moment, factored: ``row <- lerp(row, mean_j(g^2 + eps1), 1 - beta2)``,
       ``col <- lerp(col, mean_i(g^2 + eps1), 1 - beta2)``,
       ``u = g / sqrt(row_i col_j / mean(row))``; 1-D and 0-D: ``v <- lerp(v, g^2 + eps1,
       1 - beta2)``, ``u = g / sqrt(v)``. No bias correction: the clip tames the first steps.
    3. RMS clip: ``u <- u / max(1, RMS(u) / clip_threshold)``
    4. momentum of the normalized step (beta1 > 0): ``m <- lerp(m, u, 1 - beta1)``,
       ``delta = lr * m`` (the fp32 ``m``, before it is stored in ``momentum_dtype``); beta1 = 0:
       ``delta = lr * u`` and no momentum is stored at all. ``m`` lives in unit-RMS update space
       and the current lr multiplies it, so a schedule (or lr = 0) takes effect at once; at a
       constant lr this equals an EMA of ``lr * u``.
    5. decoupled weight decay: ``delta <- delta + lr * weight_decay * p`` (computed as
       ``lr * (m + weight_decay * p)``)
    6. cautious (optional): zero the coordinates where ``delta * g <= 0``, rescale the rest by
       ``1 / mean(mask)``
    7. ``p <- p - delta``, written with ``bf16_method`` for low-precision parameters.

    Args:
        params: parameters or parameter groups.
        lr (float, default 1e-3): learning rate.
        betas (tuple, default (0.9, 0.999)): momentum and second-moment decay, each in [0, 1).
            ``beta1 = 0`` disables momentum and its memory.
        eps (tuple, default (1e-30, 1e-3)): ``eps1 > 0`` is added to ``g^2`` before the means;
            ``eps2 >= 0`` is reserved (unused).
        weight_decay (float, default 0.0): decoupled weight decay, folded into the step.
        maximize (bool, default False): maximize the objective instead.
        clip_threshold (float, default 1.0): RMS clip of the normalized update, > 0.
        momentum_dtype (str, default "bfloat16"): storage of the momentum: "float32",
            "bfloat16", "int8" (per-row absmax) or "4bit" (per-block absmax, packed).
        momentum_4bit_block (int, default 128): block of the 4-bit codec (<= 0: one block).
        cautious (bool, default True): cautious masking of the step.
        gradient_centralization (bool, default True): centralize gradients of ndim >= 2.
        bf16_method (str, default "stochastic_rounding"): "stochastic_rounding", "kahan" or
            "none" for bf16/fp16 parameters.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.
        fused (bool | None, default None): run kaon's Triton kernel (docs/kernels.md);
            None: automatic (in this release the reference rule unless KAON_FUSED_AUTO=1;
            see docs/kernels.md). Same state and checkpoints either way.

    State per parameter (the checkpoint format): ``row`` fp32 ``[R]`` and ``col`` fp32 ``[C]``
    for ndim >= 2, else ``v`` fp32 shaped like the parameter; with beta1 > 0 the momentum ``m``
    (``m`` + ``m_scale`` for int8/4bit); ``shift`` (parameter dtype) with ``bf16_method="kahan"``
    on a low-precision parameter.

    Bytes per parameter: second moment ``4 (R + C) / (R C)`` (about 0 for large matrices) plus
    momentum 4 (float32), 2 (bfloat16), 1 + 4/C (int8) or 0.5 + 4/block (4bit), or 0 with
    beta1 = 0; plus 2 for Kahan on bf16.

    Example::

        opt = kaon.Adakaon(model.parameters(), lr=1e-4, momentum_dtype="int8")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    #: K-Optimizers arguments kaon maps or refuses (docs/migrating.md)
    upstream_arguments = {**upstream.k_optimizers_auto_lr(), **upstream.k_optimizers_fused_tile_cap()}
    hyperparameter_checks = {
        "lr": real(0.0),
        "betas": BETAS,
        "eps": pair(real(0.0, low_inclusive=False), real(0.0)),
        "weight_decay": real(0.0),
        "maximize": boolean(),
        "clip_threshold": real(0.0, low_inclusive=False),
        **memory_checks(),
    }
    layout_keys = ("betas", "momentum_dtype", "momentum_4bit_block", "bf16_method")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: tuple[float, float] = (1e-30, 1e-3),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        clip_threshold: float = 1.0,
        momentum_dtype: str = "bfloat16",
        momentum_4bit_block: int = 128,
        cautious: bool = True,
        gradient_centralization: bool = True,
        bf16_method: str = "stochastic_rounding",
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            clip_threshold=clip_threshold, momentum_dtype=momentum_dtype,
            momentum_4bit_block=momentum_4bit_block, cautious=cautious,
            gradient_centralization=gradient_centralization, bf16_method=bf16_method,
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
            fused=fused,
        )

    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return factored.matrix_shape(tuple(p.shape))

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        slots = factored.second_moment_slots(view)
        if group["betas"][0] > 0:
            codec = momentum_codec(group["momentum_dtype"], group["momentum_4bit_block"])
            slots.append(Slot("m", codec, view))
        return slots

    def _step_lr(self, group: dict[str, Any]) -> float:
        """The learning rate that scales this step's update: the group's ``lr`` (Autokaon
        multiplies it by its discovered rate)."""
        return group["lr"]

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        beta1, beta2 = group["betas"]
        eps1 = group["eps"][0]
        lr = self._step_lr(group)
        g = batch.grad
        if group["gradient_centralization"]:
            g = ops.centralize(g, out=batch.scratch("centered"))

        scratch = None  # a temporary of this call that later steps may overwrite
        if "row" in state:
            squared = torch.mul(g, g, out=batch.scratch("squared"))
            row, col = factored.update_moments(state["row"], state["col"], squared, beta2, eps1)
            r, c = factored.inverse_sqrt_factors(row, col)
            step = torch.mul(g, r, out=squared).mul_(c)
            new_state = {"row": row, "col": col}
        else:
            v = state["v"].lerp_(torch.mul(g, g).add_(eps1), 1.0 - beta2)
            step = torch.rsqrt(v).mul_(g)
            new_state = {"v": v}
        step = ops.rms_clip_(step, group["clip_threshold"])

        if beta1 > 0:
            scratch = step
            step = state["m"].lerp_(step, 1.0 - beta1)
            new_state["m"] = step
        if group["weight_decay"] != 0:
            decay = group["weight_decay"]
            if scratch is None:
                step = step.add_(batch.param, alpha=decay)
            else:
                step, scratch = torch.add(step, batch.param, alpha=decay, out=scratch), None
        # everything so far is in unit-RMS space; the learning rate scales it once, at the end
        if group["cautious"]:
            step = ops.cautious(step, g, scale=lr, out=scratch)
        elif scratch is not None:
            step = torch.mul(step, lr, out=scratch)
        else:
            step = step.mul_(lr)
        return step, new_state

