"""Adafactor8Bit: Adafactor with log-space 8-bit second moments, 4-bit momentum, CAME, APOLLO and
the Fira limiter (the feature set of the ``adafactor8bit`` package, on kaon's engine)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from kaon import distributed, lowrank, ops, upstream
from kaon.engine import Batch, Slot
from kaon.optimizer import KaonOptimizer
from kaon.precision import BF16_METHODS
from kaon.state import factored
from kaon.state.codecs import (
    MOMENTUM_DTYPES,
    Codec,
    FloatCodec,
    IntegerCodec,
    LogSpace8BitCodec,
    momentum_codec,
)
from kaon.validation import Check, boolean, check_all, choice, integer, optional, pair, real

__all__ = ["Adafactor8Bit", "APOLLO_SCALE_TYPES", "PRESETS", "ROUTES", "build_param_groups"]

APOLLO_SCALE_TYPES = ("channel", "tensor")
_TINY = 1.17549435e-38  # smallest normal fp32, 2**-126
_DEFAULT_EPS1 = 1e-30
_SEED_INIT_LIMIT = 2**24  # initial seeds pass through fp32 exactly
_UNIT = real(0.0, 1.0, high_inclusive=False)


_A8 = "adafactor8bit"
_M_QUANT_TYPES = {"uf4": "4bit", "uf8": "int8", "fp32": "float32"}


def _momentum_quant_type(value: Any) -> str:
    """adafactor8bit's ``m_quant_type`` as kaon's ``momentum_dtype``: uf4 (packed 4-bit block
    absmax) is kaon's 4bit codec, uf8 (8-bit linear absmax) its int8 codec (per-row scales),
    fp32 float32; d4 / d8 (dynamic codebooks) have no kaon codec."""
    if value in _M_QUANT_TYPES:
        return _M_QUANT_TYPES[value]
    raise upstream.UnsupportedError(
        "kaon has no dynamic-codebook momentum (d4, d8); use m_quant_type='uf4' / 'uf8' (or "
        "momentum_dtype='4bit' / 'int8' / 'bfloat16' / 'float32')")


def _writeback(value: Any) -> str:
    if value is True:
        return "stochastic_rounding"
    if value is False:
        return "none"
    raise upstream.UnsupportedError("stochastic_round_writeback must be True or False "
                                    "(or use bf16_method)")


def _eps_check(name: str, value: Any) -> None:
    pair(optional(real(0.0)), real(0.0))(name, value)


class Adafactor8Bit(KaonOptimizer, names=("Adafactor8Bit",)):
    r"""Adafactor with quantized state: log-space 8-bit second moments, optional 4-bit momentum,
    CAME confidence, APOLLO random-subspace scaling and the Fira norm-growth limiter.

    For a gradient ``g`` (fp32; a parameter with two or more dimensions is seen as the matrix
    ``[R, C] = [shape[0], numel / shape[0]]``, so conv kernels factor as ``[out, in*kh*kw]``) at
    step ``t`` (per parameter, 1-based):

    1. step sizes: ``rho = min(lr, 1/sqrt(t))`` with ``relative_step`` else ``lr``;
       ``alpha = max(eps2, RMS(p)) * rho`` with ``scale_parameter`` else ``rho``.
    2. new-sample weight of the second moment ``b = 1 - beta2`` (``beta2`` set) or
       ``t ** beta2_decay`` (the Adafactor schedule; step 1 replaces the statistic).
    3. second moment, refreshed from the current gradient and used fresh (the quantized copy is
       what the next step reads):

       * factored (ndim >= 2, ``factored``): ``row <- lerp(row, mean_j(g^2) + eps1, b)``,
         ``col <- lerp(col, mean_i(g^2) + eps1, b)``, ``1/sqrt(v_hat)_ij =
         (row_i / mu)^-1/2 col_j^-1/2`` with ``mu = max(mean(row), eps1)``;
       * full (1-D, or ``factored=False``): ``v <- lerp(v, g^2 + eps1, b)``, ``1/sqrt(v)``;
       * Adam denominator (``factored=False``, ``beta2`` set, no CAME):
         ``v <- lerp(v, g^2, 1 - beta2)``, ``u = m / (sqrt(v) + eps1 sqrt(1 - beta2^t))``.

       ``row``, ``col`` and ``v`` are floored at ``max(eps1^2, 2^-126)``, ``mu`` at
       ``max(eps1, 2^-126)``: a zero gradient, a cold column or an all-zero row gives a zero
       update, never NaN.
    4. direction ``u``: without momentum ``g / sqrt(v_hat)``; with ``beta1``: ``m <- lerp(m, g,
       1 - beta1)`` (Adam-style, raw gradient), ``u = m / sqrt(v_hat)``. Then the update clip
       ``u <- u / max(1, RMS(u) / d)`` (``d = 0``: no clip).
    5. CAME (``beta3``, with ``beta1``, factored parameters): ``U = clip(g / sqrt(v_hat))``,
       ``m <- lerp(m, U, 1 - beta1)``, ``res = (U - m)^2 + eps_came``, ``conf_row / conf_col <-
       lerp(., mean(res), 1 - beta3)``, ``u = m / sqrt(conf_hat)`` with no second clip (as the
       official CAME). Non-factored parameters of a CAME group take CAME's own rule for them:
       ``u = m`` (the momentum of the clipped update).
    6. APOLLO (``apollo_rank > 0``, ndim >= 2): ``G_low = G P^T`` (``R >= C``, ``P [rank, C]``) or
       ``P^T G`` (``P [R, rank]``) with a seeded Gaussian ``P`` regenerated every
       ``apollo_update_proj_gap`` steps (see :mod:`kaon.lowrank`); Adam in the low-rank space
       (``v_low``, ``m_low``; or Adafactor factors of ``v_low`` with ``apollo_factorize``);
       scaling ``s = ||U_low|| / (||G_low|| + 1e-8)`` per channel or per tensor; the update is
       ``G * s`` (the full-rank gradient, rescaled), limited by Fira, times
       ``sqrt(apollo_scale)``, clipped with the norm before the limiter.
    7. Fira (``enable_fira_for_adafactor`` on the other paths, ``enable_fira_for_apollo`` on
       APOLLO): ``u <- u * gamma / max(||u|| / ||u_prev||, gamma)``, ``gamma = 1 + fira_margin``.
    8. bias correction (``bias_correction=None``: on for the Adam-denominator and APOLLO paths,
       off elsewhere; never with ``relative_step``): ``alpha <- alpha sqrt(1 - beta2^t) /
       (1 - beta1^t)`` (each factor only when that beta is set).
    9. ``p <- p - w weight_decay p - alpha u`` with ``w = alpha`` before bias correction
       (``scale_weight_decay``) or ``rho``; written with ``bf16_method``.

    SGD mode (``beta2=None`` and ``beta2_decay=None``): no second moment, ``u = m / (1 - beta1)``
    or ``g``, then the clip.

    With ``quantize=False``, ``beta1=None`` and ``d=1`` this is ``transformers.Adafactor``
    (same ``relative_step``, ``scale_parameter``, ``eps`` and weight decay); the CAME
    configuration ``beta1=0.9, beta2=0.999, beta3=0.9999, relative_step=False,
    scale_parameter=False, d=1, eps_came=1e-16`` is ``came_pytorch.CAME`` on 1-D and 2-D
    parameters.

    Args (every one except the optimizer-level options can be set per parameter group):
        params: parameters or parameter groups.
        lr (float or Tensor, default 1e-2): the external step size (a cap with relative_step).
        beta1 (float or None, default None): momentum; None stores no momentum at all.
        beta2 (float or None, default None): fixed second-moment decay; None uses the schedule.
        beta2_decay (float or None, default -0.8): schedule exponent (<= 0).
        beta3 (float or None, default None): CAME confidence decay; needs beta1 and factored.
        eps (pair, default (1e-30, 1e-3)): eps1 (added to g^2; the Adam eps; None = 1e-30) and
            eps2 (floor of RMS(p) for scale_parameter).
        eps_came (float, default 1e-16): added to CAME's residual.
        weight_decay (float, default 0.0): decoupled weight decay.
        d (float, default 1.0): update-RMS clip threshold; 0 disables the clip.
        maximize (bool, default False): maximize the objective.
        relative_step (bool, default True): rho = min(lr, 1/sqrt(t)).
        scale_parameter (bool, default True): alpha = max(eps2, RMS(p)) rho.
        factored (bool, default True): row/column second moment for ndim >= 2.
        quantize (bool, default True): quantize the state of tensors with at least
            ``min_8bit_size`` elements (second moments, confidence and low-rank V in the
            log-space 8-bit codec; momentum in ``momentum_dtype``).
        block_size (int, default 256): block of the log-space codec (per block: exact zero
            code, min and max of log2; 8 B per block).
        m_block_size (int, default 128): block of the 4-bit momentum codec.
        momentum_dtype (str, default "4bit"): storage of quantized momentum: "4bit", "int8",
            "bfloat16" or "float32".
        min_8bit_size (int, default 4096): smaller tensors keep fp32 state.
        apollo_rank (int, default 0): > 0 enables APOLLO for ndim >= 2 (at most 65,536).
        apollo_update_proj_gap (int, default 200): steps between projection refreshes.
        apollo_scale_type (str, default "channel"): "channel" or "tensor".
        apollo_scale (float, default 1.0): the update is multiplied by sqrt(apollo_scale).
        apollo_scale_front (bool, default False): apply it before (True) or after the limiter.
        apollo_eps (float, default 1e-6): eps of the low-rank Adam denominator.
        apollo_factorize (bool, default False): factor v_low into fp32 row/col statistics.
        enable_fira_for_adafactor (bool, default False): Fira on the non-APOLLO paths.
        enable_fira_for_apollo (bool, default True): Fira on the APOLLO path.
        fira_margin (float, default 0.01): gamma = 1 + fira_margin.
        bias_correction (bool or None, default None): see step 8.
        scale_weight_decay (bool, default True): weight decay scaled by alpha instead of rho.
        bf16_method (str, default "stochastic_rounding"): "stochastic_rounding", "kahan" or
            "none" for bf16/fp16 parameters.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed, fused: see
            :class:`kaon.optimizer.KaonOptimizer` (``seed`` also varies APOLLO's projections).

    State per parameter (plain tensors): ``step`` (fp32 scalar); ``row`` [R] / ``col`` [C] or
    ``v`` (log8: uint8 codes plus ``_scale`` / ``_offset`` per block); ``m`` with beta1;
    ``conf_row`` / ``conf_col`` with CAME; APOLLO: ``apollo_seed`` (int64 scalar), ``v_low``
    (or ``row_low`` / ``col_low``), ``m_low``; ``fira_norm`` (fp32 scalar) with Fira; ``shift``
    with Kahan on a low-precision parameter.

    Bytes per parameter (a large ``R x C`` matrix, quantized): factored, no momentum
    ``(R + C)(1 + 8/256) / (R C)`` (about 0.002 for 1024 x 4096); 4-bit momentum adds
    ``0.5 + 4/128 = 0.531``; CAME adds the same as the factored statistic; full-rank V adds
    ``1 + 8/256``; APOLLO rank ``r`` (right side) ``r (1 + 8/256) / C`` for v_low plus
    ``0.53 r / C`` for 4-bit m_low. Unquantized: 4 bytes per stored element.

    Example::

        opt = kaon.Adafactor8Bit(model.parameters(), lr=1e-3, relative_step=False)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    #: adafactor8bit (0.3.1 and 0.4.6) arguments kaon maps or refuses (docs/migrating.md); the
    #: others (lr, betas, eps, d, factored, quantize, apollo_*, ...) are kaon's own already
    upstream_arguments = {
        "use_cuda_kernel": upstream.ignored(
            _A8, "kaon runs one batched PyTorch path on every device (the same math as the "
            "upstream fallback and kernels)", when=lambda v: isinstance(v, bool),
            use="use_cuda_kernel must be True or False"),
        "warmup_init": upstream.refused(
            _A8, "kaon's relative step is min(lr, 1/sqrt(t)); for transformers.Adafactor's "
            "min(1e-6 t, 1/sqrt(t)) warm-up use relative_step=False with a linear-warmup LR "
            "scheduler", when=lambda v: v is not False),
        "lag_norm": upstream.refused(
            _A8, "kaon clips with the current step's exact norm (lag_norm=False)",
            when=lambda v: v is not False),
        "momentum_only_1d": upstream.refused(
            _A8, "kaon's 1-D (full-rank) momentum is the EMA of the raw gradient, the 0.3.1 rule "
            "(momentum_only_1d=False); None is accepted and means that rule",
            when=lambda v: v not in (None, False)),
        "warmup_multiplier": upstream.ignored(
            _A8, "it only primed CUDA's caching allocator; no number changes",
            when=lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
            use="warmup_multiplier must be a number >= 0"),
        "m_quant_type": upstream.rename(
            _A8, "momentum_dtype", _momentum_quant_type,
            "`momentum_dtype`: uf4 -> '4bit', uf8 -> 'int8', fp32 -> 'float32'; d4/d8 refused"),
        "v_quant_type": upstream.refused(
            _A8, "kaon stores quantized second moments in its adaptive log-space 8-bit codec "
            "(al8); for fp32 statistics use quantize=False (all state fp32) or raise "
            "min_8bit_size", when=lambda v: v != "al8"),
        "c_quant_type": upstream.refused(
            _A8, "kaon stores CAME's confidence like the second moment (al8 when quantized); "
            "for fp32 use quantize=False", when=lambda v: v not in (None, "al8")),
        "stochastic_round_writeback": upstream.rename(
            _A8, "bf16_method", _writeback,
            "`bf16_method`: True -> 'stochastic_rounding', False -> 'none' (round to nearest)"),
        "apollo_cache_proj": upstream.ignored(
            _A8, "kaon regenerates APOLLO's projection from its seed on the device each step, "
            "the same matrix the cache held", when=lambda v: isinstance(v, bool),
            use="apollo_cache_proj must be True or False"),
    }

    hyperparameter_checks: dict[str, Check] = {
        "lr": real(0.0),
        "beta1": optional(_UNIT),
        "momentum": optional(_UNIT),  # beta1 under torch's schedulers' name (cycle_momentum)
        "beta2": optional(_UNIT),
        "beta2_decay": optional(real(high=0.0)),
        "beta3": optional(_UNIT),
        "eps": _eps_check,
        "eps_came": real(0.0),
        "weight_decay": real(0.0),
        "d": real(0.0),
        "maximize": boolean(),
        "relative_step": boolean(),
        "scale_parameter": boolean(),
        "factored": boolean(),
        "quantize": boolean(),
        "block_size": integer(1),
        "m_block_size": integer(2),
        "momentum_dtype": choice(*MOMENTUM_DTYPES),
        "min_8bit_size": integer(0),
        "apollo_rank": integer(0, 65_536),  # a [rank, C] projection: 2**31 would take 8 GB
        "apollo_update_proj_gap": integer(1),
        "apollo_scale_type": choice(*APOLLO_SCALE_TYPES),
        "apollo_scale": real(0.0),
        "apollo_scale_front": boolean(),
        "apollo_eps": real(0.0),
        "apollo_factorize": boolean(),
        "enable_fira_for_adafactor": boolean(),
        "enable_fira_for_apollo": boolean(),
        "fira_margin": real(0.0),
        "bias_correction": optional(boolean()),
        "scale_weight_decay": boolean(),
        "bf16_method": choice(*BF16_METHODS),
    }
    layout_keys = (
        "beta1", "beta2", "beta2_decay", "beta3", "factored", "quantize", "block_size",
        "m_block_size", "momentum_dtype", "min_8bit_size", "apollo_rank", "apollo_factorize",
        "enable_fira_for_adafactor", "enable_fira_for_apollo", "bf16_method",
    )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        beta1: float | None = None,
        beta2: float | None = None,
        beta2_decay: float | None = -0.8,
        beta3: float | None = None,
        eps: tuple[float | None, float] = (1e-30, 1e-3),
        eps_came: float = 1e-16,
        weight_decay: float = 0.0,
        d: float = 1.0,
        *,
        maximize: bool = False,
        relative_step: bool = True,
        scale_parameter: bool = True,
        factored: bool = True,
        quantize: bool = True,
        block_size: int = 256,
        m_block_size: int = 128,
        momentum_dtype: str = "4bit",
        min_8bit_size: int = 4096,
        apollo_rank: int = 0,
        apollo_update_proj_gap: int = 200,
        apollo_scale_type: str = "channel",
        apollo_scale: float = 1.0,
        apollo_scale_front: bool = False,
        apollo_eps: float = 1e-6,
        apollo_factorize: bool = False,
        enable_fira_for_adafactor: bool = False,
        enable_fira_for_apollo: bool = True,
        fira_margin: float = 0.01,
        bias_correction: bool | None = None,
        scale_weight_decay: bool = True,
        bf16_method: str = "stochastic_rounding",
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, beta1=beta1, beta2=beta2, beta2_decay=beta2_decay, beta3=beta3, eps=eps,
            eps_came=eps_came, weight_decay=weight_decay, d=d, maximize=maximize,
            relative_step=relative_step, scale_parameter=scale_parameter, factored=factored,
            quantize=quantize, block_size=block_size, m_block_size=m_block_size,
            momentum_dtype=momentum_dtype, min_8bit_size=min_8bit_size,
            apollo_rank=apollo_rank, apollo_update_proj_gap=apollo_update_proj_gap,
            apollo_scale_type=apollo_scale_type, apollo_scale=apollo_scale,
            apollo_scale_front=apollo_scale_front, apollo_eps=apollo_eps,
            apollo_factorize=apollo_factorize,
            enable_fira_for_adafactor=enable_fira_for_adafactor,
            enable_fira_for_apollo=enable_fira_for_apollo, fira_margin=fira_margin,
            bias_correction=bias_correction, scale_weight_decay=scale_weight_decay,
            bf16_method=bf16_method,
        )
        if beta1 is not None:
            # torch's OneCycleLR / CyclicLR (cycle_momentum=True) look for a "momentum" key and
            # write the cycled value there; each step takes a changed one into beta1. Without
            # momentum there is nothing to cycle: no key, and torch's schedulers refuse
            defaults["momentum"] = beta1
        self._momentum_seen: dict[int, tuple[dict[str, Any], Any]] = {}
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
            fused=fused,
        )
        self.register_step_pre_hook(lambda opt, args, kwargs: opt._sync_momentum())

    # ------------------------------------------------------------ momentum for torch's schedulers
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a ``momentum`` given without ``beta1`` is its ``beta1``."""
        if isinstance(param_group, dict) and param_group.get("momentum") is not None:
            beta1 = param_group.get("beta1", param_group["momentum"])
            if beta1 != param_group["momentum"]:
                raise ValueError(f"{type(self).__name__}: a group with momentum="
                                 f"{param_group['momentum']!r} and beta1={beta1!r}: they are one "
                                 "setting (give one)")
            param_group = {**param_group, "beta1": beta1}
        super().add_param_group(param_group)
        self._seen_now()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._seen_now()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_momentum_seen", {})
        self._seen_now()

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        self._sync_momentum()
        super().step_param(p, group)

    def _seen_now(self) -> None:
        seen = self.__dict__.setdefault("_momentum_seen", {})
        live = {id(g) for g in self.param_groups}
        for key in [k for k in seen if k not in live]:
            del seen[key]
        for group in self.param_groups:
            if "momentum" in group and seen.get(id(group), (None,))[0] is not group:
                seen[id(group)] = (group, group["momentum"])

    def _sync_momentum(self) -> None:
        """A ``momentum`` written since the last step (by a scheduler) becomes ``beta1``;
        otherwise ``momentum`` follows ``beta1`` (a hand-set ``beta1`` wins)."""
        self._seen_now()
        owner = type(self).__name__
        for group in self.param_groups:
            if "momentum" not in group:
                continue
            written = group["momentum"]
            if written != self._momentum_seen[id(group)][1]:
                check_all({"momentum": self.hyperparameter_checks["momentum"]},
                          {"momentum": written}, owner)
                if group["beta1"] is None and written is not None:
                    raise ValueError(
                        f"{owner}: momentum={written!r} was set on a group with beta1=None (no "
                        "momentum state to cycle); construct it with beta1 set to cycle momentum")
                group["beta1"] = written
            group["momentum"] = group["beta1"]
            self._momentum_seen[id(group)] = (group, group["momentum"])

    # ------------------------------------------------------------------------ validation
    def check_group(self, group: dict[str, Any], owner: str) -> None:
        """The combination of a group's settings (an added group's, a checkpoint's)."""
        _check_combination(group, owner)

    # ------------------------------------------------------------------------ layout
    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return factored.matrix_shape(tuple(p.shape))

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        quant = group["quantize"] and p.numel() >= group["min_8bit_size"]
        stat: Codec = LogSpace8BitCodec(group["block_size"]) if quant else FloatCodec()
        slots = [Slot("step", FloatCodec(), ())]
        path = _path(group, view)
        moment = (momentum_codec(group["momentum_dtype"], group["m_block_size"]) if quant
                  else FloatCodec())
        if path == "apollo":
            rank = group["apollo_rank"]
            low = (view[0], rank) if view[0] >= view[1] else (rank, view[1])
            index = self._param_index(p)
            start = float((self.seed * 1_000_003 + index) % _SEED_INIT_LIMIT)
            slots.append(Slot("apollo_seed", IntegerCodec(), (),
                              init=lambda t, s=start: torch.full((), s)))
            if group["apollo_factorize"]:
                slots += [Slot("row_low", FloatCodec(), low[:1]),
                          Slot("col_low", FloatCodec(), low[1:])]
            else:
                slots.append(Slot("v_low", stat, low))
            if group["beta1"] is not None:
                slots.append(Slot("m_low", moment, low))
            if group["enable_fira_for_apollo"]:
                slots.append(Slot("fira_norm", FloatCodec(), ()))
            return slots
        if path == "factored":
            slots += [Slot("row", stat, view[:1]), Slot("col", stat, view[1:])]
        elif path != "sgd":
            slots.append(Slot("v", stat, view))
        if group["beta1"] is not None:
            slots.append(Slot("m", moment, view))
        if path == "factored" and group["beta3"] is not None:
            slots += [Slot("conf_row", stat, view[:1]), Slot("conf_col", stat, view[1:])]
        if group["enable_fira_for_adafactor"]:
            slots.append(Slot("fira_norm", FloatCodec(), ()))
        return slots

    def _param_index(self, p: Tensor) -> int:
        p = distributed.original(p)  # under FSDP2 the engine steps a whole-tensor stand-in
        for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)):
            if q is p:
                return i
        return 0

    # ------------------------------------------------------------------------ the rule
    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        g = batch.grad
        n, ndim = g.shape[0], g.ndim
        shape = (n,) + (1,) * (ndim - 1)
        path = _path(group, batch.view)
        beta2 = group["beta2"]
        eps1 = group["eps"][0]
        eps1 = _DEFAULT_EPS1 if eps1 is None else float(eps1)

        step = state["step"].add_(1.0)  # [N], exact integers
        new_state: dict[str, Tensor] = {"step": step}
        rho = _rho(group, step)
        alpha = rho
        if group["scale_parameter"]:
            alpha = ops.slice_rms(batch.param).reshape(n).clamp_min(group["eps"][1]) * rho
        weight = _sample_weight(group, step)  # float, [N] tensor or None (SGD)
        adam = path == "full" and not group["factored"] and beta2 is not None \
            and group["beta3"] is None
        correction = _bias_correction(group, step, adam or path == "apollo")

        if path == "apollo":
            direction = self._apollo(batch, state, new_state, weight, alpha, correction)
        else:
            u, rows, clipped = self._direction(batch, state, new_state, path, weight, eps1,
                                               adam, step)
            scale = _as_tensor(alpha, g) if correction is None else alpha * correction
            d = group["d"]
            fira = group["enable_fira_for_adafactor"]
            if (d > 0 and not clipped) or fira:
                # ||u||^2 of the final direction u * rows, without forming it
                if rows is None:
                    norm2 = ops.sum_squares(u.reshape(n, -1), dim=-1)
                else:
                    per_row = ops.sum_squares(u, dim=-1, keepdim=True).mul_(rows.square())
                    norm2 = ops.sum(per_row.reshape(n, -1), dim=-1)
                norm = norm2.sqrt_()
                if d > 0 and not clipped:  # the update clip u / max(1, RMS(u) / d)
                    clip = (norm / (math.sqrt(u[0].numel()) * d)).clamp_min_(1.0)
                    scale = scale / clip
                    norm = norm / clip
                if fira:
                    factor, new_state["fira_norm"] = lowrank.fira_limiter(
                        norm, state["fira_norm"], group["fira_margin"])
                    scale = scale * factor
            multiplier = scale.view(shape)
            if rows is not None:
                multiplier = rows * multiplier
            direction = u.mul_(multiplier)

        decay = group["weight_decay"]
        if decay != 0:
            w = alpha if group["scale_weight_decay"] else rho
            direction.addcmul_(batch.param, _as_tensor(w, g).view(shape), value=decay)
        return direction, new_state

    def _direction(self, batch: Batch, state: dict[str, Tensor], new_state: dict[str, Tensor],
                   path: str, weight: float | Tensor | None, eps1: float, adam: bool,
                   step: Tensor) -> tuple[Tensor, Tensor | None, bool]:
        """The update direction of the non-APOLLO paths as ``(u, rows, clipped)``.

        The direction is ``u * rows`` (``rows`` ``[N, R, 1]`` or None; the factored path keeps
        the row factor apart so that the norm, the clip and the step size cost one pass);
        ``u`` is a tensor this call owns. ``clipped``: the update clip does not apply any more
        (CAME clipped before its momentum and has no second clip).
        """
        group, g = batch.group, batch.grad
        beta1, d = group["beta1"], group["d"]
        came = group["beta3"] is not None
        eps_sq = max(eps1 * eps1, _TINY)
        u = batch.scratch("direction")
        if path == "sgd":
            if beta1 is None:
                return u.copy_(g), None, False
            m = state["m"].lerp_(g, 1.0 - beta1)
            new_state["m"] = m
            return torch.div(m, 1.0 - beta1, out=u), None, False

        if path == "factored":
            row, col = state["row"], state["col"]
            # g^2 once, then two plain sums (a norm over dim -2 is several times slower on CPU)
            squared = torch.mul(g, g, out=u)
            row_mean = ops.mean(squared, dim=-1).add_(eps1)
            col_mean = ops.mean(squared, dim=-2).add_(eps1)
            row.lerp_(row_mean, _like(weight, row))
            col.lerp_(col_mean, _like(weight, col))
            new_state["row"], new_state["col"] = row, col
            r, c = _inverse_sqrt_factors(row, col, eps1, eps_sq)
            if came:
                normalized = _clip(torch.mul(g, r, out=u).mul_(c), d)
                m = state["m"].lerp_(normalized, 1.0 - beta1)
                residual = torch.sub(normalized, m, out=normalized).square_().add_(
                    group["eps_came"])
                beta3 = group["beta3"]
                conf_row = state["conf_row"].lerp_(ops.mean(residual, dim=-1), 1.0 - beta3)
                conf_col = state["conf_col"].lerp_(ops.mean(residual, dim=-2), 1.0 - beta3)
                new_state.update(m=m, conf_row=conf_row, conf_col=conf_col)
                sr, sc = _inverse_sqrt_factors(conf_row, conf_col, eps1, eps_sq)
                return torch.mul(m, sc, out=residual), sr, True  # no second clip, as CAME
            source = g
            if beta1 is not None:
                source = state["m"].lerp_(g, 1.0 - beta1)
                new_state["m"] = source
            return torch.mul(source, c, out=u), r, False

        # full-rank second moment
        v = state["v"]
        squared = torch.mul(g, g, out=u)
        if adam:
            beta2 = group["beta2"]
            v.lerp_(squared, 1.0 - beta2)
            new_state["v"] = v
            source = g
            if beta1 is not None:
                source = state["m"].lerp_(g, 1.0 - beta1)
                new_state["m"] = source
            denom = torch.sqrt(v, out=u)
            if _correct(group, True):
                bc2 = _one_minus_pow(beta2, step).sqrt_()
                denom.add_(bc2.view(-1, *([1] * (g.ndim - 1))) * eps1)
            else:
                denom.add_(eps1)
            return torch.div(source, denom, out=denom), None, False
        v.lerp_(squared.add_(eps1), _like(weight, v))
        new_state["v"] = v
        inv = torch.clamp_min(v, eps_sq, out=u).rsqrt_()
        if came:
            normalized = _clip(inv.mul_(g), d)
            m = state["m"].lerp_(normalized, 1.0 - beta1)
            new_state["m"] = m
            # CAME's non-factored rule: the momentum of the clipped update, no second clip
            return normalized.copy_(m), None, True
        source = g
        if beta1 is not None:
            source = state["m"].lerp_(g, 1.0 - beta1)
            new_state["m"] = source
        return inv.mul_(source), None, False

    def _apollo(self, batch: Batch, state: dict[str, Tensor], new_state: dict[str, Tensor],
                weight: float | Tensor, alpha: float | Tensor,
                correction: Tensor | None) -> Tensor:
        """APOLLO's step direction ``alpha * correction * G * s'`` (before weight decay)."""
        group, g = batch.group, batch.grad
        n, rows, cols = g.shape
        rank = group["apollo_rank"]
        right = rows >= cols
        step = new_state["step"]
        seed = lowrank.refresh_seed(state["apollo_seed"], step, group["apollo_update_proj_gap"])
        new_state["apollo_seed"] = seed
        proj_shape = (rank, cols) if right else (rows, rank)
        projection = lowrank.gaussian_projection(seed, proj_shape, rank)
        low = lowrank.project(g, projection, right)
        eps = group["apollo_eps"]
        squared = low.square()
        if group["apollo_factorize"]:
            row, col = state["row_low"], state["col_low"]
            row.lerp_(ops.mean(squared, dim=-1), _like(weight, row))
            col.lerp_(ops.mean(squared, dim=-2), _like(weight, col))
            new_state["row_low"], new_state["col_low"] = row, col
            mu = ops.mean(row, dim=-1, keepdim=True).clamp_min_(max(eps, _TINY))
            second = (row / mu).unsqueeze(-1) * col.unsqueeze(-2)
        else:
            second = state["v_low"].lerp_(squared, _like(weight, squared)).clamp_min_(_TINY)
            new_state["v_low"] = second
        numerator = low
        if group["beta1"] is not None:
            numerator = state["m_low"].lerp_(low, 1.0 - group["beta1"])
            new_state["m_low"] = numerator
        update_low = torch.div(numerator, second.sqrt().add_(eps))
        scale = lowrank.apollo_scaling(update_low, low, right,
                                       group["apollo_scale_type"] == "channel")
        root = math.sqrt(group["apollo_scale"])
        if group["apollo_scale_front"]:
            scale.mul_(root)
        norm = lowrank.scaled_norm(g, scale)  # ||G * s||, before the limiter
        if group["enable_fira_for_apollo"]:
            factor, new_state["fira_norm"] = lowrank.fira_limiter(
                norm, state["fira_norm"], group["fira_margin"])
            scale = scale * factor.view(n, 1, 1)
        if not group["apollo_scale_front"]:
            scale = scale * root
        step_size = _as_tensor(alpha, g)
        if correction is not None:
            step_size = step_size * correction
        if group["d"] > 0:
            clip = (norm / (math.sqrt(rows * cols) * group["d"])).clamp_min_(1.0)
            step_size = step_size / clip
        scale = scale * step_size.view(n, 1, 1)
        return torch.mul(g, scale, out=batch.scratch("direction"))


# ---------------------------------------------------------------------------- helpers
def _check_combination(group: dict[str, Any], owner: str) -> None:
    """Checks across arguments, run before a group is stored."""
    sgd = group["beta2"] is None and group["beta2_decay"] is None
    if sgd:
        for key, bad in (("relative_step", group["relative_step"]),
                         ("apollo_rank", group["apollo_rank"] > 0),
                         ("beta3", group["beta3"] is not None)):
            if bad:
                raise ValueError(
                    f"{owner}: SGD mode (beta2=None and beta2_decay=None) needs "
                    f"relative_step=False, apollo_rank=0 and beta3=None; got {key}="
                    f"{group[key]!r}")
    if group["beta3"] is not None:
        if group["beta1"] is None:
            raise ValueError(f"{owner}: beta3 (CAME) needs beta1 to be set; got beta1=None")
        if not group["factored"]:
            raise ValueError(f"{owner}: beta3 (CAME) needs factored=True; got factored=False")
        if group["apollo_rank"] > 0:
            raise ValueError(
                f"{owner}: beta3 (CAME) and apollo_rank > 0 (APOLLO) are mutually exclusive; "
                f"got beta3={group['beta3']!r}, apollo_rank={group['apollo_rank']!r}")


def _path(group: dict[str, Any], view: tuple[int, ...]) -> str:
    """Which rule a parameter of this view follows: sgd, apollo, factored or full."""
    if group["beta2"] is None and group["beta2_decay"] is None:
        return "sgd"
    if len(view) == 2 and group["apollo_rank"] > 0:
        return "apollo"
    if len(view) == 2 and group["factored"]:
        return "factored"
    return "full"


def _like(weight: float | Tensor, target: Tensor) -> float | Tensor:
    """A per-slice weight (float or ``[N]``) shaped to broadcast over ``target`` ``[N, ...]``."""
    if isinstance(weight, Tensor):
        return weight.view(-1, *([1] * (target.ndim - 1)))
    return weight


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=torch.float32)
    return torch.full((like.shape[0],), float(value), device=like.device)


def _rho(group: dict[str, Any], step: Tensor) -> Tensor:
    """The step size before parameter scaling, ``[N]``: ``min(lr, 1/sqrt(t))`` or ``lr``."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        lr = lr.to(device=step.device, dtype=torch.float32).reshape(()).expand(step.shape[0])
    else:
        lr = torch.full_like(step, float(lr))
    if group["relative_step"]:
        return torch.minimum(lr, step.rsqrt())
    return lr


def _sample_weight(group: dict[str, Any], step: Tensor) -> float | Tensor | None:
    """The new-sample weight of the second moment: 1 - beta2, t ** beta2_decay, or None."""
    if group["beta2"] is not None:
        return 1.0 - float(group["beta2"])
    if group["beta2_decay"] is None:
        return None
    return torch.exp(step.double().log() * float(group["beta2_decay"])).float()


def _one_minus_pow(beta: float, step: Tensor) -> Tensor:
    """``1 - beta ** step`` without the cancellation of fp32 ``1 - 0.999 ** 1``."""
    if beta == 0.0:
        return torch.ones_like(step)
    return torch.expm1(step * math.log(beta)).neg_()


def _correct(group: dict[str, Any], default: bool) -> bool:
    if group["relative_step"]:
        return False
    if group["bias_correction"] is None:
        return default
    return bool(group["bias_correction"])


def _bias_correction(group: dict[str, Any], step: Tensor, default: bool) -> Tensor | None:
    """``sqrt(1 - beta2^t) / (1 - beta1^t)`` ``[N]`` (each factor where its beta is set), or
    None when no correction applies."""
    if not _correct(group, default):
        return None
    factor = None
    if group["beta2"] is not None:
        factor = _one_minus_pow(float(group["beta2"]), step).sqrt_()
    if group["beta1"] is not None:
        first = _one_minus_pow(float(group["beta1"]), step).reciprocal_()
        factor = first if factor is None else factor.mul_(first)
    return factor


def _inverse_sqrt_factors(row: Tensor, col: Tensor, eps1: float,
                          eps_sq: float) -> tuple[Tensor, Tensor]:
    """``r [N, R, 1]`` and ``c [N, 1, C]`` with ``r c = 1 / sqrt(row_i col_j / mu)``."""
    mu = ops.mean(row, dim=-1, keepdim=True).clamp_min_(max(eps1, _TINY))
    r = (torch.clamp_min(row, eps_sq) / mu).rsqrt_()
    c = torch.clamp_min(col, eps_sq).rsqrt_()
    return r.unsqueeze(-1), c.unsqueeze(-2)


def _clip(u: Tensor, d: float) -> Tensor:
    """The update clip ``u / max(1, RMS(u) / d)`` in place; ``d = 0`` leaves ``u`` unchanged."""
    if d > 0:
        return ops.rms_clip_(u, d)
    return u


# ------------------------------------------------------------------------- parameter groups
#: the settings of each preset for the dense weight groups (2-D and conv kernels)
PRESETS: dict[str, dict[str, Any]] = {
    "adafactor": dict(beta1=None, beta2=None, beta2_decay=-0.8, factored=True,
                      relative_step=False, scale_parameter=True, d=1.0),
    "came": dict(beta1=0.9, beta2=0.999, beta3=0.9999, factored=True, relative_step=False,
                 scale_parameter=False, d=1.0, eps_came=1e-16),
    "apollo": dict(beta1=0.9, beta2=0.999, relative_step=False, scale_parameter=False, d=0.0,
                   eps=(1e-6, 1e-3), enable_fira_for_apollo=True),
    "adamw": dict(beta1=0.9, beta2=0.999, factored=False, relative_step=False,
                  scale_parameter=False, d=0.0, eps=(1e-8, 1e-3)),
    # SGD mode: no second moment, unscaled, no clip; beta1 (None here) gives heavy-ball momentum
    "sgd": dict(beta1=None, beta2=None, beta2_decay=None, relative_step=False,
                scale_parameter=False, d=0.0),
    # RMSprop: a full second moment at beta2 = 0.99 (the Adam denominator), no momentum
    "rmsprop": dict(beta1=None, beta2=0.99, factored=False, relative_step=False,
                    scale_parameter=False, d=0.0, eps=(1e-8, 1e-3)),
}
#: the groups (routes) build_param_groups makes, in order; a policy's keys
ROUTES = ("sensitive", "embedding", "matrix", "matrix_full", "conv")


def build_param_groups(
    model: torch.nn.Module,
    preset: str = "adafactor",
    *,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
    apollo_rank: int = 256,
    beta1: float | None | str = "preset",
    grouping: str = "auto",
    policy: dict[str, Any] | str | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`Adafactor8Bit` following the recommended recipe.

    Every trainable parameter lands in exactly one of up to five groups (empty ones are left
    out), each carrying ``param_names``:

    1. ``sensitive``: 1-D parameters, biases and normalization weights: not quantized, no weight
       decay, no momentum, the preset's second moment;
    2. ``embedding``: ``nn.Embedding`` / ``nn.EmbeddingBag`` weights as momentum-free Adam
       (``factored=False, scale_parameter=False, d=0``, ``beta2=0.999``, bias-corrected, no
       weight decay), at ``embedding_lr`` when given: per-token updates with no cold-token
       interference through a shared factor or clip;
    3. ``matrix``: 2-D weights, quantized, with weight decay; the preset's rule, with the
       ``apollo`` preset APOLLO at ``apollo_rank`` (matrices whose smaller side is not larger
       than the rank go to ``matrix_full`` instead);
    4. ``matrix_full``: such small matrices with the ``apollo`` preset (quantized, factored, no
       APOLLO);
    5. ``conv``: weights with more than 2 dimensions, quantized, with weight decay, full-rank
       second moment (``factored=False``) to keep the spatial structure.

    Presets (:data:`PRESETS`): ``adafactor`` (schedule ``beta2_decay=-0.8``, factored, scaled
    by RMS(p), no momentum), ``came`` (0.9 / 0.999 / 0.9999, unscaled, clip 1), ``apollo``
    (0.9 / 0.999, APOLLO with Fira, no clip), ``adamw`` (0.9 / 0.999, full second moment, Adam
    denominator, unscaled, no clip). ``beta1`` overrides the momentum of the ``matrix`` and
    ``conv`` groups (None: momentum-free, the smallest state); the default keeps the preset's.
    ``sgd`` (SGD mode: no second moment, unscaled, no clip) and ``rmsprop`` (full second moment
    at ``beta2=0.99``, no momentum, unscaled, no clip) complete adafactor8bit's preset list.

    ``grouping``: ``"auto"`` (the only grouping, adafactor8bit's default). ``policy``: options
    laid over the groups (adafactor8bit's JSON policy): a dict or a JSON string ``{"defaults":
    {...}, "<route>": {...}}`` with routes from :data:`ROUTES`; ``defaults`` apply to every
    group, a route's options to its group (defaults < preset < policy defaults < route). Every
    option is checked as an :class:`Adafactor8Bit` group key when the optimizer is built; a
    route with ``apollo_rank`` whose parameters are not 2-D or have a side not larger than the
    rank raises ``ValueError`` here.
    Pass the result to ``Adafactor8Bit(groups, lr=...)``; group keys override the constructor's.
    """
    if grouping != "auto":
        raise ValueError(f"grouping must be 'auto' (kaon's only grouping); got {grouping!r}")
    overlay = _policy(policy)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}")
    real(0.0)("weight_decay", weight_decay)
    optional(real(0.0))("embedding_lr", embedding_lr)
    integer(1)("apollo_rank", apollo_rank)
    if beta1 != "preset":
        optional(_UNIT)("beta1", beta1)
    from kaon.grouping import NORM_TYPES

    base = dict(PRESETS[preset])
    dense = {**base, "quantize": True, "weight_decay": weight_decay}
    if beta1 != "preset":
        dense["beta1"] = beta1
        if beta1 is None:
            dense.pop("beta3", None)  # CAME needs momentum
    sensitive = {k: v for k, v in base.items() if k not in ("beta1", "beta3")}
    sensitive.update(quantize=False, weight_decay=0.0, beta1=None)
    if preset == "adamw":
        sensitive.update(factored=False)
    embedding = dict(factored=False, scale_parameter=False, d=0.0, beta1=None, beta2=0.999,
                     relative_step=False, eps=(1e-8, 1e-3), weight_decay=0.0,
                     bias_correction=True)
    if embedding_lr is not None:
        embedding["lr"] = embedding_lr
    groups: dict[str, dict[str, Any]] = {
        "sensitive": {**sensitive, "params": [], "param_names": []},
        "embedding": {**embedding, "params": [], "param_names": []},
        "matrix": {**dense, "params": [], "param_names": []},
        "matrix_full": {**dense, "params": [], "param_names": []},
        "conv": {**dense, "factored": False, "params": [], "param_names": []},
    }
    if preset == "apollo":
        groups["matrix"]["apollo_rank"] = apollo_rank
        groups["matrix_full"].update(factored=True, beta2=None, beta2_decay=-0.8)
    groups["conv"].pop("beta3", None)  # CAME needs a factored second moment
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
                key = "embedding"
            elif p.ndim < 2 or isinstance(module, NORM_TYPES) or name == "bias":
                key = "sensitive"
            elif p.ndim > 2:
                key = "conv"
            elif preset == "apollo" and min(p.shape[0], p.numel() // p.shape[0]) <= apollo_rank:
                key = "matrix_full"
            else:
                key = "matrix"
            groups[key]["params"].append(p)
            groups[key]["param_names"].append(full)
    for key, group in groups.items():
        group["name"] = key
        group.update(overlay.get("defaults", {}))
        group.update(overlay.get(key, {}))
        rank = group.get("apollo_rank", 0)
        for name, p in zip(group["param_names"], group["params"]):
            if rank and (p.ndim != 2 or min(p.shape) <= rank):
                raise ValueError(
                    f"policy: route {key!r} sets apollo_rank={rank}, but {name} has shape "
                    f"{tuple(p.shape)} (APOLLO needs 2-D parameters with both sides larger than "
                    "the rank)"
                )
    return [g for g in groups.values() if g["params"]]


def _policy(policy: dict[str, Any] | str | None) -> dict[str, dict[str, Any]]:
    """A policy as ``{route or "defaults": {option: value}}``, checked for its shape."""
    if policy is None:
        return {}
    if isinstance(policy, str):
        import json

        try:
            policy = json.loads(policy)
        except json.JSONDecodeError as error:
            raise ValueError(f"policy: not valid JSON ({error})") from None
    if not isinstance(policy, dict):
        raise TypeError(f"policy must be a dict or a JSON object string; got {type(policy).__name__}")
    known = ("defaults", *ROUTES)
    for route, options in policy.items():
        if route not in known:
            raise ValueError(f"policy: unknown route {route!r}; routes: {', '.join(known)}")
        if not isinstance(options, dict) or any(k in ("params", "param_names", "name")
                                                for k in options):
            raise ValueError(f"policy: route {route!r} must map option names (not params) to "
                             "values")
    return policy
