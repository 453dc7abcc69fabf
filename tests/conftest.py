"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than torch's pool, far faster on a shared, loaded CPU.
    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: modules that compile graphs with inductor (kaon.fused, compile=True kernels); they run last
_COMPILING = ("test_fused.py",)


def pytest_collection_modifyitems(session, config, items):
    """Run the modules that compile with inductor after every other module: once inductor has
    compiled a graph in a process, Triton's CPU interpreter (``TRITON_INTERPRET=1``, which
    tests/test_kernels.py uses) fails with "Cannot call @triton.jit'd outside of the scope of a
    kernel" in that process."""
    items.sort(key=lambda item: item.path.name in _COMPILING)
