"""build_optimizer's groups on a small transformer and a small UNet; create_optimizer; kohya."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kaon
from kaon import registry


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 32, 3)
        self.norm = nn.GroupNorm(8, 32)
        self.conv = nn.Conv2d(32, 32, 3)
        self.attn = nn.Linear(32, 32)
        self.time = nn.Sequential(nn.Linear(32, 128), nn.SiLU(), nn.Linear(128, 128))
        self.conv_out = nn.Conv2d(32, 4, 3)
        self.text_encoder = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 32))


def routing(opt):
    """name -> (weight_decay, muon) for every parameter."""
    table = {}
    for group in opt.param_groups:
        for name in group["param_names"]:
            assert name not in table, f"{name} is in two groups"
            table[name] = (group["weight_decay"], group.get("muon"), group["lr"])
    return table


def test_transformer_groups_adamw():
    model = TinyTransformer()
    opt = kaon.build_optimizer(model, "AdamW", lr=1e-3, weight_decay=0.1)
    print(kaon.describe_groups(opt))
    table = routing(opt)
    assert set(table) == {n for n, _ in model.named_parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for name, (wd, _, _) in table.items():
        no_decay = name.endswith("bias") or ".ln" in name or name.startswith(("norm", "embed"))
        assert wd == (0.0 if no_decay else 0.1), name
    assert isinstance(opt, kaon.AdamW) and "muon" not in opt.param_groups[0]


def test_transformer_groups_muon_routing():
    model = TinyTransformer()
    opt = kaon.build_optimizer(model, "Muon", weight_decay=0.01)
    print(kaon.describe_groups(opt))
    table = routing(opt)
    assert set(table) == {n for n, _ in model.named_parameters()}
    assert table["embed.weight"][:2] == (0.0, False)  # embedding: no decay, AdamW path
    assert table["lm_head.weight"][:2] == (0.01, False)  # output head: AdamW path, decayed
    assert table["blocks.0.qkv.weight"][:2] == (0.01, True)
    assert table["blocks.1.down.weight"][:2] == (0.01, True)
    assert table["blocks.0.qkv.bias"][:2] == (0.0, False)
    assert table["norm.weight"][:2] == (0.0, False)
    assert all(lr == 0.02 for _, _, lr in table.values())  # Muon's lr, not an AdamW default
    # it trains: one step on real gradients
    tokens = torch.randint(0, 256, (4, 8))
    h = model.embed(tokens)
    loss = model.lm_head(model.norm(h)).logsumexp(-1).mean() + sum(
        p.sum() * 0 for p in model.parameters())
    loss.backward()
    opt.step()
    assert set(opt.state[model.blocks[0].qkv.weight]) == {"momentum_buffer"}
    assert set(opt.state[model.lm_head.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_unet_groups_with_an_override_for_the_text_encoder():
    model = TinyUNet()
    opt = kaon.build_optimizer(model, "kaon.Muon", lr=0.02, weight_decay=0.1,
                               overrides={"text_encoder.*": {"lr": 0.005}})
    print(kaon.describe_groups(opt))
    table = routing(opt)
    assert set(table) == {n for n, _ in model.named_parameters()}
    assert table["conv.weight"][:2] == (0.1, True)  # [32, 288]: ratio 9
    assert table["conv_in.weight"][:2] == (0.1, True)  # [32, 36]: ratio 1.1
    assert table["conv_out.weight"][:2] == (0.1, False)  # [4, 288]: ratio 72
    assert table["norm.weight"][:2] == (0.0, False)
    assert table["time.0.weight"][:2] == (0.1, True)
    assert table["text_encoder.0.weight"] == (0.0, False, 0.005)  # embedding
    assert table["text_encoder.1.weight"] == (0.1, True, 0.005)
    assert table["attn.weight"][2] == 0.02


def test_decay_embeddings_and_frozen_parameters():
    model = TinyTransformer()
    model.blocks[1].requires_grad_(False)
    opt = kaon.build_optimizer(model, "AdamW", weight_decay=0.1, decay_embeddings=True)
    table = routing(opt)
    assert table["embed.weight"][0] == 0.1
    assert not any(n.startswith("blocks.1.") for n in table)
    assert opt.param_groups[0]["lr"] == 1e-3  # AdamW's default


def test_build_optimizer_forms_and_errors():
    model = TinyTransformer()
    opt = kaon.build_optimizer(model, {"name": "AdamW", "lr": 5e-4, "args": "betas=0.9|0.95"})
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["lr"] == 5e-4
    opt = kaon.build_optimizer(model, "AdamW:state_dtype=int8 amsgrad=True")
    assert opt.param_groups[0]["state_dtype"] == "int8" and opt.param_groups[0]["amsgrad"] is True
    opt = kaon.build_optimizer(model, torch.optim.SGD, lr=0.1)
    assert isinstance(opt, torch.optim.SGD) and {g["weight_decay"] for g in opt.param_groups} == {0}
    with pytest.raises(ValueError, match="unknown optimizer"):
        kaon.build_optimizer(model, "NoSuch")
    with pytest.raises(TypeError, match="name_or_config"):
        kaon.build_optimizer(model, 3)
    with pytest.raises(ValueError, match="params"):
        kaon.build_optimizer(model, "AdamW", overrides={"*": {"params": []}})


@pytest.mark.parametrize(
    "text",
    ["betas=(0.9,0.99) weight_decay=0.01 amsgrad=False fused=False",
     "betas=0.9|0.99,weight_decay=0.01,amsgrad=False,fused=False",
     "betas = (0.9, 0.99),  weight_decay=0.01 amsgrad=false fused=FALSE"],
)
def test_argument_strings_in_both_trainer_forms(text):
    parsed = registry.parse_kwargs(text)
    assert parsed == {"betas": (0.9, 0.99), "weight_decay": 0.01, "amsgrad": False,
                      "fused": False}
    assert parsed["amsgrad"] is False  # never the truthy string "False"
    p = [torch.zeros(3, 3, requires_grad=True)]
    opt = kaon.create_optimizer("AdamW", p, text, lr=2e-3)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["lr"] == 2e-3
    assert registry.parse_kwargs("state_dtype=int8|log4") == {"state_dtype": ("int8", "log4")}
    assert registry.parse_kwargs(["eps=(1e-30,1e-16) betas=(0.9,0.999)"]) == {
        "eps": (1e-30, 1e-16), "betas": (0.9, 0.999)}


def test_kohya_style_call():
    """``--optimizer_type kaon.AdamW --optimizer_args ...``: import by class path, literal
    args, groups with different lrs, ``train()`` if present."""
    import ast
    import importlib

    optimizer_type = "kaon.AdamW"
    optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)", "state_dtype='int8'"]
    module, _, attribute = optimizer_type.rpartition(".")
    cls = getattr(importlib.import_module(module), attribute)
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=", 1)
        kwargs[key] = ast.literal_eval(value)
    unet, text_encoder = nn.Linear(8, 8), nn.Linear(8, 8)
    trainable = [{"params": list(unet.parameters()), "lr": 1e-4},
                 {"params": list(text_encoder.parameters()), "lr": 5e-5}]
    opt = cls(trainable, lr=1e-4, **kwargs)
    if hasattr(opt, "train") and callable(opt.train):
        opt.train()
    (unet(torch.randn(2, 8)).sum() + text_encoder(torch.randn(2, 8)).sum()).backward()
    before = [p.detach().clone() for p in unet.parameters()]
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    assert opt.state[unet.weight]["exp_avg"].dtype == torch.int8
    assert not torch.equal(before[0], unet.weight)
    assert registry.get(optimizer_type) is cls
