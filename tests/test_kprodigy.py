"""KProdigy against the reference ``prodigyopt.Prodigy`` 1.1.2, plus its own features."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
from torch import nn

import kaon
from kaon import bench

STEPS = 100


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Tanh(), nn.Linear(64, 64),
                         nn.Tanh(), nn.Linear(64, 4))


def data(steps: int, learnable: bool = False):
    """Random regression batches; the default target is hard to fit (the parity runs), the
    ``learnable`` one is fit well within a few dozen steps."""
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 4, generator=gen)
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen)
        yield x, torch.tanh(x @ teacher) if learnable else torch.sin(x @ teacher)


def trajectory(make_opt, steps: int = STEPS, seed: int = 0, learnable: bool = False):
    """(final parameters, D after every step, losses) of a small regression run."""
    model = make_model(seed)
    opt = make_opt(model.parameters())
    ds, losses = [], []
    for x, y in data(steps, learnable):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        ds.append(opt.param_groups[0]["d"])
        losses.append(loss.item())
    return [p.detach().clone() for p in model.parameters()], ds, losses


def reference(**kwargs):
    prodigyopt = pytest.importorskip("prodigyopt")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice for decoupled decay
        return trajectory(lambda params: prodigyopt.Prodigy(params, **kwargs))


def relative_d_error(ds_ref, ds):
    return max(abs(a - b) / a for a, b in zip(ds_ref, ds))


def max_abs_error(ps_ref, ps):
    return max((a - b).abs().max().item() for a, b in zip(ps_ref, ps))


PARITY = {
    "defaults": {},
    "slice_p": {"slice_p": 3},
    "slice_p-11": {"slice_p": 11},
    "weight_decay": {"weight_decay": 0.01},
    "bias_correction": {"use_bias_correction": True},
    "all": {"slice_p": 5, "weight_decay": 0.01, "use_bias_correction": True},
    "beta1-0": {"betas": (0.0, 0.999)},
    "safeguard-d0-dcoef": {"safeguard_warmup": True, "d0": 1e-5, "d_coef": 0.5},
    "growth_rate-beta3": {"growth_rate": 1.05, "beta3": 0.99},
}


@pytest.mark.parametrize("kwargs", PARITY.values(), ids=PARITY.keys())
def test_matches_prodigyopt(kwargs):
    """D within 1e-6 relative and weights within 1e-6 absolute over 100 steps.

    Not bit for bit: the reference's per-tensor ``torch.dot`` is MKL's ``sdot``, whose rounding
    even depends on the inputs' memory alignment; kaon sums the same products in fixed chunks.
    Every other operation is the reference's, so the runs are bit-identical until D first moves.
    """
    ps_ref, ds_ref, losses_ref = reference(**kwargs)
    ps, ds, losses = trajectory(lambda params: kaon.KProdigy(params, **kwargs))
    assert ds_ref[-1] > 10 * ds_ref[0]  # D really adapted
    assert relative_d_error(ds_ref, ds) <= 1e-6
    assert max_abs_error(ps_ref, ps) <= 1e-6
    assert abs(losses[-1] - losses_ref[-1]) <= 1e-5 and losses[-1] < losses[0]


def test_coupled_weight_decay_tracks_prodigyopt():
    """decouple=False grows D 30x larger here, which amplifies rounding differences: the
    reference itself moves by ~5e-5 when only its dot products are rounded differently."""
    kwargs = {"weight_decay": 0.1, "decouple": False}
    ps_ref, ds_ref, _ = reference(**kwargs)
    ps, ds, _ = trajectory(lambda params: kaon.KProdigy(params, **kwargs))
    assert relative_d_error(ds_ref, ds) <= 1e-6
    assert max_abs_error(ps_ref, ps) <= 1e-3


def test_bit_identical_to_prodigyopt_while_d_is_d0():
    """With bias correction D stays at d0 for the first steps: nothing differs at all then."""
    kwargs = {"use_bias_correction": True}
    prodigyopt = pytest.importorskip("prodigyopt")
    for steps in (1, 3):
        ref = trajectory(lambda params: prodigyopt.Prodigy(params, **kwargs), steps=steps)
        ours = trajectory(lambda params: kaon.KProdigy(params, **kwargs), steps=steps)
        assert ref[1] == ours[1] == [1e-6] * steps
        for a, b in zip(ref[0], ours[0]):
            assert torch.equal(a, b)


def test_parity_test_detects_a_wrong_coefficient(monkeypatch):
    """The parity check fails when one coefficient of the rule is changed (beta3 here)."""
    pytest.importorskip("prodigyopt")
    ps_ref, ds_ref, _ = reference()
    original = kaon.KProdigy._statistics

    def wrong(self, batch):
        self._scalars[id(batch.group)]["beta3"] *= 0.999
        return original(self, batch)

    monkeypatch.setattr(kaon.KProdigy, "_statistics", wrong)
    ps, ds, _ = trajectory(lambda params: kaon.KProdigy(params))
    assert relative_d_error(ds_ref, ds) > 1e-4


def test_d_is_visible_and_frozen_groups_do_not_move():
    model = make_model()
    opt = kaon.KProdigy(model.parameters())
    assert opt.get_d() == 1e-6 == opt.param_groups[0]["d"] and not opt.uses_independent_d()
    for x, y in data(20):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    group = opt.param_groups[0]
    assert isinstance(group["d"], float) and group["d"] > 1e-6 and group["k"] == 20
    assert opt.get_d() == group["d"] and group["d_max"] >= group["d"]
    assert {"d_numerator", "d_denom", "d_hat"} <= set(group)


def test_two_groups_with_different_lrs_get_their_own_d_and_both_learn():
    model = make_model()
    first, last = model[0], model[5]
    opt = kaon.KProdigy([
        {"params": first.parameters(), "lr": 1.0},
        {"params": list(model[1].parameters()) + list(model[3].parameters()), "lr": 1.0},
        {"params": last.parameters(), "lr": 0.5},
    ])
    assert opt.uses_independent_d()
    start = [p.detach().clone() for p in model.parameters()]
    losses = []
    for x, y in data(80, learnable=True):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ds = [g["d"] for g in opt.param_groups]
    assert len(set(ds)) == 3 and all(d > 1e-5 for d in ds)
    assert losses[-1] < 0.5 * losses[0]
    for p, p0 in zip(model.parameters(), start):
        assert not torch.equal(p, p0)


def test_shared_d_rejects_different_lrs_before_anything_changes():
    model = make_model()
    opt = kaon.KProdigy([{"params": model[0].parameters()},
                         {"params": model[5].parameters(), "lr": 0.5}], independent_d=False)
    x, y = next(data(1))
    (model(x) - y).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="independent_d=True"):
        opt.step()
    assert not opt.state
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_shared_d_with_a_frozen_group_matches_prodigyopt():
    """independent_d=False with an lr-0 group: one D, the frozen group is untouched."""
    prodigyopt = pytest.importorskip("prodigyopt")

    def groups(params):
        params = list(params)
        return [{"params": params[:-2]}, {"params": params[-2:], "lr": 0.0}]

    ref = trajectory(lambda params: prodigyopt.Prodigy(groups(params)), steps=40)
    ours = trajectory(lambda params: kaon.KProdigy(groups(params), independent_d=False),
                      steps=40)
    assert relative_d_error(ref[1], ours[1]) <= 1e-6
    assert max_abs_error(ref[0], ours[0]) <= 1e-6
    start = [p.detach() for p in make_model().parameters()]
    assert torch.equal(ours[0][-1], start[-1]) and torch.equal(ours[0][-2], start[-2])


def test_gradient_release_is_refused_with_the_reason():
    model = make_model()
    opt = kaon.KProdigy(model.parameters())
    x, y = next(data(1))
    (model(x) - y).pow(2).mean().backward()
    group = opt.param_groups[0]
    for call in (lambda: opt.step_param(group["params"][0], group),
                 lambda: opt.step_parameter(group["params"][0], group, 0)):
        with pytest.raises(RuntimeError, match="reduction over every parameter"):
            call()
    assert not opt.state


def test_zero_initialized_slice_keeps_a_scalar_p0_and_d_update_freq_skips_statistics():
    a = nn.Parameter(torch.randn(8, 40) * 0.1)
    b = nn.Parameter(torch.zeros(40, 8))  # a LoRA B factor
    opt = kaon.KProdigy([a, b], slice_p=11, d_update_freq=3)
    gen = torch.Generator().manual_seed(0)
    numerators = []
    for _ in range(6):
        for p in (a, b):
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        numerators.append(opt.param_groups[0]["d_numerator"])
    assert opt.state[b]["p0"].shape == (1,) and opt.state[a]["p0"].shape == (math.ceil(320 / 11),)
    assert opt.state[a]["s"].shape == opt.state[b]["s"].shape == (30,)
    # D statistics at k = 0 and 3 only
    assert numerators[0] == numerators[1] == numerators[2] != numerators[3] == numerators[5]


@pytest.mark.parametrize("momentum_dtype", ["bfloat16", "int8", "4bit"])
def test_memory_toolkit_tracks_the_fp32_run(momentum_dtype):
    """Quantized momentum and the factored second moment change the run a little, not its
    course: D and the final loss stay close to the full-precision run."""
    base = trajectory(lambda params: kaon.KProdigy(params), steps=60, learnable=True)
    run = trajectory(lambda params: kaon.KProdigy(params, momentum_dtype=momentum_dtype,
                                                   second_moment="factored", slice_p=11),
                     steps=60, learnable=True)
    assert 0.5 < run[1][-1] / base[1][-1] < 2.0
    assert run[2][-1] < 0.8 * run[2][0]
    assert abs(run[2][-1] - base[2][-1]) < 0.1 * base[2][0]


def test_bf16_weights_learn():
    model = make_model().to(torch.bfloat16)
    opt = kaon.KProdigy(model.parameters(), second_moment="factored", momentum_dtype="4bit")
    losses = []
    for x, y in data(60, learnable=True):
        opt.zero_grad()
        loss = (model(x.bfloat16()).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert opt.state[model[0].weight]["m"].dtype == torch.uint8
    assert losses[-1] < 0.8 * losses[0] and opt.get_d() > 1e-5


def llm_like_params():
    shapes = [(1024, 1024), (4096, 1024), (1024, 4096), (1024, 1024), (1024,), (1024,), (4096,)]
    return [nn.Parameter(torch.randn(s) * 0.02) for s in shapes]


@pytest.mark.parametrize(("momentum_dtype", "target"), [("4bit", 1.3), ("int8", 1.8)])
def test_bytes_per_param_targets(momentum_dtype, target):
    params = llm_like_params()
    opt = kaon.KProdigy(params, second_moment="factored", momentum_dtype=momentum_dtype,
                        slice_p=11)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.bytes_per_param() <= target


def test_bench_suites_exist_for_the_benchmark_script():
    assert bench.suite_shapes("llm", quick=True) and bench.suite_shapes("lora", quick=True)


def test_independent_d_must_be_a_bool_or_none():
    with pytest.raises(TypeError, match="independent_d"):
        kaon.KProdigy(make_model().parameters(), independent_d="auto")


def test_docs_page_example_runs_and_documents_every_argument_and_state_key():
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "kprodigy.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    namespace: dict = {}
    exec(compile(blocks[0], "docs/kprodigy.md", "exec"), namespace)
    assert namespace["effective_lr"] > 0 and namespace["opt"].state
    for name in inspect.signature(kaon.KProdigy).parameters:
        if name != "params":
            assert f"`{name}`" in text, name
    for key in ("`s`", "`p0`", "`m`", "`m_scale`", "`v`", "`row`", "`col`", "`shift`", "`d`",
                "`d_max`", "`d_numerator`", "`d_hat`", "`k`"):
        assert key in text, key


# ------------------------------------------------------------------ compile=True (inductor)
def compiled_or_skip():
    from kaon.kernels import compiled

    if not compiled.available("cpu"):
        pytest.skip("torch.compile does not work on this machine (no C++ compiler?)")


COMPILED_PARITY = {
    "defaults": {},
    "slice_p-wd-bias": {"slice_p": 5, "weight_decay": 0.01, "use_bias_correction": True},
}


@pytest.mark.parametrize("kwargs", COMPILED_PARITY.values(), ids=COMPILED_PARITY.keys())
def test_compiled_kernels_match_prodigyopt(kwargs):
    """The compiled passes fuse the arithmetic (contracted multiply-adds, their own summation
    order), so they are not bit-identical to the eager rule, but they track the reference as
    closely: D within 3e-6 relative (1.4e-6 measured), weights within 1e-6 absolute."""
    compiled_or_skip()
    ps_ref, ds_ref, losses_ref = reference(**kwargs)
    ps, ds, losses = trajectory(lambda params: kaon.KProdigy(params, compile=True, **kwargs))
    assert ds_ref[-1] > 10 * ds_ref[0]
    assert relative_d_error(ds_ref, ds) <= 3e-6
    assert max_abs_error(ps_ref, ps) <= 1e-6
    assert abs(losses[-1] - losses_ref[-1]) <= 1e-5


def test_compiled_kernels_run_and_share_the_state_format(monkeypatch):
    """compile=True steps with the compiled kernels (not the eager rule), stays with the eager
    run, keeps the same state keys and dtypes, and its checkpoint loads into the eager path."""
    compiled_or_skip()
    from kaon.kernels import compiled

    requested = []
    real = compiled.compiled
    monkeypatch.setattr(compiled, "compiled", lambda fn: requested.append(fn.__name__) or real(fn))
    eager = trajectory(lambda params: kaon.KProdigy(params), steps=5)
    assert not requested
    model = make_model()
    opt = kaon.KProdigy(model.parameters(), compile=True)
    for x, y in data(5):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    assert {"kprodigy_statistics", "kprodigy_update"} == set(requested)
    assert max_abs_error(eager[0], [p.detach() for p in model.parameters()]) <= 1e-6
    plain = kaon.KProdigy(make_model().parameters())
    plain.load_state_dict(opt.state_dict())
    for a, b in zip(plain.state.values(), opt.state.values()):
        assert {k: v.dtype for k, v in a.items()} == {k: v.dtype for k, v in b.items()}


def test_compile_flag_is_validated():
    with pytest.raises(TypeError, match="compile must be True or False"):
        kaon.KProdigy(make_model().parameters(), compile="yes")


def test_compiled_path_keeps_the_nonfinite_policy():
    """A chunk with a non-finite gradient runs the eager rule, which skips that tensor."""
    compiled_or_skip()
    gen = torch.Generator().manual_seed(0)
    a, b = (nn.Parameter(torch.randn(32, 16, generator=gen)) for _ in range(2))
    opt = kaon.KProdigy([a, b], compile=True)
    for step in range(3):
        a.grad = torch.randn(32, 16, generator=gen)
        b.grad = torch.randn(32, 16, generator=gen)
        if step == 2:
            b.grad[3, 4] = float("nan")
            before_b, before_a = b.detach().clone(), a.detach().clone()
            state_b = {k: v.clone() for k, v in opt.state[b].items()}
        opt.step()
    assert torch.equal(b, before_b) and not torch.equal(a, before_a)
    assert all(torch.equal(v, state_b[k]) for k, v in opt.state[b].items())
    assert all(torch.isfinite(p).all() for p in (a, b))


def test_gradients_are_checked_once_per_step(monkeypatch):
    """The update pass reuses the statistics pass's non-finite check of each chunk."""
    model = make_model()
    opt = kaon.KProdigy(model.parameters())
    x, y = next(data(1))
    (model(x) - y).pow(2).mean().backward()
    opt.step()  # plans built
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(1) or real(t))
    opt.step()
    chunks = len(next(iter(opt._plans[(id(opt.param_groups[0]), False)].values())))
    assert len(calls) == chunks
    assert opt._finite_memo is None  # the memo lives only inside a step
