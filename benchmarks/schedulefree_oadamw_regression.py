"""Small teacher-student regression for the ScheduleFreeAdamW and OAdamW docs' numbers.

A fixed random teacher (MLP 32-64-8, tanh) labels 4096 training inputs (plus 0.05 Gaussian
noise) and 1024 clean validation inputs; a student MLP 32-128-128-8 (GELU) trains for 400 steps
of batch 64. Printed: validation MSE at the training point and, for ScheduleFreeAdamW, at the
evaluation point (after ``opt.eval()``), each the mean of two student seeds. CPU, ~1 minute.

    PYTHONPATH=src python benchmarks/schedulefree_oadamw_regression.py
"""

from __future__ import annotations

import torch
from torch import nn

import kaon


def task():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1234)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    x = torch.randn(4096, 32, generator=gen)
    x_val = torch.randn(1024, 32, generator=gen)
    with torch.no_grad():
        y = teacher(x) + 0.05 * torch.randn(4096, 8, generator=gen)
        y_val = teacher(x_val)
    return x, y, x_val, y_val


def run(make, data, steps=400, seed=0):
    x, y, x_val, y_val = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                          nn.Linear(128, 8))
    opt = make(model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 4096, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        at_train = nn.functional.mse_loss(model(x_val), y_val).item()
        if hasattr(opt, "eval"):
            opt.eval()
        at_eval = nn.functional.mse_loss(model(x_val), y_val).item()
    return at_train, at_eval


CONFIGS = {
    "AdamW lr=1e-3": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0),
    "ScheduleFreeAdamW lr=1e-3": lambda m: kaon.ScheduleFreeAdamW(m.parameters(), lr=1e-3),
    "ScheduleFreeAdamW lr=3e-3": lambda m: kaon.ScheduleFreeAdamW(m.parameters(), lr=3e-3),
    "ScheduleFreeAdamW lr=1e-2": lambda m: kaon.ScheduleFreeAdamW(m.parameters(), lr=1e-2),
    "ScheduleFreeAdamW lr=2.5e-2": lambda m: kaon.ScheduleFreeAdamW(m.parameters(), lr=0.025),
    "OAdamW lr=1e-3 (Adam only)": lambda m: kaon.OAdamW(m.parameters(), lr=1e-3,
                                                        weight_decay=0.0),
    "OAdamW(model) lr=1e-3 (Muon)": lambda m: kaon.OAdamW(m, lr=1e-3, weight_decay=0.0),
    "OAdamW(model) lr=1e-3 gap=4": lambda m: kaon.OAdamW(m, lr=1e-3, weight_decay=0.0,
                                                         update_proj_gap=4),
}


def main() -> None:
    data = task()
    for name, make in CONFIGS.items():
        results = [run(make, data, seed=seed) for seed in (0, 1)]
        train = sum(r[0] for r in results) / len(results)
        evaluated = sum(r[1] for r in results) / len(results)
        print(f"{name:32s} val MSE at train point {train:.5f}   at eval point {evaluated:.5f}")


if __name__ == "__main__":
    main()
