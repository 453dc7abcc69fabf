"""Issue 17: nothing a user or a checkpoint feeds kaon may corrupt weights or state.

One test (or parametrized family) per numbered defect class of the issue; the property-based
suite over the whole registry is ``test_reliability_properties.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conformance import OPTIMIZERS, Entry
from numerics import same as _same
from test_conformance import make_model, set_grads

import kaon


def _finite(opt, model) -> bool:
    weights = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    state = all(bool(torch.isfinite(v.float()).all()) for s in opt.state.values()
                for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return weights and state


def _snapshot(opt, model):
    return ([p.detach().clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


# --------------------------------------------------------------- 1: fused AdamW, strided params
@pytest.mark.parametrize("make_view", [lambda base: base[:, 1:3], lambda base: base.t(),
                                       lambda base: base[::2]])
def test_1_adamw_non_contiguous_params_match_torch(make_view):
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    ref_base = base.clone()
    p = make_view(base)
    ref = make_view(ref_base)
    assert not p.is_contiguous()
    p.requires_grad_(True)
    ref.requires_grad_(True)
    opt = kaon.AdamW([p], lr=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.1)
    for i in range(3):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(base, ref_base, rtol=1e-6, atol=1e-7)


# --------------------------------------------- 2: finite but huge gradients, overflow-safe rules
def _signed(p: torch.Tensor, magnitude: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(p.shape, generator=gen).sign_().mul_(magnitude).to(p.dtype)


@pytest.mark.parametrize("magnitude", [1e20, 3e38])
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_2_huge_finite_gradients_keep_weights_and_state_finite(entry: Entry, magnitude):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr)
    set_grads(model, 0)
    opt.step()
    for i in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = _signed(p, magnitude, i)
        opt.step()
        assert _finite(opt, model), f"{entry.name}: non-finite weights or state"
        moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
        assert any(moved), f"{entry.name}: the step with a finite gradient was dropped"
    # the state stays finite under ordinary gradients afterwards, so it decays back (an
    # infinite second moment would freeze the parameter for good)
    set_grads(model, 1)
    opt.step()
    assert _finite(opt, model)


def test_2_ordinary_gradients_are_not_rescaled():
    # the screen passes gradients below the threshold through untouched, bit for bit
    from kaon import engine

    flat = torch.randn(3, 100) * 1e6
    flat[1, 7] = engine.GRAD_SAFE_MAX
    finite, scale = engine.screen_gradients(flat)
    assert finite is None and scale is None
    flat[2, 3] = engine.GRAD_SAFE_MAX * 3
    finite, scale = engine.screen_gradients(flat)
    assert finite is None and scale.tolist() == [1.0, 1.0, 0.25]


# -------------------------------------- 6: "skip" does not skip gradients whose sum overflows
@pytest.mark.parametrize("entry", [e for e in OPTIMIZERS if e.name in (
    "Adakaon", "AdamW", "AdamW-engine", "Lion", "KProdigy", "ScheduleFreeAdamW",
    "Adafactor8Bit", "Muon")], ids=repr)
def test_6_skip_keeps_finite_gradients_whose_sum_overflows(entry: Entry):
    model = make_model()
    opt = entry.make(model.parameters(), lr=entry.train_lr, nonfinite_grad="skip")
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():  # every element in [1e38, 2e38]: the sum overflows
        p.grad = torch.rand(p.shape, generator=gen).add_(1.0).mul_(1e38)
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert all(moved), f"{entry.name}: a finite gradient was skipped"
    assert _finite(opt, model)


# ------------------------------------------- 3, 4, 7: a transactional, validating load_state_dict
def _trained(entry: Entry, steps: int = 2, dtype=torch.float32, **overrides):
    from test_conformance import train
    model = make_model(dtype)
    opt = entry.make(model.parameters(), lr=entry.train_lr, **overrides)
    train(model, opt, steps, dtype=dtype)
    return model, opt


def _refused_unchanged(opt, model, checkpoint, match: str | None = None) -> str:
    """Load ``checkpoint``: it must raise ValueError and leave weights, state, groups and the
    random stream exactly as they were (also: the next step equals an untouched twin's)."""
    twin_model, twin_opt = copy.deepcopy((model, opt))
    before = _snapshot(opt, model)
    with pytest.raises(ValueError, match=match) as error:
        opt.load_state_dict(checkpoint)
    assert _same(before, _snapshot(opt, model))
    dtype = next(model.parameters()).dtype
    set_grads(model, 5, dtype)
    set_grads(twin_model, 5, dtype)
    opt.step()
    twin_opt.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    return str(error.value)


BAD_GROUP_VALUES = [("lr", float("nan")), ("lr", -1.0), ("weight_decay", float("inf")),
                    ("betas", (2.0, 0.9)), ("bf16_method", "bogus"), ("clip_threshold", 0.0),
                    ("lr", 2**70)]


@pytest.mark.parametrize("key,value", BAD_GROUP_VALUES, ids=lambda v: repr(v))
@pytest.mark.parametrize("name", ["Adakaon", "AdamW", "Lion", "KProdigy", "Nekaon", "Autokaon",
                                  "AdaPNM", "ScheduleFreeAdamW"])
def test_3_bad_group_values_in_a_checkpoint_are_refused(name, key, value):
    entry = next(e for e in OPTIMIZERS if e.name == name)
    model, opt = _trained(entry, dtype=torch.bfloat16)
    checkpoint = copy.deepcopy(opt.state_dict())
    if key not in checkpoint["param_groups"][0]:
        pytest.skip(f"{name} has no {key}")
    try:
        entry.make([torch.nn.Parameter(torch.zeros(2))], **{key: value})
    except (TypeError, ValueError):
        pass
    else:
        pytest.skip(f"{name} accepts {key}={value!r}")
    checkpoint["param_groups"][0][key] = value
    message = _refused_unchanged(opt, model, checkpoint)
    assert key in message and "param_groups[0]" in message


FOREIGN_PAIRS = [("Adakaon", "AdaMuon"), ("Nekaon", "Adakaon"), ("AdaMuon", "Adakaon"),
                 ("Autokaon", "Adakaon"), ("Adakaon", "Lion"), ("Lion", "Adakaon"),
                 ("KProdigy", "AdamW"), ("AdamW", "ScheduleFreeAdamW"),
                 ("Adafactor8Bit", "Adakaon"), ("Muon", "AdamW"), ("OAdamW", "AdamW")]


@pytest.mark.parametrize("source,target", FOREIGN_PAIRS)
def test_4_7_foreign_checkpoints_are_refused_at_load(source, target):
    src = next(e for e in OPTIMIZERS if e.name == source)
    dst = next(e for e in OPTIMIZERS if e.name == target)
    _, donor = _trained(src)
    model, opt = _trained(dst)
    message = _refused_unchanged(opt, model, copy.deepcopy(donor.state_dict()))
    assert source in message or "another optimizer" in message


@pytest.mark.parametrize("name", ["Adakaon-4bit", "Lion-4bit-kahan", "AdamW-4bit", "Adakaon"])
def test_4_swapped_parameter_shapes_are_refused(name):
    entry = next(e for e in OPTIMIZERS if e.name == name)
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16, 8))
    donor = entry.make([a, b], lr=entry.train_lr)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    donor.step()
    c, d = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 16))
    opt = entry.make([c, d], lr=entry.train_lr)
    c.grad, d.grad = torch.randn_like(c), torch.randn_like(d)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(copy.deepcopy(donor.state_dict()))
    assert _same(before, opt.state_dict())


@pytest.mark.parametrize("source", ["Adakaon", "Lion", "AdaMuon", "KProdigy", "Nekaon"])
def test_7_torch_adamw_checkpoint_into_kaon_is_refused_at_load(source):
    entry = next(e for e in OPTIMIZERS if e.name == source)
    torch_model = make_model()
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3)
    set_grads(torch_model, 0)
    torch_opt.step()
    model, opt = _trained(entry)
    _refused_unchanged(opt, model, copy.deepcopy(torch_opt.state_dict()))


def _bad_entries(opt):
    good = opt.state_dict()["kaon"]
    cpu_state = good["generators"]["cpu"]
    return [
        {**good, "seed": "abc"},
        {**good, "seed": -3},
        {**good, "generators": {"cpu": cpu_state[:100]}},  # another size
        {**good, "generators": {"cpu": torch.zeros(16, dtype=torch.uint8)}},  # a CUDA state
        {**good, "generators": {"cpu": cpu_state.float()}},
        {**good, "generators": {"not a device": cpu_state}},
        {**good, "optimizer": "Lion"},
        "garbage",
    ]


@pytest.mark.parametrize("where", ["top", "group"])
@pytest.mark.parametrize("case", range(8))
def test_7_bad_kaon_entry_refuses_before_anything_changes(case, where):
    entry = next(e for e in OPTIMIZERS if e.name == "Adakaon-int8")
    model, opt = _trained(entry, dtype=torch.bfloat16)
    _, other = _trained(entry, steps=4, dtype=torch.bfloat16)  # other state: a real change
    checkpoint = copy.deepcopy(other.state_dict())
    bad = _bad_entries(opt)[case]
    if where == "top":
        checkpoint["kaon"] = bad
    else:
        checkpoint.pop("kaon")
        checkpoint["param_groups"][0]["kaon"] = bad
    _refused_unchanged(opt, model, checkpoint)


@pytest.mark.parametrize("damage", ["nan", "dtype", "shape", "missing", "extra", "not_tensor"])
def test_7_damaged_state_is_refused(damage):
    entry = next(e for e in OPTIMIZERS if e.name == "Adakaon-int8")
    model, opt = _trained(entry)
    checkpoint = copy.deepcopy(opt.state_dict())
    _, other = _trained(entry, steps=3)
    checkpoint = copy.deepcopy(other.state_dict())
    state = checkpoint["state"][0]
    key = "row" if "row" in state else next(iter(state))
    if damage == "nan":
        state[key] = state[key].clone().fill_(float("nan"))
    elif damage == "dtype":
        state[key] = state[key].double()
    elif damage == "shape":
        state[key] = state[key][:-1]
    elif damage == "missing":
        del state[key]
    elif damage == "extra":
        state["exp_avg"] = torch.zeros(3)
    else:
        state[key] = [1.0, 2.0]
    _refused_unchanged(opt, model, checkpoint)


# ------------------------------------------------------ 8: checkpoints that must load
def test_8_generator_state_of_another_device_loads_on_cpu():
    entry = next(e for e in OPTIMIZERS if e.name == "Adakaon")
    model, opt = _trained(entry, dtype=torch.bfloat16)
    checkpoint = copy.deepcopy(opt.state_dict())
    # as written on a GPU: the stream is a CUDA generator's state (16 bytes), named cuda:0
    cuda_entry = {**checkpoint["kaon"], "generators": {"cuda:0": torch.zeros(16, dtype=torch.uint8)}}
    checkpoint["kaon"] = cuda_entry
    checkpoint["param_groups"][0]["kaon"] = cuda_entry
    model2, opt2 = _trained(entry, steps=0, dtype=torch.bfloat16)
    opt2.load_state_dict(checkpoint)
    set_grads(model2, 3, torch.bfloat16)
    opt2.step()
    assert _finite(opt2, model2)
    assert opt2.seed == opt.seed


def test_8_torch_checkpoint_with_a_plain_number_step_loads():
    torch_model = make_model()
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-2)
    set_grads(torch_model, 0)
    torch_opt.step()
    checkpoint = copy.deepcopy(torch_opt.state_dict())
    for state in checkpoint["state"].values():
        state["step"] = float(state["step"])  # torch < 1.12 saved a Python number
    model = make_model()
    model.load_state_dict(torch_model.state_dict())
    opt = kaon.AdamW(model.parameters(), lr=1e-2, fused=False)
    opt.load_state_dict(checkpoint)
    torch_opt.load_state_dict(checkpoint)
    set_grads(model, 1)
    set_grads(torch_model, 1)
    opt.step()
    torch_opt.step()
    for a, b in zip(model.parameters(), torch_model.parameters()):
        torch.testing.assert_close(a, b)


def test_8_kaon_adamw_loads_torch_checkpoint_with_a_0d_parameter():
    scalar = torch.nn.Parameter(torch.tensor(0.5))
    vector = torch.nn.Parameter(torch.randn(4))
    torch_opt = torch.optim.AdamW([scalar, vector], lr=1e-2)
    scalar.grad, vector.grad = torch.tensor(0.3), torch.randn(4)
    torch_opt.step()
    mine = [torch.nn.Parameter(scalar.detach().clone()), torch.nn.Parameter(vector.detach().clone())]
    opt = kaon.AdamW(mine, lr=1e-2)
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    for p, q in zip(mine, (scalar, vector)):
        p.grad = torch.full_like(p, 0.7)
        q.grad = torch.full_like(q, 0.7)
    opt.step()
    torch_opt.step()
    for p, q in zip(mine, (scalar, vector)):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------- 9: no "differentiable" key appears
@pytest.mark.parametrize("entry", OPTIMIZERS, ids=repr)
def test_9_round_trip_adds_no_group_key(entry: Entry):
    model, opt = _trained(entry, steps=1)
    keys = [set(g) for g in opt.param_groups]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [set(g) for g in opt.param_groups] == keys
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [set(g) for g in opt.param_groups] == keys
    assert set(opt.defaults) == set(copy.deepcopy(opt).defaults)


# ------------------------------------------ 5, 14: argument checks (finite, in range, named)
ARGUMENT_CASES = [
    (kaon.KProdigy, dict(d0=1e-38), "d0"),
    (kaon.Autokaon, dict(d0=1e-38), "d0"),
    (kaon.Muon, dict(ns_coefficients=(float("nan"), -4.775, 2.0315)), "ns_coefficients"),
    (kaon.Muon, dict(ns_coefficients=(1e30, 0.0, 0.0)), "ns_coefficients"),
    (kaon.Muon, dict(ns_coefficients=(3.0, 0.0, 0.0)), "ns_coefficients"),  # diverges
    (kaon.Muon, dict(ns_coefficients=1.0), "ns_coefficients"),  # 14: not a triple
    (kaon.Muon, dict(ns_coefficients=(3.4, -4.7)), "ns_coefficients"),
    (kaon.Muon, dict(ns_steps=2**40), "ns_steps"),
    (kaon.AdaMuon, dict(ns_steps=2**40), "ns_steps"),
    (kaon.OAdamW, dict(ns_steps=2**40), "ns_steps"),
    (kaon.Adakaon, dict(lr=2**70), "lr"),
    (kaon.AdamW, dict(lr=2**70), "lr"),
    (kaon.Lion, dict(weight_decay=2**70), "weight_decay"),
    (kaon.Adakaon, dict(lr=float("nan")), "lr"),
    (kaon.Adakaon, dict(weight_decay=float("inf")), "weight_decay"),
    (kaon.Adakaon, dict(foreach_batch_cutoff=2**70), "foreach_batch_cutoff"),
]


@pytest.mark.parametrize("cls,kwargs,name", ARGUMENT_CASES, ids=lambda v: repr(v)[:40])
def test_5_14_arguments_that_would_give_nan_weights_are_refused(cls, kwargs, name):
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises((ValueError, TypeError), match=name) as error:
        cls([p], **kwargs)
    assert "not iterable" not in str(error.value)


def test_5_torch_default_muon_coefficients_and_identity_are_accepted():
    p = torch.nn.Parameter(torch.randn(4, 4))
    kaon.Muon([p], ns_coefficients=(3.4445, -4.7750, 2.0315))
    kaon.Muon([p], ns_coefficients=(2.0, -1.5, 0.5))
    kaon.Muon([p], ns_coefficients=(1.0, 0.0, 0.0))


# ------------------------------------------- the lead's first reproductions (cases 1 and 6)
def test_adamw_default_on_a_strided_view_matches_torch_and_leaves_the_base_alone():
    """torch's fused CPU kernel walks storage linearly; kaon.AdamW must not hand it a column
    slice (it wrote into the neighbouring columns and computed a wrong step)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=gen)
    ours_base, theirs_base = base.clone(), base.clone()
    ours = ours_base[:, 1:4]  # a strided view of the base tensor, as a leaf parameter
    theirs = theirs_base[:, 1:4].clone()
    ours.requires_grad_(True)
    theirs.requires_grad_(True)
    opt = kaon.AdamW([ours], lr=1e-1, weight_decay=0.01)
    ref = torch.optim.AdamW([theirs], lr=1e-1, weight_decay=0.01, foreach=False)
    for _ in range(3):
        g = torch.randn(8, 3, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        with torch.no_grad():
            opt.step()
            ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)
    untouched = torch.ones(6, dtype=torch.bool)
    untouched[1:4] = False
    assert torch.equal(ours_base[:, untouched], base[:, untouched])


def test_skip_policy_steps_finite_gradients_whose_sum_overflows():
    """2e38 in every element is finite; its sum is not. The step must run, not be skipped."""
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = kaon.Lion([p], lr=1e-2, momentum_dtype="float32",
                    gradient_centralization=False, cautious=False)
    p.grad = torch.full((4, 4), 2e38)
    opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p.detach(), torch.full((4, 4), -1e-2))


def test_skip_policy_still_skips_a_tensor_with_an_infinite_element():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    q = torch.nn.Parameter(torch.zeros(4, 4))
    opt = kaon.Lion([p, q], lr=1e-2, momentum_dtype="float32",
                    gradient_centralization=False, cautious=False)
    p.grad = torch.ones(4, 4)
    p.grad[0, 0] = float("inf")
    q.grad = torch.ones(4, 4)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(4, 4))
    assert torch.equal(q.detach(), torch.full((4, 4), -1e-2))


# --------------------------------- 11: step_param and step() take the same kernel per parameter
@pytest.mark.parametrize("odd", ["0-d", "strided", "huge-grad"])
def test_11_adamw_step_param_equals_step_beside_an_unfusable_parameter(odd):
    def make():
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(6, 5, generator=gen)
        weird = {"0-d": torch.tensor(0.5), "strided": base[:, 1:3],
                 "huge-grad": torch.randn(7, generator=gen)}[odd]
        return [torch.nn.Parameter(torch.randn(8, 4, generator=gen)), weird.requires_grad_(True),
                torch.nn.Parameter(torch.randn(3, generator=gen))]

    a, b = make(), make()
    opt_a, opt_b = kaon.AdamW(a, lr=1e-2), kaon.AdamW(b, lr=1e-2)
    for i in range(3):
        gen = torch.Generator().manual_seed(10 + i)
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen)
            if odd == "huge-grad" and p.shape == (7,):
                g *= 1e20
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        for q in b:
            opt_b.step_param(q, opt_b.param_groups[0])
    for p, q in zip(a, b):
        assert torch.equal(p, q)


# ----------------------------- 12: a tensor lr is 0-D (it steps) or refused at construction
TENSOR_LR = [("Nekaon", {}), ("KProdigy", {}), ("Autokaon", {}), ("AdaPNM", {"weight_decay": 0.1}),
             ("Adakaon", {}), ("AdamW", {}), ("Lion", {})]


@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@pytest.mark.parametrize("name,extra", TENSOR_LR, ids=[n for n, _ in TENSOR_LR])
def test_12_tensor_lr_of_shape_1_is_refused_at_construction(name, extra, shape):
    entry = next(e for e in OPTIMIZERS if e.name == name)
    model = make_model()
    with pytest.raises(ValueError, match="lr.*0-D"):
        entry.make(model.parameters(), lr=torch.full(shape, entry.train_lr), **extra)
    opt = entry.make(model.parameters(), lr=entry.train_lr, **extra)
    with pytest.raises(ValueError, match="lr.*0-D"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))],
                             "lr": torch.full(shape, 0.1)})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name,extra", TENSOR_LR, ids=[n for n, _ in TENSOR_LR])
def test_12_a_0d_tensor_lr_steps_like_the_float(name, extra):
    entry = next(e for e in OPTIMIZERS if e.name == name)
    model, twin = make_model(), make_model()
    opt = entry.make(model.parameters(), lr=torch.tensor(entry.train_lr), **extra)
    ref = entry.make(twin.parameters(), lr=entry.train_lr, **extra)
    for i in range(2):
        set_grads(model, i)
        set_grads(twin, i)
        opt.step()
        ref.step()
    assert _finite(opt, model)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------- 15: torch.compile(opt.step) runs the eager step
@pytest.mark.parametrize("name", ["Adakaon", "KProdigy", "Lion", "AdamW"])
def test_15_compiled_step_runs_at_once_and_equals_the_eager_step(name):
    import time

    cls = getattr(kaon, name)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (8, 8, 16)]  # the shapes
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = cls(params), cls(twin)
    step = torch.compile(opt.step)
    start = time.perf_counter()
    for i in range(3):
        gen = torch.Generator().manual_seed(i)
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step()
        ref.step()
    assert time.perf_counter() - start < 60  # no minutes of compiling and recompiling
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


# ------------------------------ 10: Nekaon resumes exactly from a checkpoint taken after eval()
@pytest.mark.parametrize("name", ["Nekaon", "Nekaon-int8-b0.2", "Nekaon-kahan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_10_nekaon_resumes_exactly_from_an_eval_mode_checkpoint(name, dtype):
    from test_conformance import train

    entry = next(e for e in OPTIMIZERS if e.name == name)
    model, opt = _trained(entry, steps=5, dtype=dtype)
    opt.eval()  # evaluate, save, continue: the trainers' order
    weights = copy.deepcopy(model.state_dict())
    checkpoint = copy.deepcopy(opt.state_dict())
    opt.train()
    train(model, opt, 10, start=5, dtype=dtype)

    resumed = make_model(dtype, seed=1)
    resumed.load_state_dict(weights)
    again = entry.make(resumed.parameters(), lr=entry.train_lr)
    again.load_state_dict(checkpoint)
    assert not again.training  # the checkpoint's mode
    again.train()
    train(resumed, again, 10, start=5, dtype=dtype)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_10_a_damaged_eval_fixup_is_refused():
    entry = next(e for e in OPTIMIZERS if e.name == "Nekaon")
    model, opt = _trained(entry, steps=3, dtype=torch.bfloat16)
    opt.eval()
    checkpoint = copy.deepcopy(opt.state_dict())
    opt.train()
    damaged = next(s for s in checkpoint["state"].values() if "eval_fixup_index" in s)
    damaged["eval_fixup_index"] = torch.tensor([10**9])
    damaged["eval_fixup_values"] = torch.zeros(1, dtype=torch.bfloat16)
    _refused_unchanged(opt, model, checkpoint)


# ------------------------------- 18: OneCycleLR(cycle_momentum=True) cycles Adafactor8Bit's beta1
def test_18_one_cycle_lr_cycles_adafactor8bit_momentum():
    model = make_model()
    opt = kaon.Adafactor8Bit(model.parameters(), lr=1e-2, beta1=0.9, relative_step=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10,
                                                cycle_momentum=True, base_momentum=0.8,
                                                max_momentum=0.95)
    seen = []
    for i in range(6):
        set_grads(model, i)
        opt.step()
        seen.append(opt.param_groups[0]["beta1"])
        sched.step()
    assert seen[0] == pytest.approx(0.95) and min(seen) < 0.95  # the cycle reaches the rule
    assert _finite(opt, model)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the key round-trips
    set_grads(model, 7)
    opt.step()
    # without momentum there is nothing to cycle: torch's own refusal, at construction
    plain = kaon.Adafactor8Bit(make_model().parameters())
    with pytest.raises(ValueError, match="momentum"):
        torch.optim.lr_scheduler.OneCycleLR(plain, max_lr=1e-2, total_steps=10,
                                            cycle_momentum=True)


def test_18_cycled_momentum_equals_setting_beta1():
    a, b = make_model(), make_model()
    opt_a = kaon.Adafactor8Bit(a.parameters(), beta1=0.9, relative_step=False)
    opt_b = kaon.Adafactor8Bit(b.parameters(), beta1=0.9, relative_step=False)
    for i, m in enumerate([0.9, 0.85, 0.8, 0.85]):
        opt_a.param_groups[0]["momentum"] = m  # as a scheduler writes it
        opt_b.param_groups[0]["beta1"] = m
        set_grads(a, i)
        set_grads(b, i)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
