"""The recipes in docs/gradient-release.md and docs/trainers/*.md run (the kohya flags through
the trainers' construction path, the Python blocks as written)."""

from __future__ import annotations

import ast
import re
import shlex
import warnings
from pathlib import Path

import pytest
import torch
from test_integrations import kohya_style_get_optimizer

import kaon
from kaon.integrations.accelerate import unwrap

DOCS = Path(__file__).resolve().parent.parent / "docs"


def blocks(page: str, language: str = "python") -> list[str]:
    found = re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), re.S)
    assert found, f"docs/{page} lost its {language} blocks"
    return found


def run(page: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    for block in blocks(page):
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    return namespace


def test_gradient_release_page_runs():
    namespace = run("gradient-release.md")
    assert isinstance(namespace["opt"], kaon.Lion)
    assert all(p.grad is None for p in namespace["model"].parameters())
    assert not any("accumulated_grad" in s for s in namespace["opt"].state.values())


def kohya_pairs(text: str) -> list[tuple[str, list[str]]]:
    """Every ``--optimizer_type X --optimizer_args ...`` of a shell block."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    pairs = []
    for i, word in enumerate(words):
        if word == "--optimizer_type":
            args = []
            if i + 2 < len(words) and words[i + 2] == "--optimizer_args":
                for item in words[i + 3:]:
                    if item.startswith("--"):
                        break
                    args.append(item)
            pairs.append((words[i + 1], args))
    return pairs


def test_kohya_page_flags_build_through_the_trainers_path():
    pairs = [pair for block in blocks("trainers/kohya.md", "bash") for pair in kohya_pairs(block)]
    for block in blocks("trainers/kohya.md", "toml"):
        # the page's TOML lines are `key = value` with Python-literal values (tomllib is 3.11+)
        config = {k.strip(): ast.literal_eval(v.strip())
                  for k, _, v in (line.partition("=") for line in block.splitlines() if line)}
        pairs.append((config["optimizer_type"], config["optimizer_args"]))
    assert len(pairs) >= 6
    for name, args in pairs:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
        groups = [{"params": model[0].parameters(), "lr": 1e-4},
                  {"params": model[1].parameters(), "lr": 5e-5}]
        opt, _ = kohya_style_get_optimizer(name, args, 1e-4, groups)
        assert isinstance(opt, kaon.KaonOptimizer), name
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        assert opt.state
    namespace = run("trainers/kohya.md")
    assert namespace["opt"].defaults["momentum_dtype"] == "int8"


def test_onetrainer_page_runs():
    namespace = run("trainers/onetrainer.md")
    opt, model = namespace["opt"], namespace["model"]
    assert opt.state[model[0].weight]["m"].dtype == torch.int8
    assert all(p.grad is None for p in model.parameters())


transformers = pytest.importorskip("transformers")


def test_huggingface_page_runs(tmp_path, monkeypatch):
    from test_trainers import TokenData, tiny_llama

    monkeypatch.chdir(tmp_path)
    namespace = {"model": tiny_llama(), "train_dataset": TokenData(16)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("trainers/huggingface.md", namespace)
    opt = unwrap(namespace["trainer"].optimizer)
    assert isinstance(opt, kaon.Muon)
    assert any(g.get("initial_lr") == 3e-5 for g in opt.param_groups)
    assert namespace["trainer"].state.global_step == 2


def test_accelerate_page_runs(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = run("trainers/accelerate.md")
    assert unwrap(namespace["opt"]).training
    assert (tmp_path / "checkpoint").is_dir()
    assert any(type(c).__name__ == "KaonTrainEval" for c in namespace["trainer"].callbacks)
