"""The small-data denoising task: deterministic, trains, evaluates optimizers at their iterate."""

from __future__ import annotations

import time

import pytest
import torch

import kaon
from kaon.battery import DenoiseTask, make_images, run_denoise

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TINY = DenoiseTask(steps=40, heldout_images=16, width=8, eval_draws=2)


def adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr)


def test_images_are_deterministic_normalized_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = make_images(20, 16, seed=7), make_images(20, 16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == (20, 1, 16, 16)
    assert not torch.equal(a, make_images(20, 16, seed=8))
    assert abs(a.mean().item()) < 1e-5 and abs(a.std().item() - 1) < 1e-5
    assert (a[0] - a[1]).abs().mean() > 0.3  # distinct images


def test_run_is_deterministic_and_fast():
    start = time.perf_counter()
    first = run_denoise(adamw, 3e-3, seed=1, task=TINY)
    second = run_denoise(adamw, 3e-3, seed=1, task=TINY)
    assert time.perf_counter() - start < 10
    assert (first.train_loss, first.heldout_loss) == (second.train_loss, second.heldout_loss)
    other = run_denoise(adamw, 3e-3, seed=2, task=TINY)
    assert other.heldout_loss != first.heldout_loss
    assert first.gap == first.heldout_loss - first.train_loss


def test_training_reduces_the_loss():
    untrained = run_denoise(adamw, 3e-3, seed=0, task=DenoiseTask(**{**TINY.__dict__, "steps": 0}))
    trained = run_denoise(adamw, 3e-3, seed=0, task=DenoiseTask(**{**TINY.__dict__, "steps": 80}))
    assert trained.train_loss < 0.7 * untrained.train_loss
    assert trained.heldout_loss < 0.7 * untrained.heldout_loss


def test_optimizers_with_modes_are_evaluated_in_eval_mode():
    calls = []

    class Recording(kaon.Nekaon):
        def train(self, mode=True):
            calls.append("train" if mode else "eval")
            return super().train(mode)

    result = run_denoise(lambda p, lr: Recording(p, lr=lr), 3e-3, seed=0,
                         task=DenoiseTask(**{**TINY.__dict__, "steps": 5}))
    assert calls == ["eval", "train"]
    assert result.heldout_loss > 0
