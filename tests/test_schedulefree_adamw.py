"""ScheduleFreeAdamW: equivalence with schedulefree.AdamWScheduleFree, train/eval, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from numerics import assert_within_ulps
from torch import nn

import kaon

schedulefree = pytest.importorskip("schedulefree")


def mlp(seed=0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 6)).to(dtype)


def set_grads(model, i, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + i)
    x, t = torch.randn(16, 12, generator=gen), torch.randn(16, 6, generator=gen)
    model.zero_grad(set_to_none=True)
    (model(x.to(dtype)).float() - t).pow(2).mean().backward()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def max_error(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def parity_error(kaon_kwargs, ref_kwargs, steps=50, ref_foreach=False):
    """Largest |kaon - reference| over the run (train point every step, eval point at the end).

    Both get the same gradients (taken at kaon's weights; the reference changes its gradients
    in place, so it gets copies) so only the optimizers' arithmetic differs.
    """
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = kaon.ScheduleFreeAdamW(model.parameters(), **kaon_kwargs)
    ref = schedulefree.AdamWScheduleFree(ref_model.parameters(), foreach=ref_foreach, **ref_kwargs)
    ref.train()
    worst = 0.0
    for i in range(steps):
        set_grads(model, i)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        worst = max(worst, max_error(model.parameters(), ref_model.parameters()))
    for p, q in zip(model.parameters(), ref_model.parameters()):
        worst = max(worst, (opt.state[p]["z"] - ref.state[q]["z"]).abs().max().item())
    opt.eval()
    ref.eval()
    return max(worst, max_error(model.parameters(), ref_model.parameters()))


CONFIGS = {
    "defaults": {},
    "warmup-wd": dict(lr=0.01, warmup_steps=10, weight_decay=0.05),
    "betas-eps": dict(lr=0.005, betas=(0.8, 0.99), eps=1e-6),
    "weighting": dict(lr=0.02, warmup_steps=20, r=0.5, weight_lr_power=1.0),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("ref_foreach", [False, True], ids=["ref-loop", "ref-foreach"])
def test_matches_schedulefree_reference(config, ref_foreach):
    ref_config = {"lr": 0.025, **config}  # the reference's own default lr is 0.0025
    assert parity_error(config, ref_config, ref_foreach=ref_foreach) < 1e-6


WRONG = {
    "beta1": ({}, dict(betas=(0.89, 0.999))),
    "beta2": ({}, dict(betas=(0.9, 0.99))),
    "eps": (dict(eps=1e-4), dict(eps=1e-5)),
    "weight_decay": (dict(weight_decay=0.05), dict(weight_decay=0.045)),
    "warmup": (dict(warmup_steps=10), dict(warmup_steps=11)),
    "weight_lr_power": (dict(warmup_steps=10), dict(warmup_steps=10, weight_lr_power=1.0)),
    "r": ({}, dict(r=0.1)),
}


@pytest.mark.parametrize(("kaon_kwargs", "ref_kwargs"), WRONG.values(), ids=WRONG.keys())
def test_parity_check_detects_a_wrong_coefficient(kaon_kwargs, ref_kwargs):
    ref_kwargs = {"lr": 0.025, **ref_kwargs}
    assert parity_error(kaon_kwargs, ref_kwargs) > 1e-5


# ----------------------------------------------------------------------------- train / eval
def trained(steps=5, dtype=torch.float32, **kwargs):
    model = mlp(dtype=dtype)
    opt = kaon.ScheduleFreeAdamW(model.parameters(), **kwargs)
    for i in range(steps):
        set_grads(model, i, dtype)
        opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["stochastic_rounding", "kahan"])
def test_eval_then_train_restores_the_weights_exactly(dtype, method):
    model, opt = trained(dtype=dtype, bf16_method=method)
    y = params_of(model)
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    assert opt.training
    opt.eval()
    assert not opt.training
    x = params_of(model)
    assert all(not torch.equal(a, b) for a, b in zip(x, y))
    for p, yp in zip(model.parameters(), y):
        assert torch.equal(opt.state[p]["y"], yp)
    opt.eval()  # a second eval() changes nothing
    assert all(torch.equal(a, b) for a, b in zip(x, params_of(model)))
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(y, params_of(model)))
    assert "y" not in opt.state[model[0].weight]
    for key, value in state.items():
        assert torch.equal(opt.state[model[0].weight][key], value)


def test_eval_point_is_the_average_x():
    model, opt = trained()
    p = model[0].weight
    beta1 = opt.param_groups[0]["betas"][0]
    y, z = p.detach().clone(), opt.state[p]["z"]
    opt.eval()
    # y = (1 - beta1) z + beta1 x
    # three roundings here (two products, a sum), at most three in the optimizer's own formula
    assert_within_ulps((1 - beta1) * z + beta1 * p, y, 3, z, p.detach())


def test_aliases_and_step_in_eval_mode_raises():
    model, opt = trained()
    assert opt.eval_params() is opt and not opt.training
    before = params_of(model)
    set_grads(model, 9)
    with pytest.raises(RuntimeError, match=r"eval mode.*optimizer\.train\(\)"):
        opt.step()
    with pytest.raises(RuntimeError, match="eval mode"):
        opt.step_param(model[0].weight, opt.param_groups[0])
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))
    assert opt.train_params() is opt and opt.training
    opt.step()
    with pytest.raises(TypeError, match="mode"):
        opt.train("eval")


def test_a_group_added_in_eval_mode_joins_eval_mode():
    model = mlp()
    opt = kaon.ScheduleFreeAdamW(list(model[0].parameters()))
    set_grads(model, 0)
    opt.step()
    opt.eval()
    opt.add_param_group({"params": list(model[3].parameters())})
    assert opt.param_groups[1]["train_mode"] is False
    opt.train()
    assert all(g["train_mode"] for g in opt.param_groups)


def test_parameters_never_stepped_are_left_alone_by_eval():
    model = mlp()
    opt = kaon.ScheduleFreeAdamW(model.parameters())
    before = params_of(model)
    opt.eval()
    opt.train()
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(model)))


# ---------------------------------------------------------------------------------- resume
def save(model, opt) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    return buffer


def continue_training(model, opt, start, steps=4):
    for i in range(start, start + steps):
        set_grads(model, i)
        opt.step()


@pytest.mark.parametrize("saved_in", ["train", "eval"])
@pytest.mark.parametrize("fresh_in", ["train", "eval"])
def test_resume_in_either_mode_is_bit_identical(saved_in, fresh_in):
    model, opt = trained(steps=4, warmup_steps=6, weight_decay=0.01)
    if saved_in == "eval":
        opt.eval()
    buffer = save(model, opt)
    opt.train()
    continue_training(model, opt, 4)

    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["opt"]["param_groups"][0]["train_mode"] is (saved_in == "train")
    resumed = mlp(seed=7)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = kaon.ScheduleFreeAdamW(resumed.parameters(), warmup_steps=6, weight_decay=0.01)
    if fresh_in == "eval":
        opt2.eval()
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.training is (saved_in == "train")  # the mode the weights were saved in
    opt2.train()
    continue_training(resumed, opt2, 4)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(resumed)))
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_state_initialization_step_at_lr_zero_then_load():
    """Distributed checkpoint loaders step a fresh optimizer with zero gradients at lr = 0 to
    create its state; the original divided by zero there."""
    model, opt = trained(steps=3)
    buffer = save(model, opt)
    continue_training(model, opt, 3)

    checkpoint = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=3)
    opt2 = kaon.ScheduleFreeAdamW(resumed.parameters())
    for group in opt2.param_groups:
        group["lr"] = 0.0
    before = params_of(resumed)
    for p in resumed.parameters():
        p.grad = torch.zeros_like(p)
    opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params_of(resumed)))
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    continue_training(resumed, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), params_of(resumed)))


def test_counters_are_per_parameter():
    """A parameter that first gets a gradient late starts its own warmup and bias correction."""
    model = mlp()
    head = model[3].weight
    opt = kaon.ScheduleFreeAdamW(model.parameters(), warmup_steps=4)
    for i in range(3):
        set_grads(model, i)
        head.grad = None
        opt.step()
    alone = copy.deepcopy(head)
    opt_alone = kaon.ScheduleFreeAdamW([alone], warmup_steps=4)
    set_grads(model, 3)
    alone.grad = head.grad.clone()
    opt.step()
    opt_alone.step()
    assert torch.equal(head, alone)
    assert opt.state[head]["step"].item() == 1 and opt.state[model[0].weight]["step"].item() == 4


def test_state_keys_dtypes_and_bytes_per_param():
    shapes = [(1024, 1024), (2048, 512), (512, 2048), (1024,), (1024,)]
    for dtype, method, expected in [(torch.float32, "stochastic_rounding", 8.0),
                                    (torch.bfloat16, "kahan", 10.0)]:
        params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
        opt = kaon.ScheduleFreeAdamW(params, bf16_method=method)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        state = opt.state[params[0]]
        assert {k: v.dtype for k, v in state.items()} == {
            "z": torch.float32, "v": torch.float32, "step": torch.float32,
            "weight_sum": torch.float32, "lr_max": torch.float32,
            **({"shift": torch.bfloat16} if method == "kahan" else {}),
        }
        assert expected <= opt.bytes_per_param() < expected + 0.01
        opt.eval()  # plus one copy of the training weights
        size = params[0].element_size()
        assert expected + size <= opt.bytes_per_param() < expected + size + 0.01


def test_docs_page_runs_and_documents_every_argument_and_state_key():
    import inspect
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "schedulefree_adamw.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "docs/schedulefree_adamw.md", "exec"), namespace)
    assert namespace["opt"].training and namespace["checkpoint"]["opt"]["state"]
    for name in inspect.signature(kaon.ScheduleFreeAdamW).parameters:
        assert f"`{name}`" in text, name
    for key in ("z", "v", "step", "weight_sum", "lr_max", "shift", "y", "train_mode"):
        assert f"`{key}`" in text, key
