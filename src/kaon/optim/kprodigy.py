"""KProdigy: Prodigy's D-adaptation (parameter-free Adam) on the kaon backend."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from kaon import engine, ops, upstream
from kaon.engine import Batch, Slot
from kaon.kernels import compiled
from kaon.optimizer import KaonOptimizer
from kaon.precision import BF16_METHODS
from kaon.state import factored
from kaon.state.codecs import MOMENTUM_DTYPES, FloatCodec, momentum_codec
from kaon.validation import boolean, choice, integer, optional, pair, real

__all__ = ["KProdigy"]

SECOND_MOMENTS = ("full", "factored")
_QUANTIZED = ("int8", "4bit")
#: group keys KProdigy keeps per group (its D estimate; checkpointed with ``param_groups``)
D_KEYS = ("d", "d_max", "d_numerator", "d_denom", "d_hat", "k")


def _growth_rate(name: str, value: Any) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == math.inf:
        return
    real(0.0, low_inclusive=False)(name, value)


class KProdigy(KaonOptimizer, names=("KProdigy", "K-Prodigy")):
    r"""Prodigy (Mishchenko & Defazio, 2023): Adam whose step size D is estimated on the fly.

    Train at ``lr=1.0``; ``lr`` scales the estimated step. With every default this is
    ``prodigyopt.Prodigy`` 1.1.2 (one parameter group, fp32 parameters): the D trajectory agrees to
    about 1e-7 relative (the per-tensor dot product is summed in another order than BLAS's
    ``sdot``), the rest of the arithmetic is the reference's, operation by operation.

    Per D scope (the whole optimizer, or each group with ``independent_d``), at group step ``k``
    with ``d`` the current estimate, ``bc = sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1))`` with
    ``use_bias_correction`` (else 1), ``dlr = d * lr * bc``, ``beta3`` (default
    ``sqrt(beta2)``) and ``x_s = x.flatten()[::slice_p]``:

    1. gradient: ``g`` (fp32), centralized (optional, ndim >= 2), plus ``weight_decay * p`` when
       ``decouple=False``; ``p.grad`` is never modified.
    2. statistics pass (every ``d_update_freq``-th step), over every tensor of the scope:
       ``r = beta3 * r + sum (d/d0) dlr <g_s, p0_s - p_s>``;
       ``s <- beta3 s + (d/d0) dlr g_s`` (``(d/d0) d g_s`` with ``safeguard_warmup``);
       ``D = sum ||s||_1``.
    3. if ``D == 0`` nothing else happens this step (as in the reference). Else
       ``d_hat = d_coef * r / D``; ``d <- max(d, d_hat)`` while ``d == d0``;
       ``d_max <- max(d_max, d_hat)``; ``d_new = min(d_max, d * growth_rate)``.
    4. update pass: ``m <- beta1 m + (1 - beta1) d g``; ``v <- beta2 v + (1 - beta2) d^2 g^2``
       (factored: row/column means of ``d^2 g^2``, Adafactor's rank-one ``v``);
       ``delta = dlr * m / (sqrt(v) + d_new eps)`` (``beta1 = 0``: ``dlr * d_new * g / (...)``),
       plus ``dlr * weight_decay * p`` when ``decouple=True``; cautious masking (optional);
       ``p <- p - delta`` with ``bf16_method``. Then ``k <- k + 1``. The *old* ``dlr`` steps the
       weights and the new ``d`` enters eps, as in the reference.

    The scalar statistics of all tensors are reduced in the parameters' order and read back once
    per step (one host synchronization per step, not one per tensor); D is updated in Python
    float64 arithmetic exactly as the reference does. ``group["d"]`` is a float: log
    ``group["d"] * group["lr"]`` as the effective learning rate, or call :meth:`get_d`.

    Args:
        params: parameters or parameter groups.
        lr (float, default 1.0): multiplier of the estimated step; a group with ``lr=0`` is frozen
            (nothing of it changes).
        betas (tuple, default (0.9, 0.999)): Adam's ``beta1`` (0 disables the momentum and its
            memory) and ``beta2``, each in [0, 1).
        beta3 (float | None, default None): decay of the D statistics; None means
            ``sqrt(beta2)``.
        eps (float, default 1e-8): added to ``sqrt(v)``, times ``d``; > 0.
        weight_decay (float, default 0.0): weight decay, >= 0.
        decouple (bool, default True): AdamW-style decoupled weight decay (else added to the
            gradient).
        use_bias_correction (bool, default False): Adam's bias correction in ``dlr``, times
            K-Prodigy's clamp ``min(max(d / d0, 0.1), 1)`` (1 unless ``growth_rate < 1`` lets D
            fall below ``d0``).
        safeguard_warmup (bool, default False): leave lr out of ``s`` (Prodigy's warm-up guard).
        d0 (float, default 1e-6): initial D, > 0. Raise it (1e-5 .. 1e-4) if D grows too slowly.
        d_coef (float, default 1.0): multiplier of the D estimate (the preferred tuning knob).
        growth_rate (float, default inf): cap of D's growth per step (e.g. 1.02 for a warm-up).
        d_update_freq (int, default 1): update D every this many steps (>= 1); on the other
            steps the statistics pass is skipped. K-Prodigy's code default was 5 (its own
            changelog had announced 1); kaon keeps 1, prodigyopt's every-step estimate: 5 delays
            D's growth (measured in docs/migrating.md).
        slice_p (int, default 1): keep the D statistics of every ``slice_p``-th element only
            (>= 1; 11 is a good memory/accuracy trade-off).
        independent_d (bool | None, default None): one D per parameter group (then groups may
            have different lrs). None: on when there is more than one group. Off: one D for all
            groups, whose lrs must all equal the largest or be 0 (else ``RuntimeError``), and
            whose D settings (betas, beta3, d0, d_coef, growth_rate, d_update_freq,
            use_bias_correction, safeguard_warmup) are the first group's.
        momentum_dtype (str | None, default None): storage of ``m``: "float32", "bfloat16",
            "int8" or "4bit"; None: the parameter's dtype (float32 for fp16 parameters).
            int8 / 4bit store ``m / d`` (so the codec's scale never meets the tiny d0 scale).
        momentum_4bit_block (int, default 128): block of the 4-bit codec.
        second_moment (str, default "full"): "full" (fp32 ``v``) or "factored" (fp32 row and
            column statistics for ndim >= 2; 1-D and 0-D keep a full ``v``).
        eps_factored (float, default 1e-30): added to the factored means, > 0.
        cautious (bool, default False): cautious masking of the step.
        gradient_centralization (bool, default False): centralize gradients of ndim >= 2.
        bf16_method (str, default "stochastic_rounding"): "stochastic_rounding", "kahan" or
            "none" for bf16 / fp16 parameters.
        maximize (bool, default False): maximize the objective.
        foreach, foreach_batch_cutoff, foreach_stack_budget, nonfinite_grad, seed: see
            :class:`kaon.optimizer.KaonOptimizer`. With ``nonfinite_grad="skip"`` a tensor with
            a non-finite gradient adds nothing to the numerator and its unchanged ``||s||_1`` to
            ``D``.
        compile (bool, default False): run the statistics pass and the update pass (full second
            moment, without cautious masking) as compiled kernels
            (:mod:`kaon.kernels.compiled`, ``torch.compile``): each pass reads and writes every
            tensor once instead of once per operation: 0.66-0.79x ``prodigyopt``'s CPU step on a
            56M-parameter LLM-like stack, where the eager path is 1.2x. Needs a
            working ``torch.compile`` (a C++ compiler on the CPU; ``RuntimeError`` at
            construction otherwise); the first steps compile (seconds). Same state and
            checkpoints; results equal the eager path up to rounding (D within 1.4e-6
            relative, weights within 3e-7 of ``prodigyopt`` over the parity runs). Other
            settings, and chunks with a non-finite
            gradient, run the eager rule.

    State per parameter (the checkpoint format), with ``n = ceil(numel / slice_p)``: ``s`` fp32
    ``[n]``; ``p0`` fp32 ``[n]`` (the initial slice; ``[1]`` zero when that slice is all zero,
    e.g. a LoRA B factor); with beta1 > 0 ``m`` (+ ``m_scale`` for int8 / 4bit) in the view
    shape (``[R, C]`` for ndim >= 2, ``[numel]`` otherwise); ``v`` fp32, or ``row`` ``[R]`` and
    ``col`` ``[C]`` fp32 when factored; ``shift`` for Kahan on low-precision parameters.
    Per group: ``d``, ``d0``, ``d_max``, ``d_numerator``, ``d_denom``, ``d_hat``, ``k``.

    Bytes per parameter: ``8 / slice_p`` (``s``, ``p0``) + second moment 4 (full) or
    ``4 (R + C) / (R C)`` (factored) + momentum 4 / 2 / ``1 + 4/C`` / ``0.5 + 4/block``
    (float32 / bfloat16 / int8 / 4bit, 0 with beta1 = 0). Factored + 4bit + ``slice_p=11``:
    about 1.27; factored + int8 + ``slice_p=11``: about 1.74; defaults on fp32: 16.

    Not a per-parameter (gradient-release) optimizer: D needs a reduction over every parameter
    before any update, so :meth:`step_param` raises.

    Example::

        opt = kaon.KProdigy(model.parameters(), lr=1.0)
        loss.backward(); opt.step(); opt.zero_grad()
        print(opt.get_d() * opt.param_groups[0]["lr"])  # the effective learning rate
    """

    #: not on the compiled path by default (``fused=None``): its rule reads the parameters' dtypes from ``batch.params`` and it has its own compiled
    #: kernels (``compile=True``)
    fusable = False

    #: arguments of reference Prodigy (prodigyopt) and K-Prodigy / K-Optimizers' KProdigy that
    #: kaon maps or refuses (docs/migrating.md); the rest are kaon's own arguments already
    upstream_arguments = {
        "factor_conv_as_matrix": upstream.refused(
            upstream.K_OPTIMIZERS, "kaon always factors a conv kernel as the [out, in*kh*kw] "
            "matrix (factor_conv_as_matrix=True); for a per-element second moment of a conv "
            "use second_moment='full' (the default)", when=lambda v: v is not True),
        "fsdp_in_use": upstream.ignored(
            "prodigyopt", "kaon finds FSDP2 (DTensor) parameters itself and reduces D's sums "
            "over the ranks (docs/distributed.md)",
            when=lambda v: isinstance(v, bool), use="fsdp_in_use must be True or False"),
    }

    hyperparameter_checks = {
        "lr": real(0.0),
        "betas": pair(real(0.0, 1.0, high_inclusive=False), real(0.0, 1.0, high_inclusive=False)),
        "beta3": optional(real(0.0, 1.0)),
        "eps": real(0.0, low_inclusive=False),
        "weight_decay": real(0.0),
        "decouple": boolean(),
        "use_bias_correction": boolean(),
        "safeguard_warmup": boolean(),
        "d0": real(1e-20, 1e6),  # smaller: d0**2 underflows; larger: no initial estimate
        "d_coef": real(0.0, low_inclusive=False),
        "growth_rate": _growth_rate,
        "d_update_freq": integer(1),
        "slice_p": integer(1),
        "momentum_dtype": optional(choice(*MOMENTUM_DTYPES)),
        "momentum_4bit_block": integer(),
        "second_moment": choice(*SECOND_MOMENTS),
        "eps_factored": real(0.0, low_inclusive=False),
        "cautious": boolean(),
        "gradient_centralization": boolean(),
        "bf16_method": choice(*BF16_METHODS),
        "maximize": boolean(),
        # the D estimate rides in every group: a checkpoint's (or add_param_group's) values are
        # checked like arguments, so a NaN or negative D cannot reach the weights
        # at most 1e18: the rules square d (d**2 must stay finite in float32)
        "d": real(0.0, 1e18, low_inclusive=False),
        "d_max": real(0.0, 1e18, low_inclusive=False),
        "d_numerator": real(),
        "d_denom": real(0.0),
        "d_hat": real(),
        "k": integer(0),
    }
    layout_keys = ("betas", "slice_p", "momentum_dtype", "momentum_4bit_block", "second_moment",
                   "bf16_method")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float | None = None,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decouple: bool = True,
        use_bias_correction: bool = False,
        safeguard_warmup: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        growth_rate: float = math.inf,
        d_update_freq: int = 1,
        slice_p: int = 1,
        independent_d: bool | None = None,
        momentum_dtype: str | None = None,
        momentum_4bit_block: int = 128,
        second_moment: str = "full",
        eps_factored: float = 1e-30,
        cautious: bool = False,
        gradient_centralization: bool = False,
        bf16_method: str = "stochastic_rounding",
        maximize: bool = False,
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
        compile: bool = False,
    ) -> None:
        if not isinstance(compile, bool):
            raise TypeError(f"KProdigy: compile must be True or False; got {compile!r}")
        if independent_d is not None and not isinstance(independent_d, bool):
            raise TypeError(
                f"KProdigy: independent_d must be None, True or False; got {independent_d!r}"
            )
        self.independent_d = independent_d
        self._scalars: dict[int, dict[str, float]] = {}
        defaults = dict(
            lr=lr, betas=betas, beta3=beta3, eps=eps, weight_decay=weight_decay,
            decouple=decouple, use_bias_correction=use_bias_correction,
            safeguard_warmup=safeguard_warmup, d0=d0, d_coef=d_coef, growth_rate=growth_rate,
            d_update_freq=d_update_freq, slice_p=slice_p, momentum_dtype=momentum_dtype,
            momentum_4bit_block=momentum_4bit_block, second_moment=second_moment,
            eps_factored=eps_factored, cautious=cautious,
            gradient_centralization=gradient_centralization, bf16_method=bf16_method,
            maximize=maximize,
            d=d0, d_max=d0, d_numerator=0.0, d_denom=0.0, d_hat=0.0, k=0,
        )
        super().__init__(
            params, defaults, foreach=foreach, foreach_batch_cutoff=foreach_batch_cutoff,
            foreach_stack_budget=foreach_stack_budget, nonfinite_grad=nonfinite_grad, seed=seed,
        )
        if compile:
            devices = {p.device.type for g in self.param_groups for p in g["params"]}
            missing = sorted(d for d in devices if not compiled.available(d))
            if missing:
                raise RuntimeError(
                    f"KProdigy: compile=True needs a working torch.compile on {missing} (on the "
                    "CPU a C++ compiler, on CUDA Triton); use compile=False"
                )
        self.compile = compile

    # ------------------------------------------------------------------------ bookkeeping
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; a group with its own ``d0`` starts its D estimate there."""
        if isinstance(param_group, dict) and "d0" in param_group:
            param_group = dict(param_group)
            param_group.setdefault("d", param_group["d0"])
            param_group.setdefault("d_max", param_group["d0"])
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("independent_d", None)
        self.__dict__.setdefault("compile", False)
        self._scalars = {}

    def get_d(self, group: int = 0) -> float:
        """The current D estimate of parameter group ``group`` (a float)."""
        return float(self.param_groups[group]["d"])

    def uses_independent_d(self) -> bool:
        """Whether each group has its own D at the next step (``independent_d``, or None and
        more than one group)."""
        if self.independent_d is None:
            return len(self.param_groups) > 1
        return self.independent_d

    def gradient_release_blocker(self) -> str:
        """KProdigy never steps one parameter at a time: see :meth:`step_param`."""
        return (
            "KProdigy cannot step one parameter at a time (gradient release / step_param / "
            "step_parameter): its D estimate is a reduction over every parameter that must be "
            "complete before any parameter is updated. Call optimizer.step() after backward."
        )

    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Not supported: see the class docstring."""
        raise RuntimeError(self.gradient_release_blocker())

    def step_parameter(self, p: Tensor, group: dict[str, Any], i: int) -> None:
        """Not supported: see :meth:`step_param`."""
        self.step_param(p, group)

    # ------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step (statistics pass, D update, update pass) over every group.

        ``closure`` (optional) re-evaluates the model and returns the loss; it is run with
        gradients enabled and its result returned.
        """
        loss, collected = self._begin_step(closure)
        kernels = compiled.allow_graphs() if self.compile else contextlib.nullcontext()
        with engine.gradients_checked_once(self), kernels:  # both passes read the gradients
            self._step_scopes({id(g): params for g, params in collected})
        return loss

    def _step_scopes(self, work: dict[int, list[Tensor]]) -> None:
        """The statistics pass, the D update and the update pass of every D scope."""
        groups = self.param_groups
        if self.uses_independent_d():
            scopes = [[g] for g in groups]
        else:
            top = max(g["lr"] for g in groups)
            for i, g in enumerate(groups):
                if g["lr"] not in (top, 0.0):
                    raise RuntimeError(
                        f"KProdigy: with one D for all groups (independent_d={self.independent_d})"
                        f" every group's lr must be the largest lr ({top}) or 0; group {i} has lr "
                        f"{g['lr']}. Pass independent_d=True to give each group its own D."
                    )
            scopes = [groups]

        # statistics pass of every scope that updates D this step
        pending = []
        for scope in scopes:
            active = [g for g in scope if g["lr"] > 0 and any(p.numel() for p in work[id(g)])]
            if not active:
                continue
            lead = scope[0]
            d, d0 = lead["d"], lead["d0"]
            beta1, beta2 = lead["betas"]
            beta3 = lead["beta3"] if lead["beta3"] is not None else math.sqrt(beta2)
            k = lead["k"]
            bc = 1.0
            if lead["use_bias_correction"]:
                bc = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1))
                # K-Prodigy's adaptive clamp: while D is below d0 (only possible with
                # growth_rate < 1) the correction is damped by d / d0, never below 0.1; with
                # d >= d0 (always, for growth_rate >= 1) it is prodigyopt's bc exactly
                bc *= min(max(d / d0, 0.1), 1.0)
            lr = max(g["lr"] for g in scope)
            dlr = d * lr * bc
            update_d = k % lead["d_update_freq"] == 0
            stats = []
            for g in active:
                glr = d * g["lr"] * bc  # = dlr of the scope for every active group of a shared one
                self._scalars[id(g)] = dict(
                    d=d, dlr=glr, beta3=beta3,
                    s_coef=(d / d0) * (d if lead["safeguard_warmup"] else glr),
                )
                if update_d:
                    stats.append(self._statistics_of(g, work[id(g)]))
            pending.append((scope, active, dict(d=d, d0=d0, dlr=dlr, beta3=beta3), stats))

        values = [part for *_, stats in pending for part in stats]
        # the step's one host synchronization: every scope's statistics at once
        rows = iter(torch.cat([v.to(values[0].device) for v in values]).tolist() if values else [])

        for scope, active, scalars, stats in pending:
            lead = scope[0]
            d = scalars["d"]
            if stats:
                delta_numerator, d_denom = 0.0, 0.0
                coef = (d / scalars["d0"]) * scalars["dlr"]
                for _ in range(sum(len(s) for s in stats)):
                    dot, norm = next(rows)
                    delta_numerator += coef * dot
                    d_denom += norm
                if d_denom == 0:
                    continue  # no progress possible yet: as the reference, change no parameter
                d_numerator = lead["d_numerator"] * scalars["beta3"] + delta_numerator
                d_hat = lead["d_coef"] * d_numerator / d_denom
                d_max = lead["d_max"]
                if d == lead["d0"]:
                    d = max(d, d_hat)
                d_max = max(d_max, d_hat)
                d = min(d_max, d * lead["growth_rate"])
                for g in scope:
                    g.update(d_numerator=d_numerator, d_denom=d_denom, d=d, d_max=d_max,
                             d_hat=d_hat)
            for g in active:
                self._scalars[id(g)]["d_new"] = d
                engine.run_group(self, g, work[id(g)])
            k = lead["k"] + 1
            for g in scope:
                g["k"] = k
        self._scalars.clear()

    def _statistics_of(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        """``[len(params with elements), 2]`` fp32 (dot, ||s||_1) rows in the group's order."""
        runs = engine.run_group(self, group, params, statistics=self._statistics,
                                reads=("s", "p0"))
        order = {id(p): i for i, p in enumerate(q for q in params if q.numel())}
        index = [order[id(p)] for chunk_params, _ in runs for p in chunk_params]
        values = torch.cat([stats for _, stats in runs])
        ordered = torch.empty_like(values)
        ordered[torch.tensor(index, device=values.device)] = values
        return ordered

    # ------------------------------------------------------------------------ state layout
    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        return factored.matrix_shape(tuple(p.shape))

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        slice_p = group["slice_p"]
        sliced = (math.prod(view) + slice_p - 1) // slice_p
        stored = self.state[p].get("p0") if p in self.state else None
        if stored is not None:
            zero = tuple(stored.shape) != (sliced,) and tuple(stored.shape) == (1,)
        else:
            zero = not bool(p.detach().reshape(-1)[::slice_p].any())  # once, at creation
        if zero:
            p0 = Slot("p0", FloatCodec(), (1,), init=lambda q: torch.zeros(1, device=q.device))
        else:
            p0 = Slot("p0", FloatCodec(), (sliced,),
                      init=lambda q: q.reshape(-1)[::slice_p].float())
        slots = [Slot("s", FloatCodec(), (sliced,)), p0]
        if group["second_moment"] == "factored" and len(view) == 2:
            slots += [Slot("row", FloatCodec(), view[:1]), Slot("col", FloatCodec(), view[1:])]
        else:
            slots.append(Slot("v", FloatCodec(), view))
        if group["betas"][0] > 0:
            codec = momentum_codec(self._momentum_dtype(p, group), group["momentum_4bit_block"])
            slots.append(Slot("m", codec, view))
        return slots

    def _expected_state(self, p: Tensor, group: dict[str, Any], saved: dict[str, Any]
                        ) -> dict[str, Tensor]:
        """The layout, with ``p0`` as the checkpoint created it: ``(1,)`` for a parameter that
        was all zero at its first step, else the sliced initial weights."""
        expected = super()._expected_state(p, group, saved)
        stored = saved.get("p0")
        if isinstance(stored, Tensor) and tuple(stored.shape) == (1,):
            expected["p0"] = torch.empty(1, device="meta")
        return expected

    @staticmethod
    def _momentum_dtype(p: Tensor, group: dict[str, Any]) -> str:
        if group["momentum_dtype"] is not None:
            return group["momentum_dtype"]
        return "bfloat16" if p.dtype == torch.bfloat16 else "float32"

    # ------------------------------------------------------------------------ the rules
    def _gradient(self, batch: Batch) -> Tensor:
        """The gradient the step uses: centralized (optional), plus coupled weight decay."""
        group, g = batch.group, batch.grad
        if group["gradient_centralization"]:
            g = ops.centralize(g, out=batch.scratch("centered"))
        if group["weight_decay"] != 0 and not group["decouple"]:
            out = batch.scratch("decayed")
            g = torch.add(g, batch.param, alpha=group["weight_decay"], out=out)
        return g

    def _statistics(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per tensor: ``<g_s, p0 - p_s>`` and ``||s||_1`` after ``s <- beta3 s + c g_s``."""
        group, state, n = batch.group, batch.state, batch.size
        scalars = self._scalars[id(group)]
        slice_p = group["slice_p"]
        g, p = self._gradient(batch).reshape(n, -1), batch.param.reshape(n, -1)
        if self.compile and batch.finite is None:
            k = compiled.scalars((scalars["beta3"], scalars["s_coef"]), g)
            kernel = compiled.compiled(compiled.kprodigy_statistics)
            return kernel(g, p, state["p0"], state["s"], k, slice_p), {"s": state["s"]}
        g_s, p_s = g[:, ::slice_p], p[:, ::slice_p]
        diff = self._workspace.take("kprodigy:diff", g_s.shape, g_s.device)
        dot = ops.dot(torch.sub(state["p0"], p_s, out=diff), g_s)
        s = state["s"]
        old = s.clone() if batch.finite is not None else None
        s = s.mul_(scalars["beta3"]).add_(g_s, alpha=scalars["s_coef"])
        if old is not None:
            finite = batch.finite.view(-1, 1)
            dot = torch.where(batch.finite, dot, 0.0)
            norm = ops.sum(torch.where(finite, s, old).abs_())
        else:
            norm = ops.sum(torch.abs(s, out=diff))
        return torch.stack((dot, norm), dim=-1), {"s": s}

    def update(self, batch: Batch) -> tuple[Tensor | None, dict[str, Tensor]]:
        group, state = batch.group, batch.state
        scalars = self._scalars[id(group)]
        d, d_new, dlr = scalars["d"], scalars["d_new"], scalars["dlr"]
        beta1, beta2 = group["betas"]
        g = self._gradient(batch)
        # the D statistics are the statistics pass's; stored back as they are (no copy)
        new_state: dict[str, Tensor] = {"s": state["s"], "p0": state["p0"]}
        if (self.compile and batch.finite is None and "v" in state
                and not group["cautious"]):
            return self._compiled_update(batch, g, new_state)

        den = batch.scratch("den")
        if "row" in state:
            squared = torch.mul(g, g, out=den)
            row, col = factored.update_moments(state["row"], state["col"], squared, beta2,
                                               group["eps_factored"], scale=d * d)
            new_state.update(row=row, col=col)
            # sqrt(v_hat) = sqrt(row_i / mean(row)) * sqrt(col_j), Adafactor's rank-one v
            a = (row / ops.mean(row, dim=-1, keepdim=True)).sqrt_().unsqueeze(-1)
            torch.mul(a, col.sqrt().unsqueeze(-2), out=den)
        else:
            v = state["v"].mul_(beta2).addcmul_(g, g, value=d * d * (1 - beta2))
            new_state["v"] = v
            torch.sqrt(v, out=den)
        den.add_(d_new * group["eps"])

        numerator, scale = g, dlr * d_new
        if beta1 > 0:
            m = state["m"]
            quantized = self._momentum_dtype(batch.params[0], group) in _QUANTIZED
            if quantized:
                m.mul_(d)  # stored as m / d (the d that is current at the next step)
            numerator, scale = m.mul_(beta1).add_(g, alpha=d * (1 - beta1)), dlr
        decay = group["weight_decay"] != 0 and group["decouple"]
        if batch.param_writable and not decay and not group["cautious"]:
            # the reference's own write, p + (-scale) m / den, straight into the live fp32
            # weights (the same rounding as the engine's p - delta, one pass less)
            batch.param.addcdiv_(numerator, den, value=-scale)
            if beta1 > 0:
                new_state["m"] = m.div_(d_new) if quantized else m
            return None, new_state
        # (scale * numerator) / den in one pass, rounded as the reference's addcdiv_
        zero = torch.zeros((), device=den.device)
        delta = torch.addcdiv(zero, numerator, den, value=scale, out=batch.scratch("delta"))
        if beta1 > 0:
            new_state["m"] = m.div_(d_new) if quantized else m
        if decay:
            # the reference decays first and steps second, rounding twice:
            # p2 = (p - wd dlr p) - step. delta = p - p2 makes the engine's p - delta exactly p2
            # wherever the subtraction is exact (the step is under half of |p|: Sterbenz)
            p = batch.param
            target = torch.mul(p, group["weight_decay"] * dlr, out=den)
            target = torch.sub(p, target, out=den).sub_(delta)
            delta = torch.sub(p, target, out=delta)
        if group["cautious"]:
            delta = ops.cautious(delta, g, out=den)
        return delta, new_state

    def _compiled_update(self, batch: Batch, g: Tensor, new_state: dict[str, Tensor]
                         ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The update pass (full second moment, no cautious masking) as one compiled kernel
        (:func:`kaon.kernels.compiled.kprodigy_update`); same state, same formulas."""
        group, state, n = batch.group, batch.state, batch.size
        scalars = self._scalars[id(group)]
        d, d_new, dlr = scalars["d"], scalars["d_new"], scalars["dlr"]
        beta1, beta2 = group["betas"]
        momentum = beta1 > 0
        quantized = momentum and self._momentum_dtype(batch.params[0], group) in _QUANTIZED
        decay = group["weight_decay"] != 0 and group["decouple"]
        k = compiled.scalars(
            (beta1, d * (1 - beta1), beta2, d * d * (1 - beta2), d_new * group["eps"],
             dlr if momentum else dlr * d_new, d, d_new, group["weight_decay"] * dlr), g)
        kernel = compiled.compiled(compiled.kprodigy_update)
        # the live fp32 weights when the engine allows it: the kernel writes p - delta itself
        write = batch.param_writable
        p = batch.param.view(n, -1) if write else batch.param.reshape(n, -1) if decay else None
        # views (never copies) of the state, which the kernel updates in place
        delta = kernel(g.reshape(n, -1), state["v"].view(n, -1),
                       state["m"].view(n, -1) if momentum else None, p, k, quantized, decay,
                       write)
        new_state["v"] = state["v"]
        if momentum:
            new_state["m"] = state["m"]
        return (None if delta is None else delta.view(g.shape)), new_state
