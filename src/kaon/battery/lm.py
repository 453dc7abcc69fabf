"""A small transformer language model on a generated language (next-token prediction).

The language is a fixed random order-2 Markov chain over ``VOCAB`` tokens: every pair of
previous tokens allows only ``BRANCHES`` next tokens, with Dirichlet-distributed weights, so the
best achievable loss (the chain's entropy rate) is well below ``log(VOCAB)`` and a model must
learn real structure to approach it. The train split is a small fixed set of sequences (easy to
memorize, so overfitting shows as a train-to-held-out gap); the held-out split is other sequences
of the same chain, never trained on. Everything comes from seeded local generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional

from kaon.battery.core import Profile, RunRecord, train

__all__ = ["VOCAB", "MarkovLanguage", "TinyTransformer", "LanguageModelTask"]

VOCAB = 16
BRANCHES = 3
CONTEXT = 32
TRAIN_SEQUENCES = 256
HELDOUT_SEQUENCES = 128
DATA_SEED = 11


class MarkovLanguage:
    """The order-2 chain: ``probs[a, b]`` is the distribution of the token after ``a, b``."""

    def __init__(self, seed: int = DATA_SEED) -> None:
        gen = torch.Generator().manual_seed(seed)
        probs = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
        for a in range(VOCAB):
            for b in range(VOCAB):
                nxt = torch.randperm(VOCAB, generator=gen)[:BRANCHES]
                weights = torch._standard_gamma(torch.full((BRANCHES,), 0.7, dtype=torch.float64),
                                                generator=gen)
                probs[a, b, nxt] = weights / weights.sum()
        self.probs = probs

    def sample(self, count: int, length: int, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        seqs = torch.zeros(count, length, dtype=torch.long)
        seqs[:, :2] = torch.randint(VOCAB, (count, 2), generator=gen)
        for t in range(2, length):
            dist = self.probs[seqs[:, t - 2], seqs[:, t - 1]]
            seqs[:, t] = torch.multinomial(dist, 1, generator=gen).squeeze(1)
        return seqs

    def entropy_rate(self) -> float:
        """Mean next-token entropy (nats) under uniform contexts: a floor for the loss."""
        p = self.probs
        logs = torch.where(p > 0, p.log(), torch.zeros_like(p))
        return float(-(p * logs).sum(-1).mean())


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Pre-norm decoder-only transformer: token and position embeddings, blocks, a head."""

    def __init__(self, width: int, layers: int, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(CONTEXT, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=tokens.device),
                          diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.norm(x))


def _loss(model: nn.Module, seqs: torch.Tensor) -> torch.Tensor:
    logits = model(seqs[:, :-1])
    return functional.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))


class LanguageModelTask:
    """Next-token prediction on the generated language (256 train sequences, 128 held out)."""

    name = "lm"
    family = "lm"
    description = (f"transformer LM, order-2 Markov language over {VOCAB} tokens, "
                   f"{TRAIN_SEQUENCES} train / {HELDOUT_SEQUENCES} held-out sequences")

    def __init__(self) -> None:
        self.language = MarkovLanguage()
        self.train_split = self.language.sample(TRAIN_SEQUENCES, CONTEXT + 1, seed=1)
        self.heldout_split = self.language.sample(HELDOUT_SEQUENCES, CONTEXT + 1, seed=2)

    def build(self, profile: Profile, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        heads = 4 if profile.lm_width % 4 == 0 else 1
        return TinyTransformer(profile.lm_width, profile.lm_layers, heads)

    def run(self, make: Callable[[nn.Module, float], torch.optim.Optimizer], lr: float, *,
            schedule: str, seed: int, profile: Profile,
            progress: Callable[[int], None] | None = None,
            device: torch.device | str = "cpu") -> RunRecord:
        device = torch.device(device)
        model = self.build(profile, seed).to(device)
        train_split, heldout_split = self.train_split.to(device), self.heldout_split.to(device)
        opt = make(model, lr)
        gen = torch.Generator().manual_seed(seed + 12345)
        order = torch.cat([torch.randperm(TRAIN_SEQUENCES, generator=gen)
                           for _ in range(math.ceil(profile.lm_steps * profile.lm_batch
                                                    / TRAIN_SEQUENCES) + 1)])

        def loss_at_step(step: int) -> torch.Tensor:
            index = order[step * profile.lm_batch:(step + 1) * profile.lm_batch].to(device)
            return _loss(model, train_split[index])

        def evaluate_curve() -> float:
            return float(_loss(model, heldout_split))

        def evaluate_final() -> tuple[float, float, float]:
            heldout = evaluate_curve()
            return heldout, float(_loss(model, train_split)), heldout

        record = RunRecord(self.name, schedule, seed, lr,
                           extra={"entropy_floor": self.language.entropy_rate()})
        return train(model, opt, steps=profile.lm_steps, schedule=schedule,
                     loss_at_step=loss_at_step, evaluate_curve=evaluate_curve,
                     evaluate_final=evaluate_final,
                     checkpoints=profile.checkpoints, record=record, progress=progress)
