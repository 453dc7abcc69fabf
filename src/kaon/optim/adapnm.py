"""AdaPNM: Adam with positive-negative momentum, a factored second moment and an RMS clip."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kaon import ops, upstream
from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.state import factored
from kaon.state.codecs import FloatCodec, momentum_codec
from kaon.validation import BETAS, boolean, memory_checks, real

__all__ = ["AdaPNM"]

# added under the square root of the 1-D second moment, as pytorch_optimizer does
_V_EPS = 1e-15
# floor of eps on the factored path: a column whose gradient was always exactly zero would
# otherwise get an infinite factor
_FACTORED_EPS_FLOOR = 1e-30


class AdaPNM(KaonOptimizer, names=("AdaPNM", "Janus")):
    r"""AdaPNM: Adam with positive-negative momentum (Xie et al., 2021) on kaon's backend.

    Two momentum buffers swap roles every step: at a parameter's step ``t`` (counted per
    parameter, from 1) the *positive* buffer is ``m_pos`` when ``t`` is odd and ``m_neg`` when
    ``t`` is even; the other one is the *negative* buffer. Only the positive buffer sees the
    gradient. With ``noise = sqrt((1 + beta0)^2 + beta0^2)``, ``bc1 = 1 - beta1^t`` and
    ``bc2 = 1 - beta2^t``:

    1. gradient centralization (optional, ndim >= 2): ``g <- g - mean_row(g)`` (on a copy)
    2. second moment. ndim >= 2 (seen as ``[R, C] = [shape[0], numel/shape[0]]``):
       ``row <- lerp(row, mean_j(g^2 + eps), 1 - beta2)``, ``col`` likewise over rows,
       ``inv = sqrt(bc2) / sqrt(row_i col_j / mean(row))``. 1-D and 0-D:
       ``v <- beta2 v + (1 - beta2) g^2`` (``ams_bound``: ``v_max <- max(v_max, v)`` and ``v_max``
       is used below), ``inv = sqrt(bc2) / (sqrt(v + 1e-15) + eps)``
    3. positive buffer: ``m+ <- lerp(m+, g, 1 - beta1^2)`` (decay beta1 squared)
    4. ``pn = ((1 + beta0) m+ - beta0 m-) / noise`` (``m-`` is the stale, stored negative buffer)
    5. ``U = pn * inv``; RMS clip ``U <- U / max(1, RMS(U) / clip_threshold)`` (off when
       ``clip_threshold = 0``)
    6. ``step = (lr / bc1) U``; cautious (optional): zero the coordinates where ``step * g <= 0``
       and rescale the rest by ``1 / mean(mask)``
    7. multiplicative weight decay, not masked: ``p <- p (1 - lr weight_decay) - step``
       (written once: ``delta = lr weight_decay p + step``, with ``bf16_method`` for
       low-precision parameters).

    ``beta0 = 0`` is Adam with momentum decay ``beta1^2``; ``beta0 = 1`` is canonical PNM
    ``(2 m+ - m-) / sqrt(5)``. With ``cautious=False`` and ``clip_threshold=0`` the 1-D path is
    ``pytorch_optimizer.AdaPNM`` with ``betas=(beta1, beta2, beta0)`` (same ``eps``, ``ams_bound``
    and decoupled weight decay) up to float rounding.

    Args:
        params: parameters or parameter groups.
        lr (float, default 1e-3): learning rate, >= 0.
        betas (tuple, default (0.8, 0.999)): momentum and second-moment decay, each in [0, 1).
            beta1 is the loss-versus-generalization dial (see docs/adapnm.md).
        beta0 (float, default 0.5): weight of the negative momentum, in [0, 1].
        eps (float, default 1e-8): added to ``g^2`` on the factored path (floored at 1e-30) and
            to ``sqrt(v)`` on the 1-D path; >= 0.
        weight_decay (float, default 0.0): multiplicative decoupled weight decay, >= 0.
        maximize (bool, default False): maximize the objective instead.
        clip_threshold (float, default 1.0): RMS clip of ``U``; 0 turns the clip off.
        cautious (bool, default True): cautious masking of the step (weight decay excluded).
        gradient_centralization (bool, default True): centralize gradients of ndim >= 2.
        ams_bound (bool, default False): AMSGrad bound on the 1-D second moment (no effect on
            factored parameters).
        momentum_dtype (str, default "bfloat16"): storage of both buffers: "float32",
            "bfloat16", "int8" or "4bit".
        momentum_4bit_block (int, default 128): block of the 4-bit codec (<= 0: one block).
        bf16_method (str, default "stochastic_rounding"): "stochastic_rounding", "kahan" or
            "none" for bf16/fp16 parameters.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.
        fused (bool | None, default None): run kaon's Triton kernel (docs/kernels.md);
            None: automatic (in this release the reference rule unless KAON_FUSED_AUTO=1;
            see docs/kernels.md). Same state and checkpoints either way.

    State per parameter (the checkpoint format): ``row`` fp32 ``[R]`` and ``col`` fp32 ``[C]``
    for ndim >= 2, else ``v`` fp32 (plus ``v_max`` with ``ams_bound``); ``m_pos`` and ``m_neg``
    in ``momentum_dtype`` (plus ``m_pos_scale`` / ``m_neg_scale`` for int8 / 4bit); ``step``
    fp32 ``[1]`` (the parameter's step count: a skipped non-finite step does not advance it);
    ``shift`` with ``bf16_method="kahan"`` on a low-precision parameter.

    Bytes per parameter: two momenta, 8 (float32), 4 (bfloat16), 2 + 8/C (int8) or
    1 + 8/block (4bit), plus ``4 (R + C) / (R C)`` for the factored second moment (4 or 8 for
    1-D), plus 2 for Kahan on bf16.

    Example::

        opt = kaon.AdaPNM(model.parameters(), lr=2e-3, momentum_dtype="int8")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    #: K-Optimizers arguments kaon maps or refuses (docs/migrating.md)
    upstream_arguments = {**upstream.k_optimizers_auto_lr(), **upstream.k_optimizers_fused_tile_cap()}
    hyperparameter_checks = {
        "lr": real(0.0),
        "betas": BETAS,
        "beta0": real(0.0, 1.0),
        "eps": real(0.0),
        "weight_decay": real(0.0),
        "maximize": boolean(),
        "clip_threshold": real(0.0),
        "ams_bound": boolean(),
        **memory_checks(),
    }
    layout_keys = ("ams_bound", "momentum_dtype", "momentum_4bit_block", "bf16_method")
    bytes_per_element = 64

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.8, 0.999),
        beta0: float = 0.5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        clip_threshold: float = 1.0,
        cautious: bool = True,
        gradient_centralization: bool = True,
        ams_bound: bool = False,
        momentum_dtype: str = "bfloat16",
        momentum_4bit_block: int = 128,
        bf16_method: str = "stochastic_rounding",
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, beta0=beta0, eps=eps, weight_decay=weight_decay,
            maximize=maximize, clip_threshold=clip_threshold, cautious=cautious,
            gradient_centralization=gradient_centralization, ams_bound=ams_bound,
            momentum_dtype=momentum_dtype, momentum_4bit_block=momentum_4bit_block,
            bf16_method=bf16_method,
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
        if len(view) != 2 and group["ams_bound"]:
            slots.append(Slot("v_max", FloatCodec(), view))
        codec = momentum_codec(group["momentum_dtype"], group["momentum_4bit_block"])
        slots += [Slot("m_pos", codec, view), Slot("m_neg", codec, view),
                  Slot("step", FloatCodec(), (1,))]
        return slots

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        beta1, beta2 = group["betas"]
        beta0, eps, lr = group["beta0"], group["eps"], group["lr"]
        g = batch.grad
        if group["gradient_centralization"]:
            g = ops.centralize(g, out=batch.scratch("centered"))

        # per-parameter step count and the coefficients that depend on it, shaped [N, 1, ...]
        t = state["step"].add_(1.0)
        per_slice = (-1,) + (1,) * len(batch.view)
        t64 = t.double().view(per_slice)
        step_size = (lr / (1.0 - torch.pow(beta1, t64))).float()
        bias2_sqrt = (1.0 - torch.pow(beta2, t64)).sqrt_().float()
        odd = torch.remainder(t, 2.0).eq_(1.0).view(per_slice).bool()

        # only the positive buffer (m_pos at odd t, m_neg at even t) takes the gradient; the
        # other one is lerped with weight 0, which leaves it exactly as stored
        m_pos, m_neg = state["m_pos"], state["m_neg"]
        weight = 1.0 - beta1 * beta1
        m_pos.lerp_(g, torch.where(odd, weight, 0.0))
        m_neg.lerp_(g, torch.where(odd, 0.0, weight))
        positive = torch.where(odd, m_pos, m_neg, out=batch.scratch("positive"))
        negative = torch.where(odd, m_neg, m_pos, out=batch.scratch("negative"))
        noise = math.sqrt((1.0 + beta0) ** 2 + beta0**2)
        pn = positive.mul_(1.0 + beta0).add_(negative, alpha=-beta0).mul_(1.0 / noise)

        new_state = {"m_pos": m_pos, "m_neg": m_neg, "step": t}
        if "row" in state:
            squared = torch.mul(g, g, out=batch.scratch("squared"))
            floor = max(eps, _FACTORED_EPS_FLOOR)
            row, col = factored.update_moments(state["row"], state["col"], squared, beta2, floor)
            r, c = factored.inverse_sqrt_factors(row, col)
            update = pn.mul_(r).mul_(c).mul_(bias2_sqrt)
            new_state.update(row=row, col=col)
        else:
            v = state["v"].mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            new_state["v"] = v
            if "v_max" in state:
                v = torch.maximum(state["v_max"], v, out=state["v_max"])
                new_state["v_max"] = v
            denom = torch.add(v, _V_EPS, out=negative).sqrt_().add_(eps).div_(bias2_sqrt)
            update = pn.div_(denom)
        if group["clip_threshold"] > 0:
            update = ops.rms_clip_(update, group["clip_threshold"])

        if group["cautious"]:
            step = ops.cautious(update, g, scale=step_size, out=batch.scratch("masked"))
        else:
            step = update.mul_(step_size)
        if group["weight_decay"] != 0:
            step = step.add_(batch.param, alpha=lr * group["weight_decay"])
        return step, new_state
