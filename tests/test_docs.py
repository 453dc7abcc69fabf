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
