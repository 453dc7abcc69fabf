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
        assert row["te"] is not None and row["bpp"] > 0 and row["lora_ms"] > 0
        assert row["lm_te"] is not None and row["img_te"] is not None
    for name in ("heldout_curves.png", "memory_vs_loss.png", "gap_vs_loss.png", "samples.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    # AdamW keeps two fp32 moments: 8 bytes of state per parameter
    adamw = next(r for r in results["rows"] if r["name"] == REFERENCE)
    assert adamw["bpp"] == pytest.approx(8.0, abs=0.05)
    assert results["noise"] is not None  # the reference's extra seed


def test_new_optimizer_measures_only_itself_and_rerenders(tiny_run, tmp_path):
    out, _ = tiny_run
    cache_before = json.loads((out / "cache.json").read_text())
    logs: list[str] = []
    sgd = entry_from_spec("torch.optim:SGD", "lr=0.05,momentum=0.9")
    battery.run_battery([*_two_entries(), sgd], profile="tiny", out=out, threads=1,
                        progress=False, log=logs.append)
    measured = [line for line in logs if "measured" in line]
    runs_for_one = len(TINY.tasks) * len(TINY.seeds) + len(TINY.constant_tasks) + 1  # + lora
    assert len(measured) == 1 and f"measured {runs_for_one} run(s)" in measured[0]
    cache_after = json.loads((out / "cache.json").read_text())
    context = next(iter(cache_after["contexts"]))
    for config, entry in cache_before["contexts"][context].items():
        assert cache_after["contexts"][context][config]["runs"] == entry["runs"]
    names = [row["name"] for row in json.loads((out / "results.json").read_text())["rows"]]
    assert "SGD(lr=0.05,momentum=0.9)" in names and REFERENCE in names


def test_render_only_measures_nothing(tiny_run):
    out, _ = tiny_run
    logs: list[str] = []
    battery.run_battery(_two_entries(), profile="tiny", out=out, render_only=True,
                        progress=False, log=logs.append)
    assert not any("measured" in line for line in logs)
    assert (out / "report.md").exists()


def test_results_are_deterministic_on_cpu(tmp_path):
    entries = select("Adakaon-nomom")
    first = battery.run_battery(entries, profile="tiny", out=tmp_path / "a", threads=1,
                                progress=False, log=lambda _: None)
    second = battery.run_battery(entries, profile="tiny", out=tmp_path / "b", threads=1,
                                 progress=False, log=lambda _: None)
    keys = ("te", "tr", "gap", "cte", "cgap", "img_te", "lm_te", "bpp", "trajectory")
    for key in keys:
        assert first["rows"][0][key] == second["rows"][0][key], key


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
