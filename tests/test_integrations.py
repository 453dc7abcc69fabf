"""Trainer integrations: sd-scripts / musubi-tuner, OneTrainer, transformers.Trainer,
accelerate and Lightning.

The kohya and OneTrainer tests replay the trainers' documented code paths (construction from
``--optimizer_type`` / ``--optimizer_args``, the fused-backward hooks) without the trainers
themselves; transformers, accelerate and Lightning run for real (the ``test`` extra installs
them; nothing is downloaded: the models are built from configs with random weights).
"""

from __future__ import annotations

import ast
import importlib

import pytest
import torch
from conformance import OPTIMIZERS, Entry
from test_conformance import assert_same, loss_of, make_model, params_of

import kaon
from kaon import registry
from kaon.integrations import kohya, onetrainer

RELEASED = [e for e in OPTIMIZERS if e.per_parameter]
# the hook protocols once per optimizer class (every configuration is covered against step()
# by test_release.py and the conformance suite's per-parameter test)
ONE_PER_CLASS = list({e.cls: e for e in reversed(RELEASED)}.values())[::-1]
REFUSED = [e for e in OPTIMIZERS if not e.per_parameter]


def state_by_param(opt):
    params = [p for group in opt.param_groups for p in group["params"]]
    return [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            for p in params if p in opt.state]


def assert_states_equal(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------ sd-scripts / musubi-tuner
def kohya_style_get_optimizer(optimizer_type: str, optimizer_args: list[str], lr: float,
                              trainable_params):
    """The path sd-scripts and musubi-tuner take for an optimizer name they do not know: their
    own names are compared case-insensitively with the whole string first, then the dotted
    name is imported; each argument is split at '=' and read with ast.literal_eval."""
    own = {"lion", "adamw8bit", "prodigy", "adafactor", "adamw", "sgdnesterov"}
    name = optimizer_type.lower()
    assert name not in own and not name.startswith("dadapt") and not name.endswith("8bit")
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    parts = optimizer_type.split(".")
    module = importlib.import_module(".".join(parts[:-1])) if len(parts) > 1 else torch.optim
    optimizer = getattr(module, parts[-1])(trainable_params, lr=lr, **kwargs)
    if hasattr(optimizer, "train") and callable(optimizer.train):
        optimizer.train()
    return optimizer, name.endswith("schedulefree")


KOHYA_ARGS = ["momentum_dtype='int8'", "betas=(0.9,0.999)", "weight_decay=0.01",
              "cautious=False", "bf16_method='kahan'"]


def test_kohya_construction_with_literal_optimizer_args():
    model = make_model()
    unet = list(model.conv.parameters()) + list(model.fc1.parameters())
    te = [p for n, p in model.named_parameters() if not n.startswith(("conv", "fc1"))]
    groups = [{"params": unet, "lr": 1e-4}, {"params": te, "lr": 5e-5}]
    opt, schedule_free = kohya_style_get_optimizer("kaon.Adakaon", KOHYA_ARGS, 1e-4, groups)
    assert type(opt) is kaon.Adakaon and not schedule_free
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    for key, value in [("momentum_dtype", "int8"), ("betas", (0.9, 0.999)),
                       ("weight_decay", 0.01), ("cautious", False), ("bf16_method", "kahan")]:
        assert opt.defaults[key] == value and opt.param_groups[1][key] == value
    loss_of(model, 0).backward()
    opt.step()
    assert opt.state[model.fc1.weight]["m"].dtype == torch.int8
    # kaon's own parser and kaon.integrations.kohya read the list the same way
    assert registry.parse_kwargs(KOHYA_ARGS) == kohya.optimizer_kwargs(KOHYA_ARGS)
    assert kohya.optimizer_kwargs(KOHYA_ARGS) == {
        "momentum_dtype": "int8", "betas": (0.9, 0.999), "weight_decay": 0.01,
        "cautious": False, "bf16_method": "kahan"}
    again = kohya.create("kaon.Adakaon", make_model().parameters(), 1e-4, KOHYA_ARGS)
    assert type(again) is kaon.Adakaon and again.defaults["momentum_dtype"] == "int8"


def test_kohya_tuple_arguments_of_musubi_form():
    """musubi-tuner's CAME recipe passes tuples of eps and betas inside the strings."""
    args = ["eps=(1e-30,1e-3)", "betas=(0.9,0.999)", "weight_decay=0.01"]
    opt, _ = kohya_style_get_optimizer("kaon.Adakaon", args, 1e-4, make_model().parameters())
    assert opt.defaults["eps"] == (1e-30, 1e-3)


def test_kohya_unquoted_string_is_named():
    with pytest.raises(ValueError, match=r"momentum_dtype='int8'"):
        kohya.optimizer_kwargs(["momentum_dtype=int8"])
    with pytest.raises(ValueError, match="name=value"):
        kohya.optimizer_kwargs(["int8"])


def test_kohya_schedule_free_alias_is_detected_by_name_and_brackets_sampling():
    model = make_model()
    opt, schedule_free = kohya_style_get_optimizer(
        "kaon.integrations.kohya.AdamWScheduleFree", ["warmup_steps=2"], 1e-2, model.parameters())
    assert schedule_free and isinstance(opt, kaon.ScheduleFreeAdamW) and opt.training
    for i in range(3):
        loss_of(model, i).backward()
        opt.step()
        opt.zero_grad()
    y = params_of(model)
    opt.eval()  # what the trainer does before sampling and saving
    assert any(not torch.equal(a, b) for a, b in zip(y, params_of(model)))
    opt.train()
    assert_same(y, params_of(model))


def kohya_fused_backward(model, opt, max_grad_norm):
    """sd-scripts' fused backward pass: per parameter, clip that gradient alone, step_param,
    free the gradient."""
    handles = []
    for group in opt.param_groups:
        for p in group["params"]:
            def hook(tensor, group=group):
                if max_grad_norm != 0.0:
                    torch.nn.utils.clip_grad_norm_([tensor], max_grad_norm)
                opt.step_param(tensor, group)
                tensor.grad = None
            handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


@pytest.mark.parametrize("entry", ONE_PER_CLASS, ids=repr)
def test_kohya_fused_backward_pass_equals_clipped_step_loop(entry: Entry):
    clip = 0.05
    model_a, model_b, model_c = make_model(), make_model(), make_model()
    opt_a = entry.make(model_a.parameters(), lr=entry.train_lr)
    opt_b = entry.make(model_b.parameters(), lr=entry.train_lr)
    opt_c = entry.make(model_c.parameters(), lr=entry.train_lr)
    kohya_fused_backward(model_b, opt_b, clip)
    kaon.prepare_for_gradient_release(model_c, opt_c, max_grad_norm=clip)
    for i in range(3):
        loss_of(model_a, i).backward()
        for p in model_a.parameters():
            torch.nn.utils.clip_grad_norm_([p], clip)
        opt_a.step()
        opt_a.zero_grad()
        for model, opt in ((model_b, opt_b), (model_c, opt_c)):
            loss_of(model, i).backward()
            assert all(p.grad is None for p in model.parameters())
            opt.step()
    for model, opt in ((model_b, opt_b), (model_c, opt_c)):
        assert_same(params_of(model_a), params_of(model))
        assert_states_equal(state_by_param(opt_a), state_by_param(opt))


def test_max_grad_norm_is_checked():
    model = make_model()
    opt = kaon.Adakaon(model.parameters())
    with pytest.raises(ValueError, match="max_grad_norm"):
        kaon.prepare_for_gradient_release(model, opt, max_grad_norm=0.0)
    with pytest.raises(TypeError, match="max_grad_norm"):
        kaon.prepare_for_gradient_release(model, opt, max_grad_norm="1")
    assert not hasattr(model, "_kaon_gradient_release")


# ------------------------------------------------------------------------------- OneTrainer
@pytest.mark.parametrize("entry", ONE_PER_CLASS, ids=repr)
def test_onetrainer_step_parameter_hooks_equal_step_loop(entry: Entry):
    model_a, model_b = make_model(), make_model()
    opt_a = entry.make(model_a.parameters(), lr=entry.train_lr)
    opt_b = entry.make(model_b.parameters(), lr=entry.train_lr)
    assert onetrainer.supports_fused_back_pass(opt_b)
    for group in opt_b.param_groups:
        for i, p in enumerate(group["params"]):
            def hook(tensor, group=group, i=i):
                opt_b.step_parameter(tensor, group, i)
                tensor.grad = None
            p.register_post_accumulate_grad_hook(hook)
    for i in range(3):
        loss_of(model_a, i).backward()
        opt_a.step()
        opt_a.zero_grad()
        loss_of(model_b, i).backward()
    assert_same(params_of(model_a), params_of(model_b))
    assert_states_equal(state_by_param(opt_a), state_by_param(opt_b))


def test_onetrainer_conventions():
    assert not onetrainer.supports_fused_back_pass(kaon.KProdigy)
    assert not onetrainer.supports_fused_back_pass(kaon.KProdigy(make_model().parameters()))
    assert onetrainer.supports_fused_back_pass(kaon.Adakaon)
    assert not onetrainer.supports_fused_back_pass(torch.optim.AdamW)
    params = make_model().parameters
    assert onetrainer.create("Adakaon", params(), stochastic_rounding=False
                             ).defaults["bf16_method"] == "none"
    assert onetrainer.create(kaon.Lion, params(), stochastic_rounding=True
                             ).defaults["bf16_method"] == "stochastic_rounding"
    with pytest.raises(TypeError, match="stochastic_rounding"):
        onetrainer.create("Adakaon", params(), stochastic_rounding="yes")
    with pytest.raises(TypeError, match="not both"):
        onetrainer.create("Adakaon", params(), stochastic_rounding=True, bf16_method="kahan")
    model = make_model()
    opt = kaon.Adakaon(model.parameters())
    loss_of(model, 0).backward()
    group = opt.param_groups[0]
    with pytest.raises(ValueError, match="index"):
        opt.step_parameter(group["params"][1], group, 0)


def test_integrations_do_not_import_the_trainers_with_kaon():
    import subprocess
    import sys

    code = ("import sys, kaon, kaon.integrations.huggingface, kaon.integrations.kohya, "
            "kaon.integrations.onetrainer, kaon.integrations.accelerate, "
            "kaon.integrations.lightning; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'lightning') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_refusing_optimizers_have_no_fused_back_pass():
    for entry in REFUSED:
        opt = entry.make(make_model().parameters())
        assert not onetrainer.supports_fused_back_pass(opt)
