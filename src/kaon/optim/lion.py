"""Lion: the sign of an interpolated momentum, with kaon's momentum codecs and write-back."""

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
from kaon.validation import BETAS, boolean, memory_checks, real

__all__ = ["Lion"]


class Lion(KaonOptimizer, names=("Lion", "Liofusion")):
    r"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    One momentum buffer and no second moment. For a gradient ``g`` (fp32; matrices and conv
    kernels are seen as ``[R, C] = [shape[0], numel/shape[0]]``):

    1. gradient centralization (optional, ndim >= 2): ``g <- g - mean_row(g)`` (on a copy; the
       caller's ``p.grad`` is never modified)
    2. direction: ``c = sign(beta1 * m + (1 - beta1) * g)`` (each entry -1, 0 or +1)
    3. momentum, updated *after* the direction: ``m <- beta2 * m + (1 - beta2) * g``, stored in
       ``momentum_dtype``
    4. decoupled weight decay: ``s = c + weight_decay * p``
    5. cautious (optional): zero the coordinates where ``s * g <= 0``, rescale the rest by
       ``1 / mean(mask)`` (the mask also acts on the weight decay term)
    6. ``p <- p - lr * s``, written with ``bf16_method`` for low-precision parameters.

    With ``cautious=False``, ``gradient_centralization=False`` and float32 momentum this is
    ``lion_pytorch.Lion`` (``p <- p (1 - lr wd) - lr c``). ``beta1 = 0`` is sign descent; the
    momentum is then never read, so none is stored.

    Args:
        params: parameters or parameter groups.
        lr (float, default 1e-4): learning rate; Lion-scale, about AdamW's lr / 3 to / 10.
        betas (tuple, default (0.9, 0.99)): ``beta1`` interpolates the direction, ``beta2``
            decays the momentum; each in [0, 1).
        weight_decay (float, default 0.0): decoupled weight decay (multiplied by lr).
        maximize (bool, default False): maximize the objective instead.
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

    State per parameter (the checkpoint format): ``m`` (``m`` + ``m_scale`` for int8/4bit),
    shaped like the matrix view, when ``beta1 > 0``; ``shift`` (parameter dtype) with
    ``bf16_method="kahan"`` on a low-precision parameter.

    Bytes per parameter: 4 (float32), 2 (bfloat16), 1 + 4/C (int8), 0.5 + 4/block (4bit); plus
    2 for Kahan on bf16.

    Example::

        opt = kaon.Lion(model.parameters(), lr=2e-4, betas=(0.95, 0.98), momentum_dtype="int8")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    #: K-Optimizers arguments kaon maps or refuses (docs/migrating.md)
    upstream_arguments = upstream.k_optimizers_auto_lr()
    hyperparameter_checks = {
        "lr": real(0.0),
        "betas": BETAS,
        "weight_decay": real(0.0),
        "maximize": boolean(),
        **memory_checks(),
    }
    layout_keys = ("betas", "momentum_dtype", "momentum_4bit_block", "bf16_method")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
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
            lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
            momentum_dtype=momentum_dtype, momentum_4bit_block=momentum_4bit_block,
            cautious=cautious, gradient_centralization=gradient_centralization,
            bf16_method=bf16_method,
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
            fused=fused,
        )

    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        # int8 keeps one scale per output row of the matrix view; 4-bit blocks follow the
        # row-major flat order, which the view does not change
        return factored.matrix_shape(tuple(p.shape))

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        if group["betas"][0] == 0:
            return []  # sign descent: the momentum would never be read
        codec = momentum_codec(group["momentum_dtype"], group["momentum_4bit_block"])
        return [Slot("m", codec, view)]

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group = batch.group
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        g = batch.grad
        if group["gradient_centralization"]:
            g = ops.centralize(g, out=batch.scratch("centered"))

        step = batch.scratch("step")
        new_state = {}
        if "m" in batch.state:
            m = batch.state["m"]
            # the same operations as lion_pytorch, so the sign agrees bit for bit
            torch.mul(m, beta1, out=step).add_(g, alpha=1.0 - beta1).sign_()
            new_state["m"] = m.mul_(beta2).add_(g, alpha=1.0 - beta2)
        else:
            torch.sign(g, out=step)
        if group["weight_decay"] != 0:
            step.add_(batch.param, alpha=group["weight_decay"])
        if group["cautious"]:
            return ops.cautious(step, g, scale=lr, out=batch.scratch("masked")), new_state
        return step.mul_(lr), new_state
