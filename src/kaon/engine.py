"""How an update rule is run.

An optimizer describes, for each parameter, the shape its rule sees (``view_shape``) and the
state slots it keeps (``state_slots``: a name, a codec and a shape each), and writes one update
rule over tensors with a leading batch dimension. The engine does everything else:

1. **plan**: bucket the parameters of a group that have gradients by (view shape, parameter
   dtype, gradient dtype, device, state layout); tensors above the effective cutoff, or every
   tensor when ``foreach=False``, run alone. Buckets are split into chunks of at most
   ``budget`` elements. Plans are cached per group and rebuilt when the set of parameters with
   gradients or a layout-relevant hyperparameter changes. Planning also creates missing state
   and checks that existing state matches the layout.
2. **run a chunk**: stack gradients and stored state (a chunk of one uses views, no copies),
   decode state to fp32, call the rule, mask parameters with non-finite gradients, encode the
   new state into the stored tensors, and write the step into the parameters with the group's
   precision method.

Per-parameter execution is the chunk-of-one case of the same code, so the batched path equals
the per-parameter path by construction (bit-for-bit on CPU fp32: every reduction in the rules
is per slice and order-independent, see :mod:`kaon.ops`).
"""

from __future__ import annotations

import contextlib
import operator
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kaon import distributed as _distributed
from kaon import fused as _fused
from kaon import precision
from kaon.state.codecs import Codec, FloatCodec

if TYPE_CHECKING:
    from kaon.optimizer import KaonOptimizer

__all__ = ["Slot", "Batch", "Workspace", "run_group", "stack_budget", "effective_cutoff",
           "chunk_state", "gradients_checked_once", "reset_state", "run_chunk",
           "run_statistics_chunk", "screen_gradients", "GRAD_SAFE_MAX"]

SHIFT = "shift"
_MAX_PLANS_PER_GROUP = 8
_CPU_BUDGET = 1_048_576


@dataclass(frozen=True)
class Slot:
    """One state slot of a parameter: stored under ``name`` (+ codec suffixes).

    ``init`` (optional) gives the slot's initial fp32 value from the parameter, shaped
    ``shape`` (e.g. a copy of the initial weights); without it the slot starts at zero.
    """

    name: str
    codec: Codec
    shape: tuple[int, ...]
    init: Callable[[Tensor], Tensor] | None = field(default=None, compare=False)

    @property
    def signature(self) -> tuple:
        return (self.name, self.codec.key, self.shape)

    def state_keys(self) -> list[str]:
        return [self.name + suffix for suffix in self.codec.suffixes]


class Batch:
    """What an update rule sees for one chunk of ``size`` parameters of one group.

    ``grad`` is the fp32 gradient ``[N, *view]`` (negated when the group maximizes), ``state``
    maps slot names to decoded fp32 tensors, ``group`` is the parameter group. ``param`` is the
    fp32 parameter stack, built on first use. ``grad`` and ``param`` are read-only (they may
    alias the live gradient and parameter). ``state`` tensors belong to the rule for this step:
    it may update them in place (on the per-parameter fp32 path that writes the stored state
    directly, saving a copy; the engine hands out copies whenever it still needs the old
    values). The rule returns ``(delta, new_state)``; the engine applies ``p <- p - delta``.

    ``finite`` is ``None`` when every gradient of the chunk is finite (or the policy is not
    ``"skip"``), else a bool ``[N]`` tensor: the engine masks the step and the state of the
    tensors flagged false itself; a statistics rule (see :func:`run_group`) uses it to keep
    their contribution out of its statistics.

    ``param_writable`` is True when ``param`` is the live fp32 parameter itself (a chunk of one
    contiguous fp32 tensor whose gradient is finite): a fused rule may then write
    ``p - delta`` into ``param`` and return ``None`` as its delta, saving the engine's separate
    write-back pass (exactly the fp32 write-back the engine would do).
    """

    __slots__ = ("grad", "state", "group", "params", "view", "slots", "finite", "_param",
                 "_workspace", "_same_shape", "param_writable")

    def __init__(self, grad, state, group, params, view, workspace=None,
                 same_shape: bool | None = None, slots: dict[str, Slot] | None = None,
                 finite: Tensor | None = None) -> None:
        self.grad: Tensor = grad
        self.state: dict[str, Tensor] = state
        self.group: dict[str, Any] = group
        self.params: list[Tensor] = params
        self.view: tuple[int, ...] = view
        self.slots: dict[str, Slot] = slots or {}
        self.finite: Tensor | None = finite
        self._param: Tensor | None = None
        self._workspace: Workspace | None = workspace
        self.param_writable: bool = False
        if same_shape is None:
            same_shape = all(p.shape == params[0].shape for p in params)
        self._same_shape = same_shape

    def scratch(self, name: str) -> Tensor:
        """An uninitialized fp32 tensor shaped like ``grad``, reused across steps on CPU.

        Each name gives a distinct buffer; its contents do not survive the chunk.
        """
        if self._workspace is None:
            return torch.empty_like(self.grad)
        return self._workspace.take(name, self.grad.shape, self.grad.device)

    @property
    def size(self) -> int:
        """The number of tensors in the batch (``grad.shape[0]``; on the fused path ``params``
        is empty)."""
        return self.grad.shape[0]

    def as_stored(self, name: str, value: Tensor) -> Tensor:
        """``value`` (fp32, shaped like slot ``name``) as it reads back after being stored.

        For a rule that must use exactly the value the next step will decode (e.g. a
        displacement derived from a quantized momentum). ``value`` is not modified.
        """
        codec = self.slots[name].codec
        return codec.decode(codec.encode(value.clone()), self.slots[name].shape)

    def with_param(self, param: Tensor) -> Batch:
        """This batch with ``param`` (fp32 ``[N, *view]``) in place of the parameter stack.

        For a rule that runs another rule at a point other than the stored weights (Nekaon
        runs Adakaon's rule at the true weights while the stored ones carry a displacement).
        Everything else (gradient, state, group, scratch buffers) is shared with this batch;
        the engine still writes the step relative to the stored weights.
        """
        other = Batch(self.grad, self.state, self.group, self.params, self.view,
                      self._workspace, self._same_shape, self.slots)
        other._param = param
        return other

    @property
    def param(self) -> Tensor:
        if self._param is None:
            params = [p.detach() for p in self.params]
            workspace = self._workspace if self._workspace is not None else Workspace()
            self._param = gather(workspace, "param", params, self.view, self._same_shape)
        return self._param


class Workspace:
    """Reusable scratch buffers for a rule's large fp32 temporaries.

    On CPU, every fresh multi-megabyte tensor is new memory from the C allocator that the kernel
    must fault in page by page, which costs as much as the arithmetic done on it; reusing a
    buffer across chunks and steps avoids that. One flat buffer is kept per name, grown to the
    largest request, so the memory held is (number of names) x (largest chunk) x 4 bytes; see
    :meth:`KaonOptimizer.workspace_bytes`. Small requests and non-CPU devices get a plain new
    tensor (CUDA's caching allocator already reuses memory).
    """

    min_elements = 65_536

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def take(self, name: str, shape: torch.Size | tuple[int, ...], device: torch.device,
             dtype: torch.dtype = torch.float32) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        if device.type != "cpu" or numel < self.min_elements:
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._buffers.get((name, device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[(name, device, dtype)] = buffer
        return buffer[:numel].view(shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


@dataclass
class _Chunk:
    params: list[Tensor]
    view: tuple[int, ...]
    slots: tuple[Slot, ...]
    packed: dict[str, Tensor] | None = None  # batched state: one [N, ...] tensor per key
    members: dict[str, list[Tensor]] | None = None  # the views of ``packed`` held in the state
    # a fused kernel's per-chunk data (pointer tables, eligibility); dropped with the plan
    kernel_cache: dict[str, Any] = field(default_factory=dict)
    # every parameter has the first one's shape: no per-tensor reshapes (derived)
    same_shape: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        first = self.params[0].shape
        self.same_shape = all(p.shape == first for p in self.params)

    def state_keys(self) -> list[str]:
        return [key for slot in self.slots for key in slot.state_keys()]


def _packed_state(opt: KaonOptimizer, chunk: _Chunk, states: list[dict]) -> dict[str, Tensor]:
    """The chunk's stored state as ``[N, ...]`` tensors whose slices are the state entries.

    A batched chunk keeps each state key of its parameters in one contiguous tensor and puts
    views of it into ``opt.state``, so running the chunk needs no stacking and storing is one
    in-place copy. The checkpoint format is unchanged (each entry is a plain tensor). If any
    entry was replaced since (a checkpoint was loaded, another plan packed it), it repacks.
    """
    keys = chunk.state_keys()
    if chunk.packed is not None and chunk.members is not None and all(
        all(map(operator.is_, [state[key] for state in states], chunk.members[key]))
        for key in keys
    ):
        return chunk.packed
    packed, members = {}, {}
    for key in keys:
        buffer = torch.stack([state[key] for state in states])
        views = list(buffer.unbind(0))
        for state, view in zip(states, views):
            state[key] = view
        packed[key], members[key] = buffer, views
    chunk.packed, chunk.members = packed, members
    return packed


def stack_budget(opt: KaonOptimizer, device: torch.device) -> int:
    """Largest number of elements stacked into one chunk.

    An explicit ``foreach_stack_budget`` is used as given. Otherwise: on CUDA 5 % of the
    device's total memory divided by the optimizer's transient bytes per element, at least 262,144
    and at most 4x the cutoff; on CPU 1,048,576 (at most 4x the cutoff). The budget depends only on
    the device, never on free memory, so chunking (and with it the stochastic-rounding stream) is
    the same after a resume.
    """
    if opt.foreach_stack_budget is not None:
        return opt.foreach_stack_budget
    ceiling = 4 * opt.foreach_batch_cutoff
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(262_144, min(int(total * 0.05 / opt.bytes_per_element), ceiling))
    # CPU: an op costs microseconds to dispatch, so only small tensors gain from stacking, while
    # stacking a large one is pure copying; 4 MiB fp32 chunks measured best on 2 cores.
    return min(_CPU_BUDGET, ceiling)


def effective_cutoff(opt: KaonOptimizer, device: torch.device) -> int:
    """Tensors up to this many elements are batched: at least two must fit in a chunk."""
    return min(opt.foreach_batch_cutoff, stack_budget(opt, device) // 2)


def _layout(opt: KaonOptimizer, p: Tensor, group: dict) -> tuple[tuple[int, ...], tuple]:
    view = tuple(opt.view_shape(p, group))
    slots = list(opt.state_slots(p, group, view))
    if precision.needs_shift(p.dtype, group.get("bf16_method", "stochastic_rounding")):
        slots.append(Slot(SHIFT, FloatCodec(p.dtype), view))
    return view, tuple(slots)


def _initial_state(slot: Slot, p: Tensor) -> dict[str, Tensor]:
    """The slot's initial stored tensors for ``p`` (zero, or ``slot.init(p)`` encoded)."""
    if slot.init is None:
        return slot.codec.init(slot.shape, p.device)
    value = slot.init(p.detach()).to(torch.float32).reshape(slot.shape).clone()
    stored = slot.codec.encode(value.unsqueeze(0))
    return {suffix: tensor[0].clone() for suffix, tensor in stored.items()}


def reset_state(opt: KaonOptimizer, p: Tensor, group: dict,
                keep: tuple[str, ...] = (SHIFT,)) -> None:
    """Re-create ``p``'s state as at its first step (each slot's initial value for the current
    ``p``), except the slots named in ``keep`` (default: the bf16 compensation ``shift``, which
    belongs to the weights, not to the rule). Used by an optimizer that restarts its rule's
    state mid-run (Autokaon after its probe). The entries are new tensors, so batched chunks
    repack them at their next run."""
    state = opt.state[p]
    if not any(isinstance(v, Tensor) for v in state.values()):
        return  # not created yet: the next step creates it fresh anyway
    _, slots = _layout(opt, p, group)
    for slot in slots:
        if slot.name not in keep:
            for suffix, tensor in _initial_state(slot, p).items():
                state[slot.name + suffix] = tensor


def _ensure_state(opt: KaonOptimizer, p: Tensor, slots: tuple[Slot, ...]) -> None:
    state = opt.state[p]
    if not any(isinstance(v, Tensor) for v in state.values()):
        for slot in slots:
            for suffix, tensor in _initial_state(slot, p).items():
                state[slot.name + suffix] = tensor
        return
    wanted = {key for slot in slots for key in slot.state_keys()}
    for key in [k for k, v in state.items() if isinstance(v, Tensor) and k not in wanted]:
        del state[key]  # e.g. the momentum after beta1 was set to 0: not kept, saved or counted
    for slot in slots:
        expected = slot.codec.init(slot.shape, torch.device("meta"))
        for suffix, ref in expected.items():
            key = slot.name + suffix
            have = state.get(key)
            if not isinstance(have, Tensor) or have.shape != ref.shape or have.dtype != ref.dtype:
                found = "missing" if have is None else f"{tuple(have.shape)} {have.dtype}"
                raise ValueError(
                    f"{type(opt).__name__}: stored state {key!r} of a parameter of shape "
                    f"{tuple(p.shape)} is {found}, but the group's settings need "
                    f"{tuple(ref.shape)} {ref.dtype} ({slot.codec.describe()}). The state was "
                    "created with other settings (momentum_dtype, betas, momentum_4bit_block or "
                    "bf16_method changed, or a checkpoint from another configuration was loaded)."
                )


def _plan(opt: KaonOptimizer, group: dict, params: list[Tensor]) -> list[_Chunk]:
    buckets: OrderedDict[tuple, list[Tensor]] = OrderedDict()
    layouts: dict[tuple, tuple[tuple[int, ...], tuple[Slot, ...]]] = {}
    chunks: list[_Chunk] = []
    for p in params:
        view, slots = _layout(opt, p, group)
        _ensure_state(opt, p, slots)
        if opt.foreach and p.numel() <= effective_cutoff(opt, p.device):
            key = (view, p.dtype, p.grad.dtype, p.device, tuple(s.signature for s in slots))
            buckets.setdefault(key, []).append(p)
            layouts[key] = (view, slots)
        else:
            chunks.append(_Chunk([p], view, slots))
    for key, members in buckets.items():
        view, slots = layouts[key]
        per_chunk = max(1, stack_budget(opt, members[0].device) // max(1, members[0].numel()))
        for start in range(0, len(members), per_chunk):
            chunks.append(_Chunk(members[start : start + per_chunk], view, slots))
    return chunks


def _plan_key(opt: KaonOptimizer, group: dict, params: list[Tensor]) -> tuple:
    settings = tuple(repr(group.get(k)) for k in opt.layout_keys)
    grads = tuple(p.grad.dtype for p in params)
    return (tuple(map(id, params)), grads, settings, opt.foreach, opt.foreach_batch_cutoff,
            opt.foreach_stack_budget)


Statistics = Callable[["Batch"], tuple[Tensor, dict[str, Tensor]]]


def run_group(opt: KaonOptimizer, group: dict, params: list[Tensor], *,
              statistics: Statistics | None = None,
              reads: Collection[str] = (), plan_only: bool = False
              ) -> list[tuple[list[Tensor], Tensor]]:
    """Run the optimizer's rule over ``params`` (all with gradients) of ``group``.

    With ``statistics`` (a *statistics pass*, for optimizers that need a reduction over all
    parameters before any update, e.g. KProdigy's D estimate), each chunk runs
    ``statistics(batch) -> (stats, new_state)`` instead of ``opt.update``: only the slots named
    in ``reads`` are decoded, no parameter is written, only the slots in ``new_state`` are
    stored (kept unchanged for tensors with a non-finite gradient), and the per-tensor ``stats``
    (``[N, ...]``) are returned as ``(chunk parameters, stats)`` pairs, in chunk order. The
    chunks are those of the update pass (same plan). Without it the return value is ``[]``.

    With ``plan_only`` the plan is built (missing state created, existing state checked) and
    no rule runs: the lr-0 priming step of ``torch.distributed.checkpoint`` uses it. DTensor
    parameters (FSDP2) are handed to :func:`kaon.distributed.run_group`.
    """
    if _distributed.has_dtensor(params):
        return _distributed.run_group(opt, group, params, statistics=statistics, reads=reads,
                                      plan_only=plan_only)
    params = [p for p in params if p.numel() > 0]  # nothing to update in an empty tensor
    if not params:
        return []
    # one-parameter plans (step_param from a backward hook) are kept per parameter; plans of
    # several parameters are few, so an LRU of a handful suffices
    single = len(params) == 1
    cache = opt._plans.setdefault((id(group), single), OrderedDict())
    key = _plan_key(opt, group, params)
    chunks = cache.get(key)
    if chunks is None:
        chunks = _plan(opt, group, params)
        cache[key] = chunks
        while not single and len(cache) > _MAX_PLANS_PER_GROUP:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    if plan_only:
        return []
    if statistics is not None:
        return [(chunk.params, run_statistics_chunk(opt, group, chunk, statistics, reads))
                for chunk in chunks]
    # the state exists and matches the layout now: an optimizer may run a fused kernel instead
    if opt.fused_step(group, params):
        return []
    # a chunk kernel (kaon.kernels) runs the rule on the chunk's own state, or declines it
    kernel = getattr(opt, "_kernel", None)
    fused = _fused.wanted(opt, group, params)
    for chunk in chunks:
        if kernel is not None and kernel.run(opt, group, chunk):
            continue
        run_chunk(opt, group, chunk, fused)
    return []


@contextlib.contextmanager
def gradients_checked_once(opt: KaonOptimizer) -> Iterator[None]:
    """Within the block, the ``nonfinite_grad="skip"`` check of each chunk's gradients runs
    once and later passes reuse its result.

    For optimizers that run several passes over the same gradients in one step (a statistics
    pass, then the update pass): the gradients must not change inside the block.
    """
    opt._finite_memo = {}
    try:
        yield
    finally:
        opt._finite_memo = None


def chunk_state(opt: KaonOptimizer, chunk: _Chunk) -> dict[str, Tensor]:
    """The stored state of a chunk by state key, as ``[N, ...]`` tensors whose slices are the
    tensors in ``opt.state`` (a chunk of one: views of them; a batched chunk: its packed
    buffers). Writing into them writes the state. For fused kernels (:mod:`kaon.kernels`)."""
    states = [opt.state[p] for p in chunk.params]
    if len(chunk.params) == 1:
        return {key: states[0][key].unsqueeze(0) for key in chunk.state_keys()}
    return _packed_state(opt, chunk, states)


def gather(workspace: Workspace, name: str, tensors: list[Tensor], view: tuple[int, ...],
           same_shape: bool) -> Tensor:
    """``tensors`` (equal numel) as one fp32 ``[N, *view]`` tensor.

    One fp32 tensor is returned as a view (no copy); otherwise the tensors are stacked in their
    own dtype into a workspace buffer (one ``stack`` call) and converted to fp32 in one copy.
    """
    if len(tensors) == 1 and tensors[0].dtype == torch.float32:
        return tensors[0].reshape(1, *view)
    count, device, dtype = len(tensors), tensors[0].device, tensors[0].dtype
    out = workspace.take(name, (count, *view), device)
    shape = tensors[0].shape if same_shape else torch.Size(view)
    parts = tensors if same_shape else [t.reshape(view) for t in tensors]
    if dtype == torch.float32:
        torch.stack(parts, out=out.view(count, *shape))
    elif count == 1:
        out.copy_(parts[0].reshape(1, *view))
    else:
        staged = workspace.take(name + ":" + str(dtype), (count, *shape), device, dtype)
        out.copy_(torch.stack(parts, out=staged).view(count, *view))
    return out


def _gather_grads(opt: KaonOptimizer, chunk: _Chunk) -> Tensor:
    """The fp32 gradients ``[N, *view]`` of a chunk."""
    grads = [p.grad for p in chunk.params]
    return gather(opt._workspace, "grad", grads, chunk.view, chunk.same_shape)


def _store(new: Tensor, old: Tensor) -> None:
    """Write ``new`` into the stored tensor ``old`` (a view of the state), unless it is it."""
    if new.data_ptr() != old.data_ptr() or new.stride() != old.stride():
        old.copy_(new)


def _keep_where(finite: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    if finite is None:
        return new
    return torch.where(finite.view(-1, *([1] * (new.ndim - 1))), new, old)


#: a finite gradient whose largest magnitude exceeds this is scaled down by a power of two
#: before the rule sees it, so that its squares and sums of squares stay far from fp32's
#: overflow (2**80 * numel < 3.4e38 for any tensor below 2**47 elements); smaller gradients
#: are passed on untouched, bit for bit
GRAD_SAFE_MAX = 2.0**40


def screen_gradients(flat: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """One read of a chunk's gradients ``[N, numel]``: per-tensor finite flags and scales.

    Returns ``(finite, scale)``. ``finite`` is the bool ``[N]`` flags of the tensors whose
    every element is finite (from the minimum and maximum, which cannot overflow the way a sum
    does), or ``None`` on the CPU when all are. ``scale`` is ``None`` when no finite gradient
    exceeds :data:`GRAD_SAFE_MAX` in magnitude (on the CPU), else fp32 ``[N]`` powers of two
    (exactly 1 for the other tensors) that bring each such gradient into range with its
    direction kept. On other devices both are always tensors (no host sync).
    """
    low, high = torch.aminmax(flat, dim=-1)
    finite = torch.isfinite(torch.stack((low, high))).all(dim=0)  # one check, both ends
    peak = torch.maximum(high, low.neg())
    large = finite & (peak > GRAD_SAFE_MAX)
    on_cpu = flat.device.type == "cpu"
    scale = None
    if not on_cpu or bool(large.any()):
        exponent = torch.log2(peak.double() / GRAD_SAFE_MAX).ceil_().clamp_min_(0.0)
        scale = torch.where(large, torch.exp2(-exponent), 1.0).to(torch.float32)
    if on_cpu and bool(finite.all()):
        finite = None  # nothing to mask; on CPU this check costs no device sync
    return finite, scale


def _screen(opt: KaonOptimizer, chunk: _Chunk, grad: Tensor) -> tuple[Tensor, Tensor | None]:
    """Phase 1b: the chunk's gradient screen (:func:`screen_gradients`) under the optimizer's
    ``nonfinite_grad`` policy, reusing an earlier pass's result inside
    :func:`gradients_checked_once`. Returns the (possibly rescaled) gradient and ``finite``."""
    if opt.nonfinite_grad == "none":
        return grad, None
    memo = getattr(opt, "_finite_memo", None)
    seen = memo.get(id(chunk)) if memo is not None else None
    if seen is not None and seen[0] is chunk:
        finite, scale = seen[1], seen[2]  # checked by an earlier pass of this step
    else:
        finite, scale = screen_gradients(grad.reshape(len(chunk.params), -1))
        if opt.nonfinite_grad != "skip":
            finite = None  # "raise": every gradient was checked finite before the step
        if memo is not None:
            # the chunk is kept alive with its result, so its id cannot be reused meanwhile
            memo[id(chunk)] = (chunk, finite, scale)
    if scale is not None:
        grad = grad * scale.view(-1, *([1] * len(chunk.view)))  # a new tensor: p.grad is kept
    return grad, finite


def _decode(opt: KaonOptimizer, slots: tuple[Slot, ...], stored: dict[str, Tensor],
            grad: Tensor, finite: Tensor | None) -> dict[str, Tensor]:
    """Phase 1c: the stored state decoded to fp32 (into workspace buffers where it can)."""
    decoded = {}
    for slot in slots:
        if slot.name == SHIFT:
            continue
        raw = {sfx: stored[slot.name + sfx] for sfx in slot.codec.suffixes}
        out = None
        if slot.shape == tuple(grad.shape[1:]) and slot.codec.decodes_into:
            out = opt._workspace.take("state:" + slot.name, grad.shape, grad.device)
        value = slot.codec.decode(raw, slot.shape, out=out)
        if finite is not None and value.data_ptr() == raw[""].data_ptr():
            value = value.clone()  # the rule may write in place; masking needs the old values
        decoded[slot.name] = value
    return decoded


def _encode(slots: tuple[Slot, ...], new_state: dict[str, Tensor], stored: dict[str, Tensor],
            finite: Tensor | None) -> None:
    """Phase 3: encode the rule's new state into the stored tensors (tensors whose gradient
    was not finite keep their old state). Slots missing from ``new_state`` are kept."""
    for slot in slots:
        if slot.name == SHIFT or slot.name not in new_state:
            continue
        for suffix, tensor in slot.codec.encode(new_state[slot.name]).items():
            key = slot.name + suffix
            _store(_keep_where(finite, tensor, stored[key]), stored[key])


def _write_back(opt: KaonOptimizer, group: dict, batch: Batch, delta: Tensor | None,
                stored: dict[str, Tensor]) -> None:
    """Phase 4: ``p <- p - delta`` in the parameters' dtype with the group's precision method
    (tensors whose gradient was not finite are left exactly as they were)."""
    params, finite = batch.params, batch.finite
    if delta is None:  # the rule wrote p - delta into batch.param itself (param_writable)
        if not batch.param_writable:
            raise RuntimeError(f"{type(opt).__name__}: the update rule returned no step for a "
                               "batch whose parameters it may not write")
        return
    if finite is not None:
        delta = torch.where(finite.view(-1, *([1] * len(batch.view))), delta, 0.0)
    low_precision = params[0].dtype in precision.LOW_PRECISION
    shift = stored.get(SHIFT)
    new_shift = precision.apply_step(
        params, delta, group.get("bf16_method", "stochastic_rounding"),
        opt._generator(params[0].device), batch.param if low_precision else None, shift,
    )
    if new_shift is not None and shift is not None:
        _store(_keep_where(finite, new_shift, shift), shift)


def _chunk_inputs(opt: KaonOptimizer, group: dict, chunk: _Chunk, slots: tuple[Slot, ...]
                  ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """Phase 1: gather the fp32 gradients, the stored state and the screen's result."""
    grad = _gather_grads(opt, chunk)
    if group.get("maximize", False):
        grad = -grad
    grad, finite = _screen(opt, chunk, grad)
    return grad, _stored(opt, chunk, slots), finite


def _stored(opt: KaonOptimizer, chunk: _Chunk, slots: tuple[Slot, ...]) -> dict[str, Tensor]:
    states = [opt.state[p] for p in chunk.params]
    if len(chunk.params) == 1:
        return {key: states[0][key].unsqueeze(0) for slot in slots for key in slot.state_keys()}
    return _packed_state(opt, chunk, states)


def run_chunk(opt: KaonOptimizer, group: dict, chunk: _Chunk, fused: bool = False) -> None:
    """Run the update rule over one chunk: gather and decode, the rule, encode, write back.

    With ``fused`` the chunk runs on the compiled path (:mod:`kaon.fused`), which traces these
    same phases and the same rule into one kernel; if it cannot compile, the phases run here.
    """
    if fused and _fused.run_chunk(opt, group, chunk, _stored(opt, chunk, chunk.slots)):
        return
    grad, stored, finite = _chunk_inputs(opt, group, chunk, chunk.slots)
    decoded = _decode(opt, chunk.slots, stored, grad, finite)
    batch = Batch(grad, decoded, group, chunk.params, chunk.view, opt._workspace,
                  chunk.same_shape, {slot.name: slot for slot in chunk.slots}, finite)
    params = chunk.params
    batch.param_writable = (finite is None and len(params) == 1
                            and params[0].dtype == torch.float32 and params[0].is_contiguous())
    delta, new_state = opt.update(batch)
    # parameters first: encoding may reuse the rule's fp32 outputs as scratch space
    _write_back(opt, group, batch, delta, stored)
    _encode(chunk.slots, new_state, stored, finite)


def run_statistics_chunk(opt: KaonOptimizer, group: dict, chunk: _Chunk, statistics: Statistics,
                         reads: Collection[str]) -> Tensor:
    """A statistics pass over one chunk (see :func:`run_group`): only the slots in ``reads`` are
    decoded, no parameter is written, the slots the pass returns are encoded back."""
    slots = tuple(slot for slot in chunk.slots if slot.name in reads)
    grad, stored, finite = _chunk_inputs(opt, group, chunk, slots)
    decoded = _decode(opt, slots, stored, grad, finite)
    batch = Batch(grad, decoded, group, chunk.params, chunk.view, opt._workspace,
                  chunk.same_shape, {slot.name: slot for slot in slots}, finite)
    stats, new_state = statistics(batch)
    _encode(slots, new_state, stored, finite)
    return stats
