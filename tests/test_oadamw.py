"""OAdamW: equivalence with optimi.StableAdamW, the Muon path against a plain reference,
``scale``, ``update_proj_gap``, model grouping and bytes per parameter."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from numerics import assert_within_ulps
from torch import nn

import kaon
from kaon import ops
from kaon.optim import oadamw

optimi = pytest.importorskip("optimi")


# ------------------------------------------------------------------ optimi's parity harness
def optimi_model(dims, seed=0) -> nn.Module:
    """optimi's test model: LayerNorm -> Linear (no bias) -> Mish -> Linear (no bias)."""
    torch.manual_seed(seed)
    d_in, d_hidden = dims
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_hidden, bias=False), nn.Mish(),
                         nn.Linear(d_hidden, d_in, bias=False))


def loss_and_grads(model, i, dtype=torch.float32):
    gen = torch.Generator().manual_seed(200 + i)
    d_in = model[0].normalized_shape[0]
    x, t = torch.randn(8, d_in, generator=gen), torch.randn(8, d_in, generator=gen)
    model.zero_grad(set_to_none=True)
    (model(x.to(dtype)).float() - t).pow(2).mean().backward()


def rebuild(opt_kwargs, model, opt):
    """Save, rebuild and reload (weights_only) the kaon optimizer, as optimi's harness does."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = kaon.OAdamW(model.parameters(), **opt_kwargs)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def run_parity(kaon_kwargs, ref_kwargs, dims=(64, 128), steps=20, dtype=torch.float32,
               atol=1e-6, rtol=1e-5):
    """Worst mismatch rate of kaon vs optimi.StableAdamW (fp32) over the run, and the worst
    absolute error. fp32: both get the same gradients. bf16 (kaon's weights in bf16, the
    reference kept in fp32 as in optimi's own bf16 tests): each model takes its own."""
    model = optimi_model(dims)
    ref_model = copy.deepcopy(model)
    model = model.to(dtype)
    opt = kaon.OAdamW(model.parameters(), **kaon_kwargs)
    ref = optimi.StableAdamW(ref_model.parameters(), foreach=False, triton=False, **ref_kwargs)
    worst_rate, worst_abs = 0.0, 0.0
    for i in range(steps):
        loss_and_grads(ref_model, i)
        if dtype == torch.float32:
            for p, q in zip(model.parameters(), ref_model.parameters()):
                p.grad = q.grad.clone()
        else:
            loss_and_grads(model, i, dtype)
        opt.step()
        ref.step()
        if i == steps // 2:
            opt = rebuild(kaon_kwargs, model, opt)
        bad = total = 0
        for p, q in zip(model.parameters(), ref_model.parameters()):
            close = torch.isclose(p.detach().float(), q.detach(), atol=atol, rtol=rtol)
            bad, total = bad + int((~close).sum()), total + close.numel()
            worst_abs = max(worst_abs, (p.detach().float() - q.detach()).abs().max().item())
        worst_rate = max(worst_rate, bad / total)
    return worst_rate, worst_abs


VARIANTS = {  # optimi's three test variants, plus a second beta pair
    "base": dict(lr=1e-3, weight_decay=0.0),
    "decoupled": dict(lr=1e-3, weight_decay=0.01),
    "fully-decoupled": dict(lr=1e-3, weight_decay=1e-5, decouple_lr=True),
    "betas-eps": dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
@pytest.mark.parametrize("dims", [(64, 64), (64, 128)], ids=["64x64", "64x128"])
def test_matches_optimi_stableadamw_fp32(variant, dims):
    # fp32: every element within atol 1e-6 + rtol 1e-5 (optimi's own fp32 tolerances, without
    # its mismatch budget), at every step, across a mid-run checkpoint reload
    rate, _ = run_parity(variant, variant, dims=dims)
    assert rate == 0.0


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_matches_optimi_stableadamw_bf16_kahan(variant):
    """bf16 weights with Kahan (the default) against the fp32 reference, with optimi's bf16
    budget: atol 1e-3 + rtol 1e-2 and at most 1 % of the elements outside. The bf16 weights
    start 1 bf16 rounding away from the fp32 ones (spacing 2^-9 relative), which is about the
    tolerance, so a small rate is expected; a wrong formula gives far more."""
    rate, worst = run_parity(variant, variant, dtype=torch.bfloat16, atol=1e-3, rtol=1e-2)
    assert rate <= 0.01
    assert worst < 1e-2


def kahan_mismatches(kaon_kwargs, ref_kwargs, steps=20):
    """Elements where the Kahan-compensated bf16 weight ``p + shift`` is not within rtol 2^-10
    (1/4 to 1/8 of a bf16 spacing) + atol 1e-6 of the fp32 reference, summed over the steps.
    Both start from the same bf16-representable weights and get the same (bf16) gradients."""
    ref_model = optimi_model((64, 128))
    with torch.no_grad():
        for q in ref_model.parameters():
            q.copy_(q.bfloat16().float())
    model = copy.deepcopy(ref_model).bfloat16()
    opt = kaon.OAdamW(model.parameters(), **kaon_kwargs)
    ref = optimi.StableAdamW(ref_model.parameters(), foreach=False, triton=False, **ref_kwargs)
    bad = 0
    for i in range(steps):
        loss_and_grads(ref_model, i)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = q.grad.bfloat16()
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            exact = p.detach().float() + opt.state[p]["shift"].float().view_as(p)
            bad += int((~torch.isclose(exact, q.detach(), rtol=2**-10, atol=1e-6)).sum())
    return bad


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_bf16_kahan_weights_track_the_fp32_reference(variant):
    """The formula check for bf16: the weight plus its Kahan compensation is the fp32
    trajectory to a fraction of a bf16 spacing (the compensation is itself bf16)."""
    assert kahan_mismatches(variant, variant) == 0


@pytest.mark.parametrize("wrong", [dict(lr=1.01e-3), dict(betas=(0.9, 0.98))],
                         ids=["lr+1%", "beta2"])
def test_bf16_kahan_check_detects_a_wrong_coefficient(wrong):
    base = VARIANTS["base"]
    assert kahan_mismatches(base, {**base, **wrong}) > 1000


WRONG = {
    "beta1": (dict(betas=(0.9, 0.99)), dict(betas=(0.89, 0.99))),
    "beta2": (dict(betas=(0.9, 0.99)), dict(betas=(0.9, 0.98))),
    "eps": (dict(eps=1e-3), dict(eps=1.1e-3)),
    "weight_decay": (dict(weight_decay=0.1), dict(weight_decay=0.09)),
    "fully-decoupled": (dict(weight_decay=0.1, decouple_lr=True), dict(weight_decay=0.1)),
}


@pytest.mark.parametrize(("kaon_kwargs", "ref_kwargs"), WRONG.values(), ids=WRONG.keys())
def test_parity_check_detects_a_wrong_coefficient(kaon_kwargs, ref_kwargs):
    rate, _ = run_parity({"lr": 1e-2, **kaon_kwargs}, {"lr": 1e-2, "max_lr": 1e-3, **ref_kwargs})
    assert rate > 0.05


def test_rms_stabilization_is_active_in_the_parity_run():
    """The parity runs must exercise eta = lr / RMS: with a spike in the gradient scale the
    RMS exceeds 1 and a version without the division would disagree."""
    p = torch.ones(64, 64, requires_grad=True)
    opt = kaon.OAdamW([p], lr=1e-3, weight_decay=0.0)
    p.grad = torch.full_like(p, 1e-3)
    opt.step()
    before = p.detach().clone()
    p.grad = torch.full_like(p, 1.0)  # 1000x the previous gradient: RMS well above 1
    opt.step()
    step = (before - p).abs().max().item()
    assert step < 0.6e-3  # an unstabilized Adam step would be about 1e-3


# ---------------------------------------------------------------- Muon path: plain reference
A, B, C = ops.NS_COEFFICIENTS


def ns_plain(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Newton-Schulz on one matrix, written out: wide orientation, Frobenius normalization."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(x.norm().item(), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return (x.T if tall else x).float()


def ns_plain_factor(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The left factor L of the iteration (NS(g) = L X0 in the wide orientation)."""
    x = g.double()
    if x.shape[0] > x.shape[1]:
        x = x.T
    x = x / max(x.norm().item(), 1e-7)
    factor = torch.eye(x.shape[0], dtype=torch.float64)
    for _ in range(steps):
        gram = x @ x.T
        poly = A * torch.eye(x.shape[0], dtype=torch.float64) + B * gram + C * gram @ gram
        x, factor = poly @ x, poly @ factor
    return factor


class StableAdamWMuonReference:
    """OAdamW on one fp32 tensor from the specification: orthogonalize (matrices), then
    StableAdamW with debiased betas, RMS-stabilized lr, decoupled weight decay, ``scale``."""

    def __init__(self, p, lr, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, muon=True,
                 ns_steps=5, update_proj_gap=1, scale=1.0):
        self.p, self.lr, self.betas, self.wd, self.eps = p, lr, betas, weight_decay, eps
        self.muon, self.ns_steps, self.gap, self.scale = muon, ns_steps, update_proj_gap, scale
        self.m = torch.zeros_like(p.reshape(p.shape[0], -1) if p.ndim >= 2 else p)
        self.v = torch.zeros_like(self.m)
        self.t = 0
        self.factor = None

    def orthogonalize(self, g):
        if self.gap > 1 and (self.t - 1) % self.gap == 0:
            self.factor = ns_plain_factor(g, self.ns_steps)
        if self.gap > 1:
            x = g.double()
            tall = x.shape[0] > x.shape[1]
            x = (x.T if tall else x) / max(x.norm().item(), 1e-7)
            out = self.factor @ x
            return (out.T if tall else out).float()
        return ns_plain(g, self.ns_steps)

    @torch.no_grad()
    def step(self, grad):
        self.t += 1
        b1, b2 = self.betas
        g = grad.reshape(self.m.shape).float()
        orthogonal = self.muon and self.p.ndim >= 2
        if orthogonal:
            g = self.orthogonalize(g)
        b1_hat = (b1**self.t - b1) / (b1**self.t - 1)
        b2_hat = (b2**self.t - b2) / (b2**self.t - 1)
        self.m = b1_hat * self.m + (1 - b1_hat) * g
        self.v = b2_hat * self.v + (1 - b2_hat) * g * g
        rms = (g * g / self.v.clamp_min(self.eps**2)).mean().sqrt().item()
        eta = self.lr / max(1.0, rms)
        update = self.m / (self.v.sqrt() + self.eps) * (self.scale if orthogonal else 1.0)
        p = self.p.reshape(self.m.shape)
        p.mul_(1 - eta * self.wd).sub_(eta * update)


class MuonNet(nn.Module):
    """Square, wide and tall matrices, a conv kernel (the original crashed on it), 1-D."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.wide = nn.Linear(8 * 4 * 4, 24)
        self.square = nn.Linear(24, 24)
        self.tall = nn.Linear(24, 40)

    def forward(self, x):
        h = self.conv(x).tanh().flatten(1)
        return self.tall(self.square(self.wide(h).tanh()).tanh())


def muon_grads(model, i):
    gen = torch.Generator().manual_seed(300 + i)
    x, t = torch.randn(8, 3, 6, 6, generator=gen), torch.randn(8, 40, generator=gen)
    model.zero_grad(set_to_none=True)
    (model(x) - t).pow(2).mean().backward()


# eps 1e-2: the first Adam step is about g / (|g| + eps), whose slope 1/eps magnifies the fp32
# rounding of Newton-Schulz (~1e-7) at entries near zero; with eps = 1e-2 (about a tenth of a
# typical entry, so still a real term) the agreement is a few 1e-6 (1e-4 of one lr step)
MUON = dict(lr=1e-2, weight_decay=0.05, eps=1e-2, ns_steps=5, scale=0.7)


def muon_parity_error(kaon_kwargs, ref_kwargs, steps=8):
    torch.manual_seed(0)
    model = MuonNet()
    ref_params = [p.detach().clone() for p in model.parameters()]
    opt = kaon.OAdamW([{"params": list(model.parameters()), "muon": True}], **kaon_kwargs)
    refs = [StableAdamWMuonReference(p, **ref_kwargs) for p in ref_params]
    worst = 0.0
    for i in range(steps):
        muon_grads(model, i)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for ref, g in zip(refs, grads):
            ref.step(g)
        for p, q in zip(model.parameters(), ref_params):
            worst = max(worst, (p.detach() - q).abs().max().item())
    return worst


@pytest.mark.parametrize("gap", [1, 3])
def test_muon_path_matches_plain_reference(gap):
    kwargs = {**MUON, "update_proj_gap": gap}
    assert muon_parity_error(kwargs, kwargs) < 5e-6


@pytest.mark.parametrize("wrong", [dict(ns_steps=4), dict(scale=0.69), dict(weight_decay=0.04),
                                   dict(betas=(0.9, 0.98)), dict(update_proj_gap=2)],
                         ids=["ns_steps", "scale", "weight_decay", "beta2", "gap"])
def test_muon_reference_check_detects_a_wrong_coefficient(wrong):
    kwargs = {**MUON, "update_proj_gap": 3}
    assert muon_parity_error(kwargs, {**kwargs, **wrong}) > 5e-5


def test_scale_scales_the_muon_update_only():
    def first_step(scale):
        torch.manual_seed(0)
        model = MuonNet()
        opt = kaon.OAdamW([
            {"params": [model.wide.weight, model.wide.bias], "muon": True},
            {"params": [model.square.weight]},
        ], lr=1e-2, weight_decay=0.0, scale=scale)
        before = [p.detach().clone() for p in model.parameters()]
        muon_grads(model, 0)
        opt.step()
        names = [name for name, _ in model.named_parameters()]
        steps = {n: b - p.detach() for n, p, b in zip(names, model.parameters(), before)}
        weights = {n: (b, p.detach()) for n, p, b in zip(names, model.parameters(), before)}
        return steps, weights

    (one, w1), (two, w2) = first_step(1.0), first_step(2.0)
    # The orthogonalized update is the same and doubles exactly (eta * 2), but each step is
    # recovered as ``before - round(before - delta)``: two roundings of half an ulp of the
    # weights per run, so 1 ulp for scale=2, 2 ulps for twice the scale=1 step: 3 ulps of the
    # weights (not of the step: the weights are what was rounded).
    assert_within_ulps(two["wide.weight"], 2 * one["wide.weight"], 3,
                       *w1["wide.weight"], *w2["wide.weight"], msg="scale=2 vs 2 x scale=1")
    assert one["wide.weight"].abs().max() > 0
    assert torch.equal(two["wide.bias"], one["wide.bias"])  # 1-D in a Muon group: not scaled
    assert torch.equal(two["square.weight"], one["square.weight"])  # Adam group


def test_update_proj_gap_uses_fresh_gradients():
    """Between refreshes the step still depends on the current gradient (the original reused
    the stale orthogonalized gradient and ignored it)."""

    def second_step(flip):
        p = torch.nn.Parameter(torch.randn(16, 32, generator=torch.Generator().manual_seed(0)))
        opt = kaon.OAdamW([p], lr=1e-2, muon=True, update_proj_gap=4, weight_decay=0.0)
        gen = torch.Generator().manual_seed(1)
        p.grad = torch.randn(16, 32, generator=gen)
        opt.step()
        before = p.detach().clone()
        g = torch.randn(16, 32, generator=gen)
        p.grad = -g if flip else g
        opt.step()
        assert opt.state[p]["ns_factor_age"] == 1  # the second step used the cached factor
        return before - p.detach()

    assert not torch.allclose(second_step(False), second_step(True))


def test_factor_form_equals_newton_schulz():
    g = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(2))
    for matrix in (g, g.mT.contiguous()):
        out, offset = oadamw._newton_schulz_with_factor(matrix, 5, torch.float32)
        torch.testing.assert_close(out, ops.newton_schulz(matrix, 5, dtype=torch.float32),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(oadamw._apply_factor(matrix, offset, torch.float32), out,
                                   atol=1e-5, rtol=1e-5)
        factor = ns_plain_factor(matrix[0], 5).float()
        torch.testing.assert_close(offset[0] + torch.eye(12), factor, atol=1e-5, rtol=1e-5)


def gap_model_and_opt(**kwargs):
    torch.manual_seed(0)
    model = MuonNet()
    opt = kaon.OAdamW(model.parameters(), lr=1e-2, muon=True, update_proj_gap=3, **kwargs)
    return model, opt


def test_update_proj_gap_cache_checkpoints_and_batches_exactly():
    model, opt = gap_model_and_opt()
    for i in range(4):  # mid-cadence: the next step uses the cached factor
        muon_grads(model, i)
        opt.step()
    factor = opt.state[model.square.weight]["ns_factor"]
    assert type(factor) is torch.Tensor and factor.shape == (24, 24)
    assert opt.state[model.tall.weight]["ns_factor"].shape == (24, 24)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for i in range(4, 8):
        muon_grads(model, i)
        opt.step()
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed, opt2 = gap_model_and_opt(seed=5)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    for i in range(4, 8):
        muon_grads(resumed, i)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))

    # batched == per parameter, and step_param == step
    loop_model, loop_opt = gap_model_and_opt(foreach=False)
    hook_model, hook_opt = gap_model_and_opt()
    for i in range(8):
        muon_grads(loop_model, i)
        loop_opt.step()
        muon_grads(hook_model, i)
        for p in hook_model.parameters():
            hook_opt.step_param(p, hook_opt.param_groups[0])
    for other in (loop_model, hook_model):
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_parameters_on_different_cadences_in_one_batch():
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.randn(8, 8))
    c = torch.nn.Parameter(b.detach().clone())
    batched = kaon.OAdamW([a, b], lr=1e-2, muon=True, update_proj_gap=2)
    alone = kaon.OAdamW([c], lr=1e-2, muon=True, update_proj_gap=2)
    gen = torch.Generator().manual_seed(0)
    for i in range(5):
        a.grad = torch.randn(8, 8, generator=gen)
        b.grad = torch.randn(8, 8, generator=gen) if i else None  # b joins one step late
        if b.grad is not None:
            c.grad = b.grad.clone()
            alone.step()
        batched.step()
    assert torch.equal(b, c)


# ------------------------------------------------------------------- grouping, Kahan, bytes
class LanguageModel(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens):
        h = self.embed(tokens)
        h = self.conv(h.mT).mT
        return self.head(self.mlp(self.norm(h)).relu())


@pytest.mark.parametrize("tied", [False, True])
def test_module_is_grouped_hidden_matrices_to_muon(tied):
    model = LanguageModel(tied)
    model.norm.bias.requires_grad_(False)
    opt = kaon.OAdamW(model, lr=1e-3)
    assert kaon.OAdamW.supports_muon_routing
    muon, adam = opt.param_groups
    assert muon["muon"] and not adam["muon"]
    assert {id(p) for p in muon["params"]} == {id(model.conv.weight), id(model.mlp.weight)}
    expected = [model.embed.weight, model.conv.bias, model.norm.weight, model.mlp.bias]
    if not tied:
        expected.append(model.head.weight)
    assert {id(p) for p in adam["params"]} == {id(p) for p in expected}
    tokens = torch.randint(0, 50, (4, 7))
    for _ in range(3):
        opt.zero_grad()
        model(tokens).logsumexp(-1).mean().backward()
        opt.step()
    assert opt.state[model.conv.weight]["exp_avg"].shape == (16, 48)  # conv: [out, in*k]


def test_bf16_kahan_is_the_engine_buffer():
    p = torch.nn.Parameter(torch.randn(32, 32).bfloat16())
    opt = kaon.OAdamW([p], lr=1e-3)
    p.grad = torch.randn(32, 32).bfloat16()
    opt.step()
    assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq", "step", "shift"}
    assert opt.state[p]["shift"].dtype == torch.bfloat16


def test_max_lr_defaults_to_each_groups_lr():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = kaon.OAdamW([{"params": [a]}, {"params": [b], "lr": 1e-2}], lr=1e-3, decouple_lr=True)
    assert [g["max_lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert kaon.OAdamW([a], lr=1e-3).param_groups[0]["max_lr"] is None


def test_bytes_per_param():
    shapes = [(1024, 1024), (2048, 512), (512, 2048), (1024,), (1024,)]
    numel = sum(torch.Size(s).numel() for s in shapes)
    cases = [(torch.float32, {}, 8.0), (torch.bfloat16, {}, 10.0),
             (torch.float32, {"muon": True, "update_proj_gap": 4},
              8.0 + 4 * (1024**2 + 2 * 512**2) / numel)]  # + the cached k x k factors
    for dtype, kwargs, expected in cases:
        params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
        opt = kaon.OAdamW(params, **kwargs)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        assert expected <= opt.bytes_per_param() < expected + 0.01, (kwargs, opt.bytes_per_param())


def test_docs_page_runs_and_documents_every_argument_and_state_key():
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "oadamw.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        exec(compile(block, "docs/oadamw.md", "exec"), {})
    for name in inspect.signature(kaon.OAdamW).parameters:
        assert f"`{name}`" in text, name
    for key in ("exp_avg", "exp_avg_sq", "step", "shift", "ns_factor", "ns_factor_age"):
        assert f"`{key}`" in text, key


def test_update_proj_gap_batched_equals_per_parameter_on_awkward_shapes():
    """The cached-factor path must be as batch-independent as the plain Newton-Schulz one."""
    from test_conformance import assert_same, awkward_grads, awkward_params

    runs = []
    for foreach in (False, True):
        params = awkward_params()
        opt = kaon.OAdamW(params, lr=1e-2, muon=True, update_proj_gap=2, weight_decay=0.0,
                          foreach=foreach)
        for i in range(5):
            awkward_grads(params, i)
            opt.step()
        runs.append(params)
    assert_same(*runs)
