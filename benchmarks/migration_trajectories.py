"""Trajectory differences where kaon deliberately differs from an original project.

Run: ``OMP_NUM_THREADS=1 python benchmarks/migration_trajectories.py`` (CPU, about a minute).
The numbers are quoted in docs/migrating.md.
"""

from __future__ import annotations

import torch
from torch import nn

import kaon


def lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64),
                         nn.Linear(64, 64))


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (64,), generator=g)
        yield x, (x * 7 + 3) % 64


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> float:
    losses = []
    for x, y in batches(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def kprodigy_d_update_freq(steps: int = 100) -> None:
    for freq in (1, 5):
        model = lm()
        opt = kaon.KProdigy(model.parameters(), d_update_freq=freq)
        d_at, loss_at = {}, {}
        for i, (x, y) in enumerate(batches(steps), 1):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i in (10, 20, 50, steps):
                d_at[i], loss_at[i] = opt.param_groups[0]["d"], loss.item()
        print(f"KProdigy d_update_freq={freq}: d at 10/20/50/{steps} steps "
              + " / ".join(f"{d:.3g}" for d in d_at.values()) + "; loss "
              + " / ".join(f"{v:.3f}" for v in loss_at.values()))


def kempnerforge_muon_reference(steps: int = 30) -> None:
    """KempnerForge's Muon from its spec (heavy-ball, fp32 Newton-Schulz without transpose,
    scale sqrt(max(1, R/C)), torch AdamW for the rest) against kaon's Muon in KempnerForge's
    two-list call."""
    ref_model, kaon_model = lm(), lm()
    muon_ref = [p for p in ref_model.parameters() if p.ndim >= 2]
    adam_ref = [p for p in ref_model.parameters() if p.ndim < 2]
    adam = torch.optim.AdamW(adam_ref, lr=0.02, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    buffers = [torch.zeros_like(p) for p in muon_ref]
    opt = kaon.Muon([p for p in kaon_model.parameters() if p.ndim >= 2],
                    [p for p in kaon_model.parameters() if p.ndim < 2], lr=0.02)
    a, b, c = 3.4445, -4.7750, 2.0315
    for x, y in batches(steps):
        for model in (ref_model, kaon_model):
            nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, buf in zip(muon_ref, buffers):
                buf.mul_(0.95).add_(p.grad)
                X = buf / (buf.norm() + 1e-7)
                for _ in range(5):
                    A = X @ X.T
                    X = a * X + (b * A + c * A @ A) @ X
                p.sub_(0.02 * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * X)
        adam.step()
        opt.step()
        for model in (ref_model, kaon_model):
            model.zero_grad(set_to_none=True)
    worst = max(((p - q).norm() / q.norm()).item()
                for p, q in zip(kaon_model.parameters(), ref_model.parameters()))
    print(f"KempnerForge Muon two-list call vs its reference after {steps} steps: "
          f"largest relative weight difference {worst:.2e}")


def kempnerforge_embedding_decay(steps: int = 200) -> None:
    config = kaon.integrations.kempnerforge.OptimizerConfig(name="adamw", lr=3e-3,
                                                            weight_decay=0.1)
    out = {}
    for decay in (False, True):
        model = lm()
        opt = kaon.build_optimizer(model, config, decay_embeddings=decay)
        out[decay] = (train(model, opt, steps), model[0].weight.norm().item())
    print(f"KempnerForge adamw config, {steps} steps: kaon grouping (embeddings not decayed) "
          f"loss {out[False][0]:.4f}, |E| {out[False][1]:.2f}; upstream code's grouping "
          f"(decay_embeddings=True) loss {out[True][0]:.4f}, |E| {out[True][1]:.2f}")


if __name__ == "__main__":
    import kaon.integrations.kempnerforge  # noqa: F401

    kprodigy_d_update_freq()
    kempnerforge_muon_reference()
    kempnerforge_embedding_decay()
