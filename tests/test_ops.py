"""Shared math pieces of kaon.ops against plain references."""

from __future__ import annotations

import pytest
import torch
from reference import newton_schulz_reference

from kaon import ops


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (32, 32)])
def test_newton_schulz_matches_reference_in_fp32(shape):
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(3, *shape, generator=gen)
    out = ops.newton_schulz(batch, steps=5, dtype=torch.float32)
    for i in range(3):
        expected = newton_schulz_reference(batch[i], steps=5)
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=1e-4)


def test_newton_schulz_flattens_singular_values_and_is_batch_independent():
    gen = torch.Generator().manual_seed(1)
    batch = torch.randn(4, 48, 20, generator=gen)
    out = ops.newton_schulz(batch, steps=5)  # bf16 iteration
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.5 and singular.max() < 1.3  # the quintic's band around 1
    assert torch.equal(ops.newton_schulz(batch[2:3], steps=5)[0], out[2])


def test_newton_schulz_zero_matrix_stays_zero():
    out = ops.newton_schulz(torch.zeros(2, 8, 4), steps=3)
    assert torch.equal(out, torch.zeros(2, 8, 4))


def test_newton_schulz_rejects_wrong_rank():
    with pytest.raises(ValueError, match="N, R, C"):
        ops.newton_schulz(torch.zeros(8, 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(3, 64, 16), (5, 16, 64), (2, 100, 30), (2, 6, 27)])
def test_newton_schulz_is_batch_independent_over_many_draws(shape, dtype):
    """CPU batched matmuls round differently for some batch sizes; kaon must not."""
    for seed in range(40):
        batch = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        out = ops.newton_schulz(batch, steps=5, dtype=dtype)
        for i in range(shape[0]):
            single = ops.newton_schulz(batch[i : i + 1], steps=5, dtype=dtype)[0]
            assert torch.equal(out[i], single), seed


def test_dot_is_the_chunked_sum_of_the_product_and_batch_independent():
    import torch

    from kaon import ops

    gen = torch.Generator().manual_seed(0)
    for size in (7, 4096, 3 * 4096 + 5):
        x = torch.randn(3, size, generator=gen)
        y = torch.randn(3, size, generator=gen)
        both = ops.dot(x, y)
        torch.testing.assert_close(both, (x.double() * y.double()).sum(-1).float(),
                                   rtol=1e-5, atol=1e-5)
        for i in range(3):  # each slice alone gives the same bits
            assert torch.equal(ops.dot(x[i:i + 1], y[i:i + 1]), both[i:i + 1])
