"""The registry, the ``kaon`` command and the benchmark's pieces."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
import torch

import kaon
from kaon import bench, cli, registry


# ------------------------------------------------------------------------------ parse_kwargs
def test_parse_kwargs_literals_bare_words_and_nesting():
    parsed = registry.parse_kwargs(
        "lr=1e-3, betas=(0.9,0.999), momentum_dtype=int8, cautious=False, eps=[1e-30, 1e-3],"
        " bf16_method='kahan', note=\"a,b\", nested=((1, 2), [3, (4, 5)]), table={'a': (1, 2)},"
        " block=4bit, dtype=bfloat16, path=a.b-c, neg=-2, none=None"
    )
    assert parsed == {
        "lr": 1e-3, "betas": (0.9, 0.999), "momentum_dtype": "int8", "cautious": False,
        "eps": [1e-30, 1e-3], "bf16_method": "kahan", "note": "a,b",
        "nested": ((1, 2), [3, (4, 5)]), "table": {"a": (1, 2)}, "block": "4bit",
        "dtype": "bfloat16", "path": "a.b-c", "neg": -2, "none": None,
    }
    assert type(parsed["betas"]) is tuple and type(parsed["nested"][1]) is list
    # kohya's --optimizer_args form: a list of k=v strings
    assert registry.parse_kwargs(["momentum_dtype=4bit", "betas=(0.9, 0.99)"]) == {
        "momentum_dtype": "4bit", "betas": (0.9, 0.99)}
    assert registry.parse_kwargs("") == {} and registry.parse_kwargs(" , ") == {}


@pytest.mark.parametrize(
    "text, piece",
    [("lr", "lr"), ("=1", "=1"), ("lr=", "lr="), ("lr=(1,", "lr=(1,"), ("1x=2", "1x=2"),
     ("lr=a b", "lr=a b"), ("lr=1,betas=(0.9,0.99))", "betas=(0.9,0.99))"),
     ("lr=1, lr=2", "lr=2"), ("x=[1, 2)", "x=[1, 2)"), ("lr=1,note='abc", "note='abc")],
)
def test_parse_kwargs_rejects_malformed_pieces_naming_them(text, piece):
    with pytest.raises(ValueError, match="optimizer argument") as info:
        registry.parse_kwargs(text)
    assert repr(piece) in str(info.value)


# ------------------------------------------------------------------------- registry, create
def test_create_applies_arguments_to_param_groups():
    p = [torch.nn.Parameter(torch.zeros(4, 3))]
    opt = registry.create("kaon.Adakaon", p, "lr=2e-4,momentum_dtype=int8,betas=(0.8,0.99),"
                          "cautious=False,weight_decay=0.1")
    assert isinstance(opt, kaon.Adakaon)
    group = opt.param_groups[0]
    assert group["lr"] == 2e-4 and group["momentum_dtype"] == "int8"
    assert group["betas"] == (0.8, 0.99) and group["cautious"] is False
    assert group["weight_decay"] == 0.1
    p[0].grad = torch.ones(4, 3)
    opt.step()
    assert opt.state[p[0]]["m"].dtype == torch.int8  # the argument reached the state layout

    opt = registry.create("ADAKAON", p, {"momentum_dtype": "4bit", "foreach": False})
    assert opt.param_groups[0]["momentum_dtype"] == "4bit" and opt.foreach is False
    adamw = registry.create("torch.optim.AdamW", p, ["lr=0.5", "foreach=True"])
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["lr"] == 0.5


def test_registry_lookup_and_unknown_names():
    assert registry.get("Adakaon") is kaon.Adakaon
    assert registry.get(" kaon.adakaon ") is kaon.Adakaon
    assert registry.get("adamw") is kaon.AdamW and registry.get("kaon.Muon") is kaon.Muon
    assert registry.get("torch.optim.AdamW") is torch.optim.AdamW  # torch's, by its path
    assert registry.get("torch.optim.SGD") is torch.optim.SGD
    with pytest.raises(ValueError, match="unknown optimizer 'Nope'.*Adakaon, AdamW"):
        registry.get("Nope")
    with pytest.raises(ValueError, match="known optimizers"):
        registry.create("kaon.NoSuchOptimizer", [torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="unexpected keyword"):
        registry.create("Adakaon", [torch.nn.Parameter(torch.zeros(2))], "momentum=0.9")


def test_register_adds_and_replaces_names():
    before = dict(registry.OPTIMIZERS)
    try:
        registry.register("MySGD", torch.optim.SGD)
        assert registry.get("mysgd") is torch.optim.SGD
        assert isinstance(registry.create("kaon.MySGD", [torch.nn.Parameter(torch.zeros(2))],
                                          "lr=0.1"), torch.optim.SGD)
        registry.register("mysgd", torch.optim.Adam)  # same name in another case replaces it
        assert registry.get("MySGD") is torch.optim.Adam
        assert sum(k.lower() == "mysgd" for k in registry.OPTIMIZERS) == 1
        with pytest.raises(TypeError):
            registry.register("bad", dict)  # type: ignore[arg-type]
    finally:
        registry.OPTIMIZERS.clear()
        registry.OPTIMIZERS.update(before)


# ------------------------------------------------------------------------ safetensors, LoRA
def _write_safetensors(path, header, payload=64):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * payload)


def test_safetensors_header_shapes_filter_and_lora_synthesis(tmp_path):
    model = tmp_path / "model.safetensors"
    _write_safetensors(model, {
        "__metadata__": {"format": "pt"},
        "unet.conv.weight": {"dtype": "F16", "shape": [64, 32, 3, 3], "data_offsets": [0, 8]},
        "unet.norm.weight": {"dtype": "F16", "shape": [64], "data_offsets": [8, 16]},
        "te.proj.weight": {"dtype": "F16", "shape": [16, 8], "data_offsets": [16, 24]},
        "te.scalar": {"dtype": "F32", "shape": [], "data_offsets": [24, 28]},
    })
    shapes = bench.read_safetensors_shapes(model)
    assert shapes == {"unet.conv.weight": (64, 32, 3, 3), "unet.norm.weight": (64,),
                      "te.proj.weight": (16, 8), "te.scalar": ()}
    assert list(bench.read_safetensors_shapes(model, prefix="unet.")) == [
        "unet.conv.weight", "unet.norm.weight"]
    # A = (rank, numel / out), B = (out, rank); vectors and scalars get no pair
    assert bench.lora_shapes_for(shapes.values(), 4) == [(4, 288), (64, 4), (4, 8), (16, 4)]
    assert bench.suite_shapes(f"safetensors:{model}") == [(64, 32, 3, 3), (64,), (16, 8)]
    assert bench.suite_shapes(f"safetensors:{model}", prefix="te.", lora_rank=2) == [
        (2, 8), (16, 2)]
    with pytest.raises(ValueError, match="no tensors starting with 'vae.'"):
        bench.suite_shapes(f"safetensors:{model}", prefix="vae.")
    with pytest.raises(ValueError, match="rank"):
        bench.lora_shapes_for([(4, 4)], 0)


def test_safetensors_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        bench.read_safetensors_shapes(tmp_path / "missing.safetensors")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(ValueError, match="too short"):
        bench.read_safetensors_shapes(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ValueError, match="implausible"):
        bench.read_safetensors_shapes(huge)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 100) + b'{"w": {}}')
    with pytest.raises(ValueError, match="truncated"):
        bench.read_safetensors_shapes(truncated)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        bench.read_safetensors_shapes(bad)
    listed = tmp_path / "list.safetensors"
    _write_safetensors(listed, [1, 2])
    with pytest.raises(ValueError, match="not an object"):
        bench.read_safetensors_shapes(listed)
    no_shape = tmp_path / "noshape.safetensors"
    _write_safetensors(no_shape, {"w": {"dtype": "F32", "shape": [2, "x"]}})
    with pytest.raises(ValueError, match="'w' has no valid shape"):
        bench.read_safetensors_shapes(no_shape)
    with pytest.raises(ValueError, match="directory"):
        bench.read_safetensors_shapes(tmp_path)


# ------------------------------------------------------------------------------------ suites
def test_suites_have_the_documented_sizes():
    def numel(shapes):
        return sum(math.prod(s) for s in shapes)

    assert numel(bench.suite_shapes("llm")) == 55_858_176
    assert 3e6 < numel(bench.suite_shapes("llm", quick=True)) < 6e6
    sdxl = bench.suite_shapes("sdxl")
    assert 20e6 < numel(sdxl) < 60e6
    for shape in [(320, 320, 3, 3), (640, 640, 3, 3), (1280, 1280, 3, 3), (640, 320, 3, 3),
                  (640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 640),
                  (640, 2560)]:
        assert shape in sdxl, shape
    assert numel(bench.suite_shapes("sdxl", quick=True)) < 8e6
    lora = bench.suite_shapes("lora")
    assert len(lora) == 1434 and numel(lora) > 20e6
    quick = bench.suite_shapes("lora", quick=True)
    assert len(quick) == 256 and quick == lora[:256]  # a prefix: same kinds of layers
    assert {640, 1280} <= {d for s in quick for d in s}
    assert all(s[0] == 8 for s in lora[0::2]) and all(s[1] == 8 for s in lora[1::2])
    dims = {d for s in lora for d in s if d != 8}
    assert {640, 1280, 2048, 2560, 5120, 10240} <= dims
    with pytest.raises(ValueError, match="unknown suite"):
        bench.suite_shapes("gpt")


# ------------------------------------------------------------------------------- measurement
def test_state_bytes_helper_counts_any_torch_optimizer():
    p = torch.nn.Parameter(torch.zeros(10, 4))
    p.grad = torch.ones(10, 4)
    adam = torch.optim.Adam([p])
    adam.step()
    assert bench.optimizer_state_bytes(adam) == 2 * 40 * 4 + 4  # exp_avg, exp_avg_sq, step
    lbfgs = torch.optim.LBFGS([p], history_size=3)
    lbfgs.step(lambda: (p * p).sum())  # keeps lists of tensors in its state
    assert bench.optimizer_state_bytes(lbfgs) > 40 * 4
    opt = kaon.Adakaon([p], momentum_dtype="int8")
    opt.step()
    assert bench.optimizer_state_bytes(opt) == opt.state_bytes() == 10 * 4 + 4 * 4 + 40 + 10 * 4


def test_run_suite_measures_state_ratios_and_skips_optional_failures():
    configs = [bench.Config(bench.BASELINE, "AdamW", {"lr": 1e-3, "foreach": True}),
               bench.Config(bench.BATCHED, "Adakaon", {"momentum_dtype": "int8"}),
               bench.Config(bench.LOOP, "Adakaon", {"momentum_dtype": "int8", "foreach": False}),
               bench.Config("broken", "Adakaon", {"momentum_dtype": "int3"}, optional=True)]
    notes: list[str] = []
    rows = bench.run_suite("tiny", [(32, 16), (32, 16), (16,)], configs, steps=2, warmup=1,
                           notes=notes)
    assert [r.label for r in rows] == [c.label for c in configs[:3]]
    assert len(notes) == 1 and notes[0].startswith("broken: skipped")
    assert all(r.params == 1040 and r.tensors == 3 and r.steps == 2 for r in rows)
    assert rows[0].state_bytes_per_param == pytest.approx(8.0, abs=0.02)  # m, v + step
    assert rows[0].ratio_vs_adamw == 1.0 and rows[0].scratch_bytes == 0
    # int8 momentum: 1 B + one fp32 scale per row, plus the factored or full second moment
    assert rows[1].state_bytes == rows[2].state_bytes == 2 * (512 + 32 * 4 + 48 * 4) + 16 + 4 + 64
    assert bench.loop_speedup(rows) > 0
    table = bench.format_table(rows, notes)
    assert "Adakaon int8 foreach=False" in table and "broken: skipped" in table
    with pytest.raises(ValueError):  # a failing configuration that is not optional raises
        bench.run_suite("tiny", [(4, 4)], configs[3:4] + [bench.Config("x", "Adakaon",
                        {"momentum_dtype": "int3"})], steps=1, warmup=0)


def test_run_suite_bfloat16_parameters():
    configs = bench.baseline_configs() + [bench.parse_config("Adakaon:momentum_dtype=4bit")]
    rows = bench.run_suite("tiny", [(256, 256), (256, 256)], configs, steps=2, warmup=0,
                           dtype=torch.bfloat16)
    assert rows[-1].label == "Adakaon:momentum_dtype=4bit" and rows[-1].args["lr"] == 1e-4
    assert rows[-1].dtype == "bfloat16"
    assert rows[-1].state_bytes_per_param < 0.6 < 4 <= rows[0].state_bytes_per_param


def test_parse_config():
    config = bench.parse_config("kaon.Adakaon:momentum_dtype=int8,lr=3e-4")
    assert config == bench.Config("kaon.Adakaon:momentum_dtype=int8,lr=3e-4", "kaon.Adakaon",
                                  {"lr": 3e-4, "momentum_dtype": "int8"})
    assert bench.parse_config("AdamW").args == {"lr": 1e-4}
    with pytest.raises(ValueError, match="unknown optimizer"):
        bench.parse_config("Nope:lr=1")
    with pytest.raises(ValueError, match="name is missing"):
        bench.parse_config(":lr=1")


# ------------------------------------------------------------------------------------- CLI
def test_cli_version_help_and_list(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kaon {kaon.__version__}"
    assert cli.main(["--help"]) == 0
    assert "bench" in capsys.readouterr().out
    assert cli.main([]) == 0
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "Adakaon" in listed and "kaon.optim.adamw.AdamW" in listed and "Muon" in listed
    assert cli.main(["bench", "--steps", "0"]) == 2
    assert cli.main(["bench", "--lora-rank", "4"]) == 2  # only with a safetensors suite
    assert "safetensors suites only" in capsys.readouterr().err


def test_cli_bench_on_a_safetensors_file(capsys, tmp_path):
    model = tmp_path / "m.safetensors"
    _write_safetensors(model, {"w": {"dtype": "F32", "shape": [24, 12], "data_offsets": [0, 4]},
                               "v": {"dtype": "F32", "shape": [24, 12], "data_offsets": [4, 8]},
                               "b": {"dtype": "F32", "shape": [24], "data_offsets": [8, 9]}})
    out_json = tmp_path / "rows.json"
    code = cli.main(["bench", "--safetensors", str(model), "--steps", "2", "--warmup", "1",
                     "--filter", "w", "--lora-rank", "4", "--device", "cpu",
                     "--config", "Adakaon:momentum_dtype=4bit", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"[safetensors:{model}] 2 tensors, 144 parameters" in printed
    assert "torch AdamW foreach" in printed and "Adakaon:momentum_dtype=4bit" in printed
    rows = json.loads(out_json.read_text())
    assert [r["label"] for r in rows][0] == bench.BASELINE
    assert rows[-1]["label"] == "Adakaon:momentum_dtype=4bit" and rows[-1]["params"] == 144
    assert {"state_bytes_per_param", "median_ms", "ratio_vs_adamw"} <= set(rows[-1])
    assert cli.main(["bench", "--suite", "nope", "--steps", "1"]) == 2
    # a bad configuration fails before any suite is built or measured
    assert cli.main(["bench", "--suite", "lora", "--config", "Adakaon:momentum=0.9"]) == 2
    assert "configuration 'Adakaon:momentum=0.9'" in capsys.readouterr().err
    assert cli.main(["bench", "--safetensors", str(tmp_path / "gone.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bench_prints_the_loop_ratio_for_the_lora_suite(monkeypatch):
    # the real lora suite, cut down to a few tensors so that the test stays fast
    tiny = bench.suite_shapes("lora")[:6]
    monkeypatch.setattr(bench, "_lora_shapes", lambda: tiny)
    printed: list[str] = []
    rows = bench.run(["lora"], steps=1, warmup=0, device="cpu", out=printed.append)
    assert rows[-1].label == bench.LOOP and len(rows) in (6, 7)  # fused may be unsupported
    text = "\n".join(printed)
    assert "[lora] 6 tensors" in text and "batched vs per-parameter loop: " in text


def test_python_dash_m_kaon():
    result = subprocess.run([sys.executable, "-m", "kaon", "--version"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip() == f"kaon {kaon.__version__}"


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["battery", "--help"],
                                  ["bench", "--help"], []])
def test_help_and_version_import_neither_torch_nor_matplotlib(argv):
    """``kaon --help`` starts in a fraction of a second: no torch, matplotlib or transformers."""
    code = ("import sys\nfrom kaon.cli import main\ncode = main(sys.argv[1:])\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'matplotlib', "
            "'numpy', 'transformers', 'tqdm'})\nprint('HEAVY', heavy)\nraise SystemExit(code)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_import_kaon_is_lazy_but_complete():
    result = subprocess.run([sys.executable, "-c", "import sys, kaon; "
                             "print('torch' in sys.modules)"], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.stdout.strip() == "False", result.stderr
    for name in kaon.__all__:  # every public name still resolves, and to the defining module
        assert getattr(kaon, name) is not None
    assert kaon.Adakaon is kaon.optim.Adakaon and kaon.ops.newton_schulz is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = kaon.Nope


# ------------------------------------------------------------- battery --out, --render-only
def test_battery_out_under_a_regular_file_fails_before_training(tmp_path, capsys, monkeypatch):
    from kaon.battery import runner

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "run_battery", no_training)
    monkeypatch.setattr("kaon.battery.run_battery", no_training, raising=False)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub" / "dir"):
        assert cli.main(["battery", "--profile", "tiny", "--out", str(out)]) != 0
        err = capsys.readouterr().err
        assert "--out" in err and "not a folder" in err


def test_battery_render_only_on_an_empty_folder_fails(tmp_path, capsys):
    assert cli.main(["battery", "--render-only", "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--render-only" in err and "cache.json" in err
    (tmp_path / "cache.json").write_text("{}")
    assert cli.main(["battery", "--render-only", "--out", str(tmp_path)]) != 0
    assert "holds no runs" in capsys.readouterr().err


# --------------------------------------------------------------- argument kinds are named
@pytest.mark.parametrize("name, flag", [("Adakaon", "cautious"), ("torch.optim.AdamW", "amsgrad")])
def test_create_names_an_argument_of_the_wrong_kind(name, flag):
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"lr='abc'.*lr expects a number"):
        registry.create(name, p, "lr=abc")
    with pytest.raises(ValueError, match=rf"{flag} expects True or False"):
        registry.create(name, p, f"{flag}=maybe")


# ------------------------------------------------------------------ every --help example runs
def _help_examples(command):
    import io
    import shlex
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert cli.main([command, "--help"]) == 0
    text = buffer.getvalue().split("examples:", 1)[1]
    examples = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"kaon {command}"):
            words = shlex.split(line, comments=True)  # a shell syntax error raises here
            examples.append(words[2:])
    return examples


@pytest.mark.parametrize("command", ["battery", "bench"])
def test_every_help_example_runs(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write_safetensors(tmp_path / "model.safetensors", {
        "model.diffusion_model.w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    (tmp_path / "battery-out").mkdir()
    (tmp_path / "battery-out" / "cache.json").write_text('{"quick": {}}')
    examples = _help_examples(command)
    assert len(examples) >= 4
    for words in examples:
        code = cli.main([command, *words, "--dry-run"])
        assert code == 0, (words, capsys.readouterr().err)


# ----------------------------------------------------- kaon list, Autokaon, dotted class paths
def test_list_aligns_wraps_and_includes_autokaon(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    heads = [line for line in lines if not line.startswith(" ")]
    assert any(line.startswith("Autokaon ") for line in heads)
    starts = {line.index("kaon.optim.") for line in heads}
    assert len(heads) == len(registry.OPTIMIZERS)
    assert len(starts) == 1  # the class-path column is aligned
    text = " ".join(line.strip() for line in lines)
    for cls in registry.OPTIMIZERS.values():
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n", 1)[0].split())
        assert summary in text  # wrapped, never cut


def test_autokaon_and_dotted_class_paths_resolve():
    assert registry.get("Autokaon") is kaon.Autokaon
    assert bench.parse_config("Autokaon").name == "Autokaon"
    assert registry.get("kaon.optim.adakaon.Adakaon") is kaon.Adakaon
    assert registry.get("kaon.optim.autokaon.Autokaon") is kaon.Autokaon


# ------------------------------------------------- battery blurbs agree with the measured table
def test_battery_blurbs_agree_with_the_committed_bytes_per_param():
    import re
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "battery-quick" / "results.json"
    rows = json.loads(results.read_text())["rows"]
    from kaon.battery import ENTRIES

    blurbs = {e.name: e.blurb for e in ENTRIES}
    checked = 0
    for row in rows:
        found = re.search(r"~?([0-9.]+) B/param", blurbs.get(row["name"], ""))
        if found and row.get("bpp") is not None:
            stated = float(found.group(1))
            assert abs(stated - row["bpp"]) <= max(0.1, 0.1 * row["bpp"]), (row["name"], stated)
            checked += 1
    assert checked >= 2  # the entries of the committed default run that state a figure
