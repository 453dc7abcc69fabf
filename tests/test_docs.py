"""The code in the docs runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Doc examples save checkpoints (``opt.pt``): run them in a scratch directory."""
    monkeypatch.chdir(tmp_path)


def test_architecture_example_runs_and_trains():
    text = (DOCS / "architecture.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "docs/architecture.md lost its example"
    namespace: dict = {}
    exec(compile(blocks[0], "docs/architecture.md", "exec"), namespace)
    opt = namespace["opt"]
    assert opt.state and all(s["m"].dtype.is_signed for s in opt.state.values())


def test_adakaon_page_documents_every_state_key_and_argument():
    import inspect

    import kaon

    text = (DOCS / "adakaon.md").read_text()
    for key in ("`row`", "`col`", "`v`", "`m`", "`m_scale`", "`shift`"):
        assert key in text
    for name in inspect.signature(kaon.Adakaon).parameters:
        if name != "params":
            assert f"`{name}`" in text, name


def _run_blocks(page: str, only_last: bool = False) -> dict:
    """Run the page's python blocks (or only its last, complete example) in one namespace."""
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"docs/{page} lost its example"
    namespace: dict = {}
    for block in blocks[-1:] if only_last else blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    return namespace


def _documents_every_argument_and_key(page: str, cls, keys) -> None:
    import inspect

    text = (DOCS / page).read_text()
    for key in keys:
        assert f"`{key}`" in text, key
    for name in inspect.signature(cls).parameters:
        if name not in ("params", "adakaon_kwargs"):
            assert f"`{name}`" in text, name


def test_lion_page_runs_and_documents_every_argument_and_key():
    import kaon

    namespace = _run_blocks("lion.md")
    assert sorted(namespace["opt"].state[namespace["model"][0].weight]) == ["m", "m_scale"]
    _documents_every_argument_and_key("lion.md", kaon.Lion, ("m", "m_scale", "shift"))


def test_adamuon_page_runs_and_documents_every_argument_and_key():
    import kaon

    namespace = _run_blocks("adamuon.md")
    state = namespace["opt"].state[namespace["model"][0].weight]
    assert sorted(state) == ["col", "m", "m_scale", "row"]
    _documents_every_argument_and_key(
        "adamuon.md", kaon.AdaMuon, ("row", "col", "v", "m", "m_scale", "shift"))


def test_adamw_muon_and_grouping_pages_run_and_document_every_argument():
    import kaon

    for page, cls, keys in (
        ("adamw.md", kaon.AdamW, ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "shift",
                                  "_offset")),
        ("muon.md", kaon.Muon, ("momentum_buffer", "momentum_buffer_scale", "step",
                                "exp_avg_sq", "base_lr", "shift")),
    ):
        _documents_every_argument_and_key(page, cls, keys)
        _run_blocks(page)
    namespace = _run_blocks("grouping.md")
    assert isinstance(namespace["opt"], kaon.AdamW) and isinstance(namespace["opt2"], kaon.Muon)


def test_adapnm_page():
    import kaon

    _documents_every_argument_and_key(
        "adapnm.md", kaon.AdaPNM,
        ["row", "col", "v", "v_max", "m_pos", "m_neg", "m_pos_scale", "m_neg_scale", "step",
         "shift"])
    opt = _run_blocks("adapnm.md", only_last=True)["opt"]
    assert {"m_pos", "m_neg", "step"} <= set(next(iter(opt.state.values())))


def test_nekaon_page():
    import kaon

    _documents_every_argument_and_key(
        "nekaon.md", kaon.Nekaon, ["row", "col", "v", "m", "m_scale", "shift", "climb"])
    assert _run_blocks("nekaon.md", only_last=True)["opt"].training


def test_readme_examples_run():
    import kaon

    text = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["opt"], kaon.Lion)
    assert len(namespace["opt"].param_groups) >= 2


def test_recipes_run():
    import kaon

    text = (DOCS / "recipes.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "docs/recipes.md", "exec"), namespace)
        assert isinstance(namespace["opt"], kaon.KaonOptimizer)


def test_autokaon_page_runs_and_documents_every_argument_and_key():
    import kaon

    namespace = _run_blocks("autokaon.md")
    assert namespace["opt"].get_d() > 1e-4
    _documents_every_argument_and_key("autokaon.md", kaon.Autokaon,
                                      ("s", "p0", "m", "row", "col", "v", "m_scale", "shift"))


def test_checkpointing_page_round_trips_through_dcp():
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming a single process"
        namespace = _run_blocks("checkpointing.md", only_last=True)
    model, resumed = namespace["model"], namespace["resumed"]
    assert all(p.dtype == torch.bfloat16 for p in resumed.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    state = namespace["resumed_opt"].state[resumed[0].weight]
    assert state["m"].dtype == torch.int8


def test_adafactor8bit_page_runs_and_documents_every_argument_and_key():
    import kaon

    namespace = _run_blocks("adafactor8bit.md")
    names = [g["name"] for g in namespace["opt"].param_groups]
    assert names == ["sensitive", "embedding", "matrix"]
    _documents_every_argument_and_key(
        "adafactor8bit.md", kaon.Adafactor8Bit,
        ("step", "row", "col", "v", "m", "conf_row", "conf_col", "apollo_seed", "v_low", "m_low",
         "row_low", "col_low", "fira_norm", "shift", "_scale", "_offset"))
