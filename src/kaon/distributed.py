"""Sharded parameters (FSDP2 / DTensor), replicas (DDP) and the collectives they need.

kaon's rules are written over plain tensors with a leading batch dimension. When a group holds
``torch.distributed.tensor.DTensor`` parameters (``fully_shard`` makes every parameter one, a
``Shard(0)`` piece per rank, uneven when the rows do not divide), :func:`kaon.engine.run_group`
hands them to :func:`run_group` here. Plain parameters of the same group take the ordinary path.

**How a sharded parameter is stepped (``distributed_mode="exact"``, the default).** Every rule of every kaon optimizer needs some statistic over the whole
tensor (the factored column moment, ``mean(row)``, the RMS clip, cautious masking's mean, the
int8 row scales are local but the 4-bit block scales are not, Newton-Schulz needs the whole
matrix, KProdigy's slices and ``D``), so rather than re-deriving each rule for shards, the step of
one sharded tensor is:

1. gather its parameter, gradient and state: on a 1-D mesh every ``Shard(0)`` piece of a bucket
   of tensors (up to :data:`GATHER_BUDGET` bytes of whole tensors) travels in one
   ``all_gather`` of a byte buffer; anything else through ``DTensor.full_tensor()``; always in
   the group's parameter order, the same on every rank;
2. run the optimizer's own rule on the whole tensor through the ordinary engine (a chunk of one,
   the per-parameter path), exactly as a single process would;
3. keep the local rows: the parameter's local shard is overwritten with its rows of the result,
   and every state tensor keeps its own rows.

The result is bit-identical to a single process stepping the same tensor with the same gradient
(tested for every optimizer in the conformance registry), for every rule, including the global
scalars (KProdigy's ``D`` is reduced from whole-tensor statistics that every rank computes
alike, so it agrees on every rank by construction). The price: per step and tensor, the gather of
its gradient, weights and state (roughly what FSDP's own forward gather of the weights costs, plus
the state), transient memory of one whole tensor's working set, and the rule computed redundantly
on every rank. At rest, everything stays sharded.

**State layout.** Each state tensor is a ``DTensor`` on the parameter's mesh whose *global* value
is exactly the single-process state: ``Shard(0)`` over its own first dimension (with
``torch.chunk`` sizes, the layout FSDP2 gives parameters) where the parameter is ``Shard(0)``,
replicated otherwise, and replicated for 0-D state. Row-aligned state (``m``, ``row``, int8
``m_scale``, the Kahan ``shift``) therefore holds the same rows as the parameter; column moments
``[C]``, 4-bit codes and block scales (flat, blocked over the whole tensor) are split by their own
length, so a block may straddle two ranks at rest; that is harmless because blocks are only
decoded after the gather. ``torch.distributed.checkpoint`` sees ordinary sharded tensors whose
``full_tensor()`` equals the single-process state, so a checkpoint can be loaded at another world
size or into a single process.

**Stochastic rounding.** Every rank rounds the whole tensor with the optimizer's generator and
keeps its rows; with the same ``seed`` on every rank (pass ``seed=`` or call
:func:`synchronize_seed`) the rows are those a single process would write. Under DDP every rank
steps the same plain tensors, so replicas stay bit-identical only if their generators agree:
``seed=None`` takes ``torch.initial_seed()``, which differs between processes unless every rank
called ``torch.manual_seed`` with the same value.

The per-group key ``distributed_mode`` selects the strategy: ``"exact"`` (the default, above)
or ``"local"``.

**``distributed_mode="local"``.** Each rank runs the optimizer's rule on its own rows only:
every ``Shard(0)`` DTensor of a 1-D mesh is handed to the ordinary engine as a plain stand-in
(its local rows, sharing the shard's storage, with the local gradient and plain views of the
state pieces), batched like any plain parameters; nothing is gathered. Per-row statistics stay
exact (row second moments, int8 row scales, centralization's row mean) and elementwise rules
give the single-process result; column moments, the RMS clip, cautious masking's mean, norms,
4-bit block scales and Newton-Schulz become statistics of the shard (docs/distributed.md has
the table). The statistics pass of KProdigy and Autokaon returns per-tensor sums; they are
summed over the ranks (one ``all_reduce``), so ``D`` and the rate agree on every rank. Ranks
whose shard is empty create the state and run nothing. State entries whose first dimension is
the parameter's rows are ``Shard(0)`` over the global rows (the exact mode's layout); every
other entry is the rank's own, stored flat in row ``rank`` of a ``[world, L]`` ``Shard(0)``
DTensor. Parameters that are not ``Shard(0)`` on a 1-D mesh take the exact path.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kaon import engine

if TYPE_CHECKING:
    from kaon.optimizer import KaonOptimizer

__all__ = ["MODES", "MODE_KEY", "is_dtensor", "has_dtensor", "local", "run_group",
           "synchronize_seed", "all_ranks_agree"]

MODE_KEY = "distributed_mode"
#: accepted values of the group key ``distributed_mode``
MODES = ("exact", "local")

_DTENSOR: Any = None


def _dtensor_type() -> type | tuple:
    """DTensor, once ``torch.distributed.tensor`` has been imported (no DTensor can exist
    before); until then ``()``, against which ``isinstance`` is always False."""
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        if module is None:
            return ()
        _DTENSOR = module.DTensor
    return _DTENSOR


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return isinstance(t, _dtensor_type())


def has_dtensor(tensors: Iterable[Any]) -> bool:
    """Whether any of ``tensors`` is a DTensor."""
    kind = _dtensor_type()
    return any(isinstance(t, kind) for t in tensors)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def check_mode(group: dict[str, Any], owner: str) -> str:
    """The group's ``distributed_mode`` (default ``"exact"``); ValueError if unknown."""
    mode = group.get(MODE_KEY, "exact")
    if mode not in MODES:
        raise ValueError(
            f"{owner}: distributed_mode must be one of {', '.join(map(repr, MODES))}; got "
            f"{mode!r}"
        )
    return mode


def run_group(opt: KaonOptimizer, group: dict, params: list[Tensor], *,
              statistics: engine.Statistics | None = None, reads: Collection[str] = (),
              plan_only: bool = False) -> list[tuple[list[Tensor], Tensor]]:
    """:func:`kaon.engine.run_group` for a list that holds DTensor parameters.

    Plain parameters run through the engine as usual; each DTensor parameter is gathered,
    stepped whole and scattered back (see the module docstring), in list order, which is the
    same on every rank. With ``statistics`` the per-tensor statistics are returned as
    ``([p], stats)`` pairs with the DTensor parameter ``p``; with ``plan_only`` the state is
    created (and checked) and nothing else happens.
    """
    mode = check_mode(group, type(opt).__name__)
    plain = [p for p in params if not is_dtensor(p)]
    out: list[tuple[list[Tensor], Tensor]] = []
    if plain:
        out += engine.run_group(opt, group, plain, statistics=statistics, reads=reads,
                                plan_only=plan_only)
    sharded = [p for p in params if is_dtensor(p)]
    if mode == "local":
        rows = [p for p in sharded if _sharded_rows(p, p.device_mesh) and p.ndim >= 1]
        out += _run_local(opt, group, rows, statistics, reads, plan_only)
        sharded = [p for p in sharded if not any(p is q for q in rows)]  # other placements
    for bucket in _buckets(sharded):
        gathered = _gather(opt, bucket)
        for p in bucket:
            stats = _step_whole(opt, group, p, gathered.pop(id(p)), statistics, reads,
                                plan_only)
            if stats is not None:
                out.append(([p], stats))
    return out


#: at most this many bytes of whole tensors (parameter, gradient, state) are gathered at once
GATHER_BUDGET = 64 * 2**20


def _buckets(params: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive runs of parameters whose whole tensors fit the gather budget together."""
    buckets: list[list[Tensor]] = []
    size = 0
    for p in params:
        nbytes = 3 * p.numel() * p.element_size()
        if not buckets or size + nbytes > GATHER_BUDGET:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += nbytes
    return buckets


def _row_split(rows: int, ranks: int) -> list[int]:
    """Rows per rank of a ``Shard(0)`` dimension of ``rows`` (torch.chunk sizes, padded)."""
    chunk = -(-rows // ranks) if rows else 0
    return [max(0, min(rows, chunk * (r + 1)) - chunk * r) for r in range(ranks)]


def _sharded_rows(t: Any, mesh) -> bool:
    """Whether ``t`` is a DTensor on the 1-D ``mesh`` placed ``Shard(0)`` (packable)."""
    from torch.distributed.tensor import Shard

    return (is_dtensor(t) and t.device_mesh == mesh and len(t.placements) == 1
            and isinstance(t.placements[0], Shard) and t.placements[0].dim == 0)


def _gather(opt: KaonOptimizer, bucket: list[Tensor]) -> dict[int, tuple[Tensor, Tensor | None, dict]]:
    """Whole parameter, gradient and state of every parameter of ``bucket``, keyed by id.

    On a 1-D mesh every ``Shard(0)`` piece of the bucket travels in one ``all_gather`` of a
    byte buffer (each rank's pieces back to back, padded to rank 0's size, the largest);
    anything else (other meshes or placements) is gathered tensor by tensor with
    ``full_tensor()``. The order is the bucket's, then sorted state keys: the same on every
    rank.
    """
    mesh = bucket[0].device_mesh
    packable = mesh.ndim == 1
    items: list[tuple[int, str, Any]] = []
    for p in bucket:
        items.append((id(p), "param", p))
        items.append((id(p), "grad", p.grad))
        state = opt.state[p]
        for key in sorted(state):
            items.append((id(p), key, state[key]))
    packed = [it for it in items if packable and _sharded_rows(it[2], mesh)]
    whole: dict[tuple[int, str], Any] = {}
    if packed:
        ranks = mesh.size()
        me = mesh.get_local_rank()
        sizes = [[rows * math.prod(t.shape[1:]) * t.element_size()
                  for rows in _row_split(t.shape[0], ranks)] for _, _, t in packed]
        width = max(sum(col[r] for col in sizes) for r in range(ranks))
        send = torch.zeros(width, dtype=torch.uint8, device=local(packed[0][2]).device)
        offset = 0
        for (_, _, t), col in zip(packed, sizes):
            if col[me]:
                flat = local(t).reshape(-1)
                if flat.stride(0) != 1:  # e.g. one element of a strided view: clone keeps it
                    flat = torch.empty(flat.shape, dtype=flat.dtype, device=flat.device
                                       ).copy_(flat)
                send[offset:offset + col[me]] = flat.view(torch.uint8)
            offset += col[me]
        received = torch.empty(ranks * width, dtype=torch.uint8, device=send.device)
        gather = getattr(torch.distributed, "all_gather_single", None) or \
            torch.distributed.all_gather_into_tensor
        gather(received, send, group=mesh.get_group())
        received = received.view(ranks, width)
        starts = [0] * ranks
        for (pid, key, t), col in zip(packed, sizes):
            parts = []
            for r in range(ranks):
                chunk = received[r, starts[r]:starts[r] + col[r]]
                starts[r] += col[r]
                parts.append(chunk)
            whole[(pid, key)] = torch.cat(parts).view(t.dtype).view(t.shape)  # a fresh copy
    out: dict[int, tuple[Tensor, Tensor | None, dict]] = {}
    for p in bucket:
        out[id(p)] = (None, None, {})
    for pid, key, t in items:
        value = whole.get((pid, key))
        if value is None:
            value = t.full_tensor() if is_dtensor(t) else t
        param, grad, state = out[pid]
        if key == "param":
            out[pid] = (value, grad, state)
        elif key == "grad":
            out[pid] = (param, value, state)
        else:
            state[key] = value
    return out


#: the whole-tensor stand-in being stepped -> its DTensor parameter (see :func:`original`)
_STAND_INS: dict[int, Tensor] = {}


def original(t: Tensor) -> Tensor:
    """The parameter the optimizer holds for ``t``: ``t`` itself, or the DTensor parameter when
    ``t`` is the whole-tensor stand-in that :func:`run_group` is stepping. A rule that derives
    something from a parameter's identity (its index in ``param_groups``, as Adafactor8Bit's
    APOLLO seeds do) looks it up through this, so the sharded run matches the single process."""
    return _STAND_INS.get(id(t), t)


def _step_whole(opt: KaonOptimizer, group: dict, p: Tensor, gathered, statistics, reads,
                plan_only: bool) -> Tensor | None:
    """Run the engine on the whole tensor (gathered by :func:`_gather`); keep the local rows of
    the new parameter and state."""
    whole, grad, state_whole = gathered
    whole.grad = grad
    state = opt.state[p]
    opt.state[whole] = state_whole
    _STAND_INS[id(whole)] = p
    try:
        runs = engine.run_group(opt, group, [whole], statistics=statistics, reads=reads,
                                plan_only=plan_only)
        cache = opt._plans.get((id(group), True))
        if cache is not None:  # the stand-in is new each step: do not keep its plan
            cache.pop(engine._plan_key(opt, group, [whole]), None)
    finally:
        new_state = opt.state.pop(whole, {})
        _STAND_INS.pop(id(whole), None)
    if not plan_only and statistics is None:
        _keep_rows(local(p), whole, p)
    _store_sharded(state, new_state, p)
    if statistics is not None and runs:
        return torch.cat([stats for _, stats in runs])
    return None


def _local_slices(shape: torch.Size, mesh, placements) -> tuple[slice, ...]:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    size, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, size))


def _keep_rows(target: Tensor, whole: Tensor, like: Tensor) -> None:
    """Copy ``like``'s local piece of the global tensor ``whole`` into ``target``."""
    target.copy_(whole[_local_slices(whole.shape, like.device_mesh, like.placements)])


def _state_placements(p: Tensor, value: Tensor) -> list:
    from torch.distributed.tensor import Replicate, Shard

    placements = []
    for placement in p.placements:
        sharded = isinstance(placement, Shard) and placement.dim == 0 and value.ndim >= 1
        placements.append(Shard(0) if sharded else Replicate())
    return placements


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(stride))


def _store_sharded(state: dict, new_state: dict, p: Tensor) -> None:
    """Store the whole-tensor state ``new_state`` into ``state`` as DTensors holding this
    rank's piece (in place where the stored DTensor already has the layout)."""
    from torch.distributed.tensor import DTensor

    for key in [k for k in state if k not in new_state]:
        del state[key]  # the engine dropped it (e.g. momentum after beta1 was set to 0)
    for key, value in new_state.items():
        if not isinstance(value, Tensor) or is_dtensor(value):
            state[key] = value
            continue
        placements = _state_placements(p, value)
        piece = value[_local_slices(value.shape, p.device_mesh, placements)] if value.ndim \
            else value
        old = state.get(key)
        if (is_dtensor(old) and old.shape == value.shape and old.dtype == value.dtype
                and list(old.placements) == placements
                and local(old).shape == piece.shape):
            local(old).copy_(piece)
        else:
            state[key] = DTensor.from_local(
                piece.clone(), p.device_mesh, placements, run_check=False,
                shape=value.shape, stride=_contiguous_stride(value.shape),
            )


# ------------------------------------------------------------------ distributed_mode="local"
def _local_shapes(opt: KaonOptimizer) -> dict[tuple[int, str], torch.Size]:
    """The engine-facing shapes of this rank's *per-rank* state entries (keyed by parameter id
    and state key): such an entry is stored flat and padded in a ``[world, L]`` DTensor."""
    return opt.__dict__.setdefault("_local_shapes", {})


def _engine_view(opt: KaonOptimizer, p: Tensor, key: str, value: Any) -> Any:
    """The plain tensor the engine sees for the stored state entry ``value`` of ``p`` (a view
    of this rank's piece, sharing its storage), or ``value`` itself if it is not a DTensor."""
    if not is_dtensor(value):
        return value
    piece = local(value)
    shape = _local_shapes(opt).get((id(p), key))
    if shape is None:
        return piece
    return piece.reshape(-1)[:math.prod(shape)].view(shape)


def _run_local(opt: KaonOptimizer, group: dict, params: list[Tensor], statistics, reads,
               plan_only: bool) -> list[tuple[list[Tensor], Tensor]]:
    """Step every ``Shard(0)`` DTensor of ``params`` on its local rows alone.

    Each rank hands the engine a plain stand-in per parameter: its local rows (sharing the
    shard's storage), the local gradient rows and plain views of its state pieces, and the
    engine runs the optimizer's rule on them exactly as on ordinary tensors (batched as
    usual). Ranks whose shard is empty create the state and run nothing. The new state is
    written back into the stored DTensors (see :func:`_store_local`). With ``statistics`` the
    per-tensor statistics are summed over the ranks of the mesh, so a global scalar reduced
    from them (KProdigy's ``D``, Autokaon's rate) agrees on every rank.
    """
    if not params:
        return []
    standins = []
    for p in params:
        s = local(p).detach()
        s.grad = local(p.grad)
        opt.state[s] = {k: _engine_view(opt, p, k, v) for k, v in opt.state[p].items()}
        _STAND_INS[id(s)] = p
        standins.append(s)
    runs: list[tuple[list[Tensor], Tensor]] = []
    try:
        live = [s for s in standins if s.numel()]
        if live:
            runs = engine.run_group(opt, group, live, statistics=statistics, reads=reads,
                                    plan_only=plan_only)
            cache = opt._plans.get((id(group), len(live) == 1))
            if cache is not None:  # the stand-ins are new each step: do not keep their plan
                cache.pop(engine._plan_key(opt, group, live), None)
        for s in standins:
            if not s.numel():  # an empty shard: same state keys as every other rank, zeros
                _, slots = engine._layout(opt, s, group)
                engine._ensure_state(opt, s, tuple(dataclasses.replace(slot, init=None)
                                                   for slot in slots))
        new_states = [opt.state.get(s, {}) for s in standins]
    finally:
        for s in standins:
            opt.state.pop(s, None)
            _STAND_INS.pop(id(s), None)
            s.grad = None
    _store_local(opt, group, params, new_states)
    if statistics is None:
        return []
    return _reduced_statistics(params, standins, runs)


def _reduced_statistics(params: list[Tensor], standins: list[Tensor], runs) -> list:
    """``([p], stats)`` per parameter, the per-shard statistics summed over the mesh (an empty
    shard contributes zeros)."""
    rows: dict[int, Tensor] = {}
    for chunk, stats in runs:
        for s, row in zip(chunk, stats):
            rows[id(s)] = row
    known = next(iter(rows.values()), None)
    width = torch.tensor([known.numel() if known is not None else 0], dtype=torch.int64)
    groups = _groups_of(params)
    for g in groups:
        torch.distributed.all_reduce(width, torch.distributed.ReduceOp.MAX, group=g)
    device = known.device if known is not None else local(params[0]).device
    table = torch.zeros(len(params), int(width.item()), dtype=torch.float32, device=device)
    for i, s in enumerate(standins):
        if id(s) in rows:
            table[i] = rows[id(s)].reshape(-1).float()
    for g in groups:
        torch.distributed.all_reduce(table, group=g)
    shape = known.shape if known is not None else (int(width.item()),)
    dtype = known.dtype if known is not None else torch.float32
    return [([p], table[i].to(dtype).reshape(1, *shape)) for i, p in enumerate(params)]


def _row_aligned_keys(opt: KaonOptimizer, group: dict, p: Tensor) -> set[str]:
    """The state keys of ``p`` whose first dimension is the parameter's rows (found by
    laying out two probe tensors of 3 and 5 rows): stored ``Shard(0)`` like the parameter."""
    shapes = []
    for rows in (3, 5):
        probe = torch.zeros((rows, *p.shape[1:]), dtype=p.dtype, device=local(p).device)
        try:
            _, slots = engine._layout(opt, probe, group)
        finally:
            opt.state.pop(probe, None)
        shapes.append({slot.name: {slot.name + sfx: tuple(t.shape) for sfx, t in
                                   slot.codec.init(slot.shape, torch.device("meta")).items()}
                       for slot in slots})
    aligned = set()
    for name, keys in shapes[0].items():
        other = shapes[1].get(name, {})
        if all(key in other and len(a) >= 1 and a[0] == 3 and other[key][0] == 5
               and a[1:] == other[key][1:] for key, a in keys.items()):
            aligned.update(keys)
    return aligned


def _store_local(opt: KaonOptimizer, group: dict, params: list[Tensor],
                 new_states: list[dict]) -> None:
    """Write each rank's new local state into the stored DTensors, in place where the layout
    is unchanged; otherwise (new state, a layout change) every rank re-creates the DTensors of
    these parameters together (a collective decision, so that the shape exchange pairs up).

    Layout: a state entry whose first dimension is the parameter's rows is ``Shard(0)`` over
    the global rows (``torch.chunk`` sizes, exactly as in the exact mode); any other entry
    (column moments, 4-bit codes and block scales, sliced KProdigy state, step counters) is
    this rank's own, stored flat in row ``rank`` of a ``[world, L]`` ``Shard(0)`` DTensor,
    ``L`` the largest piece over the ranks (zero-padded).
    """
    shapes = _local_shapes(opt)
    rewrap = False
    for p, new in zip(params, new_states):
        state = opt.state[p]
        for key in [k for k in state if k not in new]:
            del state[key]
            shapes.pop((id(p), key), None)
        for key, value in new.items():
            if not isinstance(value, Tensor) or is_dtensor(value):
                state[key] = value
                continue
            view = _engine_view(opt, p, key, state.get(key))
            if (is_dtensor(state.get(key)) and view.shape == value.shape
                    and view.dtype == value.dtype):
                if value.data_ptr() != view.data_ptr() or value.stride() != view.stride():
                    view.copy_(value)  # e.g. a batched chunk's packed buffer
            else:
                rewrap = True
    flag = torch.tensor([int(rewrap)], dtype=torch.int64)
    for g in _groups_of(params):
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=g)
    if not flag.item():
        return
    from torch.distributed.tensor import DTensor, Shard

    values = []  # every tensor entry, plain (engine-facing), in a rank-independent order
    for p, new in zip(params, new_states):
        state = opt.state[p]
        for key in sorted(new):
            value = new[key]
            if isinstance(value, Tensor) and not is_dtensor(value):
                values.append((p, key, value))
            elif is_dtensor(value):
                values.append((p, key, _engine_view(opt, p, key, value).clone()))
    process_group = params[0].device_mesh.get_group()
    shapes_of = [None] * torch.distributed.get_world_size(process_group)
    torch.distributed.all_gather_object(
        shapes_of, [tuple(v.shape) for _, _, v in values], group=process_group)
    keys = [(id(p), key) for p, key, _ in values]
    if any(len(col) != len(keys) for col in shapes_of):
        raise ValueError(
            f"{type(opt).__name__}: distributed_mode='local' gives the shards of a parameter "
            "different state (the rule's layout depends on the shard's shape); use "
            "distributed_mode='exact' for this optimizer or group"
        )
    probed = {id(p): _row_aligned_keys(opt, group, p) for p in params}
    for i, (p, key, value) in enumerate(values):
        mesh, world = p.device_mesh, len(shapes_of)
        rows = _row_split(p.shape[0], world)
        # Shard(0) like the parameter where every rank holds its own rows of the same shape
        aligned = key in probed[id(p)] and all(
            len(col[i]) >= 1 and col[i][0] == r and col[i][1:] == value.shape[1:]
            for col, r in zip(shapes_of, rows))
        if aligned:
            shape = torch.Size((p.shape[0], *value.shape[1:]))
            piece = value.clone()
            shapes.pop((id(p), key), None)
        else:
            width = max(math.prod(col[i]) for col in shapes_of)
            shape = torch.Size((world, width))
            piece = torch.zeros(1, width, dtype=value.dtype, device=value.device)
            piece[0, :value.numel()] = value.reshape(-1)
            shapes[(id(p), key)] = value.shape
        opt.state[p][key] = DTensor.from_local(piece, mesh, [Shard(0)], run_check=False,
                                               shape=shape, stride=_contiguous_stride(shape))


# ------------------------------------------------------------------------- collectives
def _groups_of(params: Iterable[Tensor]) -> list:
    """The process groups over which the DTensors among ``params`` are spread (deduplicated)."""
    groups, seen = [], set()
    for p in params:
        if not is_dtensor(p):
            continue
        mesh = p.device_mesh
        for dim in range(mesh.ndim):
            group = mesh.get_group(dim)
            if id(group) not in seen:
                seen.add(id(group))
                groups.append(group)
    return groups


def all_ranks_agree(flag: bool, params: Iterable[Tensor]) -> bool:
    """``flag`` and-ed over every rank that holds a shard of a DTensor among ``params``.

    Without DTensors (or without an initialized process group) this is ``flag`` itself. Every
    rank of those meshes must call it (it is a collective).
    """
    groups = _groups_of(params)
    if not groups or not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    for group in groups:
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(value.item())


def synchronize_seed(optimizer: KaonOptimizer, src: int = 0, group: Any = None) -> int:
    """Give every rank the stochastic-rounding seed of rank ``src`` and restart the streams.

    For DDP (every replica steps the same tensors) and for FSDP2's exact mode: the rounding of
    bf16 / fp16 weights then agrees across ranks, as a single process would round. Call it on
    every rank after building the optimizer and before the first step (it resets the
    generators). Not needed when ``seed=`` was given the same value on every rank. Returns the
    seed.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return optimizer.seed
    seed = torch.tensor([optimizer.seed], dtype=torch.int64)
    dist.broadcast(seed, src=src, group=group)
    optimizer.seed = int(seed.item())
    optimizer._generators = {}
    return optimizer.seed
