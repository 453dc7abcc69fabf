"""AdaMuon: Muon's orthogonalized momentum, normalized by a factored second moment."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from kaon import ops, upstream
from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.state import factored
from kaon.state.codecs import momentum_codec
from kaon.validation import BETAS, boolean, integer, memory_checks, pair, real

__all__ = ["AdaMuon"]

#: the applied step has RMS ``UPDATE_SCALE * lr`` (the factored normalization makes it ~1 first)
UPDATE_SCALE = 0.2


def _matrix_direction(
    g: Tensor, m: Tensor | None, row: Tensor, col: Tensor, beta1: float, beta2: float,
    eps1: float, clip: float, ns_steps: int, ns_dtype: torch.dtype,
) -> Tensor:
    """Momentum, Newton-Schulz, factored normalization and RMS clip of ``[N, R, C]`` slices.

    ``m``, ``row`` and ``col`` are updated in place; returns the clipped direction (unit RMS at
    most ``clip``), a new tensor.
    """
    source = g if m is None else m.lerp_(g, 1.0 - beta1)
    o = ops.newton_schulz(source, ns_steps, dtype=ns_dtype)
    factored.update_moments(row, col, o * o, beta2, eps1)
    r, c = factored.inverse_sqrt_factors(row, col)
    return ops.rms_clip_(o.mul_(r).mul_(c), clip)


def _vector_direction(
    g: Tensor, m: Tensor | None, v: Tensor, beta1: float, beta2: float, eps1: float, clip: float,
) -> Tensor:
    """Adam-style normalization, RMS clip, then momentum of the result, for ``[N, L]`` slices.

    ``m`` and ``v`` are updated in place; returns a new tensor (never ``m`` itself).
    """
    v.lerp_(torch.mul(g, g).add_(eps1), 1.0 - beta2)
    u = ops.rms_clip_(torch.rsqrt(v).mul_(g), clip)
    if m is None:
        return u
    return u.copy_(m.lerp_(u, 1.0 - beta1))


_COMPILED: dict[str, Callable[..., Tensor]] = {}


def _rule(name: str, compiled: bool) -> Callable[..., Tensor]:
    """The direction function ``name``, wrapped in ``torch.compile`` on first request."""
    fn = {"matrix": _matrix_direction, "vector": _vector_direction}[name]
    if not compiled:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=False)
    return _COMPILED[name]


class AdaMuon(KaonOptimizer, names=("AdaMuon",)):
    r"""AdaMuon: orthogonalized momentum with an Adafactor-style factored second moment.

    For a parameter with two or more dimensions, seen as the matrix ``[R, C] = [shape[0],
    numel/shape[0]]`` (conv kernels as ``[out, in*kh*kw]``), with fp32 gradient ``g``:

    1. gradient centralization (optional, off by default): ``g <- g - mean_row(g)`` (on a copy)
    2. momentum of the raw gradient: ``m <- lerp(m, g, 1 - beta1)`` (``beta1 = 0``: ``m = g``,
       nothing stored)
    3. orthogonalize: ``O = NS(m)``, ``ns_steps`` quintic Newton-Schulz iterations in bf16
       (:func:`kaon.ops.newton_schulz`)
    4. factored second moment of ``O``: ``row <- lerp(row, mean_j(O^2 + eps1), 1 - beta2)``,
       ``col <- lerp(col, mean_i(O^2 + eps1), 1 - beta2)``,
       ``u = O / sqrt(row_i col_j / mean(row))`` (no bias correction; the clip tames the start)
    5. RMS clip: ``u <- u / max(1, RMS(u) / clip_threshold)``

    For vectors and scalars (biases, norms), not orthogonalized: ``v <- lerp(v, g^2 + eps1,
    1 - beta2)``, ``u = g / sqrt(v)``, RMS clip, then ``m <- lerp(m, u, 1 - beta1)`` and
    ``u = m`` (momentum of the normalized step, as in Adakaon).

    Then, for both: ``s = 0.2 u + weight_decay * p``; cautious (optional): zero the coordinates
    where ``s * g <= 0`` and rescale the rest by ``1 / mean(mask)``; ``p <- p - lr * s``, written
    with ``bf16_method``. The applied step has RMS about ``0.2 lr`` everywhere, so one lr governs
    all parameters.

    Args:
        params: parameters or parameter groups.
        lr (float, default 2e-2): learning rate (Muon-scale default; about 1e-3 suited the
            upstream diffusion proxy, see docs/adamuon.md).
        betas (tuple, default (0.95, 0.999)): momentum and second-moment decay, each in [0, 1).
        eps (tuple, default (1e-30, 1e-3)): ``eps1 > 0`` is added to the squares before the
            means; ``eps2 >= 0`` is reserved (unused).
        weight_decay (float, default 0.0): decoupled weight decay (multiplied by lr).
        maximize (bool, default False): maximize the objective instead.
        ns_steps (int, default 2): Newton-Schulz iterations, >= 1.
        clip_threshold (float, default 1.0): RMS clip of the normalized update, > 0.
        momentum_dtype (str, default "bfloat16"): storage of the momentum: "float32",
            "bfloat16", "int8" (per-row absmax) or "4bit" (per-block absmax, packed).
        momentum_4bit_block (int, default 128): block of the 4-bit codec (<= 0: one block).
        cautious (bool, default True): cautious masking of the step.
        gradient_centralization (bool, default False): centralize gradients of ndim >= 2.
        bf16_method (str, default "stochastic_rounding"): "stochastic_rounding", "kahan" or
            "none" for bf16/fp16 parameters.
        compile (bool, default False): run the direction computation (steps 2-5) through
            ``torch.compile``; workload-dependent, not recommended on CPU.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`.

    State per parameter (the checkpoint format): ``row`` fp32 ``[R]`` and ``col`` fp32 ``[C]``
    for ndim >= 2, else ``v`` fp32 shaped like the parameter; with beta1 > 0 the momentum ``m``
    (``m`` + ``m_scale`` for int8/4bit) shaped like the matrix view; ``shift`` (parameter dtype)
    with ``bf16_method="kahan"`` on a low-precision parameter.

    Bytes per parameter: second moment ``4 (R + C) / (R C)`` for matrices (4 for vectors) plus
    momentum 4 (float32), 2 (bfloat16), 1 + 4/C (int8), 0.5 + 4/block (4bit) or 0 (beta1 = 0);
    plus 2 for Kahan on bf16.

    Example::

        opt = kaon.AdaMuon(model.parameters(), lr=1e-3, momentum_dtype="int8")
        loss.backward(); opt.step(); opt.zero_grad()
    """

    #: not on the compiled path by default (``fused=None``): Newton-Schulz is matmul-bound (nothing to fuse); ``compile=True`` compiles its rule
    fusable = False

    #: K-Optimizers arguments kaon maps or refuses (docs/migrating.md)
    upstream_arguments = upstream.k_optimizers_auto_lr()
    hyperparameter_checks = {
        "lr": real(0.0),
        "betas": BETAS,
        "eps": pair(real(0.0, low_inclusive=False), real(0.0)),
        "weight_decay": real(0.0),
        "maximize": boolean(),
        "ns_steps": integer(1, 100),
        "clip_threshold": real(0.0, low_inclusive=False),
        "compile": boolean(),
        **memory_checks(),
    }
    layout_keys = ("betas", "momentum_dtype", "momentum_4bit_block", "bf16_method")
    #: dtype of the Newton-Schulz iteration (internal: tests set float32 on an instance)
    _ns_dtype: ClassVar[torch.dtype] = torch.bfloat16

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-2,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: tuple[float, float] = (1e-30, 1e-3),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        ns_steps: int = 2,
        clip_threshold: float = 1.0,
        momentum_dtype: str = "bfloat16",
        momentum_4bit_block: int = 128,
        cautious: bool = True,
        gradient_centralization: bool = False,
        bf16_method: str = "stochastic_rounding",
        compile: bool = False,
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            ns_steps=ns_steps, clip_threshold=clip_threshold, momentum_dtype=momentum_dtype,
            momentum_4bit_block=momentum_4bit_block, cautious=cautious,
            gradient_centralization=gradient_centralization, bf16_method=bf16_method,
            compile=compile,
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
        )

    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return factored.matrix_shape(tuple(p.shape))

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        slots = factored.second_moment_slots(view)
        if group["betas"][0] > 0:
            codec = momentum_codec(group["momentum_dtype"], group["momentum_4bit_block"])
            slots.append(Slot("m", codec, view))
        return slots

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        beta1, beta2 = group["betas"]
        eps1, clip, lr = group["eps"][0], group["clip_threshold"], group["lr"]
        g = batch.grad
        if group["gradient_centralization"]:
            g = ops.centralize(g, out=batch.scratch("centered"))
        m = state.get("m")

        if "row" in state:
            rule = _rule("matrix", group["compile"])
            step = rule(g, m, state["row"], state["col"], beta1, beta2, eps1, clip,
                        group["ns_steps"], self._ns_dtype)
            new_state = {"row": state["row"], "col": state["col"]}
        else:
            rule = _rule("vector", group["compile"])
            step = rule(g, m, state["v"], beta1, beta2, eps1, clip)
            new_state = {"v": state["v"]}
        if m is not None:
            new_state["m"] = m

        step = step.mul_(UPDATE_SCALE)  # a new tensor of this call, never the stored momentum
        if group["weight_decay"] != 0:
            step = step.add_(batch.param, alpha=group["weight_decay"])
        if group["cautious"]:
            return ops.cautious(step, g, scale=lr, out=batch.scratch("masked")), new_state
        return step.mul_(lr), new_state
