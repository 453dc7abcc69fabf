"""The control battery end to end on the tiny profile, its cache, determinism and data splits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kaon import battery
from kaon.battery import diffusion, lm
from kaon.battery.core import PROFILES, RunRecord, rex_multiplier
from kaon.battery.registry import REFERENCE, entry_from_spec, select
from kaon.cli import main

TINY = PROFILES["tiny"]


def _two_entries():
    return select(f"{REFERENCE},Adakaon-nomom")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("battery")
    payload = battery.run_battery(_two_entries(), profile="tiny", out=out, threads=1,
                                  progress=False, log=lambda _: None)
    return out, payload


def test_tiny_profile_writes_report_json_and_plots(tiny_run):
    out, payload = tiny_run
    report = (out / "report.md").read_text()
    assert "Ranking" in report and "Seed noise" in report and "CPU" in report
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert sorted(names) == sorted([REFERENCE, "Adakaon-nomom"])
    for row in results["rows"]:
        assert row["te"] is not None and row["bpp"] > 0
        assert row["lm_te"] is not None and row["img_te"] is not None
    # step times live apart from the deterministic rows, one fresh pass for every entry
    assert "ms" not in results["rows"][0] and results["timing"]["fresh"]
    timed = {row["name"]: row for row in results["timing"]["rows"]}
    assert set(timed) == set(names)
    assert all(row["ms"] > 0 and row["lora_ms"] > 0 for row in timed.values())
    assert results["timing"]["command_cpu_s"] > 0
    assert report.index("## Step times") > report.index("## Optimizers")
    for name in ("heldout_curves.png", "memory_vs_loss.png", "gap_vs_loss.png",
                 "speed_vs_loss.png", "samples.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    # AdamW keeps two fp32 moments: 8 bytes of state per parameter
    adamw = next(r for r in results["rows"] if r["name"] == REFERENCE)
    assert adamw["bpp"] == pytest.approx(8.0, abs=0.05)
    assert results["noise"] is not None  # the reference's extra seed


def test_new_optimizer_measures_only_itself_and_rerenders(tiny_run, tmp_path):
    out, _ = tiny_run
    _ = json.loads((out / "results.json").read_text())
    cache_before = json.loads((out / "cache.json").read_text())
    logs: list[str] = []
    sgd = entry_from_spec("torch.optim:SGD", "lr=0.05,momentum=0.9")
    battery.run_battery([*_two_entries(), sgd], profile="tiny", out=out, threads=1,
                        progress=False, log=logs.append)
    measured = [line for line in logs if "measured" in line]
    runs_for_one = len(TINY.tasks) * len(TINY.seeds) + len(TINY.constant_tasks)
    assert len(measured) == 1 and f"measured {runs_for_one} run(s)" in measured[0]
    cache_after = json.loads((out / "cache.json").read_text())
    context = next(iter(cache_after["contexts"]))
    for config, entry in cache_before["contexts"][context].items():
        assert cache_after["contexts"][context][config]["runs"] == entry["runs"]
    results = json.loads((out / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert "SGD(lr=0.05,momentum=0.9)" in names and REFERENCE in names
    # the added entry is not part of the default set: the target T does not move
    assert results["target"] == pytest.approx(_["target"], abs=0)
    # every entry, cached or new, was re-timed in this run
    assert {row["name"] for row in results["timing"]["rows"]} == set(names)


def test_a_weak_added_optimizer_keeps_the_default_ranking(tiny_run, tmp_path):
    """kaon battery --optimizer torch.optim:SGD "lr=0.01" on a cache of the default entries:
    the targets, and every default entry's ranks, mean rank and place, stay as they were."""
    out, before = tiny_run
    cache = json.loads((out / "cache.json").read_text())
    for entries in cache["contexts"].values():  # only the fixture's entries (no other test's)
        for config in [c for c, e in entries.items() if e.get("family") == "custom"]:
            del entries[config]
    (tmp_path / "cache.json").write_text(json.dumps(cache))
    weak = entry_from_spec("torch.optim:SGD", "lr=0.01")
    after = battery.run_battery([*_two_entries(), weak], profile="tiny", out=tmp_path,
                                threads=1, progress=False, log=lambda _: None)
    assert after["target"] == before["target"]
    assert after["target_const"] == before["target_const"]
    rows = {r["name"]: r for r in after["rows"]}
    assert rows[weak.name]["te"] > max(r["te"] for r in before["rows"])  # it is the weak one
    for old in before["rows"]:
        new = rows[old["name"]]
        for key in ("ranks", "mean_rank", "place", "conv", "wins"):
            assert new[key] == old[key], (old["name"], key)


def test_render_only_measures_nothing(tiny_run):
    out, _ = tiny_run
    logs: list[str] = []
    battery.run_battery(_two_entries(), profile="tiny", out=out, render_only=True,
                        progress=False, log=logs.append)
    assert not any("measured" in line for line in logs)
    assert (out / "report.md").exists()


def test_results_are_deterministic_on_cpu_and_do_not_depend_on_the_worker_count(tmp_path):
    entries = _two_entries()
    first = battery.run_battery(entries, profile="tiny", out=tmp_path / "a", threads=1,
                                progress=False, log=lambda _: None)
    second = battery.run_battery(entries, profile="tiny", out=tmp_path / "b", threads=1,
                                 jobs=2, progress=False, log=lambda _: None)
    keys = ("te", "tr", "gap", "cte", "cgap", "img_te", "lm_te", "bpp", "trajectory")
    for key in keys:
        assert first["rows"][0][key] == second["rows"][0][key], key
    # the report is byte-for-byte the same apart from its timing section and timing key
    reports = [(tmp_path / d / "report.md").read_text() for d in "ab"]
    untimed = [text[:text.index("## Step times")] for text in reports]
    assert untimed[0] == untimed[1]
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in "ab"]
    for data in results:
        del data["timing"]
    assert results[0] == results[1]
    for name in ("heldout_curves.png", "memory_vs_loss.png", "gap_vs_loss.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="jobs"):
        battery.run_battery(_two_entries(), profile="tiny", out=tmp_path, jobs=0,
                            progress=False, log=lambda _: None)


def test_diffusion_trains_only_on_the_train_split(monkeypatch):
    task = diffusion.DiffusionTask("synthetic")
    data = task.data(TINY.resolutions)
    seen: list[torch.Tensor] = []
    original = diffusion._noise_loss

    def spy(model, x0, t, noise, bars):
        if torch.is_grad_enabled():
            seen.append(x0.detach().clone())
        return original(model, x0, t, noise, bars)

    monkeypatch.setattr(diffusion, "_noise_loss", spy)
    task.run(lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr), 1e-3, schedule="rex",
             seed=0, profile=TINY)
    assert seen
    for batch in seen:
        size = batch.shape[-1]
        train = data[size][: diffusion.TRAIN_IMAGES].flatten(1)
        heldout = data[size][diffusion.TRAIN_IMAGES:].flatten(1)
        for image in batch.flatten(1):
            assert (train == image).all(dim=1).any()
            assert not (heldout == image).all(dim=1).any()


def test_language_model_trains_only_on_the_train_split(monkeypatch):
    task = lm.LanguageModelTask()
    seen: list[torch.Tensor] = []
    original = lm._loss

    def spy(model, seqs):
        if torch.is_grad_enabled():
            seen.append(seqs.clone())
        return original(model, seqs)

    monkeypatch.setattr(lm, "_loss", spy)
    task.run(lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr), 1e-3, schedule="rex",
             seed=0, profile=TINY)
    heldout = {tuple(s.tolist()) for s in task.heldout_split}
    train = {tuple(s.tolist()) for s in task.train_split}
    assert not heldout & train  # the splits are disjoint
    for batch in seen:
        for seq in batch:
            assert tuple(seq.tolist()) in train


def test_rex_schedule_and_resolution_curriculum():
    assert rex_multiplier(0.0) == 1.0 and rex_multiplier(1.0) == 0.0
    assert rex_multiplier(0.5) > 0.5  # REX stays high longer than linear decay
    sizes = diffusion.resolution_schedule(100, (8, 12, 16))
    assert len(sizes) == 100 and set(sizes[:40]) == {8, 16} and set(sizes[40:80]) == {12, 16}
    assert set(sizes[80:]) == {16}


def test_diverged_run_ranks_last():
    record = RunRecord("diffusion", "rex", 0, 1.0, diverged=True)
    assert record.final_heldout == math.inf and record.gap == math.inf


def test_cli_lists_entries_and_rejects_bad_arguments(capsys, tmp_path):
    assert main(["battery", "--list"]) == 0
    assert REFERENCE in capsys.readouterr().out
    assert main(["battery", "--only", "NoSuchOptimizer", "--out", str(tmp_path)]) == 2
    assert "unknown battery entry" in capsys.readouterr().err
    assert main(["battery", "--optimizer", "nosuchmodule:Foo", "--out", str(tmp_path)]) == 2
    assert main(["battery", "--optimizer", "torch.optim", "--out", str(tmp_path)]) == 2


def test_changed_learning_rate_is_remeasured_and_the_old_runs_are_stale(tmp_path, monkeypatch):
    import dataclasses

    from kaon.battery import registry

    old = select("Adakaon-nomom")[0]
    battery.run_battery([old], profile="tiny", out=tmp_path, progress=False, log=lambda _: None)
    new = dataclasses.replace(old, lr={"diffusion": 1e-3, "lm": 1e-3})
    monkeypatch.setattr(registry, "ENTRIES", [new])
    logs: list[str] = []
    payload = battery.run_battery([new], profile="tiny", out=tmp_path, progress=False,
                                  log=logs.append)
    assert any("measured" in line for line in logs)
    assert [row["name"] for row in payload["rows"]] == ["Adakaon-nomom"]
    assert payload["stale"] == ["Adakaon-nomom"]
    assert "Stale cache entries" in (tmp_path / "report.md").read_text()


# --- the report on synthetic results: ties, the target, gating, colours --------------------

def _fake(name: str, te: float, *, gap: float = 0.01, bpp: float = 1.0, default: bool = True,
          lm: float = 1.3, img: float = 0.13, curve: list[float] | None = None,
          family: str = "kaon") -> tuple[str, dict]:
    steps = [30 * (k + 1) for k in range(8)]
    curve = curve or [te + 0.1 * (1 - k / 7) ** 2 for k in range(8)]

    def record(task: str, schedule: str, final: float, gap_: float) -> dict:
        return RunRecord(task, schedule, 0, 1e-3, steps=steps, heldout=list(curve),
                         heldout_loss=final, train_loss=final - gap_,
                         bytes_per_param=bpp).to_json()

    runs = {"diffusion/rex/0": record("diffusion", "rex", te, gap),
            "diffusion/constant/0": record("diffusion", "constant", te + 0.005, gap),
            "images/rex/0": record("images", "rex", img, 0.002),
            "lm/rex/0": record("lm", "rex", lm, 0.3)}
    return f"{name} | cfg", {"name": name, "family": family, "default": default, "runs": runs}


def _defaults() -> dict:
    return dict([_fake("A", 0.210, gap=0.008, bpp=2.0, lm=1.30),
                 _fake("B", 0.212, gap=0.006, bpp=1.0, lm=1.27),
                 _fake("C", 0.215, gap=0.009, bpp=0.3, lm=1.45),
                 _fake("D", 0.220, gap=0.007, bpp=8.0, lm=1.35),
                 _fake("E", 0.225, gap=0.005, bpp=4.0, lm=1.60)])


def test_quantile_and_competition_ranks():
    from kaon.battery.report import competition_ranks, quantile

    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert quantile([1.0, math.inf, 2.0], 1.0) == 2.0 and quantile([], 0.5) == math.inf
    with pytest.raises(ValueError, match="q must be"):
        quantile([1.0], 1.5)
    # equal shown values share a rank; the next rank skips; inf and ineligible go last
    assert competition_ranks([0.21151, 0.21149, 0.3, math.inf], 4) == [1, 1, 3, 4]
    assert competition_ranks([0.1, 0.2, 0.3], 1, eligible=[True, False, True]) == [1, 3, 2]


def test_ties_share_a_rank_and_are_not_wins():
    from kaon.battery.report import compute

    entries = dict([_fake("Zeta", 0.2100), _fake("Alpha", 0.2100), _fake("Mid", 0.2200)])
    rows = {r["name"]: r for r in compute(entries, TINY)["rows"]}
    assert rows["Zeta"]["ranks"]["te"] == rows["Alpha"]["ranks"]["te"] == 1
    assert rows["Mid"]["ranks"]["te"] == 3
    assert "loss" not in rows["Zeta"]["wins"] and "loss (tie of 2)" in rows["Zeta"]["wins"]
    # identical entries: the same place, listed by name, not by registry or insertion order
    result = compute(entries, TINY)
    assert [r["name"] for r in result["rows"]][:2] == ["Alpha", "Zeta"]
    assert result["rows"][0]["place"] == result["rows"][1]["place"] == 1
    assert any(tie.startswith("loss: ") for tie in result["ties"])


def test_a_weak_added_entry_moves_neither_the_target_nor_the_default_ranking():
    from kaon.battery.report import compute

    base = compute(_defaults(), TINY)
    # an SGD-like entry: barely learns, so a small gap, no state, and a high loss
    weak = _fake("SGD(lr=0.01)", 0.34, gap=0.001, bpp=0.0, lm=2.5, img=0.3, default=False,
                 family="custom", curve=[0.6 - 0.03 * k for k in range(8)])
    added = compute({**_defaults(), weak[0]: weak[1]}, TINY)
    assert added["target"] == base["target"] and added["target_const"] == base["target_const"]
    before = [r["name"] for r in base["rows"]]
    after = [r["name"] for r in added["rows"] if r["name"] in before]
    assert after == before
    for old, new in zip(base["rows"], (r for r in added["rows"] if r["name"] in before)):
        assert old["conv"] == new["conv"] and old["ranks"] == new["ranks"], old["name"]
    sgd = next(r for r in added["rows"] if r["name"].startswith("SGD"))
    # it never reaches T, so its small gap and zero state win nothing
    assert sgd["conv"] == math.inf and sgd["wins"] == []
    last = {key: max(r["ranks"][key] for r in added["rows"]) for key in ("gap", "bpp")}
    assert sgd["ranks"]["gap"] == last["gap"] and sgd["ranks"]["bpp"] == last["bpp"]
    assert added["rows"][-1]["name"] == sgd["name"]


def test_target_is_a_quantile_of_the_default_entries():
    from kaon.battery.report import TARGET_QUANTILE, compute, quantile

    entries = _defaults()
    result = compute(entries, TINY)
    bests = [min(r["trajectory"]) for r in result["rows"]]
    assert result["target"] == pytest.approx(quantile(bests, TARGET_QUANTILE))
    assert result["target"] < max(bests)  # not the worst entry's best
    reached = [r for r in result["rows"] if math.isfinite(r["conv"])]
    assert 0 < len(reached) < len(result["rows"])


def test_colours_are_fixed_by_name():
    from kaon.battery.plots import style_of
    from kaon.battery.registry import ENTRIES

    styles = {e.name: style_of(e.name) for e in ENTRIES}
    assert len({c for c, _ in styles.values()}) == len(styles)  # no two registry entries share
    assert style_of("Lion") == styles["Lion"]
    assert style_of("SGD(lr=0.01)") == style_of("SGD(lr=0.01)")
    assert style_of("SGD(lr=0.01)")[1] == "*"


# --- docs/recipes.md quotes only what the committed quick run shows --------------------------

def test_recipes_quote_only_the_committed_battery_run():
    import re
    from pathlib import Path

    from kaon.battery.report import COLUMNS, SPEED_COLUMNS

    root = Path(__file__).resolve().parents[1]
    results = json.loads((root / "benchmarks/battery-quick/results.json").read_text())
    recipes = (root / "docs/recipes.md").read_text()
    rows = {r["name"]: r for r in results["rows"]}
    timed = {r["name"]: r for r in results["timing"]["rows"]}
    cells = {title: cell for title, cell in COLUMNS}
    speed_cells = {title: cell for title, cell in SPEED_COLUMNS}
    inf = float("inf")

    def restore(row):
        return {k: (inf if v is None else v) for k, v in row.items()}

    tables = re.findall(r"<!-- battery-quick -->\n((?:\|.*\n)+)", recipes)
    assert tables, "recipes.md has no <!-- battery-quick --> table"
    checked = 0
    for table in tables:
        lines = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
        header = [h.strip() for h in lines[0]]
        assert header[0] == "optimizer", header
        for line in lines[2:]:
            values = [v.strip() for v in line]
            name = values[0]
            assert name in rows, f"recipes.md quotes {name!r}, not in results.json"
            for title, shown in zip(header[1:], values[1:]):
                if title in speed_cells:
                    speed = {**restore(timed[name]), "ranks": {"ms": 0, "lora_ms": 0}}
                    expected = speed_cells[title](speed).split(" (")[0]
                else:
                    expected = cells[title](restore(rows[name]))
                assert shown == expected, f"recipes.md: {name} {title} {shown} != {expected}"
                checked += 1
    assert checked >= 10
    # claims of the form "best <column> in the battery: **NAME**"
    keys = {"held-out": "te", "gap": "gap", "faces held-out": "img_te",
            "LM held-out": "lm_te", "B/param": "bpp"}
    claims = re.findall(r"best ([A-Za-z/ -]+?) in the battery: \*\*([^*]+)\*\*", recipes)
    assert claims
    for title, name in claims:
        key = keys[title.strip()]
        best = min((r for r in rows.values() if r[key] is not None), key=lambda r: r[key])
        assert name == best["name"], f"recipes.md: best {title} is {best['name']}, not {name}"
    # the seed-noise figures
    noise = re.search(r"seed noise \(held-out loss ([\d.]+), gap ([\d.]+)[:)]", recipes)
    assert noise, "recipes.md must quote the seed noise"
    assert noise.group(1) == f"{results['noise']['te']:.4f}"
    assert noise.group(2) == f"{results['noise']['gap']:.4f}"


def test_steps_to_target_interpolates_between_checkpoints():
    from kaon.battery.report import steps_to

    assert steps_to([30, 60, 90], [0.5, 0.3, 0.2], 0.4) == pytest.approx(45.0)
    assert steps_to([30, 60], [0.2, 0.1], 0.3) == 30.0  # reached at the first checkpoint
    assert steps_to([30, 60], [0.5, 0.4], 0.3) == math.inf
