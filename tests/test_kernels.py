"""kaon's Triton kernels (kaon.kernels) against the reference rules.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set here
before the kernels are compiled) on CPU tensors; the tests are kept small because the
interpreter is slow. Tests that need CUDA (graph capture, no host synchronization) skip
without it; the argument checks run without Triton.
"""

from __future__ import annotations

import io
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from numerics import ulp  # noqa: E402

import kaon  # noqa: E402
from kaon import kernels  # noqa: E402

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# a bucket of equal matrices, a conv kernel, a lone matrix, a vector, a scalar
SHAPES = [(24, 16), (24, 16), (24, 16), (6, 3, 3, 3), (16, 40), (40,), ()]
SMALL = [(12, 8), (12, 8), (8, 20), (20,)]

ADAKAON = [
    {"momentum_dtype": "bfloat16"},
    {"momentum_dtype": "float32", "weight_decay": 0.1},
    {"momentum_dtype": "int8"},
    {"momentum_dtype": "4bit", "momentum_4bit_block": 64},
    {"momentum_dtype": "4bit", "momentum_4bit_block": 0},
    {"betas": (0.0, 0.999), "weight_decay": 0.05},
    {"momentum_dtype": "int8", "cautious": False, "gradient_centralization": False,
     "clip_threshold": 0.5, "maximize": True},
    {"momentum_dtype": "float32", "betas": (0.7, 0.9)},  # lerp weight > 0.5 (other branch)
]
LION = [
    {"momentum_dtype": "bfloat16"},
    {"momentum_dtype": "float32", "weight_decay": 0.1},
    {"momentum_dtype": "int8"},
    {"momentum_dtype": "4bit", "momentum_4bit_block": 32},
    {"betas": (0.0, 0.99)},
    {"momentum_dtype": "int8", "cautious": False, "gradient_centralization": False,
     "maximize": True, "weight_decay": 0.1},
]
ADAPNM = [
    {"momentum_dtype": "bfloat16"},
    {"momentum_dtype": "int8", "weight_decay": 0.1},
    {"momentum_dtype": "4bit", "momentum_4bit_block": 32},
    {"momentum_dtype": "float32", "clip_threshold": 0.0, "cautious": False,
     "gradient_centralization": False},
    {"momentum_dtype": "float32", "betas": (0.5, 0.99), "beta0": 1.0, "maximize": True},
]
NEKAON = [
    {},  # k = 1.5, 4-bit momentum, weight decay 0.1
    {"momentum_dtype": "int8"},
    {"momentum_dtype": "bfloat16", "weight_decay": 0.0},
    {"momentum_dtype": "float32", "k": 0.0},
    {"momentum_dtype": "4bit", "cautious": False, "gradient_centralization": False,
     "weight_decay": 0.3},
]
CASES = ([pytest.param(kaon.Adakaon, kw, id=f"Adakaon-{i}") for i, kw in enumerate(ADAKAON)]
         + [pytest.param(kaon.Lion, kw, id=f"Lion-{i}") for i, kw in enumerate(LION)]
         + [pytest.param(kaon.AdaPNM, kw, id=f"AdaPNM-{i}") for i, kw in enumerate(ADAPNM)]
         + [pytest.param(kaon.Nekaon, kw, id=f"Nekaon-{i}") for i, kw in enumerate(NEKAON)])
LR = {kaon.Adakaon: 1e-2, kaon.Lion: 1e-3, kaon.AdaPNM: 1e-2, kaon.Nekaon: 1e-2}


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=DEVICE, dtype=dtype).requires_grad_()
            for s in shapes]


def set_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen) * scale
        g = g + 0.3 * torch.randn(p.shape[:1] + (1,) * (p.ndim - 1), generator=gen) if p.ndim else g
        p.grad = g.to(device=p.device, dtype=p.dtype)


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_step_close(before, after_ref, after_fused, rtol=1e-6):
    """The fused step equals the reference step to ``rtol`` (of the step's largest entry),
    plus one rounding of the final ``p - delta`` (an ulp of the parameter, which a delta that
    differs in its last bit can flip)."""
    delta = (after_ref.detach() - before).double()
    err = (after_fused.detach().double() - after_ref.detach().double()).abs()
    bound = rtol * delta.abs().max() + ulp(after_ref)
    assert bool((err <= bound).all()), float((err - bound).max())


def assert_state_close(fused, ref, params_f, params_r, rtol=1e-6):
    """Same keys, dtypes and shapes; float state within rtol; codes within one level."""
    for pf, pr in zip(params_f, params_r):
        sf, sr = fused.state[pf], ref.state[pr]
        assert sorted(sf) == sorted(sr)
        for key in sr:
            a, b = sf[key], sr[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if key == "m" and b.dtype == torch.int8:
                diff = (a.int() - b.int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, key
            elif key == "m" and b.dtype == torch.uint8:
                for shift in (0, 4):
                    diff = (((a.int() >> shift) & 15) - ((b.int() >> shift) & 15)).abs()
                    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
            elif b.dtype == torch.bfloat16:
                # one bf16 rounding of values that agree to ~1e-7 may differ by one ulp
                assert torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=0), key
            else:
                assert rel(a, b) <= rtol, (key, rel(a, b))


def step_pair_and_compare_steps(ref, params_r, fused, params_f, seed):
    """One step of the reference and the fused optimizer on the same gradients (``seed``);
    their steps must agree (:func:`assert_step_close`)."""
    before = [p.detach().clone() for p in params_r]
    set_grads(params_r, seed)
    set_grads(params_f, seed)
    ref.step()
    fused.step()
    for b, pr, pf in zip(before, params_r, params_f):
        assert_step_close(b, pr, pf)


def assert_kernels_ran(opt) -> None:
    """Every chunk of the optimizer's plans ran fused (none was declined)."""
    chunks = [c for cache in opt._plans.values() for plan in cache.values() for c in plan]
    assert chunks and all(c.kernel_cache.get("blocker", "not run") is None for c in chunks)


def warmed_pair(cls, kw, steps=2, dtype=torch.float32, shapes=SHAPES):
    """A reference optimizer after ``steps`` steps and a fused one loaded from its checkpoint."""
    params_r = make_params(shapes, dtype)
    ref = cls(params_r, lr=LR[cls], fused=False, **kw)
    for i in range(steps):
        set_grads(params_r, i)
        ref.step()
    params_f = clone_params(params_r)
    fused = cls(params_f, lr=LR[cls], fused="triton", **kw)
    fused.load_state_dict(roundtrip(ref.state_dict()))
    return ref, params_r, fused, params_f


# ------------------------------------------------------------------ arguments (no Triton needed)
def test_fused_argument_is_checked():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="fused"):
        kaon.Adakaon(p, fused="yes")

    class Custom(kaon.Adakaon):  # kernels are registered for exact classes: a subclass may
        pass                     # have another rule

    with pytest.raises(ValueError, match="no Triton kernel for Custom"):
        Custom(p, fused="triton")
    assert Custom(p, fused=None)._kernel is None


def test_fused_true_without_triton_or_device_raises(monkeypatch):
    p = [torch.zeros(3, requires_grad=True)]
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs Triton"):
        kaon.Adakaon(p, fused="triton")
    assert kaon.Lion(p, fused=None)._kernel is None  # automatic: the reference rule
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "interpreter", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        kaon.Lion(p, fused="triton")
    assert kaon.Adakaon(p, fused=None)._kernel is None


def test_automatic_choice_does_not_import_triton_without_cuda(monkeypatch):
    """fused=None on a machine without CUDA never touches Triton (import stays cheap)."""
    def boom():
        raise AssertionError("Triton was probed")

    monkeypatch.setattr(kernels, "triton_available", boom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kaon.Adakaon([torch.zeros(2, requires_grad=True)])._kernel is None


def test_automatic_choice_waits_for_gpu_validation(monkeypatch):
    """fused=None keeps the reference rule until KAON_FUSED_AUTO=1 (kernels not yet GPU-run)."""
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    p = [torch.zeros(3, requires_grad=True)]
    monkeypatch.delenv("KAON_FUSED_AUTO", raising=False)
    assert kaon.Adakaon(p)._kernel is None and kaon.Lion(p, fused=None)._kernel is None
    monkeypatch.setenv("KAON_FUSED_AUTO", "1")
    assert kaon.Adakaon(p)._kernel is kernels.kernel_for(kaon.Adakaon)
    assert kaon.Lion(p, fused=None)._kernel is kernels.kernel_for(kaon.Lion)
    assert kaon.Lion(p, fused=False)._kernel is None


# ------------------------------------------------------------------ parity under the interpreter
@needs_triton
@pytest.mark.parametrize("cls,kw", CASES)
def test_one_step_matches_the_reference(cls, kw):
    # AdaPNM alternates its momentum buffers by step parity: step 3 here; step 2 below
    ref, params_r, fused, params_f = warmed_pair(cls, kw)
    step_pair_and_compare_steps(ref, params_r, fused, params_f, 5)
    assert_kernels_ran(fused)
    assert_state_close(fused, ref, params_f, params_r)


@needs_triton
@pytest.mark.parametrize("kw", ADAPNM[:3])
def test_adapnm_even_step_matches_the_reference(kw):
    ref, params_r, fused, params_f = warmed_pair(kaon.AdaPNM, kw, steps=1, shapes=SMALL)
    step_pair_and_compare_steps(ref, params_r, fused, params_f, 5)
    assert_state_close(fused, ref, params_f, params_r)


@needs_triton
@pytest.mark.parametrize("kw", NEKAON[:2])
def test_nekaon_true_weights_match_after_eval(kw):
    """The climb is removed from the same stored momentum and record by eval()."""
    ref, params_r, fused, params_f = warmed_pair(kaon.Nekaon, kw, steps=1, shapes=SMALL)
    set_grads(params_r, 5)
    set_grads(params_f, 5)
    ref.step()
    fused.step()
    ref.eval()
    fused.eval()
    for pr, pf in zip(params_r, params_f):
        assert torch.allclose(pf, pr, rtol=1e-6, atol=1e-7)
    fused.train()
    assert fused.training


@needs_triton
@pytest.mark.parametrize("cls,kw", [CASES[2], CASES[11], CASES[15]])
def test_tiled_regime_matches_the_reference(cls, kw, monkeypatch):
    """Large-tensor tiling: several row ranges and flat ranges per tensor, partial sums."""
    from kaon.kernels import rules

    monkeypatch.setattr(rules, "_MAX_ROW_RANGES", 3)
    monkeypatch.setattr(rules, "_MAX_FLAT_RANGES", 3)
    shapes = [(60, 160), (60, 160), (3000,)]
    ref, params_r, fused, params_f = warmed_pair(cls, kw, steps=1, shapes=shapes)
    geo = rules.ChunkKernel.geometry(type("C", (), {"view": (60, 160), "params": [0]})())
    assert geo["T"] > 1 and geo["RPP"] > geo["BR"] and geo["F"] > 1 and geo["EPP"] > geo["BLOCK"]
    step_pair_and_compare_steps(ref, params_r, fused, params_f, 7)
    assert_state_close(fused, ref, params_f, params_r)


@needs_triton
@pytest.mark.parametrize("cls,kw", [CASES[3], CASES[10], CASES[15], CASES[19]])
def test_checkpoints_interchange_both_ways(cls, kw):
    """fused -> reference and reference -> fused continue like an uninterrupted run."""
    params_a = make_params(SMALL)
    a = cls(params_a, lr=LR[cls], fused="triton", **kw)
    params_b = clone_params(params_a)
    b = cls(params_b, lr=LR[cls], fused=False, **kw)
    for i in range(2):
        set_grads(params_a, i)
        set_grads(params_b, i)
        a.step()
        b.step()
    # same checkpoint format: keys, dtypes, shapes
    assert_state_close(a, b, params_a, params_b, rtol=1e-5)
    # swap the engines through checkpoints
    params_c = clone_params(params_a)
    c = cls(params_c, lr=LR[cls], fused=False, **kw)
    c.load_state_dict(roundtrip(a.state_dict()))
    params_d = clone_params(params_b)
    d = cls(params_d, lr=LR[cls], fused="triton", **kw)
    d.load_state_dict(roundtrip(b.state_dict()))
    for i in range(2, 4):
        for ps in (params_a, params_b, params_c, params_d):
            set_grads(ps, i)
        for opt in (a, b, c, d):
            opt.step()
    for pa, pb, pc, pd in zip(params_a, params_b, params_c, params_d):
        # an int8 / 4-bit level that rounds the other way moves later steps by < 1 level
        tol = 1e-4 if kw.get("momentum_dtype") in ("int8", "4bit") else 1e-5
        assert torch.allclose(pc, pa, rtol=tol, atol=tol * 1e-1)
        assert torch.allclose(pd, pb, rtol=tol, atol=tol * 1e-1)


@needs_triton
@pytest.mark.parametrize("cls,kw,dtype", [(kaon.Adakaon, ADAKAON[2], torch.bfloat16),
                                            (kaon.Lion, LION[3], torch.float32),
                                            (kaon.AdaPNM, ADAPNM[1], torch.bfloat16),
                                            (kaon.Nekaon, NEKAON[0], torch.bfloat16)])
def test_fused_resume_is_bit_identical(cls, kw, dtype):
    """Deterministic reductions and a checkpointed SR stream: resume gives the same bits."""
    params_a = make_params(SMALL, dtype=dtype)
    a = cls(params_a, lr=LR[cls], fused="triton", seed=3, **kw)
    params_b = clone_params(params_a)
    b = cls(params_b, lr=LR[cls], fused="triton", seed=3, **kw)
    for i in range(2):
        for ps in (params_a, params_b):
            set_grads(ps, i)
        a.step()
        b.step()
    saved = roundtrip(b.state_dict())
    params_c = clone_params(params_b)
    c = cls(params_c, lr=LR[cls], fused="triton", seed=99, **kw)
    c.load_state_dict(saved)
    for i in range(2, 4):
        for ps in (params_a, params_c):
            set_grads(ps, i)
        a.step()
        c.step()
    for pa, pc in zip(params_a, params_c):
        assert torch.equal(pa, pc)
    for pa, pc in zip(params_a, params_c):
        for key, value in a.state[pa].items():
            assert torch.equal(value, c.state[pc][key]), key


@needs_triton
@pytest.mark.parametrize("cls,kw", [CASES[2], CASES[3], CASES[8], CASES[11], CASES[16],
                                    CASES[19]])
def test_nonfinite_gradient_cannot_poison_state(cls, kw):
    """A NaN / Inf gradient leaves that tensor and its state exactly as they were (skip)."""
    ref, params_r, fused, params_f = warmed_pair(cls, kw)
    set_grads(params_r, 5)
    set_grads(params_f, 5)
    poisoned = (1, 4, 5)  # a member of the bucket, the lone matrix, the vector
    for i in poisoned:
        params_f[i].grad.view(-1)[3] = float("nan") if i != 4 else float("inf")
        params_r[i].grad.view(-1)[3] = float("nan") if i != 4 else float("inf")
    before = [p.detach().clone() for p in params_f]
    state_before = [{k: v.clone() for k, v in fused.state[p].items()} for p in params_f]
    fused.step()
    ref.step()
    for i, p in enumerate(params_f):
        if i in poisoned:
            assert torch.equal(p, before[i])
            for key, value in fused.state[p].items():
                assert torch.equal(value, state_before[i][key]), key
        else:
            assert_step_close(before[i], params_r[i], p)
        for value in fused.state[p].values():
            assert torch.isfinite(value.float()).all()


@needs_triton
def test_pointer_tables_follow_moved_gradients():
    """Gradients re-allocated between steps (zero_grad(set_to_none=True), other shapes in
    between): every address is compared every step, so the kernels never read stale memory."""
    from kaon.kernels.rules import pointer_table

    params_r = make_params()
    ref = kaon.Adakaon(params_r, lr=1e-2, fused=False, momentum_dtype="int8")
    params_f = clone_params(params_r)
    fused = kaon.Adakaon(params_f, lr=1e-2, fused="triton", momentum_dtype="int8")
    keep = []
    for i in range(3):
        set_grads(params_r, i)
        set_grads(params_f, i)
        # move only the LAST gradient of the bucket (the first one keeps its address)
        if i:
            keep.append(params_f[2].grad)
            params_f[2].grad = params_f[2].grad.clone()
        ref.step()
        fused.step()
        fused.zero_grad(set_to_none=i % 2 == 0)
    for pr, pf in zip(params_r, params_f):
        assert torch.allclose(pf, pr, rtol=1e-5, atol=1e-7)
    cache: dict = {}
    a, b = torch.zeros(4), torch.zeros(4)
    first = pointer_table(cache, "g", [a, b])
    assert pointer_table(cache, "g", [a, b]) is first
    c = torch.zeros(4)
    moved = pointer_table(cache, "g", [a, c])  # only the second tensor moved
    assert moved is not first and int(moved[1]) == c.data_ptr()


@needs_triton
@pytest.mark.parametrize("cls", [kaon.Adakaon, kaon.Lion, kaon.AdaPNM])
def test_bf16_stochastic_rounding_is_unbiased(cls):
    """bf16 weights: each written value is one of the two bf16 neighbours of the exact fp32
    result (from the fp32 reference), and the rounding errors average to zero within their
    statistics; round to nearest gives exactly the nearest value."""
    shapes = [(64, 96), (64, 96)]
    params16 = make_params(shapes, torch.bfloat16, seed=4)
    params32 = [p.detach().float().requires_grad_() for p in params16]
    kw = dict(lr=LR[cls] * 0.05, fused=False, momentum_dtype="float32")
    ref = cls(params32, **kw)
    fused = cls(params16, **{**kw, "fused": True}, seed=11)
    near16 = [p.detach().clone().requires_grad_() for p in params16]
    nearest = cls(near16, **{**kw, "fused": True}, bf16_method="none")
    set_grads(params32, 0)
    for ps in (params16, near16):
        for p, q in zip(ps, params32):
            p.grad = q.grad.to(torch.bfloat16).float().to(torch.bfloat16)
    for q in params32:
        q.grad = q.grad.to(torch.bfloat16).float()
    ref.step()
    fused.step()
    nearest.step()
    z = torch.cat([q.detach().flatten() for q in params32]).double()
    out = torch.cat([p.detach().flatten() for p in params16]).double()
    down = torch.cat([q.detach().flatten() for q in params32]).to(torch.bfloat16)
    # the bf16 neighbours of z: truncate toward -inf and the next value up
    lo = torch.where(down.double() > z, torch.nextafter(down, torch.full_like(down, -math.inf)),
                     down).double()
    hi = torch.nextafter(lo.to(torch.bfloat16), torch.full_like(down, math.inf)).double()
    spacing = hi - lo
    tol = 1e-5 * spacing  # z itself is the fp32 reference, within ~1e-7 of the kernel's value
    assert bool(((out >= lo - tol) & (out <= hi + tol)).all())
    frac = ((z - lo) / spacing).clamp(0, 1)
    moved = (frac > 0.01) & (frac < 0.99)
    assert int(moved.sum()) > 1000  # the test exercises sub-ulp steps
    err = ((out - z) / spacing)[moved]
    sigma = math.sqrt(float((frac * (1 - frac))[moved].sum())) / int(moved.sum())
    assert abs(float(err.mean())) <= 4 * sigma
    up = (out == hi)[moved].double()
    assert 0.2 < float(up.mean()) < 0.8  # both neighbours occur
    rtn = torch.cat([p.detach().flatten() for p in near16])
    assert torch.equal(rtn, z.float().to(torch.bfloat16))


@needs_triton
def test_foreach_off_and_tiny_budget_match():
    """Chunks of one and chunks cut by a tiny budget run the same kernels, per tensor."""
    results = []
    for options in (dict(foreach=True), dict(foreach=False), dict(foreach_stack_budget=200)):
        params = make_params(SMALL)
        opt = kaon.Lion(params, lr=1e-3, fused="triton", momentum_dtype="int8", **options)
        for i in range(2):
            set_grads(params, i)
            opt.step()
        results.append(params)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------ AdamW with quantized state
ADAMW = [
    {"state_dtype": "int8"},
    {"state_dtype": "4bit"},
    {"state_dtype": ("int8", "bfloat16"), "maximize": True, "weight_decay": 0.0},
    {"state_dtype": ("4bit", "log8"), "weight_decay": 0.1},
    {"state_dtype": ("float32", "log4")},
]


def adamw_pair(kw, steps, shapes=SHAPES, dtype=torch.float32):
    """kaon.AdamW picks its Triton kernel by itself only on CUDA (its fused=True means torch's
    kernel); here the kernel is attached explicitly to run it under the interpreter."""
    params_r = make_params(shapes, dtype)
    ref = kaon.AdamW(params_r, lr=1e-2, fused=False, **kw)
    for i in range(steps):
        set_grads(params_r, i)
        ref.step()
    params_f = clone_params(params_r)
    fused = kaon.AdamW(params_f, lr=1e-2, **kw)
    fused._kernel = kernels.kernel_for(kaon.AdamW)
    fused.load_state_dict(roundtrip(ref.state_dict()))
    return ref, params_r, fused, params_f


@needs_triton
@pytest.mark.parametrize("kw", ADAMW)
def test_adamw_quantized_state_matches_the_reference(kw):
    ref, params_r, fused, params_f = adamw_pair(kw, steps=2)
    step_pair_and_compare_steps(ref, params_r, fused, params_f, 5)
    assert_kernels_ran(fused)
    for pf, pr in zip(params_f, params_r):
        assert sorted(fused.state[pf]) == sorted(ref.state[pr])
        for key, b in ref.state[pr].items():
            a = fused.state[pf][key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            if b.dtype in (torch.int8, torch.uint8):
                packed = b.dtype == torch.uint8 and b.numel() < pr.numel()  # two codes a byte
                for shift in (0, 4) if packed else (0,):
                    mask = 15 if packed else 255
                    diff = (((a.int() >> shift) & mask) - ((b.int() >> shift) & mask)).abs()
                    if b.dtype == torch.int8:
                        diff = (a.int() - b.int()).abs()
                    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01, key
            elif b.dtype == torch.bfloat16:
                assert torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=0), key
            else:
                assert rel(a, b) <= 1e-6, key


@needs_triton
def test_adamw_fused_skips_nonfinite_and_resumes_exactly():
    kw = {"state_dtype": "4bit"}
    ref, params_r, fused, params_f = adamw_pair(kw, steps=1, shapes=SMALL)
    set_grads(params_f, 3)
    params_f[1].grad.view(-1)[0] = float("nan")
    before = params_f[1].detach().clone()
    state_before = {k: v.clone() for k, v in fused.state[params_f[1]].items()}
    saved = roundtrip(fused.state_dict())
    fused.step()
    assert torch.equal(params_f[1], before)
    for key, value in fused.state[params_f[1]].items():
        assert torch.equal(value, state_before[key]), key
    # resume: a fresh fused optimizer from the checkpoint gives the same bits
    params_c = clone_params(params_f)
    twin = kaon.AdamW(params_c, lr=1e-2, **kw)
    twin._kernel = kernels.kernel_for(kaon.AdamW)
    twin.load_state_dict(roundtrip(fused.state_dict()))
    for opt, ps in ((fused, params_f), (twin, params_c)):
        set_grads(ps, 4)
        opt.step()
    for a, b in zip(params_f, params_c):
        assert torch.equal(a, b)
    assert saved["state"]  # the checkpoint held state before the skipped step


# ------------------------------------------------------------------ GPU only
@needs_cuda
@needs_triton
@pytest.mark.parametrize("cls", [kaon.Adakaon, kaon.Lion, kaon.AdaPNM, kaon.Nekaon])
def test_fused_step_does_not_synchronize(cls):
    params = make_params(dtype=torch.bfloat16)
    opt = cls(params, lr=1e-3, fused="triton", momentum_dtype="int8")
    set_grads(params, 0)
    opt.step()  # compile and plan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@needs_triton
@pytest.mark.parametrize("cls", [kaon.Adakaon, kaon.Lion, kaon.AdaPNM, kaon.Nekaon])
def test_cuda_graph_capture_of_step(cls):
    params = make_params()
    opt = cls(params, lr=1e-3, fused="triton", momentum_dtype="int8")
    twin = clone_params(params)
    ref = cls(twin, lr=1e-3, fused="triton", momentum_dtype="int8")
    set_grads(params, 0)
    set_grads(twin, 0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up: plans, pointer tables, compiled kernels
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(params, twin):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
