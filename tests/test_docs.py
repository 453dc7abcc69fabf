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


def _page_runs_and_documents(page: str, cls, keys):
    import inspect

    text = (DOCS / page).read_text()
    for key in keys:
        assert f"`{key}`" in text, key
    for name in inspect.signature(cls).parameters:
        if name not in ("params", "adakaon_kwargs"):
            assert f"`{name}`" in text, name
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"docs/{page} lost its example"
    namespace: dict = {}
    exec(compile(blocks[-1], f"docs/{page}", "exec"), namespace)
    return namespace


def test_adapnm_page():
    import kaon

    namespace = _page_runs_and_documents(
        "adapnm.md", kaon.AdaPNM,
        ["row", "col", "v", "v_max", "m_pos", "m_neg", "m_pos_scale", "m_neg_scale", "step",
         "shift"])
    opt = namespace["opt"]
    assert {"m_pos", "m_neg", "step"} <= set(next(iter(opt.state.values())))


def test_nekaon_page():
    import kaon

    namespace = _page_runs_and_documents(
        "nekaon.md", kaon.Nekaon, ["row", "col", "v", "m", "m_scale", "shift", "climb"])
    assert namespace["opt"].training
