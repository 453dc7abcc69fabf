"""The documented calls of the five projects kaon replaces, replayed on kaon.

Each call either constructs and trains a small model a few steps, or raises a ValueError that
names the argument and says what to use in kaon instead (docs/migrating.md lists them all).
"""

from __future__ import annotations

import ast
import inspect
import pkgutil
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import kaon
from kaon import registry, upstream
from kaon.integrations.kempnerforge import OptimizerConfig
from kaon.integrations.kempnerforge import build_optimizer as kf_build_optimizer

MIGRATING = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> list[float]:
    """A few steps on a fixed batch; the weights must change and stay finite."""
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(32, model[0].in_features), torch.randn(32, 4)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "nothing moved"
    return losses


# ----------------------------------------------------------------------------- one registry
def test_registry_equals_exports_and_every_module_registers_its_optimizer():
    exported = {n for n in kaon.__all__
                if isinstance(getattr(kaon, n), type) and issubclass(getattr(kaon, n), kaon.KaonOptimizer)
                and getattr(kaon, n) is not kaon.KaonOptimizer}
    assert exported == set(registry.builtin()) == set(kaon.optim.__all__)
    assert "Autokaon" in exported
    # every public KaonOptimizer subclass defined in kaon.optim is registered (names= not
    # forgotten)
    for info in pkgutil.iter_modules(kaon.optim.__path__):
        module = __import__(f"kaon.optim.{info.name}", fromlist=["_"])
        for name, obj in vars(module).items():
            if (isinstance(obj, type) and issubclass(obj, kaon.KaonOptimizer)
                    and obj.__module__ == module.__name__ and not name.startswith("_")):
                assert registry.builtin().get(name) is obj, name


def test_optimizer_packages_list_no_names_by_hand():
    """kaon/__init__.py and kaon/optim/__init__.py name no optimizer: they cannot drift."""
    root = Path(kaon.__file__).parent
    for path in (root / "__init__.py", root / "optim" / "__init__.py"):
        names = {n.value for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not names & set(registry.builtin()), path


_ARGS = {"Muon": "momentum=0.9", "KProdigy": "d_coef=1.0", "Autokaon": "lr_freeze=None"}


@pytest.mark.parametrize("name", sorted(registry.builtin()))
def test_every_exported_optimizer_is_creatable_by_name_path_and_argument_string(name):
    cls = getattr(kaon, name)
    module_path = f"{cls.__module__}.{cls.__qualname__}"
    for spelling in (name, name.lower(), f"kaon.{name}", module_path):
        assert registry.get(spelling) is cls, spelling
    model = _model()
    args = _ARGS.get(name, "weight_decay=0.0")
    opt = kaon.create_optimizer(name, model.parameters(), args)
    assert type(opt) is cls
    _train(model, opt, steps=2)
    model = _model()
    assert type(registry.create(module_path, model.parameters(), args)) is cls
    # the kohya-style "k=v k=v" trainer form
    assert type(kaon.create_optimizer(f"kaon.{name}", _model().parameters(),
                                      args + " foreach=True")) is cls


@pytest.mark.parametrize("alias, name", [
    ("schedule_free_adamw", "ScheduleFreeAdamW"), ("Adafusion", "Adakaon"),
    ("Autofusion", "Autokaon"), ("Liofusion", "Lion"), ("Janus", "AdaPNM"),
    ("StableAdamW", "OAdamW"), ("kaon.schedule_free_adamw", "ScheduleFreeAdamW"),
])
def test_upstream_names_resolve(alias, name):
    assert registry.get(alias) is getattr(kaon, name)
    assert alias not in registry.OPTIMIZERS  # aliases are not listed by `kaon list`


def test_kaon_list_and_bench_config_know_autokaon(capsys):
    from kaon import bench, cli

    assert cli.main(["list"]) == 0
    assert "Autokaon" in capsys.readouterr().out
    assert bench.parse_config("Autokaon:lr_freeze=None").name == "Autokaon"


def test_a_users_named_subclass_is_registered_but_not_exported():
    before, aliases = dict(registry.OPTIMIZERS), dict(registry.ALIASES)
    try:
        class Mine(kaon.Lion, names=("MyLion", "my-lion")):
            pass

        assert registry.get("my-lion") is Mine and registry.get("mylion") is Mine
        assert "MyLion" not in registry.builtin()
    finally:
        registry.OPTIMIZERS.clear()
        registry.OPTIMIZERS.update(before)
        registry.ALIASES.clear()
        registry.ALIASES.update(aliases)


def test_unregistered_subclass_stays_out_of_the_registry():
    before = dict(registry.OPTIMIZERS)

    class Scratch(kaon.Adakaon):
        pass

    assert before == registry.OPTIMIZERS and "Scratch" not in registry.builtin()


# ------------------------------------------------------------------------ the alias table
def test_translate_refuses_naming_the_argument_and_its_replacement():
    with pytest.raises(ValueError, match=r"auto_lr=True .*K-Optimizers.*kaon\.Autokaon"):
        kaon.Adakaon(_model().parameters(), auto_lr=True)
    with pytest.raises(ValueError, match=r"sets betas=.*given too"):
        kaon.Autokaon(_model().parameters(), adakaon_betas=(0.0, 0.999), betas=(0.9, 0.999))


def test_a_subclass_constructor_translates_once():
    class Mine(kaon.Adakaon):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)

    opt = Mine(_model().parameters(), fused_tile_cap=128, auto_lr=False)
    assert "_upstream_translated" not in opt.__dict__
    assert "fused_tile_cap" not in opt.defaults


def test_every_table_entry_has_a_line_in_the_migration_guide():
    import re

    text = MIGRATING.read_text()
    for cls in registry.builtin().values():
        for name in upstream.table(cls):
            # `name` or `name=value` in a table row
            assert re.search(rf"`{name}(=[^`]*)?`", text), f"{cls.__name__}.{name}"


def test_the_signature_is_still_the_kaon_one():
    assert "fused_tile_cap" not in inspect.signature(kaon.Adakaon).parameters
    assert "momentum_dtype" in inspect.signature(kaon.Adakaon).parameters


# -------------------------------------------------------------------------- adafactor8bit
A8_OK = [
    dict(lr=1e-3),
    dict(lr=1e-3, relative_step=False, use_cuda_kernel=False),
    dict(lr=1e-3, use_cuda_kernel=True, warmup_init=False, lag_norm=False,
         momentum_only_1d=None, warmup_multiplier=0.5, c_quant_type=None, v_quant_type="al8",
         m_quant_type="uf8", stochastic_round_writeback=True, apollo_cache_proj=True,
         beta1=0.9, min_8bit_size=0),
    dict(beta1=0.9, beta2=0.999, beta3=0.9999, relative_step=False, scale_parameter=False,
         d=1.0, eps_came=1e-16, m_quant_type="uf4", c_quant_type="al8"),
    dict(lr=1e-3, apollo_rank=2, apollo_update_proj_gap=200, apollo_scale_type="tensor",
         apollo_cache_proj=False, beta1=0.9, relative_step=False, momentum_only_1d=False),
    dict(lr=1e-2, beta2=None, beta2_decay=None, relative_step=False, m_quant_type="fp32",
         beta1=0.9),
]


@pytest.mark.parametrize("kwargs", A8_OK)
def test_adafactor8bit_calls_construct_and_train(kwargs):
    model = _model()
    _train(model, kaon.Adafactor8Bit(model.parameters(), **kwargs))


def test_adafactor8bit_quant_types_map_onto_kaon_arguments():
    params = _model().parameters()
    opt = kaon.Adafactor8Bit(params, m_quant_type="uf8", stochastic_round_writeback=False)
    assert opt.defaults["momentum_dtype"] == "int8" and opt.defaults["bf16_method"] == "none"
    assert "m_quant_type" not in opt.defaults


@pytest.mark.parametrize("kwargs, replacement", [
    (dict(warmup_init=True), "relative_step=False"),
    (dict(lag_norm=True), "lag_norm=False"),
    (dict(momentum_only_1d=True), "momentum_only_1d=False"),
    (dict(m_quant_type="d4"), "momentum_dtype="),
    (dict(m_quant_type="d8"), "m_quant_type='uf4'"),
    (dict(v_quant_type="al16"), "quantize=False"),
    (dict(v_quant_type="fp32"), "quantize=False"),
    (dict(c_quant_type="fp32"), "quantize=False"),
    (dict(use_cuda_kernel="yes"), "True or False"),
    (dict(stochastic_round_writeback=1), "bf16_method"),
])
def test_adafactor8bit_refusals_name_argument_and_replacement(kwargs, replacement):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError) as info:
        kaon.Adafactor8Bit(_model().parameters(), **kwargs)
    message = str(info.value)
    assert f"{name}={value!r}" in message and replacement in message


@pytest.mark.parametrize("preset", ["sgd", "rmsprop", "adafactor", "adamw", "came", "apollo"])
def test_adafactor8bit_presets_train(preset):
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 64), nn.LayerNorm(64),
                          nn.Linear(64, 50))
    groups = kaon.build_param_groups(model, preset=preset, grouping="auto", apollo_rank=4)
    opt = kaon.Adafactor8Bit(groups, lr=1e-3)
    x = torch.randint(0, 50, (8,))
    before = model[1].weight.detach().clone()
    for _ in range(3):
        nn.functional.cross_entropy(model(x), x).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, model[1].weight) and torch.isfinite(model[1].weight).all()


def test_adafactor8bit_json_policy_overlays_routes_and_checks_apollo_shapes():
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.Linear(64, 4))
    policy = '{"defaults": {"d": 2.0}, "matrix": {"weight_decay": 0.05}}'
    groups = {g["name"]: g for g in kaon.build_param_groups(model, policy=policy)}
    assert groups["matrix"]["weight_decay"] == 0.05 and groups["sensitive"]["d"] == 2.0
    _train(model, kaon.Adafactor8Bit(list(groups.values()), lr=1e-3))
    with pytest.raises(ValueError, match="unknown route 'dense'"):
        kaon.build_param_groups(model, policy={"dense": {"d": 1.0}})
    with pytest.raises(ValueError, match=r"apollo_rank=32, but 0.weight has shape \(64, 16\)"):
        kaon.build_param_groups(model, policy={"matrix": {"apollo_rank": 32}})
    with pytest.raises(ValueError, match="grouping must be 'auto'"):
        kaon.build_param_groups(model, grouping="manual")


# --------------------------------------------------------------------------- K-Optimizers
K_OK = [
    ("Adakaon", dict(lr=1e-4, betas=(0.0, 0.999), bf16_method="stochastic_rounding")),
    ("Adakaon", dict(lr=1e-4, betas=(0.9, 0.999), momentum_dtype="int8", fused=False,
                     fused_tile_cap=None, auto_lr=False)),
    ("Adakaon", dict(lr=1e-4, fused_tile_cap=256, auto_lr=False, auto_lr_scale=1.0,
                     auto_lr_fuse_rel=20.0, auto_lr_d0=None)),
    ("Nekaon", dict(lr=1e-3, k=1.5, betas=(0.5, 0.999), momentum_dtype="4bit", auto_lr=False)),
    ("AdaPNM", dict(lr=2e-3, betas=(0.8, 0.999), beta0=0.5, fused_tile_cap=None)),
    ("Lion", dict(lr=2e-4, betas=(0.95, 0.98), momentum_dtype="4bit", auto_lr=False)),
    ("AdaMuon", dict(lr=1e-3, momentum_dtype="int8", compile=False, auto_lr=False)),
    ("KProdigy", dict(lr=1.0, momentum_dtype="bfloat16")),
    ("KProdigy", dict(lr=1.0, second_moment="factored", momentum_dtype="int8", slice_p=11,
                      factor_conv_as_matrix=True)),
    ("Autokaon", dict(bf16_method="stochastic_rounding")),
    ("Autokaon", dict(lr=1.0, s_init="auto", lr_freeze="auto", scale_cap="auto",
                      scale_cap_rel=6.0, betas=(0.0, 0.999), s_decay=0.01, eps=1e-8,
                      foreach_warmup=True)),
    ("Autokaon", dict(adakaon_betas=(0.0, 0.999), lr_freeze=2)),
    ("Autokaon", dict(adakaon_betas=(0.9, 0.999), lr_freeze=None)),
]


@pytest.mark.parametrize("name, kwargs", K_OK)
def test_k_optimizers_calls_construct_and_train(name, kwargs):
    model = _model()
    _train(model, getattr(kaon, name)(model.parameters(), **kwargs))


def test_k_optimizers_two_group_kprodigy_and_create_optimizer_autokaon():
    model = _model()
    opt = kaon.KProdigy([{"params": model[0].parameters(), "lr": 1.0},
                         {"params": model[3].parameters(), "lr": 1.0}])
    _train(model, opt)
    assert opt.param_groups[0]["d"] != opt.param_groups[1]["d"]  # one D per group
    model = _model()
    _train(model, kaon.create_optimizer("Autokaon", model.parameters(),
                                        "adakaon_betas=(0.0,0.999) lr_freeze=3"))
    assert registry.get("Autokaon") is kaon.Autokaon


def test_autokaon_upstream_betas_land_on_adakaon():
    opt = kaon.Autokaon(_model().parameters(), adakaon_betas=(0.0, 0.999))
    assert opt.defaults["betas"] == (0.0, 0.999)


@pytest.mark.parametrize("name, kwargs, replacement", [
    ("Adakaon", dict(auto_lr=True), "kaon.Autokaon"),
    ("Lion", dict(auto_lr=True), "kaon.Autokaon"),
    ("AdaMuon", dict(auto_lr_d0=1e-5), "d0"),
    ("Nekaon", dict(auto_lr_scale=2.0), "d_coef"),
    ("AdaPNM", dict(auto_lr_fuse_rel=10.0), "lr_cap"),
    ("Adakaon", dict(fused_tile_cap=-1), "positive int"),
    ("Autokaon", dict(betas=(0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999)), "adakaon_betas"),
    ("Autokaon", dict(s_init=1e-3), "d0="),
    ("Autokaon", dict(scale_cap=0.01), "lr_cap="),
    ("Autokaon", dict(scale_cap_rel=3.0), "lr_cap="),
    ("Autokaon", dict(s_decay=0.1), "weight_decay"),
    ("Autokaon", dict(eps=1e-6), "(eps1, eps2)"),
    ("KProdigy", dict(factor_conv_as_matrix=False), "second_moment='full'"),
])
def test_k_optimizers_refusals_name_argument_and_replacement(name, kwargs, replacement):
    (arg, value), = kwargs.items()
    with pytest.raises(ValueError) as info:
        getattr(kaon, name)(_model().parameters(), **kwargs)
    assert f"{arg}={value!r}" in str(info.value) and replacement in str(info.value)


# ----------------------------------------------------------------------------- K-Prodigy
def test_k_prodigy_calls_construct_and_train():
    model = _model()
    _train(model, kaon.KProdigy(model.parameters(), lr=1.0, d_update_freq=5, foreach=True,
                                use_bias_correction=False, independent_d=True, fsdp_in_use=False))
    model = _model()
    _train(model, kaon.KProdigy(model.parameters(), lr=1.0, betas=(0.9, 0.99), weight_decay=0.01,
                                use_bias_correction=True, safeguard_warmup=True, d0=1e-5))


def test_k_prodigy_adaptive_bias_correction_clamp():
    """K-Prodigy damps the bias correction by clamp(d / d0, 0.1, 1): at d = 0.2 d0 (possible
    with growth_rate < 1) the first step is 0.2 times the step at d = d0 with the same d."""
    def first_step(d0):
        model = _model()
        opt = kaon.KProdigy(model.parameters(), use_bias_correction=True, d0=d0)
        for group in opt.param_groups:
            group["d"] = group["d_max"] = 2e-4
        start = model[0].weight.detach().clone()
        _train(model, opt, steps=1)
        return model[0].weight.detach() - start

    damped, plain = first_step(1e-3), first_step(2e-4)
    torch.testing.assert_close(damped, 0.2 * plain, rtol=1e-3, atol=1e-9)
    assert 0.5 * 0.2 * plain.abs().max() < damped.abs().max()  # and never below 0.1 d / d0


def test_kprodigy_d_update_freq_default_is_every_step():
    assert inspect.signature(kaon.KProdigy).parameters["d_update_freq"].default == 1


# -------------------------------------------------------------------------- KempnerForge
@pytest.mark.parametrize("name", ["adamw", "lion", "muon", "schedule_free_adamw"])
def test_kempnerforge_build_optimizer_with_its_config(name, caplog):
    model = nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 32), nn.LayerNorm(32),
                          nn.Linear(32, 64))
    config = OptimizerConfig(name=name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                             muon_momentum=0.9, muon_ns_steps=3, muon_adam_lr=None,
                             schedule_free_warmup_steps=10)
    with caplog.at_level("INFO", logger="kaon"):
        opt = kaon.build_optimizer(model, config)
    expected = upstream.KEMPNERFORGE_NAMES[name]
    assert type(opt).__name__ == expected
    assert "params with weight decay" in caplog.text
    if name == "muon":
        assert "NS-orthogonalized" in caplog.text
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["ns_steps"] == 3
        assert opt.defaults["adam_lr"] is None and opt.defaults["nesterov"] is False
    if name == "schedule_free_adamw":
        assert opt.defaults["warmup_steps"] == 10
    x = torch.randint(0, 64, (8,))
    for _ in range(3):
        nn.functional.cross_entropy(model(x), x).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert type(kf_build_optimizer(model, config)).__name__ == expected


def test_kempnerforge_config_checks_and_duck_typing():
    with pytest.raises(ValueError, match="muon_momentum"):
        OptimizerConfig(muon_momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        OptimizerConfig(lr=0.0)
    theirs = types.SimpleNamespace(name="lion", lr=3e-5, weight_decay=0.0, betas=(0.9, 0.99),
                                   eps=1e-8, fused=False, muon_momentum=0.95, muon_ns_steps=5,
                                   muon_adam_lr=None, schedule_free_warmup_steps=0)
    model = _model()
    opt = kaon.build_optimizer(model, theirs)
    assert type(opt) is kaon.Lion and opt.defaults["cautious"] is False
    _train(model, opt)
    with pytest.raises(ValueError, match="name must be one of"):
        kaon.build_optimizer(model, types.SimpleNamespace(name="sgd", muon_momentum=0.9))


def test_kempnerforge_two_list_muon_and_class_calls():
    model = _model()
    muon = [p for p in model.parameters() if p.ndim >= 2]
    adam = [p for p in model.parameters() if p.ndim < 2]
    opt = kaon.Muon(muon, adam, lr=0.02, momentum=0.95, weight_decay=0.0,
                    adam_betas=(0.9, 0.95), adam_eps=1e-8, ns_steps=5, adam_lr=None)
    assert [g["muon"] for g in opt.param_groups] == [True, False]
    assert opt.param_groups[1]["adam_lr"] is None  # upstream: the AdamW path at lr
    _train(model, opt)
    model = _model()
    _train(model, kaon.Lion(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0))
    model = _model()
    opt = kaon.ScheduleFreeAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0, warmup_steps=100)
    _train(model, opt)
    opt.eval_params()
    opt.train_params()
    assert registry.get("schedule_free_adamw") is kaon.ScheduleFreeAdamW


# --------------------------------------------------------------------------------- OAdamW
def test_oadamw_readme_calls():
    model = _model()
    _train(model, kaon.OAdamW(model, lr=5e-6 * 1000))
    model = _model()
    weights = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    opt = kaon.OAdamW([{"params": weights, "muon": True, "ns_steps": 6, "scale": 0.9},
                       {"params": others}], lr=5e-3)
    _train(model, opt)


def test_oadamw_optimi_arguments_and_training_args():
    training_args = types.SimpleNamespace(learning_rate=2e-3, weight_decay=None)
    model = _model()
    opt = kaon.OAdamW(model, training_args, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6,
                      decouple_lr=False, max_lr=None, kahan_sum=None, foreach=None,
                      triton=None, gradient_release=False)
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["weight_decay"] == 1e-2
    assert opt.defaults["bf16_method"] == "kahan" and opt.foreach is True
    _train(model, opt)
    assert kaon.OAdamW(_model(), training_args=training_args, lr=1.0).defaults["lr"] == 2e-3
    assert kaon.OAdamW(_model().parameters(), kahan_sum=False).defaults["bf16_method"] == "none"
    with pytest.raises(TypeError, match="learning_rate"):
        kaon.OAdamW(_model(), object())
    with pytest.raises(ValueError, match=r"kahan_sum='yes'.*bf16_method"):
        kaon.OAdamW(_model(), kahan_sum="yes")


def test_oadamw_gradient_release_true_with_kaons_hooks():
    model = _model()
    opt = kaon.OAdamW(model, lr=1e-3, gradient_release=True)
    kaon.prepare_for_gradient_release(model, opt)
    try:
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        before = model[0].weight.detach().clone()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # a no-op: the hooks stepped and freed every gradient
        assert not torch.equal(before, model[0].weight)
        assert all(p.grad is None for p in model.parameters())
    finally:
        kaon.remove_gradient_release(model)


# ------------------------------------------------------------------------- the guide runs
def test_migrating_guide_examples_run():
    import re

    blocks = re.findall(r"```python\n(.*?)```", MIGRATING.read_text(), re.S)
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, "docs/migrating.md", "exec"), {})
