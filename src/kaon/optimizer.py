"""``KaonOptimizer``: the torch optimizer contract every kaon optimizer shares.

A subclass supplies its hyperparameter checks, its state layout (``view_shape`` and
``state_slots``) and its update rule (``update``); see ``docs/architecture.md``. This class does
the rest: validation before anything changes, lazy state, ``step()`` with closure support, the
per-parameter entry used by fused-backward trainers, the non-finite gradient policy, the
stochastic-rounding random stream, dtype-preserving checkpoints and memory accounting.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor

from kaon import distributed, engine, kernels, registry, upstream
from kaon.engine import Batch, Slot
from kaon.validation import Check, check_all, choice, integer

__all__ = ["KaonOptimizer", "NONFINITE_POLICIES"]

NONFINITE_POLICIES = ("skip", "raise", "none")
_CHECKPOINT_KEY = "kaon"
_MAX_SEED = 2**63 - 1


def _translating(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` behind the upstream translation of the outermost constructor call: a subclass's
    ``super().__init__(...)`` passes kaon arguments already and is not translated again."""

    @functools.wraps(init)
    def _init(self: KaonOptimizer, *args: Any, **kwargs: Any) -> None:
        if self.__dict__.get("_upstream_translated"):
            return init(self, *args, **kwargs)
        self.__dict__["_upstream_translated"] = True
        try:
            cls = type(self)
            args, kwargs = cls.upstream_call(args, kwargs)
            return init(self, *args, **upstream.translate(cls, kwargs))
        finally:
            self.__dict__.pop("_upstream_translated", None)

    return _init


def _eager(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run eagerly even inside ``torch.compile`` (issue 17, case 15).

    ``torch.compile(opt.step)`` traced kaon's host-side planning, caches and once-per-step memos
    and crashed (inductor ``KeyError``, ``NameError``) or recompiled for minutes; the step runs
    as in eager mode instead (``torch._dynamo.disable``), at once. The compiled kernels kaon
    runs itself (``compile=True``, :mod:`kaon.kernels.compiled`) are compiled as before. Without
    ``torch._dynamo`` imported nothing can be compiling, so the eager path costs no import."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is None:
            return method(*args, **kwargs)
        if not disabled:
            disabled.append(dynamo.disable(method))
        return disabled[0](*args, **kwargs)

    return run


class KaonOptimizer(torch.optim.Optimizer):
    """Base class of every kaon optimizer (a ``torch.optim.Optimizer``).

    Optimizer-level arguments, shared by all subclasses:

    foreach (bool, default True)
        Batch same-shaped tensors into one call of the update rule. Results are bit-identical to
        ``foreach=False`` on CPU fp32.
    foreach_batch_cutoff (int, default 2_000_000)
        Tensors with more elements run alone.
    foreach_stack_budget (int | None, default None)
        Maximum elements per stacked chunk; ``None`` derives it from the device (see
        :func:`kaon.engine.stack_budget`).
    nonfinite_grad ("skip" | "raise" | "none", default "skip")
        What a gradient containing NaN or Inf does. ``"skip"``: that parameter's weights and state
        are left exactly as they were for this step (decided per tensor on the device, without a
        host sync); the other parameters step normally. ``"raise"``: check every gradient first
        and raise ``FloatingPointError`` naming the parameter before anything changes (one host
        sync per step). ``"none"``: no check, as in ``torch.optim`` (a non-finite gradient then
        reaches the weights and the state); it saves the one read of the gradients the check
        costs, for trainers that already skip such steps themselves (AMP's GradScaler does).
    seed (int | None, default None)
        Seed of the stochastic-rounding random stream; ``None`` takes ``torch.initial_seed()``.
        The stream's state is saved in ``state_dict()``.
    fused (bool | "triton" | None, default None)
        Run each chunk's whole step (decode, rule, masking, encode, write-back) as kernels
        compiled by ``torch.compile`` from the rule itself (:mod:`kaon.fused`). ``None``: the
        eager rule (not yet faster compiled on the CPU measured so far), unless
        ``KAON_FUSED_AUTO_COMPILE=1``: then compiled on the CPU for groups of at least
        :data:`kaon.fused.MIN_NUMEL` elements (8,388,608) of classes validated on it
        (``fusable``); ``True``: always; ``False``: never (the eager rule). Where compiling fails, the eager rule runs and one warning says why. ``"triton"``:
        kaon's hand-written Triton kernel where one is registered (:mod:`kaon.kernels`; Adakaon,
        Nekaon, Lion, AdaPNM, AdamW; ``RuntimeError`` without Triton or a CUDA device unless
        ``TRITON_INTERPRET=1``). Every path keeps the same state format and checkpoints.
    """

    #: per-hyperparameter checks, run on the defaults and on every added group
    hyperparameter_checks: ClassVar[dict[str, Check]] = {}
    #: group keys whose change alters the state layout (triggers re-planning and layout checks)
    layout_keys: ClassVar[tuple[str, ...]] = ("bf16_method",)
    #: whether ``fused=None`` may run the class on the compiled path (validated on it)
    fusable: ClassVar[bool] = True
    #: worst-case transient fp32 bytes per element of a batched step (sizes the stack budget)
    bytes_per_element: ClassVar[int] = 48
    #: upstream argument name -> its kaon mapping or refusal (:mod:`kaon.upstream`); applied to
    #: the keyword arguments before the class's ``__init__`` runs, merged over base classes
    upstream_arguments: ClassVar[dict[str, upstream.Upstream]] = {}

    def __init_subclass__(cls, *, names: tuple[str, ...] = (), **kwargs: Any) -> None:
        """Register the subclass and install its upstream-argument translation.

        ``names``: the registry names of the class (``class Adakaon(KaonOptimizer,
        names=("Adakaon", "Adafusion"))``): the first is its name in ``kaon list``, ``kaon.__all__``
        and :data:`kaon.registry.OPTIMIZERS`, the others are aliases (upstream names) that
        :func:`kaon.registry.get` also resolves. A subclass without ``names`` (a user's or a
        test's) is not registered.
        """
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _translating(cls.__init__)  # type: ignore[method-assign]
        for name in ("step", "step_param"):
            if name in cls.__dict__:
                setattr(cls, name, _eager(cls.__dict__[name]))
        if names:
            registry.register_builtin(cls, tuple(names))

    @classmethod
    def upstream_call(cls, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Rewrite an upstream positional call form (``Muon(muon_params, adam_params)``) into
        kaon's; the default changes nothing. Runs before ``upstream_arguments`` is applied."""
        return args, kwargs

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        foreach: bool = True,
        foreach_batch_cutoff: int = 2_000_000,
        foreach_stack_budget: int | None = None,
        nonfinite_grad: str = "skip",
        seed: int | None = None,
        fused: bool | None = None,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(foreach, bool):
            raise TypeError(f"{owner}: foreach must be True or False; got {foreach!r}")
        check_all({"foreach_batch_cutoff": integer(1)},
                  {"foreach_batch_cutoff": foreach_batch_cutoff}, owner)
        if foreach_stack_budget is not None:
            check_all({"foreach_stack_budget": integer(1)},
                      {"foreach_stack_budget": foreach_stack_budget}, owner)
        check_all({"nonfinite_grad": choice(*NONFINITE_POLICIES)},
                  {"nonfinite_grad": nonfinite_grad}, owner)
        if seed is not None:
            check_all({"seed": integer(0)}, {"seed": seed}, owner)
        check_all(self.hyperparameter_checks, defaults, owner)
        if isinstance(params, Tensor):
            raise TypeError(
                f"{owner}: params must be an iterable of tensors or of dicts; got a single "
                "Tensor (wrap it in a list)"
            )
        self.foreach = foreach
        self.foreach_batch_cutoff = foreach_batch_cutoff
        self.foreach_stack_budget = foreach_stack_budget
        self.nonfinite_grad = nonfinite_grad
        self.seed = int(seed if seed is not None else torch.initial_seed()) % _MAX_SEED
        self._generators: dict[torch.device, torch.Generator] = {}
        self._plans: dict[Any, Any] = {}
        self._workspace = engine.Workspace()
        self._kernel = kernels.resolve(self, fused)  # raises before anything is stored
        self._fused = fused
        self._fused_broken: str | None = None
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- what a subclass supplies
    def view_shape(self, p: Tensor, group: dict[str, Any]) -> tuple[int, ...]:
        """The shape the rule sees for ``p`` (default: ``p``'s shape; 0-D becomes ``(1,)``)."""
        return tuple(p.shape) if p.ndim else (1,)

    def state_slots(
        self, p: Tensor, group: dict[str, Any], view: tuple[int, ...]
    ) -> Iterable[Slot]:
        """The state slots of ``p`` under ``group``'s settings."""
        return ()

    def update(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The update rule: return ``(delta, new_state)`` for a batch; see :class:`Batch`."""
        raise NotImplementedError

    def check_group(self, group: dict[str, Any], owner: str) -> None:
        """Check what ``hyperparameter_checks`` cannot: a combination of a group's values, or
        its values against its parameters (``group["params"]``, a list of tensors). Runs on
        every added group and on every group of a checkpoint, before anything changes; raise
        ``ValueError`` (or ``TypeError``) starting with ``owner``. Default: nothing."""

    def fused_step(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """Optionally run ``params`` (all with gradients, state created and checked) of
        ``group`` with a fused kernel instead of the update rule; return whether it did.

        The engine calls this after planning, so the state exists with the layout that
        ``state_slots`` describes. A fused path must compute the same rule on the same state
        tensors (the conformance suite checks resume and batching either way) and must return
        False whenever it cannot honour a setting exactly (e.g. a non-finite gradient under
        ``nonfinite_grad="skip"``); the rule then runs. Default: never.
        """
        return False

    # ------------------------------------------------------------------------ torch contract
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its hyperparameters are validated before anything is stored."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        check_all(self.hyperparameter_checks, merged, type(self).__name__)
        distributed.check_mode(merged, type(self).__name__)
        params = param_group.get("params")
        tensors = [params] if isinstance(params, Tensor) else list(params or [])
        if not isinstance(params, (Tensor, list, tuple, set)):
            param_group = {**param_group, "params": tensors}  # a generator would be used up
        for p in tensors:
            if isinstance(p, Tensor) and (p.is_complex() or not p.is_floating_point()):
                raise TypeError(
                    f"{type(self).__name__}: parameters must be real floating point tensors; "
                    f"got dtype {p.dtype}"
                )
        self.check_group({**merged, "params": [p for p in tensors if isinstance(p, Tensor)]},
                         type(self).__name__)
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plans"] = {}
        state["_workspace"] = engine.Workspace()
        generators = state.pop("_generators", {})
        state["_generator_states"] = {str(d): g.get_state() for d, g in generators.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        generator_states = state.pop("_generator_states", {})
        had_differentiable = "differentiable" in state.get("defaults", getattr(self, "defaults", {}))
        super().__setstate__(state)
        if not had_differentiable:
            # torch's __setstate__ adds it to the defaults (and the loop below would put it in
            # every group); a kaon optimizer that takes no such argument has no such key
            self.defaults.pop("differentiable", None)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self.__dict__.setdefault("foreach", True)
        self.__dict__.setdefault("foreach_batch_cutoff", 2_000_000)
        self.__dict__.setdefault("foreach_stack_budget", None)
        self.__dict__.setdefault("nonfinite_grad", "skip")
        self.__dict__.setdefault("seed", 0)
        self.__dict__.setdefault("_fused", None)
        self.__dict__.setdefault("_kernel", None)
        self.__dict__.setdefault("_fused_broken", None)
        self._plans = {}
        self._workspace = engine.Workspace()
        self._generators = {}
        for device, rng in generator_states.items():
            self._generator(torch.device(device)).set_state(rng.clone())

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step over every group.

        ``closure`` (optional) re-evaluates the model and returns the loss; it is run with
        gradients enabled and its result returned.
        """
        loss, work = self._begin_step(closure)
        for group, params in work:
            engine.run_group(self, group, params)
        return loss

    def _begin_step(self, closure: Callable[[], Any] | None
                    ) -> tuple[Any, list[tuple[dict[str, Any], list[Tensor]]]]:
        """Run the closure (with gradients enabled), then collect each group's parameters that
        have gradients and check those gradients before anything changes."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        self._check_gradients(chain.from_iterable(params for _, params in work))
        if self._is_priming(work):
            # torch.distributed.checkpoint's state-dict helpers prime an empty optimizer with
            # zero gradients and lr = 0: create the state, change nothing else (no counter,
            # moment, D, average or random stream moves)
            for group, params in work:
                engine.run_group(self, group, params, plan_only=True)
            return loss, [(group, []) for group, _ in work]
        return loss, work

    def _is_priming(self, work: list[tuple[dict[str, Any], list[Tensor]]]) -> bool:
        """Whether this step has lr = 0 in every group with gradients and only all-zero
        gradients (the priming step of ``torch.distributed.checkpoint.state_dict``)."""
        params = [p for _, ps in work for p in ps]
        if not params or any(float(g.get("lr", 1.0)) != 0.0 for g, ps in work if ps):
            return False
        zero = all(not bool(distributed.local(p.grad).any()) for p in params)
        return distributed.all_ranks_agree(zero, params)

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        """Step one parameter of ``group`` with exactly the code ``step()`` runs.

        This is the entry point for fused-backward trainers (step in a post-accumulate-grad hook,
        then free the gradient). A parameter without a gradient is left alone.
        """
        if p.grad is None:
            return
        if not any(q is p for q in group["params"]):
            raise ValueError("step_param: the parameter is not in the given group")
        self._check_gradients([p])
        engine.run_group(self, group, [p])

    def step_parameter(self, p: Tensor, group: dict[str, Any], i: int) -> None:
        """``step_param`` with the parameter's index ``i`` in its group (OneTrainer's form)."""
        if not (0 <= i < len(group["params"])) or group["params"][i] is not p:
            raise ValueError(f"step_parameter: index {i} does not hold this parameter in the group")
        self.step_param(p, group)

    def gradient_release_blocker(self) -> str | None:
        """Why the optimizer cannot step one parameter at a time now, or ``None`` if it can.

        :func:`kaon.prepare_for_gradient_release` refuses an optimizer whose blocker is not
        ``None``. An optimizer that needs a reduction over every gradient before any update
        (KProdigy's D estimate) returns a message; the default is ``None``.
        """
        return None

    def train(self, mode: bool = True) -> KaonOptimizer:
        """Switch to training mode; a no-op unless an optimizer keeps a training view."""
        return self

    def eval(self) -> KaonOptimizer:
        """Switch to evaluation mode; a no-op unless an optimizer keeps a training view."""
        return self.train(False)

    def state_bytes(self) -> int:
        """Bytes held by every tensor in the optimizer state (on this rank, under FSDP2)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    value = distributed.local(value)  # under FSDP2: this rank's piece
                    total += value.numel() * value.element_size()
        return total

    def workspace_bytes(self) -> int:
        """Bytes of reusable scratch buffers held between steps (CPU only; see
        :class:`kaon.engine.Workspace`). Not optimizer state: ``release_workspace()`` frees it."""
        return self._workspace.nbytes()

    def release_workspace(self) -> None:
        """Free the scratch buffers; they are re-created at the next step."""
        self._workspace.clear()

    def bytes_per_param(self) -> float:
        """``state_bytes()`` divided by the number of parameters in all groups."""
        count = sum(distributed.local(p).numel() for g in self.param_groups for p in g["params"])
        return self.state_bytes() / max(count, 1)

    # ---------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the stochastic-rounding stream under the key ``"kaon"``.

        Like torch's, the state tensors are references, not copies: ``torch.save`` it before
        training on if a frozen copy is needed.
        """
        for device in {distributed.local(p).device for g in self.param_groups
                       for p in g["params"]}:
            self._generator(device)  # every device's stream, so the entry's layout is fixed
        state = super().state_dict()
        entry = {
            "seed": self.seed,
            "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            # checked by load_state_dict: another class's state, or another model's, is refused
            "optimizer": type(self).__name__,
            "shapes": [list(p.shape) for g in self.param_groups for p in g["params"]],
        }
        state[_CHECKPOINT_KEY] = entry
        if state["param_groups"]:
            # torch.distributed.checkpoint keeps only "state" and "param_groups": the same entry
            # rides in the first group and is taken out again by load_state_dict
            state["param_groups"][0][_CHECKPOINT_KEY] = entry
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, keeping every state tensor's saved dtype; all or nothing.

        Everything is checked before anything changes (see docs/checkpointing.md): every
        group's values with the constructor's checks, the optimizer class and parameter shapes
        recorded in the ``"kaon"`` entry (when present), its seed and generator states, and
        each parameter's stored state against the layout the group's settings need (keys,
        shapes, dtypes). A checkpoint that fails raises ``ValueError`` naming what is wrong and
        leaves the optimizer (state, groups, random streams) exactly as it was.

        torch's loader casts floating-point state to the parameter dtype (int8 codes of a bf16
        parameter would come back as bf16, fp32 statistics as bf16); here each tensor is moved to
        its parameter's device and keeps its dtype. Group keys added in later versions are
        back-filled from the defaults. A generator state saved for a device that none of the
        parameters is on now (a checkpoint written on a GPU, loaded on the CPU) is left out:
        that device's stream restarts from the saved seed.
        """
        state_dict, extra, states = self._checked_load(state_dict)
        seed, generators = self._checked_entry(extra)
        state_dict = {**state_dict, "state": {**state_dict.get("state", {}), **states}}
        super().load_state_dict(state_dict)
        current = chain.from_iterable(g["params"] for g in self.param_groups)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for saved_id, p in zip(saved_ids, current):
            for key, value in states.get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[p][key] = value.detach().to(device=p.device, copy=True)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        self._plans = {}
        if seed is not None:
            self.seed = seed
            self._generators = generators

    #: tensor state keys a parameter may hold besides its slots (gradient release's buffer)
    extra_state_keys: ClassVar[tuple[str, ...]] = ("accumulated_grad",)

    def _checked_load(self, state_dict: Any
                      ) -> tuple[dict[str, Any], Any, dict[Any, dict[str, Any]]]:
        """Check a state dict against this optimizer without changing anything.

        Returns the state dict with the ``"kaon"`` entries taken out of its groups, the entry,
        and each parameter's saved state normalized to the layout (a plain-number ``step`` of
        torch's older checkpoints as a tensor, the ``()`` state of a 0-D parameter as the
        ``(1,)`` kaon keeps), keyed by saved parameter id. Raises ``ValueError``.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{owner}: expected a dict; got {type(state_dict).__name__}")
        state_dict = dict(state_dict)
        extra = state_dict.pop(_CHECKPOINT_KEY, None)
        saved_state = state_dict.get("state", {})
        raw_groups = state_dict.get("param_groups")
        if not isinstance(saved_state, dict) or not isinstance(raw_groups, (list, tuple)):
            raise ValueError(f"{owner}: a state dict holds a dict 'state' and a list "
                             "'param_groups'")
        saved_groups = []
        for i, group in enumerate(raw_groups):
            if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
                raise ValueError(f"{owner}: param_groups[{i}] is not a group with 'params'")
            group = dict(group)
            in_group = group.pop(_CHECKPOINT_KEY, None)
            extra = extra if extra is not None else in_group  # a DCP round trip keeps this one
            saved_groups.append(group)
        state_dict["param_groups"] = saved_groups
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{owner}: the checkpoint has {len(saved_groups)} parameter "
                             f"group(s), the optimizer {len(self.param_groups)}")
        if isinstance(extra, dict) and "optimizer" in extra and \
                extra["optimizer"] != type(self).__name__:
            raise ValueError(
                f"{owner}: the checkpoint was written by {extra['optimizer']!r}, not "
                f"{type(self).__name__!r}; a kaon optimizer loads only its own class's state")
        shapes = extra.get("shapes") if isinstance(extra, dict) else None
        params = [p for g in self.param_groups for p in g["params"]]
        if shapes is not None:
            now = [list(p.shape) for p in params]
            if not isinstance(shapes, (list, tuple)) or [list(s) for s in shapes] != now:
                raise ValueError(
                    f"{owner}: the checkpoint's parameter shapes {shapes!r} are not the "
                    f"optimizer's {now!r} (another model, or the parameters in another order)")
        states: dict[Any, dict[str, Any]] = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{owner}: param_groups[{i}] has {len(saved['params'])} "
                                 f"parameter(s) in the checkpoint, {len(group['params'])} here")
            merged = {**self.defaults, **saved, "params": group["params"]}
            try:
                check_all(self.hyperparameter_checks, merged, owner)
                distributed.check_mode(merged, owner)
                self.check_group(merged, owner)
            except (TypeError, ValueError) as error:
                raise ValueError(f"param_groups[{i}]: {error}") from None
            for saved_id, p in zip(saved["params"], group["params"]):
                if saved_id in saved_state:
                    states[saved_id] = self._checked_param_state(
                        p, merged, saved_state[saved_id], owner)
        return state_dict, extra, states

    def _checked_param_state(self, p: Tensor, group: dict[str, Any], state: Any,
                             owner: str) -> dict[str, Any]:
        """``state`` (one parameter's saved state) checked against the layout ``group``'s
        settings need for ``p``, normalized (see :meth:`_checked_load`); raises ValueError."""
        where = f"{owner}: the state of a parameter of shape {tuple(p.shape)}"
        if not isinstance(state, dict):
            raise ValueError(f"{where} is a {type(state).__name__}, not a dict")
        state = dict(state)
        if not state:
            return state
        expected = self._expected_state(p, group, state)
        allowed = set(expected) | set(self.extra_state_keys)
        unexpected = sorted(str(k) for k in state if k not in allowed)
        missing = sorted(k for k in expected if k not in state)
        if unexpected or missing:
            raise ValueError(
                f"{where} holds {sorted(map(str, state))}, but {type(self).__name__} with these "
                f"settings keeps {sorted(expected)} (missing {missing}, unexpected "
                f"{unexpected}): a checkpoint of another optimizer or configuration")
        sharded = distributed.has_dtensor([p])
        for key, ref in expected.items():
            value = state[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and ref.ndim == 0:
                # torch's older `step`: a plain number, finite and (for an integer slot) whole
                whole = ref.dtype.is_floating_point or float(value).is_integer()
                if not (math.isfinite(value) and whole and abs(value) <= 2**53):
                    raise ValueError(f"{where}: {key!r} is {value!r}, not a finite "
                                     f"{'number' if ref.dtype.is_floating_point else 'integer'}")
                value = torch.tensor(value, dtype=ref.dtype)
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
            if sharded or distributed.has_dtensor([value]):
                state[key] = value
                continue  # sharded entries: their local layout is the distributed module's
            if tuple(value.shape) == () and tuple(ref.shape) == (1,) and p.ndim == 0:
                value = value.reshape(1)  # torch keeps a 0-D parameter's moments as 0-D
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(
                    f"{where}: {key!r} is {tuple(value.shape)} {value.dtype}, but the group's "
                    f"settings need {tuple(ref.shape)} {ref.dtype}: a checkpoint of another "
                    "configuration (momentum_dtype, betas, bf16_method, ...) or parameter")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{where}: {key!r} holds non-finite values")
            state[key] = value
        return state

    def _expected_state(self, p: Tensor, group: dict[str, Any], saved: dict[str, Any]
                        ) -> dict[str, Tensor]:
        """The stored tensors (as ``meta`` tensors: key -> shape and dtype) that ``group``'s
        settings need for ``p``; ``saved`` is the checkpoint's state of ``p``, for a layout
        that depends on how the state was created (KProdigy's ``p0``)."""
        _, slots = engine._layout(self, p, group)
        return {slot.name + sfx: ref for slot in slots
                for sfx, ref in slot.codec.init(slot.shape, torch.device("meta")).items()}

    def _checked_entry(self, extra: Any) -> tuple[int | None, dict[torch.device, torch.Generator]]:
        """The seed and the generators of a checkpoint's ``"kaon"`` entry, built on the side
        (``(None, {})`` without an entry); raises ValueError for a bad entry."""
        owner = f"{type(self).__name__}.load_state_dict"
        if not extra:
            return None, {}
        if not isinstance(extra, dict):
            raise ValueError(f"{owner}: the 'kaon' entry is a {type(extra).__name__}, not a dict")
        seed = extra.get("seed", self.seed)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"{owner}: the 'kaon' entry's seed must be an int in "
                             f"[0, {_MAX_SEED}]; got {seed!r}")
        saved = extra.get("generators", {})
        if not isinstance(saved, dict):
            raise ValueError(f"{owner}: the 'kaon' entry's generators must be a dict")
        devices = {distributed.local(p).device for g in self.param_groups for p in g["params"]}
        ours = {self._device_key(d) for d in devices}
        generators: dict[torch.device, torch.Generator] = {}
        for name, rng in saved.items():
            try:
                device = torch.device(name)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"{owner}: the 'kaon' entry names a generator of device "
                                 f"{name!r}: {error}") from None
            if device.type not in {d.type for d in ours}:
                continue  # written on another kind of device: that stream restarts from seed
            device = self._device_key(device)
            if device not in ours:
                continue
            if not isinstance(rng, Tensor) or rng.dtype != torch.uint8:
                raise ValueError(f"{owner}: the generator state of {name!r} must be a uint8 "
                                 "tensor")
            generator = torch.Generator(device=device)
            try:
                generator.set_state(rng.detach().cpu().clone())
            except (RuntimeError, TypeError, ValueError) as error:
                raise ValueError(f"{owner}: the generator state of {name!r} does not fit a "
                                 f"{device} generator: {error}") from None
            generators[device] = generator
        return seed, generators

    @staticmethod
    def _device_key(device: torch.device) -> torch.device:
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, torch.get_device_module(device.type).current_device())
        return device

    # ---------------------------------------------------------------------- internals
    def _generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            device = torch.device(device.type, torch.get_device_module(device.type).current_device())
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed((self.seed + 7919 * (device.index or 0)) % _MAX_SEED)
            self._generators[device] = generator
        return generator

    def _check_gradients(self, params: Iterable[Tensor]) -> None:
        params = list(params)
        for p in params:
            if distributed.local(p.grad).layout != torch.strided:
                raise TypeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                    f"{tuple(p.shape)}); use a dense embedding (sparse=False)"
                )
        if self.nonfinite_grad == "raise" and params:
            # exact: a norm would overflow for large but finite gradients
            finite = torch.stack([torch.isfinite(distributed.local(p.grad)).all().cpu()
                                  for p in params])
            if distributed.has_dtensor(params):  # a shard's verdict holds for the whole tensor
                finite = finite.to(torch.int64)
                for group in distributed._groups_of(params):
                    torch.distributed.all_reduce(finite, torch.distributed.ReduceOp.MIN, group)
                finite = finite.bool()
            bad = (~finite).nonzero().flatten().tolist()
            if bad:
                shape = tuple(params[bad[0]].shape)
                raise FloatingPointError(
                    f"{type(self).__name__}: non-finite gradient in {len(bad)} parameter(s), the "
                    f"first of shape {shape}; nothing was changed (nonfinite_grad='raise')"
                )


# the base class's own entries too (a subclass's are wrapped by __init_subclass__)
KaonOptimizer.step = _eager(KaonOptimizer.step)  # type: ignore[method-assign]
KaonOptimizer.step_param = _eager(KaonOptimizer.step_param)  # type: ignore[method-assign]
