"""The code in the docs runs."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


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


def _run_blocks(page: str) -> dict:
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"docs/{page} lost its example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    return namespace


def _documents_every_argument_and_key(page: str, cls, keys) -> None:
    import inspect

    text = (DOCS / page).read_text()
    for key in keys:
        assert f"`{key}`" in text, key
    for name in inspect.signature(cls).parameters:
        if name != "params":
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
