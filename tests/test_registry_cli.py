"""The registry, the ``kaon`` command and the benchmark's pieces."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import kaon
from kaon import bench, cli, registry


def test_parse_kwargs_literals_bare_words_and_nesting():
    parsed = registry.parse_kwargs(
        "lr=1e-3, betas=(0.9,0.999), momentum_dtype=int8, cautious=False, eps=[1e-30, 1e-3],"
        " bf16_method='kahan', note=\"a,b\""
    )
    assert parsed == {
        "lr": 1e-3, "betas": (0.9, 0.999), "momentum_dtype": "int8", "cautious": False,
        "eps": [1e-30, 1e-3], "bf16_method": "kahan", "note": "a,b",
    }
    assert registry.parse_kwargs(["momentum_dtype=4bit", "weight_decay=0.1"]) == {
        "momentum_dtype": "4bit", "weight_decay": 0.1}
    assert registry.parse_kwargs("") == {}


@pytest.mark.parametrize("text", ["lr", "=1", "lr=", "lr=(1,", "1x=2", "lr=a b"])
def test_parse_kwargs_rejects_malformed_pieces(text):
    with pytest.raises(ValueError, match="optimizer argument"):
        registry.parse_kwargs(text)


def test_create_applies_arguments_and_names():
    p = [torch.nn.Parameter(torch.zeros(3))]
    opt = registry.create("kaon.Adakaon", p, "momentum_dtype=int8,betas=(0.8,0.99)")
    assert isinstance(opt, kaon.Adakaon)
    assert opt.param_groups[0]["momentum_dtype"] == "int8"
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert registry.get("adamw") is torch.optim.AdamW
    with pytest.raises(ValueError, match="known optimizers"):
        registry.get("Nope")


def _write_safetensors(path, header):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


def test_safetensors_header_shapes_and_lora_synthesis(tmp_path):
    model = tmp_path / "model.safetensors"
    _write_safetensors(model, {
        "__metadata__": {"format": "pt"},
        "unet.conv.weight": {"dtype": "F16", "shape": [64, 32, 3, 3], "data_offsets": [0, 8]},
        "unet.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [8, 16]},
        "te.proj.weight": {"dtype": "F16", "shape": [16, 8], "data_offsets": [16, 24]},
    })
    shapes = bench.read_safetensors_shapes(model)
    assert shapes == {"unet.conv.weight": (64, 32, 3, 3), "unet.norm.weight": (64,),
                      "te.proj.weight": (16, 8)}
    assert list(bench.read_safetensors_shapes(model, prefix="unet.")) == [
        "unet.conv.weight", "unet.norm.weight"]
    assert bench.lora_shapes_for(shapes.values(), 4) == [(4, 288), (64, 4), (4, 8), (16, 4)]
    assert bench.suite_shapes(f"safetensors:{model}", lora_rank=2)[:2] == [(2, 288), (64, 2)]


def test_safetensors_errors(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(ValueError, match="too short"):
        bench.read_safetensors_shapes(short)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="JSON"):
        bench.read_safetensors_shapes(bad)
    with pytest.raises(FileNotFoundError):
        bench.read_safetensors_shapes(tmp_path / "missing.safetensors")


def test_bench_suites_have_the_documented_sizes():
    llm = bench.suite_shapes("llm")
    assert 50e6 < sum(torch.Size(s).numel() for s in llm) < 60e6
    lora = bench.suite_shapes("lora")
    assert len(lora) == 1434 and all(8 in s for s in lora)
    assert any(len(s) == 4 for s in bench.suite_shapes("sdxl"))


def test_run_suite_measures_state_and_ratios():
    configs = [bench.Config(bench.BASELINE, "AdamW", {"lr": 1e-3, "foreach": True}),
               bench.Config("Adakaon int8", "Adakaon", {"momentum_dtype": "int8"}),
               bench.Config(bench.LOOP, "Adakaon", {"momentum_dtype": "int8", "foreach": False})]
    rows = bench.run_suite("tiny", [(32, 16), (32, 16), (16,)], configs, steps=2, warmup=1)
    assert [r.label for r in rows] == [c.label for c in configs]
    assert rows[0].state_bytes_per_param == pytest.approx(8.0, abs=0.02)  # m, v + step
    assert rows[0].ratio_vs_adamw == 1.0
    assert 1.0 < rows[1].state_bytes_per_param < 2.0
    assert bench.loop_speedup(rows) > 0
    assert "Adakaon int8" in bench.format_table(rows)


def test_cli_version_list_and_bench(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kaon {kaon.__version__}"
    assert cli.main(["list"]) == 0
    assert "Adakaon" in capsys.readouterr().out
    model = tmp_path / "m.safetensors"
    _write_safetensors(model, {"w": {"dtype": "F32", "shape": [24, 12], "data_offsets": [0, 4]},
                               "v": {"dtype": "F32", "shape": [24, 12], "data_offsets": [4, 8]}})
    out_json = tmp_path / "rows.json"
    code = cli.main(["bench", "--safetensors", str(model), "--steps", "2", "--warmup", "1",
                     "--config", "Adakaon:momentum_dtype=4bit", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "torch AdamW foreach" in printed and "Adakaon:momentum_dtype=4bit" in printed
    assert len(json.loads(out_json.read_text())) == 2
    assert cli.main(["bench", "--suite", "nope", "--steps", "1"]) == 2
