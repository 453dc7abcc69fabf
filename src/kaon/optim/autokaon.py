"""Autokaon: Adakaon whose learning rate is discovered by a distance estimate, then frozen."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Integral
from typing import Any

import torch
from torch import Tensor

from kaon import distributed as _distributed
from kaon import engine, ops, upstream
from kaon.engine import Batch, Slot
from kaon.optim.adakaon import Adakaon
from kaon.state.codecs import FloatCodec
from kaon.validation import boolean, check_all, integer, optional, real

__all__ = ["Autokaon"]

#: the tuner's per-parameter state (freed at the freeze)
TUNER_KEYS = ("s", "p0")
_CHECKPOINT_KEY = "autokaon"
_BASE_KEY = "kaon"  # the base class's checkpoint entry


def _lr_freeze(name: str, value: Any) -> None:
    allowed = f"{name} must be 'auto', None or an int >= 1; got {value!r}"
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    if isinstance(value, str):
        raise ValueError(allowed)
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TypeError(allowed)
    if value < 1:
        raise ValueError(allowed)


TUNER_CHECKS = {
    "lr_freeze": _lr_freeze,
    "d0": real(1e-20, 1e6),  # smaller: d0**2 underflows; larger: no initial estimate
    "d_coef": real(0.0, low_inclusive=False),
    "lr_cap": real(0.0, low_inclusive=False),
    "beta3": optional(real(0.0, 1.0, high_inclusive=False)),
    "slice_p": integer(1),
    "freeze_patience": integer(1),
    "freeze_tol": real(0.0, low_inclusive=False),
    "probe_restart": boolean(),
    "probe_patience": integer(1),
}



def _mechanic_betas(value: Any) -> dict[str, Any]:
    """The historical Autokaon's ``betas`` were Mechanic's six tuner horizons; a pair is taken
    as Adakaon's betas (what ``betas`` means for kaon's Autokaon)."""
    if isinstance(value, (tuple, list)) and len(value) != 2:
        raise upstream.UnsupportedError(
            "six betas were the Mechanic tuner's horizons; kaon's Autokaon has no Mechanic tuner "
            "(its rate comes from a Prodigy-style distance estimate, tuned by d_coef); pass "
            "Adakaon's momentum betas as betas=(b1, b2) or adakaon_betas=(b1, b2)")
    return {"betas": value}

def _mechanic_eps(value: Any) -> dict[str, Any]:
    """The historical Autokaon's float ``eps`` (1e-8) guarded Mechanic's divisions; a pair is
    Adakaon's ``eps`` (what ``eps`` means for kaon's Autokaon)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value == 1e-8:
            return {}
        raise upstream.UnsupportedError(
            "a float eps was Mechanic's guard (only its default 1e-8 is accepted); Adakaon's "
            "eps is the pair (eps1, eps2), default (1e-30, 1e-3)")
    return {"eps": value}


class Autokaon(Adakaon, names=("Autokaon", "Autofusion")):
    r"""Adakaon with its learning rate discovered on the fly, then frozen into plain Adakaon.

    Train at ``lr=1.0``. Every step is Adakaon's exact update (see :class:`kaon.Adakaon`) at the
    learning rate ``d * lr`` (``lr`` of the group: a multiplier, so group ratios and LR
    schedules act on the discovered rate), where ``d`` is a *distance estimate* in the style of
    Prodigy / D-Adaptation (Mishchenko & Defazio 2023), computed on Adakaon's iterates:

    1. statistics pass over every parameter (one reduction, one host read per step), with
       ``w_k = d_k * (d_k * lr) / d0`` (Prodigy's weights) and ``beta3`` (default
       ``sqrt(beta2)``): ``r <- beta3 r + w_k <g_k, x_0 - x_k>``; per coordinate
       ``s <- beta3 s + w_k g_k``; ``D = ||s||_1``;
    2. ``d_hat = d_coef * r / D`` (skipped while ``D = 0``); ``d <- min(max(d, d_hat), lr_cap)``.
    3. the probe: ``d`` first ramps up geometrically from ``d0`` (the weights barely move); once
       it has not grown for ``probe_patience`` steps the probe ends, and with
       ``probe_restart`` Adakaon's momentum and second moment restart from zero (the tuner's
       statistics are kept). A tuned Adakaon starts with fresh state at its rate; without the
       restart, the state built at ``x_0`` during the ramp cost 20-40 % held-out loss on the
       battery's LM at the same rate (docs/autokaon.md).

    For a convex loss ``sum_k w_k <g_k, x_k - x*> >= 0``, so ``d_hat <= ||x_0 - x*||_inf``: the
    estimate only grows as far as the iterates' own progress proves is there, whatever the
    update rule; and since Adakaon's update has about unit RMS per coordinate, ``lr`` is exactly
    a per-coordinate distance per step, the quantity the bound is about (as ``d`` is for Adam in
    Prodigy). ``lr_cap`` is a safety bound that a real discovery never reaches (the old Mechanic
    tuner's rate was its cap; see docs/autokaon.md).

    Freezing (``lr_freeze``): ``"auto"`` freezes once ``d`` has grown less than a factor
    ``1 + freeze_tol`` over ``freeze_patience`` steps (after it first left ``d0``); an int
    freezes after that many steps; ``None`` never. At the freeze the rate is folded into the
    step: ``frozen_lr = d`` multiplies every group's ``lr`` from then on, and since Adakaon keeps
    its momentum in unit-RMS space (the lr multiplies it at the end), the stored momentum needs
    no rescaling, for any ``momentum_dtype``. The tuner's reference copy of the weights (``p0``),
    its ``s`` and every tuner scalar but ``frozen_lr`` are freed; from then on the state, the
    checkpoint's per-parameter state and every step are plain Adakaon's at
    ``lr = frozen_lr * group["lr"]`` (bit for bit; :meth:`adakaon_state_dict` gives a checkpoint
    that ``kaon.Adakaon`` loads directly).

    Args:
        params: parameters or parameter groups.
        lr (float, default 1.0): multiplier of the discovered rate (per group; 0 freezes a
            group, whose parameters then take no part in the estimate).
        lr_freeze ("auto" | int | None, default "auto"): when the rate is frozen (see above).
        d0 (float, default 1e-6): the initial rate, > 0 (the estimate grows geometrically from
            it in a few dozen steps).
        d_coef (float, default 15.0): multiplier of the estimate, > 0. The bound is conservative
            on short runs (noise inflates ``D``); 15 is a calibration chosen on the battery's
            quick tasks at seed 0 and checked on other seeds, a 3x longer run and two other
            small tasks (docs/autokaon.md, benchmarks/RESULTS.md); 1.0 is Prodigy's own.
        lr_cap (float, default 1.0): upper bound of ``d``, > 0 (a unit-RMS step of 1.0 per
            coordinate is far beyond any usable rate; the cap only stops a runaway).
        beta3 (float | None, default None): decay of the statistics in [0, 1); None means
            ``sqrt(beta2)``.
        slice_p (int, default 1): keep the tuner's statistics for every ``slice_p``-th element
            only (>= 1; 11 cuts the tuning memory 11x).
        freeze_patience (int, default 50): steps without growth that mean a plateau (>= 1).
        freeze_tol (float, default 0.05): relative growth below which ``d`` counts as flat, > 0.
        probe_restart (bool, default True): restart Adakaon's momentum and second moment when
            the probe ends (see above; not done for FSDP2 DTensor parameters).
        probe_patience (int, default 3): steps without growth of ``d`` that end the probe
            (>= 1; 1 or 2 end it at a passing stall of the ramp on some tasks).
        **adakaon_kwargs: every argument of :class:`kaon.Adakaon` but ``lr`` (betas, eps,
            weight_decay, momentum_dtype, cautious, ..., foreach, nonfinite_grad, seed).

    State per parameter: Adakaon's (``row`` / ``col`` or ``v``, ``m`` [+ ``m_scale``],
    ``shift``), plus while tuning ``s`` and ``p0``, fp32 ``[ceil(numel / slice_p)]``. Bytes per
    parameter: Adakaon's plus ``8 / slice_p`` while tuning; exactly Adakaon's after the freeze.
    Tuner scalars are saved under ``state_dict()["autokaon"]``.

    Not a per-parameter (gradient-release) optimizer while tuning: the estimate is a reduction
    over every parameter, so :meth:`step_param` raises until the rate is frozen.

    Example::

        opt = kaon.Autokaon(model.parameters())  # lr=1.0, lr_freeze="auto"
        loss.backward(); opt.step(); opt.zero_grad()
        print(opt.get_d(), opt.is_frozen(), opt.frozen_lr)
    """

    #: not on the compiled path by default (``fused=None``): its probe resets state between steps; not yet validated on the fused path
    fusable = False

    #: the historical K-Optimizers Autokaon's arguments (its Mechanic tuner), mapped or refused
    #: (docs/migrating.md); Adakaon's entries (auto_lr, fused_tile_cap) are inherited
    upstream_arguments = {
        "adakaon_betas": upstream.rename(
            upstream.K_OPTIMIZERS, "betas", doc="`betas` (Adakaon's betas)"),
        "betas": upstream.mapped(
            upstream.K_OPTIMIZERS, _mechanic_betas,
            "a pair: Adakaon's `betas`; six values (Mechanic's horizons): refused"),
        "eps": upstream.mapped(
            upstream.K_OPTIMIZERS, _mechanic_eps,
            "a pair: Adakaon's `eps`; Mechanic's float 1e-8: accepted, no effect"),
        "s_init": upstream.refused(
            upstream.K_OPTIMIZERS, "Autokaon's starting estimate is d0 (default 1e-6); pass "
            "d0=... instead", when=lambda v: v != "auto"),
        "scale_cap": upstream.refused(
            upstream.K_OPTIMIZERS, "Autokaon bounds its discovered rate with lr_cap (an "
            "absolute cap, default 1.0); pass lr_cap=... instead", when=lambda v: v != "auto"),
        "scale_cap_rel": upstream.refused(
            upstream.K_OPTIMIZERS, "Autokaon's distance estimate needs no cap relative to its "
            "seed; bound the rate with lr_cap=... instead",
            when=lambda v: not upstream.is_value(6.0, 6)(v)),
        "s_decay": upstream.refused(
            upstream.K_OPTIMIZERS, "Mechanic's decay term has no counterpart; use "
            "weight_decay for Adakaon's decoupled decay", when=lambda v: not upstream.is_value(0.01)(v)),
        "foreach_warmup": upstream.ignored(
            upstream.K_OPTIMIZERS, "the tuner's passes are always batched (foreach=)",
            when=lambda v: isinstance(v, bool), use="foreach_warmup must be True or False"),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        lr_freeze: str | int | None = "auto",
        *,
        d0: float = 1e-6,
        d_coef: float = 15.0,
        lr_cap: float = 1.0,
        beta3: float | None = None,
        slice_p: int = 1,
        freeze_patience: int = 50,
        freeze_tol: float = 0.05,
        probe_restart: bool = True,
        probe_patience: int = 3,
        **adakaon_kwargs: Any,
    ) -> None:
        tuner = dict(lr_freeze=lr_freeze, d0=d0, d_coef=d_coef, lr_cap=lr_cap, beta3=beta3,
                     slice_p=slice_p, freeze_patience=freeze_patience, freeze_tol=freeze_tol,
                     probe_restart=probe_restart, probe_patience=probe_patience)
        check_all(TUNER_CHECKS, tuner, type(self).__name__)
        if "lr" in adakaon_kwargs:
            raise TypeError("Autokaon: lr given twice")
        self.tuner_settings = tuner
        self._tuner = self._fresh_tuner()
        self._weights: dict[int, float] = {}
        super().__init__(params, lr=lr, **adakaon_kwargs)

    def _fresh_tuner(self) -> dict[str, Any]:
        d0 = float(self.tuner_settings["d0"])
        return dict(d=d0, d_max=d0, d_hat=0.0, numerator=0.0, k=0, anchor=d0, anchor_k=0,
                    frozen=False, frozen_lr=None, probe_end=None, stall=0)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (Adakaon's keys); the tuner's arguments are optimizer-level and rejected
        in a group."""
        if isinstance(param_group, dict):
            given = {k: v for k, v in param_group.items() if k in TUNER_CHECKS}
            check_all(TUNER_CHECKS, given, type(self).__name__)
            if given:
                raise ValueError(
                    f"Autokaon: {', '.join(sorted(given))} is an optimizer-level argument (one "
                    "rate is discovered for all groups), not a parameter-group key"
                )
        super().add_param_group(param_group)

    # ------------------------------------------------------------------------ public API
    def get_d(self) -> float:
        """The discovered rate: ``frozen_lr`` once frozen, else the current estimate ``d``
        (the step's learning rate is ``d * group["lr"]``)."""
        return float(self._tuner["frozen_lr"] if self._tuner["frozen"] else self._tuner["d"])

    def is_frozen(self) -> bool:
        """Whether the rate is frozen (the optimizer is plain Adakaon from then on)."""
        return bool(self._tuner["frozen"])

    @property
    def frozen_lr(self) -> float | None:
        """The rate at the freeze (multiplies each group's ``lr``); None while tuning."""
        return self._tuner["frozen_lr"]

    def freeze(self, rate: float | None = None) -> None:
        """Freeze the rate now at ``rate`` (default: the current estimate ``d``) and free the
        tuner's state."""
        if self._tuner["frozen"]:
            return
        rate = float(self._tuner["d"] if rate is None else rate)
        self._tuner = dict(frozen=True, frozen_lr=rate, d=rate, k=self._tuner["k"])
        for state in self.state.values():
            for key in TUNER_KEYS:
                state.pop(key, None)
        self._plans = {}  # the next plan has Adakaon's layout (and packs the state afresh)

    def adakaon_state_dict(self) -> dict[str, Any]:
        """A frozen Autokaon's checkpoint as ``kaon.Adakaon`` saves it: the rate folded into
        every group's ``lr``. ``Adakaon(params, **same_kwargs).load_state_dict(...)`` then
        continues bit for bit."""
        if not self.is_frozen():
            raise RuntimeError("Autokaon.adakaon_state_dict: the rate is not frozen yet")
        state = super().state_dict()
        rate = self._tuner["frozen_lr"]
        entry = {**state[_BASE_KEY], "optimizer": "Adakaon"}  # Adakaon's checkpoint now
        state[_BASE_KEY] = entry
        state["param_groups"] = [{**g, "lr": rate * g["lr"]} for g in state["param_groups"]]
        if state["param_groups"]:
            state["param_groups"][0][_BASE_KEY] = entry
        return state

    # ------------------------------------------------------------------------ engine hooks
    def _step_lr(self, group: dict[str, Any]) -> float:
        rate = self._tuner["frozen_lr"] if self._tuner["frozen"] else self._tuner["d"]
        return rate * group["lr"]

    def state_slots(self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]) -> list[Slot]:
        slots = super().state_slots(p, group, view)
        if self._tuner["frozen"]:
            return slots
        slice_p = self.tuner_settings["slice_p"]
        sliced = (math.prod(view) + slice_p - 1) // slice_p
        return slots + [
            Slot("s", FloatCodec(), (sliced,)),
            Slot("p0", FloatCodec(), (sliced,), init=lambda q: q.reshape(-1)[::slice_p].float()),
        ]

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        delta, new_state = super().update(batch)
        for key in TUNER_KEYS:
            if key in batch.state:
                new_state[key] = batch.state[key]  # kept as the statistics pass left them
        return delta, new_state

    def gradient_release_blocker(self) -> str | None:
        """Why Autokaon cannot step one parameter at a time now (``None`` once frozen)."""
        if self._tuner["frozen"]:
            return None
        return (
            "Autokaon cannot step one parameter at a time (gradient release / step_param / "
            "step_parameter) while it is tuning its learning rate: the rate estimate is a "
            "reduction over every parameter that must be complete before any update. Call "
            "optimizer.step() after backward until is_frozen() is True (or pass an int "
            "lr_freeze)."
        )

    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Adakaon's per-parameter step once frozen; while tuning it raises (see the class
        docstring)."""
        reason = self.gradient_release_blocker()
        if reason is not None:
            raise RuntimeError(reason)
        super().step_param(p, group)

    # ------------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: while tuning, the statistics pass, the rate update and Adakaon's update at
        the new rate; once frozen, Adakaon's step.

        ``closure`` (optional) re-evaluates the model and returns the loss; it is run with
        gradients enabled and its result returned.
        """
        if self._tuner["frozen"]:
            return super().step(closure)
        loss, work = self._begin_step(closure)
        if not any(params for _, params in work):
            # no gradient at all, or the lr-0 priming step of torch.distributed.checkpoint
            # (which only created the state): the tuner does not count it
            return loss
        tuner = self._tuner
        active = [(g, params) for g, params in work
                  if g["lr"] > 0 and any(p.numel() for p in params)]
        d_before = tuner["d"]
        with engine.gradients_checked_once(self):  # both passes read the gradients
            if active:
                settings, d = self.tuner_settings, tuner["d"]
                beta3 = settings["beta3"]
                if beta3 is None:
                    beta3 = math.sqrt(active[0][0]["betas"][1])
                # Prodigy's weights lambda_k = d_k * (d_k lr) / d0 (their scale cancels in the ratio)
                self._weights = {id(g): d * (d * g["lr"]) / settings["d0"] for g, _ in active}
                self._beta3 = beta3
                stats = [self._statistics_of(g, params) for g, params in active]
                # the step's one host synchronization; summed in the parameters' order (batch-free)
                rows = torch.cat([x.to(stats[0].device) for x in stats]).tolist()
                weights = [self._weights[id(g)] for (g, _), x in zip(active, stats) for _ in x]
                numerator = math.fsum(w * dot for w, (dot, _) in zip(weights, rows))
                denominator = math.fsum(norm for _, norm in rows)
                tuner["numerator"] = beta3 * tuner["numerator"] + numerator
                if denominator > 0:
                    tuner["d_hat"] = settings["d_coef"] * tuner["numerator"] / denominator
                    tuner["d_max"] = max(tuner["d_max"], tuner["d_hat"])
                    tuner["d"] = min(tuner["d_max"], settings["lr_cap"])
            for group, params in work:
                engine.run_group(self, group, params)
        tuner["k"] += 1
        if tuner.get("probe_end", 0) is None and active:
            if self.tuner_settings["d0"] < tuner["d"] <= d_before:
                tuner["stall"] = tuner.get("stall", 0) + 1
                if tuner["stall"] >= self.tuner_settings["probe_patience"]:
                    self._end_probe()
            else:
                tuner["stall"] = 0
        self._check_freeze()
        return loss

    def _end_probe(self) -> None:
        """End of the probe: ``d`` (after it left ``d0``) has not grown for ``probe_patience``
        steps in a row. With ``probe_restart``, Adakaon's own state (momentum and second
        moment) starts afresh, so the run goes on as a fresh Adakaon at the discovered rate
        from the barely moved weights, not as one whose momentum and second moment were built
        at ``x_0`` during the tiny-rate ramp. The tuner's statistics (``r``, ``s``, ``p0``) are
        kept, so the estimate goes on exactly as before. The freeze clock restarts."""
        tuner = self._tuner
        tuner["probe_end"] = tuner["k"]
        if not self.tuner_settings["probe_restart"]:
            return
        groups = [(g, [p for p in g["params"] if p in self.state]) for g in self.param_groups]
        if any(_distributed.has_dtensor(params) for _, params in groups):
            return  # FSDP2 state is sharded DTensors: kept (documented limitation)
        for group, params in groups:
            for p in params:
                engine.reset_state(self, p, group, keep=(engine.SHIFT, *TUNER_KEYS))
        tuner["anchor"], tuner["anchor_k"] = tuner["d"], tuner["k"]  # the freeze clock

    def _check_freeze(self) -> None:
        tuner, settings = self._tuner, self.tuner_settings
        rule = settings["lr_freeze"]
        if rule is None:
            return
        if rule != "auto":
            if tuner["k"] >= rule:
                self.freeze()
            return
        d = tuner["d"]
        if d > tuner["anchor"] * (1.0 + settings["freeze_tol"]):
            tuner["anchor"], tuner["anchor_k"] = d, tuner["k"]
        elif d > settings["d0"] and tuner["k"] - tuner["anchor_k"] >= settings["freeze_patience"]:
            self.freeze()

    def _statistics_of(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        """``[tensors with elements, 2]`` (dot, ||s||_1) rows in the group's parameter order."""
        runs = engine.run_group(self, group, params, statistics=self._statistics,
                                reads=TUNER_KEYS)
        order = {id(p): i for i, p in enumerate(q for q in params if q.numel())}
        index = [order[id(p)] for chunk_params, _ in runs for p in chunk_params]
        values = torch.cat([stats for _, stats in runs])  # [tensors] dots
        ordered = torch.empty_like(values)
        ordered[torch.tensor(index, device=values.device)] = values
        return ordered

    def _statistics(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Per tensor: ``<g_s, p0 - p_s>`` and ``||s||_1`` after ``s <- beta3 s + w g_s``."""
        state, n = batch.state, batch.size
        slice_p = self.tuner_settings["slice_p"]
        g_s = batch.grad.reshape(n, -1)[:, ::slice_p]
        p_s = batch.param.reshape(n, -1)[:, ::slice_p]
        diff = self._workspace.take("autokaon:diff", g_s.shape, g_s.device)
        dot = ops.sum(torch.sub(state["p0"], p_s, out=diff).mul_(g_s))
        s = state["s"]
        old = s.clone() if batch.finite is not None else None
        s = s.mul_(self._beta3).add_(g_s, alpha=self._weights[id(batch.group)])
        if old is not None:
            dot = torch.where(batch.finite, dot, 0.0)
            norm = ops.sum(torch.where(batch.finite.view(-1, 1), s, old).abs_())
        else:
            norm = ops.sum(torch.abs(s, out=diff))
        return torch.stack((dot, norm), dim=-1), {"s": s}

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Adakaon's state dict plus the tuner's scalars under the key ``"autokaon"``."""
        state = super().state_dict()
        state[_CHECKPOINT_KEY] = dict(self._tuner)
        if state["param_groups"]:
            # torch.distributed.checkpoint keeps only "state" and "param_groups": the tuner
            # rides in the first group too (as the base class's "kaon" entry does)
            state["param_groups"][0][_CHECKPOINT_KEY] = dict(self._tuner)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (tuning or frozen); the saved tuner scalars are restored."""
        state_dict = dict(state_dict)
        tuner = state_dict.pop(_CHECKPOINT_KEY, None)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        for group in groups:
            in_group = group.pop(_CHECKPOINT_KEY, None)
            tuner = tuner if tuner is not None else in_group
        state_dict["param_groups"] = groups
        tuner = self._checked_tuner(tuner)
        # the checkpoint's state layout is that of its tuner (tuning: Adakaon's slots plus s and
        # p0; frozen: Adakaon's), so the base class checks it under the saved tuner; on a
        # refusal the optimizer's own tuner is put back
        previous = self._tuner
        self._tuner = tuner
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self._tuner = previous
            raise
        if self._tuner["frozen"]:
            for state in self.state.values():
                for key in TUNER_KEYS:
                    state.pop(key, None)

    def _checked_tuner(self, tuner: Any) -> dict[str, Any]:
        """A checkpoint's tuner scalars, checked (``ValueError`` before anything changes); a
        fresh tuner when the checkpoint has none."""
        if tuner is None:
            return self._fresh_tuner()
        where = "Autokaon.load_state_dict: the 'autokaon' entry"
        if not isinstance(tuner, dict) or not isinstance(tuner.get("frozen"), bool):
            raise ValueError(f"{where} must be a dict with a bool 'frozen'; got {tuner!r}")
        needed = ("frozen_lr", "d", "k") if tuner["frozen"] else ("d", "k")
        missing = [key for key in needed if key not in tuner]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        for key in ("d", "d_max", "d_hat", "numerator", "anchor", "frozen_lr"):
            value = tuner.get(key)
            if value is None and key == "frozen_lr" and not tuner["frozen"]:
                continue
            if key in tuner and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not math.isfinite(value)):
                raise ValueError(f"{where}: {key} must be a finite number; got {value!r}")
        return dict(tuner)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._weights = {}
