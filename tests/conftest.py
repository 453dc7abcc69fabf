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


#: the module that runs Triton's CPU interpreter, first; the fused path's module, last
_INTERPRETED = ("test_kernels.py",)
_COMPILING = ("test_fused.py",)


def pytest_collection_modifyitems(session, config, items):
    """Run Triton's interpreter tests before anything compiles, and the fused path's last: once
    inductor has compiled a graph in a process (kaon.fused, AdaMuon's and KProdigy's
    ``compile=True``), Triton's CPU interpreter (``TRITON_INTERPRET=1``, which
    tests/test_kernels.py uses) fails with "Cannot call @triton.jit'd outside of the scope of a
    kernel" in that process."""
    def rank(item) -> int:
        name = item.path.name
        return 0 if name in _INTERPRETED else 2 if name in _COMPILING else 1

    items.sort(key=rank)  # stable: the order within each rank is kept
