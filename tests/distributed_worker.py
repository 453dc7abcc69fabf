"""The body of the 2-process distributed checks (``test_distributed.py`` launches it).

Every rank runs every check for every optimizer entry it is given, in the same order (the
collectives pair up), and records "ok" or the failure; rank 0 writes the results as JSON. The
references are single-process optimizers built on every rank from the same initial weights and
fed the same global gradients, so each check compares the distributed optimizer with what one
process computes:

* ``fsdp``: ``fully_shard`` on a model whose shards are uneven (rows 5 -> 3/2, 7 -> 4/3, 3 -> 2/1)
  and empty on rank 1 (a one-row head), fp32. Before training, the optimizer is primed by
  ``get_optimizer_state_dict`` (the lr-0 step). After every step the gathered weights, every
  gathered state tensor and the group scalars must equal the reference bit for bit.
* ``fsdp_bf16``: the same with bf16 weights and stochastic rounding (or the entry's write-back),
  against a per-parameter (``foreach=False``) reference with the same seed.
* ``dcp``: ``dcp.save`` of the model and optimizer state dicts after 3 steps, ``dcp.load`` into a
  fresh model and optimizer (other initial weights, so the load must matter) through
  ``get_/set_optimizer_state_dict``; both then train 3 more steps and must agree bit for bit
  (weights, state, group scalars), in fp32 and, where supported, bf16 (which needs the
  stochastic-rounding stream to travel).
* ``local``: ``distributed_mode="local"`` (each rank runs the rule on its own rows), fp32:
  after 3 steps the weights equal the single-process run bit for bit for the elementwise
  entries (``LOCAL_EXACT``) and are within ``LOCAL_TOLERANCE`` of it otherwise; every state
  entry is a ``Shard(0)`` DTensor holding only this rank's piece; the group scalars (KProdigy's
  ``D``, Autokaon's rate) agree on every rank; a DCP round trip then continues bit for bit.
* ``ddp``: ``DistributedDataParallel`` with half of the global batch per rank against one process
  stepping on the mean of the two half-batch gradients, fp32 and bf16 (replicas must also agree
  with each other bit for bit).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conformance import OPTIMIZERS
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import kaon

SEED = 1234
STEPS = 3


class UnevenNet(nn.Module):
    """Rows 5 (conv), 7 (fc1), 3 (fc2) and 1 (head): uneven shards on 2 ranks, rank 1's head
    shard empty; conv, matrix, vector and norm parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.norm = nn.GroupNorm(1, 5)
        self.fc1 = nn.Linear(5 * 4 * 4, 7)
        self.ln = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        h = self.norm(self.conv(x)).relu().flatten(1)
        return self.head(self.fc2(self.ln(self.fc1(h)).relu()).relu())


def make_model(dtype, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return UnevenNet().to(dtype)


def global_batch(i: int, dtype):
    gen = torch.Generator().manual_seed(100 + i)
    x = torch.randn(8, 2, 6, 6, generator=gen)
    y = x.flatten(1)[:, :1] * 0.5 + 0.1
    return x.to(dtype), y.to(dtype)


def half(i: int, rank: int, dtype):
    x, y = global_batch(i, dtype)
    return x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]


def loss_of(model, x, y):
    return (model(x).float() - y.float()).pow(2).mean()


def shard(model: nn.Module) -> nn.Module:
    """One FSDP2 unit over the whole model: every parameter a ``Shard(0)`` DTensor (one
    all-gather and one reduce-scatter per step keep the checks fast)."""
    fully_shard(model)
    return model


def state_pairs(opt, ref, params, ref_params):
    for p, q in zip(params, ref_params):
        a, b = opt.state.get(p, {}), ref.state.get(q, {})
        if sorted(a) != sorted(b):
            raise AssertionError(f"state keys differ: {sorted(a)} vs {sorted(b)}")
        for key in a:
            yield key, a[key], b[key]


def piece(t, like):
    """``like``'s local piece of the global tensor ``t`` (``t`` itself for a plain ``like``)."""
    if not hasattr(like, "to_local"):
        return t
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    size, offset = compute_local_shape_and_global_offset(t.shape, like.device_mesh,
                                                         like.placements)
    return t[tuple(slice(o, o + n) for o, n in zip(offset, size))]


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def assert_same(opt, ref, params, ref_params, what):
    """Every rank's pieces of the weights and state equal the same pieces of the reference's
    (no collective: each rank checks its own rows). A mismatch is recorded in ``PROBLEMS``, not
    raised, so that both ranks go on issuing the same collectives; the check raises at its end."""
    try:
        _compare(opt, ref, params, ref_params, what)
    except AssertionError as error:
        PROBLEMS.append(str(error))


PROBLEMS: list[str] = []


def _compare(opt, ref, params, ref_params, what):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        a, b = local(p.detach()), piece(q.detach(), p)
        if a.dtype != b.dtype or not torch.equal(a, b):
            diff = (a.float() - b.float()).abs().max().item()
            raise AssertionError(f"{what}: parameter {i} differs from the reference by {diff}")
    for key, a, b in state_pairs(opt, ref, params, ref_params):
        if torch.is_tensor(a):
            if tuple(a.shape) != tuple(b.shape):
                raise AssertionError(f"{what}: state {key!r} has global shape {a.shape}, "
                                     f"the reference {b.shape}")
            a, b = local(a), piece(b, a)
            if a.dtype != b.dtype or not torch.equal(a, b):
                raise AssertionError(f"{what}: state {key!r} differs from the reference")
        elif a != b:
            raise AssertionError(f"{what}: state {key!r} {a!r} != {b!r}")
    for g, h in zip(opt.param_groups, ref.param_groups):
        for key in g:
            if key != "params" and g[key] != h[key]:
                raise AssertionError(f"{what}: group key {key!r}: {g[key]!r} != {h[key]!r}")


def agree_across_ranks(values: list[float], what: str) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    if any(v != gathered[0] for v in gathered):
        raise AssertionError(f"{what} differ between ranks: {gathered}")


def group_scalars(opt) -> list:
    return [repr(v) for g in opt.param_groups for k, v in sorted(g.items())
            if k != "params" and isinstance(v, (int, float))]


def fsdp_step(model, opt, ref_model, ref, i, rank, dtype):
    """One step of the sharded model and of the reference on the same global gradient."""
    x, y = half(i, rank, dtype)
    model.zero_grad(set_to_none=True)
    loss_of(model, x, y).backward()
    # every rank's gradient shards in one collective: the reference's global gradients
    shards = [None] * dist.get_world_size()
    dist.all_gather_object(shards, [local(p.grad) for p in model.parameters()])
    for j, q in enumerate(ref_model.parameters()):
        q.grad = torch.cat([s[j] for s in shards])
    opt.step()
    if ref is not None:
        ref.step()


def built(entry, dtype, *, seed_model=0, reference=True):
    model = shard(make_model(dtype, seed_model))
    opt = entry.make(list(model.parameters()), lr=entry.train_lr, seed=SEED)
    ref_model = make_model(dtype, seed_model)
    ref = None
    if reference:
        extra = {"foreach": False} if dtype != torch.float32 else {}
        ref = entry.make(list(ref_model.parameters()), lr=entry.train_lr, seed=SEED, **extra)
    return model, opt, ref_model, ref


def check_fsdp(entry, rank, dtype):
    model, opt, ref_model, ref = built(entry, dtype)
    before = [local(p.detach()).clone() for p in model.parameters()]
    get_optimizer_state_dict(model, opt)  # primes the empty optimizer with an lr-0 step
    for p, b in zip(model.parameters(), before):
        if not torch.equal(local(p.detach()), b):
            PROBLEMS.append("the lr-0 priming step changed a weight")
    for step in range(STEPS):
        fsdp_step(model, opt, ref_model, ref, step, rank, dtype)
        assert_same(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                    f"step {step}")
    agree_across_ranks(group_scalars(opt), "group scalars")


def check_dcp(entry, rank, dtype, path):
    model, opt, ref_model, _ = built(entry, dtype, reference=False)
    for step in range(STEPS):
        fsdp_step(model, opt, ref_model, None, step, rank, dtype)
    saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(saved, checkpoint_id=path)
    # the gathered state, for the test that loads this checkpoint into one process
    whole = {"model": {k: v.full_tensor() for k, v in saved["model"].items()},
             "state": {fqn: {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                             for k, v in entry_state.items()}
                       for fqn, entry_state in sorted(saved["optim"]["state"].items())},
             "dtype": str(dtype)}
    if rank == 0:
        torch.save(whole, os.path.join(path, "whole.pt"))
    model2, opt2, ref_model2, _ = built(entry, dtype, seed_model=1, reference=False)
    if getattr(opt, "is_frozen", lambda: False)():
        # DCP loads into the layout of the new optimizer: a frozen Autokaon checkpoint is
        # loaded into a frozen Autokaon (docs/checkpointing.md); the saved rate overwrites it
        opt2.freeze()
    target = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(model2, target["model"])
    set_optimizer_state_dict(model2, opt2, target["optim"])
    for step in range(STEPS, 2 * STEPS):
        fsdp_step(model, opt, ref_model, None, step, rank, dtype)
        fsdp_step(model2, opt2, ref_model2, None, step, rank, dtype)
        # the resumed run against the uninterrupted one, compared shard by shard
        for i, (p, q) in enumerate(zip(model.parameters(), model2.parameters())):
            if not torch.equal(p.to_local(), q.to_local()):
                PROBLEMS.append(f"resumed step {step}: parameter {i} differs")
        for key, a, b in state_pairs(opt2, opt, list(model2.parameters()),
                                     list(model.parameters())):
            a, b = (a.to_local(), b.to_local()) if hasattr(a, "to_local") else (a, b)
            same = torch.equal(a, b) if torch.is_tensor(a) else a == b
            if not same:
                PROBLEMS.append(f"resumed step {step}: state {key!r} differs")
        for g, h in zip(opt.param_groups, opt2.param_groups):
            for key in g:
                if key != "params" and g[key] != h[key]:
                    PROBLEMS.append(f"resumed step {step}: group key {key!r} differs")


def check_ddp(entry, rank, dtype):
    model = make_model(dtype)
    ddp = DistributedDataParallel(model)
    opt = entry.make(list(model.parameters()), lr=entry.train_lr, seed=SEED)
    ref_model = make_model(dtype)
    ref = entry.make(list(ref_model.parameters()), lr=entry.train_lr, seed=SEED)
    for step in range(STEPS):
        ddp.zero_grad(set_to_none=True)
        loss_of(ddp, *half(step, rank, dtype)).backward()
        opt.step()
        # the reference: one process, the mean of the two half-batch gradients
        grads = []
        for r in range(dist.get_world_size()):
            ref_model.zero_grad(set_to_none=True)
            loss_of(ref_model, *half(step, r, dtype)).backward()
            grads.append([q.grad.clone() for q in ref_model.parameters()])
        for j, q in enumerate(ref_model.parameters()):
            q.grad = (sum(g[j].float() for g in grads) / len(grads)).to(q.grad.dtype)
        ref.step()
        assert_same(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                    f"step {step}")
    weights = [p.detach().float().flatten() for p in model.parameters()]
    agree_across_ranks([float(w.double().sum()) for w in weights] + group_scalars(opt),
                       "replica weights")


def check_synchronize_seed(rank):
    torch.manual_seed(100 + rank)  # seed=None takes torch.initial_seed(): differs per rank
    opt = kaon.Adakaon([nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    seeds = [None] * dist.get_world_size()
    dist.all_gather_object(seeds, opt.seed)
    if len(set(seeds)) != len(seeds):
        raise AssertionError(f"the seeds already agree before synchronizing: {seeds}")
    kaon.distributed.synchronize_seed(opt)
    after = [None] * dist.get_world_size()
    dist.all_gather_object(after, opt.seed)
    if after != [seeds[0]] * len(seeds):
        raise AssertionError(f"synchronize_seed gave {after}, expected rank 0's {seeds[0]}")


def check_nonfinite(rank, policy):
    """A NaN in rank 1's shard of one tensor: under "skip" that tensor keeps its weights on
    every rank while the others step; under "raise" every rank raises before any change."""
    model = shard(make_model(torch.float32))
    opt = kaon.Adakaon(list(model.parameters()), lr=1e-2, nonfinite_grad=policy, seed=SEED)
    loss_of(model, *half(0, rank, torch.float32)).backward()
    if rank == 1:
        local(model.fc1.weight.grad)[0, 0] = float("nan")
    before = {n: local(p.detach()).clone() for n, p in model.named_parameters()}
    raised = False
    try:
        opt.step()
    except FloatingPointError:
        raised = True
    after = {n: local(p.detach()) for n, p in model.named_parameters()}
    if policy == "raise":
        if not raised:
            raise AssertionError("nonfinite_grad='raise' did not raise on this rank")
        if any(not torch.equal(before[n], after[n]) for n in before):
            raise AssertionError("a weight changed although the step raised")
    else:
        if not torch.equal(before["fc1.weight"], after["fc1.weight"]):
            raise AssertionError("the tensor with a non-finite shard was stepped on this rank")
        if torch.equal(before["fc2.weight"], after["fc2.weight"]):
            raise AssertionError("a tensor with finite gradients was not stepped")


# distributed_mode="local": the entries whose rule is elementwise (Adam moments without
# quantization, Lion without cautious masking or centralization, ScheduleFree, OAdamW without
# orthogonalization) give the single-process result bit for bit (docs/distributed.md).
# kaon.AdamW on torch's fused CPU kernel is not listed: its weights match, but the last bit of
# exp_avg_sq depends on where an element falls in the kernel's vector lanes, which a shard moves.
LOCAL_EXACT = {
    "Lion-float32-plain", "AdamW-engine", "AdamW-bfloat16", "ScheduleFreeAdamW",
    "ScheduleFreeAdamW-warmup-wd-kahan", "OAdamW", "OAdamW-decoupled-sr",
}
#: shard-local approximations: ||w_local - w_ref|| / ||w_ref - w_0|| (all weights, 3 steps,
#: against one process in exact arithmetic); measured up to 0.69 (Newton-Schulz on shards),
#: <= 0.35 for the rules whose approximation is a statistic (column moments, clip, cautious)
LOCAL_TOLERANCE = 0.75
LOCAL_METRICS: dict[str, dict[str, float]] = {}


def _sum_sq(t) -> float:
    return float(t.double().pow(2).sum())


def check_local(entry, rank, path):
    """``distributed_mode="local"``: train 3 steps against the single-process reference (bit
    for bit for LOCAL_EXACT, else within LOCAL_TOLERANCE), every state entry a ``Shard(0)``
    DTensor holding only this rank's piece, then a DCP round trip continues bit for bit."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dtype = torch.float32
    def make_local(seed_model):
        m = shard(make_model(dtype, seed_model))
        o = entry.make([{"params": list(m.parameters()), "distributed_mode": "local"}],
                       lr=entry.train_lr, seed=SEED)
        return m, o
    model, opt = make_local(0)
    ref_model = make_model(dtype)
    ref = entry.make(list(ref_model.parameters()), lr=entry.train_lr, seed=SEED)
    start = [q.detach().clone() for q in ref_model.parameters()]
    get_optimizer_state_dict(model, opt)  # the lr-0 priming step creates the sharded state
    x0, y0 = global_batch(0, dtype)
    with torch.no_grad():
        before = float(loss_of(ref_model, x0, y0))  # the same initial weights
    for step in range(STEPS):
        fsdp_step(model, opt, ref_model, ref, step, rank, dtype)
    with torch.no_grad():
        after, ref_after = float(loss_of(model, x0, y0)), float(loss_of(ref_model, x0, y0))
    model.reshard()  # the root unit keeps its gathered weights after a forward alone
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    for i, p in enumerate(params):
        if not torch.isfinite(local(p.detach())).all():
            PROBLEMS.append(f"parameter {i} is not finite")
        for key, value in opt.state[p].items():
            if not torch.is_tensor(value):
                continue
            if not (hasattr(value, "to_local") and list(value.placements) == [Shard(0)]):
                PROBLEMS.append(f"state {key!r} of parameter {i} is not a Shard(0) DTensor")
                continue
            size, _ = compute_local_shape_and_global_offset(value.shape, value.device_mesh,
                                                            value.placements)
            if tuple(value.to_local().shape) != tuple(size) or (
                    value.shape[0] > 1 and value.to_local().numel() == value.numel()):
                PROBLEMS.append(f"state {key!r} of parameter {i} holds more than its piece")
    # trains: a finite loss, not worse than the start or the single process by 5 % of the start
    # (3 steps at the suite's rates do not lower every optimizer's loss, in one process either)
    if not (math.isfinite(after) and after <= max(before, ref_after) + 0.05 * before):
        PROBLEMS.append(f"the loss went {before} -> {after} (one process: {ref_after})")
    # bit for bit: the weights and every state entry laid out as in one process (row-aligned)
    same = all(torch.equal(local(p.detach()), piece(q.detach(), p))
               for p, q in zip(params, ref_params))
    same = same and all(
        torch.equal(local(opt.state[p][key]), piece(b, opt.state[p][key]))
        for p, q in zip(params, ref_params) for key, b in ref.state[q].items()
        if torch.is_tensor(b) and tuple(opt.state[p][key].shape) == tuple(b.shape))
    sums = torch.tensor([
        sum(_sum_sq(local(p.detach()) - piece(q.detach(), p)) for p, q in
            zip(params, ref_params)),
        sum(_sum_sq(piece(q.detach() - s, p)) for p, q, s in zip(params, ref_params, start)),
        0.0 if same else 1.0,
    ], dtype=torch.float64)
    dist.all_reduce(sums)
    rel, same = float(sums[0].sqrt() / sums[1].sqrt()), not sums[2].item()
    if entry.name in LOCAL_EXACT:
        if not same:
            PROBLEMS.append(f"not bit-exact against one process (weights: relative {rel:.3g})")
        agree_across_ranks(group_scalars(opt) + group_scalars(ref), "group scalars")
    elif not rel <= LOCAL_TOLERANCE:
        PROBLEMS.append(f"relative difference {rel:.3g} > {LOCAL_TOLERANCE}")
    agree_across_ranks(group_scalars(opt), "group scalars")  # KProdigy's D (in the groups)
    agree_across_ranks([repr(v) for _, v in sorted(getattr(opt, "_tuner", {}).items())],
                       "Autokaon's tuner")  # its rate d, d_max, numerator, k
    LOCAL_METRICS[entry.name] = {"rel": rel, "bit_exact": same, "loss_before": before, "loss_after": after,
                                 "loss_ref": ref_after}
    # DCP: save, load into a fresh local-mode optimizer (other weights), continue bit for bit
    saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(saved, checkpoint_id=path)
    model2, opt2 = make_local(1)
    if getattr(opt, "is_frozen", lambda: False)():
        opt2.freeze()  # a frozen Autokaon checkpoint loads into a frozen Autokaon (as above)
    target = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(model2, target["model"])
    set_optimizer_state_dict(model2, opt2, target["optim"])
    for step in range(STEPS, STEPS + 2):
        fsdp_step(model, opt, ref_model, None, step, rank, dtype)
        fsdp_step(model2, opt2, ref_model, None, step, rank, dtype)
        for i, (p, q) in enumerate(zip(model.parameters(), model2.parameters())):
            if not torch.equal(p.to_local(), q.to_local()):
                PROBLEMS.append(f"local resumed step {step}: parameter {i} differs")
        for key, a, b in state_pairs(opt2, opt, list(model2.parameters()),
                                     list(model.parameters())):
            a, b = (a.to_local(), b.to_local()) if hasattr(a, "to_local") else (a, b)
            if not (torch.equal(a, b) if torch.is_tensor(a) else a == b):
                PROBLEMS.append(f"local resumed step {step}: state {key!r} differs")
        for g, h in zip(opt.param_groups, opt2.param_groups):
            for key in g:
                if key != "params" and g[key] != h[key]:
                    PROBLEMS.append(f"local resumed step {step}: group key {key!r} differs")


CHECKS = {
    "fsdp": lambda e, r, path: check_fsdp(e, r, torch.float32),
    "fsdp_bf16": lambda e, r, path: check_fsdp(e, r, torch.bfloat16),
    # bf16 where supported: the stochastic-rounding stream must travel too
    "dcp": lambda e, r, path: check_dcp(
        e, r, torch.bfloat16 if e.supports_bf16 else torch.float32, path),
    "ddp": lambda e, r, path: check_ddp(e, r, torch.float32),
    "ddp_bf16": lambda e, r, path: check_ddp(e, r, torch.bfloat16),
    "local": check_local,
}
BF16_CHECKS = ("fsdp_bf16", "ddp_bf16")


def main(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    entries = [e for e in OPTIMIZERS if e.name in names]
    results: dict[str, dict[str, str]] = {"_global": {}}
    try:
        check_synchronize_seed(rank)
        results["_global"]["synchronize_seed"] = "ok"
    except Exception as error:
        results["_global"]["synchronize_seed"] = repr(error)
    for policy in ("skip", "raise"):
        try:
            check_nonfinite(rank, policy)
            outcome = "ok"
        except Exception as error:
            outcome = f"rank {rank}: {error!r}"
        verdicts = [None] * world
        dist.all_gather_object(verdicts, outcome)
        bad = [v for v in verdicts if v != "ok"]
        results["_global"][f"nonfinite_{policy}"] = bad[0] if bad else "ok"
    timings: dict[str, float] = {}
    try:
        for entry in entries:
            results[entry.name] = {}
            for check, run in CHECKS.items():
                if check in BF16_CHECKS and not entry.supports_bf16:
                    continue
                start = time.perf_counter()
                if os.environ.get("KAON_DIST_TRACE"):
                    print(rank, entry.name, check, flush=True)
                PROBLEMS.clear()
                try:
                    run(entry, rank, os.path.join(out, "ckpt", entry.name, check))
                    if PROBLEMS:
                        raise AssertionError(f"rank {rank}: " + "; ".join(PROBLEMS[:3]))
                    outcome = "ok"
                except Exception as error:  # recorded; the test of that entry fails
                    outcome = "".join(traceback.format_exception_only(error)).strip()
                    outcome += "\n" + traceback.format_exc()[-3000:]
                if os.environ.get("KAON_DIST_TRACE") and outcome != "ok":
                    print(rank, outcome, flush=True)
                # every rank's verdict: a check fails if it failed anywhere
                verdicts = [None] * world
                dist.all_gather_object(verdicts, outcome)
                bad = [v for v in verdicts if v != "ok"]
                results[entry.name][check] = bad[0] if bad else "ok"
                timings[f"{entry.name}-{check}"] = round(time.perf_counter() - start, 3)
    finally:
        if rank == 0:
            with open(os.path.join(out, "results.json"), "w") as f:
                json.dump(results, f, indent=1)
            with open(os.path.join(out, "timings.json"), "w") as f:
                json.dump(timings, f, indent=1)
            with open(os.path.join(out, "local_metrics.json"), "w") as f:
                json.dump(LOCAL_METRICS, f, indent=1)
        # both ranks are done with every collective before the group goes away: tearing gloo
        # down while the other rank still talks to it aborts the process ("terminate called
        # without an active exception"), seen intermittently on a loaded 2-core machine
        dist.barrier()
        dist.destroy_process_group()
    # the results are on disk; skip the interpreter's teardown of gloo's and torch's threads
    # (the same intermittent abort at exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
