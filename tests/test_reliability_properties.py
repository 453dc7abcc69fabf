"""Issue 17, property-based: nothing a user or a checkpoint feeds kaon may corrupt weights or state.

Three properties, each run for every entry of the conformance registry (``conformance.py``):

* **arguments**: a constructor argument drawn from a hostile pool (NaN, infinities, negative,
  zero, subnormal, huge, integers beyond the float range, tensors of odd shapes, wrong kinds) is
  either refused with ``ValueError``/``TypeError`` (and then ``add_param_group`` refuses it too,
  changing nothing), or accepted, and then steps on ordinary gradients keep every weight, state
  tensor and group number finite (for values of ordinary magnitude; a huge accepted value must
  still step without raising).
* **gradients**: gradients of magnitude 0 to 3e38 (and tiny, subnormal, one-hot spikes), some
  with NaN/Inf, under ``nonfinite_grad="skip"`` and ``"raise"``: finite gradients never make a
  weight or state non-finite; a tensor with a non-finite gradient is skipped exactly
  (``"skip"``: its weights and state unchanged) or the step raises ``FloatingPointError``
  before anything changes (``"raise"``).
* **checkpoints**: a checkpoint of the same entry, of another entry or of ``torch.optim``,
  damaged in one of many ways (state tensors non-finite, of another dtype or shape, missing,
  extra, not tensors; hostile group values; a damaged ``"kaon"`` entry; group or parameter
  counts that do not match), either loads, and then steps keep everything finite, or is refused
  with ``ValueError``/``TypeError`` leaving parameters, state, groups and random streams
  exactly as they were.

Deterministic (``derandomize=True``) and small (``KAON_HYPOTHESIS_EXAMPLES`` examples per entry
and property, default 12) so it fits CI; set the variable higher for a longer local hunt.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os

import pytest
import torch
from conformance import OPTIMIZERS, Entry
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import same as _same

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EXAMPLES = int(os.environ.get("KAON_HYPOTHESIS_EXAMPLES", "12"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                   print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow,
                                          HealthCheck.function_scoped_fixture,
                                          HealthCheck.filter_too_much])

SHAPES = [(4, 6), (6,)]
NAN, INF = float("nan"), float("inf")
# how large an accepted value may be and still owe finite weights: lr=1e30 legitimately moves a
# weight by 1e30 per step, so beyond this an accepted value must only step without raising
ORDINARY = 1e4


# ------------------------------------------------------------------------------------ helpers
def _params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _ordinary_grads(params, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _numbers(value):
    """Every float inside a (nested) group value or state entry."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield from value.detach().float().flatten().tolist()
    elif isinstance(value, float):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def _all_finite(opt, params) -> str | None:
    """None when every weight, state tensor and group number is finite, else what is not."""
    for i, p in enumerate(params):
        if not bool(torch.isfinite(p.detach()).all()):
            return f"weights of parameter {i}"
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                    not bool(torch.isfinite(value.float()).all()):
                return f"state {key!r} of parameter {i}"
    for i, group in enumerate(opt.param_groups):
        for key, value in group.items():
            if key in ("params", "kaon") or \
                    not all(math.isfinite(x) for x in _numbers(opt.defaults.get(key))):
                continue  # growth_rate=inf: a documented infinite default
            if not all(math.isfinite(x) for x in _numbers(value)):
                return f"param_groups[{i}][{key!r}] = {value!r}"
    return None


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()),
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
             for g in opt.param_groups])


def _magnitude(value) -> float:
    numbers = [abs(x) for x in _numbers(value)]
    if isinstance(value, int) and not isinstance(value, bool):
        numbers.append(abs(float(value)))
    return max(numbers, default=0.0)


# --------------------------------------------------------------------------- hostile values
FLOATS = [NAN, INF, -INF, -1.0, -1e-30, 0.0, -0.0, 5e-324, 1e-38, 1e-12, 1e-8, 1e-3, 0.1, 0.5,
          0.9, 0.999, 0.999999, 1.0, 1.5, 2.0, 10.0, 1e4, 1e30, 3e38]
INTS = [-1, 0, 1, 2, 3, 64, 2**31, 2**40, 2**53 + 1, 2**70]
ODD = [None, True, False, "abc", "", (), [], {}, b"x"]


def _tensor_values():
    return st.sampled_from([0.01, 0.5, NAN, -1.0]).flatmap(
        lambda x: st.sampled_from([torch.tensor(x), torch.tensor([x]), torch.tensor([[x]]),
                                   torch.tensor([x, x]), torch.tensor(x, dtype=torch.float64)]))


def _hostile(default):
    """Values for an argument whose default is ``default``: mostly of its kind, some not."""
    scalar = st.one_of(st.sampled_from(FLOATS), st.sampled_from(INTS))
    odd = st.sampled_from(ODD)
    if isinstance(default, bool):
        return st.one_of(st.booleans(), st.sampled_from([0, 1, "yes", None, 1.0]))
    if isinstance(default, str):
        return st.one_of(st.just(default), st.sampled_from(["bogus", "", "none", "NONE", 1, None]))
    if isinstance(default, (tuple, list)):
        items = st.one_of(st.sampled_from(FLOATS), st.sampled_from([1, 0, -1]),
                          st.sampled_from([None, "x"]))
        same_length = st.lists(items, min_size=len(default), max_size=len(default)).map(tuple)
        return st.one_of(same_length, same_length, st.lists(items, max_size=4).map(tuple),
                         scalar, odd)
    return st.one_of(scalar, scalar, _tensor_values(), odd)


OPTIMIZER_LEVEL = {"foreach_batch_cutoff": 2_000_000, "foreach_stack_budget": None,
                   "seed": 0, "nonfinite_grad": "skip", "foreach": True}


def _group_keys(entry: Entry) -> list[str]:
    opt = entry.make(_params())
    return sorted(k for k in opt.defaults if k not in ("params", "differentiable"))


GROUP_KEYS = {e.name: _group_keys(e) for e in OPTIMIZERS}


# ------------------------------------------------------------------------------- arguments
# a group may take what the constructor's defaults may not: Nekaon's documented no-momentum
# group (betas=(0, beta2), what low_vram_above builds) is refused only as the default
LOOSER_GROUPS = {("Nekaon", "betas")}


def _constructor_arguments(cls) -> set[str]:
    return {name for klass in cls.__mro__ if "__init__" in klass.__dict__
            for name in inspect.signature(klass.__init__).parameters}


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@PROFILE
@given(data=st.data())
def test_arguments_are_refused_before_any_change_or_keep_everything_finite(entry: Entry, data):
    reference = entry.make(_params())
    keys = GROUP_KEYS[entry.name] + sorted(OPTIMIZER_LEVEL)
    key = data.draw(st.sampled_from(keys), label="argument")
    default = reference.defaults.get(key, OPTIMIZER_LEVEL.get(key))
    value = data.draw(_hostile(default), label="value")
    argument = key in _constructor_arguments(entry.cls)  # else a group entry (KProdigy's d)

    params = _params()
    opt = None
    if argument:
        with contextlib.suppress(TypeError, ValueError):
            opt = entry.make(params, **{"lr": entry.train_lr, key: value})
    accepted = opt is not None

    if key in GROUP_KEYS[entry.name]:
        # the same verdict for a group added later, and a refusal changes nothing
        base_params = _params(seed=1)
        base = entry.make(base_params, lr=entry.train_lr)
        _ordinary_grads(base_params, 0)
        base.step()
        before = _snapshot(base, base_params)
        extra = torch.nn.Parameter(torch.randn(3, 5))
        try:
            base.add_param_group({"params": [extra], key: value})
        except (TypeError, ValueError):
            assert not accepted, f"add_param_group refused {key}={value!r}, the constructor did not"
            assert _same(before, _snapshot(base, base_params)), "a refused group changed things"
            assert len(base.param_groups) == 1
        else:
            if argument and (entry.cls.__name__, key) not in LOOSER_GROUPS:
                assert accepted, f"add_param_group accepted {key}={value!r}, the constructor did not"
            else:
                opt, params, accepted = base, base_params + [extra], True

    if not accepted:
        return
    ordinary = _magnitude(value) <= ORDINARY
    for i in range(3):
        _ordinary_grads(params, i)
        opt.step()
        if ordinary:
            bad = _all_finite(opt, params)
            assert bad is None, f"{key}={value!r} was accepted; after step {i + 1}: {bad}"


# ------------------------------------------------------------------------------- gradients
@st.composite
def _gradient(draw, shape):
    """A float64 gradient (cast to the parameter dtype later), finite or with NaN/Inf."""
    numel = math.prod(shape)
    kind = draw(st.sampled_from(["uniform", "uniform", "constant", "spike", "zero", "mixed"]))
    exponent = draw(st.sampled_from([-45.0, -40.0, -30.0, -8.0, 0.0, 8.0, 20.0, 30.0, 36.0, 37.0,
                                     38.0, 38.5]))
    magnitude = min(10.0 ** exponent, 3.38e38)
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        g = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * magnitude
    elif kind == "constant":
        g = torch.full(shape, magnitude * draw(st.sampled_from([1.0, -1.0])),
                       dtype=torch.float64)
    elif kind == "spike":
        g = torch.zeros(shape, dtype=torch.float64)
        g.view(-1)[draw(st.integers(0, numel - 1))] = magnitude
    elif kind == "zero":
        g = torch.zeros(shape, dtype=torch.float64)
    else:  # ordinary values with a few huge ones
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        g.view(-1)[: max(1, numel // 4)] *= magnitude / 4
    bad = draw(st.sampled_from([None, None, None, NAN, INF, -INF]))
    if bad is not None:
        g.view(-1)[draw(st.integers(0, numel - 1))] = bad
    return g


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@PROFILE
@given(data=st.data())
def test_gradients_of_any_magnitude_never_make_weights_or_state_nonfinite(entry: Entry, data):
    policy = data.draw(st.sampled_from(["skip", "raise"]), label="nonfinite_grad")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float32] +
                                      ([torch.bfloat16] if entry.supports_bf16 else [])),
                      label="dtype")
    params = _params(dtype)
    opt = entry.make(params, lr=entry.train_lr, nonfinite_grad=policy)
    _ordinary_grads(params, 0)
    opt.step()
    for step in range(3):
        grads = [data.draw(_gradient(s), label=f"grad {step}.{i}") for i, s in enumerate(SHAPES)]
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        finite = [bool(torch.isfinite(p.grad).all()) for p in params]
        before = _snapshot(opt, params)
        state_before = [{k: v.clone() for k, v in opt.state[p].items()
                         if isinstance(v, torch.Tensor)} for p in params]
        if policy == "raise" and not all(finite):
            with pytest.raises(FloatingPointError):
                opt.step()
            assert _same(before, _snapshot(opt, params)), "a refused step changed things"
            continue
        opt.step()
        bad = _all_finite(opt, params)
        assert bad is None, f"step {step + 1}: {bad} became non-finite"
        for i, (p, ok) in enumerate(zip(params, finite)):
            if not ok:  # "skip": that tensor's weights and state are exactly as they were
                assert torch.equal(p.detach(), before[0][i]), f"skipped parameter {i} moved"
                for k, v in state_before[i].items():
                    if k not in opt.state[p]:  # dropped for every parameter at once (Autokaon's
                        # probe buffer when its rate freezes): not a change of this one's state
                        assert not any(k in opt.state[q] for q in params), k
                        continue
                    assert _same(v, opt.state[p][k]), f"skipped parameter {i}: {k!r} changed"


# ------------------------------------------------------------------------------ checkpoints
ENTRY = {e.name: e for e in OPTIMIZERS}


def _trained(entry: Entry, steps: int, seed: int = 0, dtype=torch.float32):
    params = _params(dtype)
    opt = entry.make(params, lr=entry.train_lr)
    for i in range(steps):
        _ordinary_grads(params, seed + i)
        opt.step()
    return params, opt


def _torch_checkpoint(kind: str):
    params = _params()
    opt = {"AdamW": lambda: torch.optim.AdamW(params, lr=1e-3),
           "SGD": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
           "Adam-0d-lr": lambda: torch.optim.Adam(params, lr=torch.tensor(1e-3))}[kind]()
    _ordinary_grads(params, 0)
    opt.step()
    return copy.deepcopy(opt.state_dict())


DAMAGES = ["none", "state_nonfinite", "state_dtype", "state_shape", "state_missing",
           "state_extra", "state_not_tensor", "state_number", "state_not_dict", "state_dropped",
           "state_renumbered", "group_value", "group_key_dropped", "group_extra", "group_params",
           "kaon_seed", "kaon_generators", "kaon_optimizer", "kaon_shapes", "kaon_garbage",
           "top_not_dict", "top_state_list"]


def _damage(data, checkpoint, damage, entry_name):
    """``checkpoint`` (a deep copy) damaged as ``damage`` says; draws what it needs."""
    state = checkpoint.get("state", {})
    ids = sorted(state)
    if damage.startswith("state_") and damage not in ("state_renumbered",) and not ids:
        return checkpoint
    pid = data.draw(st.sampled_from(ids), label="state of") if ids else None
    entry = state.get(pid) if pid is not None else None
    tensors = sorted(k for k, v in (entry or {}).items() if isinstance(v, torch.Tensor))
    key = data.draw(st.sampled_from(tensors), label="state key") if tensors else None
    if damage == "state_nonfinite" and key:
        value = entry[key]
        if value.is_floating_point() and value.numel():
            value = value.clone()
            value.view(-1)[0] = data.draw(st.sampled_from([NAN, INF, -INF]))
            entry[key] = value
    elif damage == "state_dtype" and key:
        entry[key] = entry[key].to(data.draw(st.sampled_from(
            [torch.float64, torch.float16, torch.bfloat16, torch.float32, torch.int8,
             torch.int64])))
    elif damage == "state_shape" and key:
        value = entry[key]
        entry[key] = value.flatten()[:-1] if value.numel() > 1 else value.reshape(1, 1, -1)
    elif damage == "state_missing" and key:
        del entry[key]
    elif damage == "state_extra" and entry is not None:
        entry[data.draw(st.sampled_from(["exp_avg", "momentum_buffer", "bogus", "row"]))] = \
            torch.zeros(3)
    elif damage == "state_not_tensor" and key:
        entry[key] = data.draw(st.sampled_from([[1.0, 2.0], "abc", None, {"a": 1}]))
    elif damage == "state_number" and key:
        entry[key] = data.draw(st.sampled_from([3, 2.5, NAN, INF, True]))
    elif damage == "state_not_dict" and pid is not None:
        state[pid] = data.draw(st.sampled_from([[1, 2], "abc", None, torch.zeros(2)]))
    elif damage == "state_dropped" and pid is not None:
        del state[pid]
    elif damage == "state_renumbered":
        checkpoint["state"] = {k + 7: v for k, v in state.items()}
    elif damage == "group_value":
        groups = checkpoint["param_groups"]
        keys = sorted(k for k in groups[0] if k not in ("params", "kaon"))
        if keys:
            k = data.draw(st.sampled_from(keys), label="group key")
            groups[0][k] = data.draw(_hostile(groups[0][k]), label="group value")
    elif damage == "group_key_dropped":
        keys = sorted(k for k in checkpoint["param_groups"][0] if k != "params")
        if keys:
            del checkpoint["param_groups"][0][data.draw(st.sampled_from(keys))]
    elif damage == "group_extra":
        checkpoint["param_groups"].append({**checkpoint["param_groups"][0], "params": [99]})
    elif damage == "group_params":
        params = checkpoint["param_groups"][0]["params"]
        checkpoint["param_groups"][0]["params"] = data.draw(st.sampled_from(
            [params[:-1], params + [99], list(reversed(params)), [p + 50 for p in params]]))
    elif damage.startswith("kaon_"):
        for where in (checkpoint, *checkpoint.get("param_groups", [])[:1]):
            if not isinstance(where.get("kaon"), dict):
                continue
            kaon_entry = dict(where["kaon"])
            if damage == "kaon_seed":
                kaon_entry["seed"] = data.draw(st.sampled_from([-1, "abc", 2.5, 2**70, None]))
            elif damage == "kaon_generators":
                kaon_entry["generators"] = data.draw(st.sampled_from(
                    [{"cpu": torch.zeros(16, dtype=torch.uint8)}, {"cpu": torch.zeros(3)},
                     {"cpu": "abc"}, {"bogus": torch.zeros(2, dtype=torch.uint8)}, ["cpu"],
                     {"cuda:0": torch.zeros(16, dtype=torch.uint8)}]))
            elif damage == "kaon_optimizer":
                kaon_entry["optimizer"] = data.draw(st.sampled_from(
                    ["Lion", "Adakaon", "AdamW", 3, None]))
            elif damage == "kaon_shapes":
                kaon_entry["shapes"] = data.draw(st.sampled_from(
                    [[[6], [4, 6]], [[4, 6]], "abc", [[4, 6], [6], [1]]]))
            else:
                kaon_entry = data.draw(st.sampled_from(["garbage", 3, [1, 2]]))
            where["kaon"] = kaon_entry
    elif damage == "top_not_dict":
        return data.draw(st.sampled_from([[checkpoint], "abc", None]))
    elif damage == "top_state_list":
        checkpoint["state"] = list(state.values())
    return checkpoint


SOURCES = [e.name for e in OPTIMIZERS] + ["torch:AdamW", "torch:SGD", "torch:Adam-0d-lr"]


@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
@PROFILE
@given(data=st.data())
def test_damaged_and_foreign_checkpoints_load_cleanly_or_change_nothing(entry: Entry, data):
    source = data.draw(st.one_of(st.just(entry.name), st.just(entry.name),
                                 st.sampled_from(SOURCES)), label="source")
    damage = data.draw(st.sampled_from(DAMAGES), label="damage")
    if source.startswith("torch:"):
        checkpoint = _torch_checkpoint(source.split(":", 1)[1])
    else:
        _, donor = _trained(ENTRY[source], steps=data.draw(st.integers(1, 3)), seed=5)
        checkpoint = copy.deepcopy(donor.state_dict())
    checkpoint = _damage(data, checkpoint, damage, entry.name)

    params, opt = _trained(entry, steps=2)
    before = _snapshot(opt, params)
    try:
        opt.load_state_dict(checkpoint)
    except (TypeError, ValueError):
        assert _same(before, _snapshot(opt, params)), "a refused checkpoint changed things"
        loaded = False
    else:
        loaded = True
    # loaded or not, the optimizer goes on stepping, and stays finite
    ordinary = all(_magnitude(v) <= ORDINARY for g in opt.param_groups
                   for k, v in g.items() if k not in ("params", "kaon"))
    for i in range(2):
        _ordinary_grads(params, 10 + i)
        opt.step()
        if ordinary:
            bad = _all_finite(opt, params)
            assert bad is None, (f"after loading {source} ({damage}, loaded={loaded}), "
                                 f"step {i + 1}: {bad}")
