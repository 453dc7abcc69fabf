"""Plain single-tensor reference implementations, written from the math without kaon's code.

Each function steps one tensor in place with straightforward torch calls (no batching, no
codecs of kaon, no shared ops), so the tests can compare kaon's engine against an independent
reading of the specification.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def quantize_int8_rows(x: torch.Tensor) -> torch.Tensor:
    """Value after an int8 round trip with one absmax scale per row (dim 0; 1-D: one scale)."""
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    out = torch.empty_like(rows)
    for i in range(rows.shape[0]):
        scale = max(rows[i].abs().max().item(), 1e-12) / 127.0
        out[i] = torch.clamp(torch.round(rows[i] / scale), -127, 127) * scale
    return out.reshape(x.shape)


def quantize_4bit_blocks(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Value after a 4-bit round trip with one absmax scale per flat block."""
    flat = x.flatten().clone()
    size = flat.numel() if block <= 0 else min(block, flat.numel())
    for start in range(0, flat.numel(), size):
        piece = flat[start : start + size]
        scale = max(piece.abs().max().item(), 1e-12) / 7.0
        flat[start : start + size] = torch.clamp(torch.round(piece / scale), -7, 7) * scale
    return flat.reshape(x.shape)


class AdakaonReference:
    """Adakaon on one fp32 tensor, following the written specification step by step."""

    def __init__(self, p: torch.Tensor, lr=1e-3, betas=(0.9, 0.999), eps1=1e-30,
                 weight_decay=0.0, clip=1.0, momentum="float32", block=128,
                 cautious=True, centralize=True) -> None:
        self.p, self.lr, self.betas, self.eps1 = p, lr, betas, eps1
        self.wd, self.clip, self.momentum, self.block = weight_decay, clip, momentum, block
        self.cautious, self.centralize = cautious, centralize
        shape = p.shape
        self.factored = p.ndim >= 2
        if self.factored:
            rows, cols = shape[0], p.numel() // shape[0]
            self.row = torch.zeros(rows)
            self.col = torch.zeros(cols)
        else:
            self.v = torch.zeros(max(p.numel(), 1))
        self.m = torch.zeros(self.matrix(p).shape)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim >= 2:
            return t.reshape(t.shape[0], -1)
        return t.reshape(-1)

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        g = self.matrix(grad.float()).clone()
        if self.centralize and self.factored and g.shape[1] > 1:
            g = g - g.mean(dim=1, keepdim=True)
        if self.factored:
            sq = g * g + self.eps1
            self.row = beta2 * self.row + (1 - beta2) * sq.mean(dim=1)
            self.col = beta2 * self.col + (1 - beta2) * sq.mean(dim=0)
            v_hat = torch.outer(self.row, self.col) / self.row.mean()
        else:
            self.v = beta2 * self.v + (1 - beta2) * (g * g + self.eps1)
            v_hat = self.v
        u = g / v_hat.sqrt()
        rms = u.pow(2).mean().sqrt()
        u = u / max(1.0, (rms / self.clip).item())
        if beta1 > 0:
            m = beta1 * self.m + (1 - beta1) * u
            delta = self.lr * m
            if self.momentum == "int8":
                self.m = quantize_int8_rows(m)
            elif self.momentum == "4bit":
                self.m = quantize_4bit_blocks(m, self.block)
            elif self.momentum == "bfloat16":
                self.m = m.to(torch.bfloat16).float()
            else:
                self.m = m
        else:
            delta = self.lr * u
        delta = delta + self.lr * self.wd * self.matrix(self.p.detach().float())
        if self.cautious:
            mask = (delta * g > 0).float()
            delta = delta * mask / max(mask.mean().item(), 1e-8)
        with torch.no_grad():
            self.p.sub_(delta.reshape(self.p.shape).to(self.p.dtype))


def newton_schulz_reference(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's quintic Newton-Schulz on one fp32 matrix, transposing a tall one."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / max(g.float().norm().item(), eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class AdaMuonReference:
    """AdaMuon on one fp32 tensor, following the written specification step by step.

    Written as the specification states it: the applied step is ``0.2 * lr * u`` and the
    momentum of a vector is an EMA of that lr-scaled step (equal to kaon's unit-space momentum
    at a constant lr). Newton-Schulz runs in ``ns_dtype`` (float32 for exact comparisons).
    """

    def __init__(self, p: torch.Tensor, lr=2e-2, betas=(0.95, 0.999), eps1=1e-30,
                 weight_decay=0.0, ns_steps=2, clip=1.0, momentum="float32", block=128,
                 cautious=True, centralize=False, ns_dtype=torch.float32) -> None:
        self.p, self.lr, self.betas, self.eps1 = p, lr, betas, eps1
        self.wd, self.ns_steps, self.clip = weight_decay, ns_steps, clip
        self.momentum, self.block = momentum, block
        self.cautious, self.centralize, self.ns_dtype = cautious, centralize, ns_dtype
        self.factored = p.ndim >= 2
        if self.factored:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            self.row, self.col = torch.zeros(rows), torch.zeros(cols)
        else:
            self.v = torch.zeros(max(p.numel(), 1))
        self.m = torch.zeros(self.matrix(p).shape)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(-1)

    def store(self, m: torch.Tensor) -> torch.Tensor:
        if self.momentum == "int8":
            return quantize_int8_rows(m)
        if self.momentum == "4bit":
            return quantize_4bit_blocks(m, self.block)
        if self.momentum == "bfloat16":
            return m.to(torch.bfloat16).float()
        return m

    def orthogonalize(self, m: torch.Tensor) -> torch.Tensor:
        a, b, c = 3.4445, -4.7750, 2.0315
        x = m / max(m.norm().item(), 1e-7)
        tall = x.shape[0] > x.shape[1]
        if tall:
            x = x.T
        x = x.to(self.ns_dtype)
        for _ in range(self.ns_steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        x = x.float()
        return x.T if tall else x

    def clipped(self, u: torch.Tensor) -> torch.Tensor:
        rms = u.pow(2).mean().sqrt().item()
        return u / max(1.0, rms / self.clip)

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        g = self.matrix(grad.float()).clone()
        if self.centralize and self.factored:
            g = g - g.mean(dim=1, keepdim=True)
        if self.factored:
            if beta1 > 0:
                m = beta1 * self.m + (1 - beta1) * g
                self.m = self.store(m)
            else:
                m = g
            o = self.orthogonalize(m)
            sq = o * o + self.eps1
            self.row = beta2 * self.row + (1 - beta2) * sq.mean(dim=1)
            self.col = beta2 * self.col + (1 - beta2) * sq.mean(dim=0)
            v_hat = torch.outer(self.row, self.col) / self.row.mean()
            delta = 0.2 * self.lr * self.clipped(o / v_hat.sqrt())
        else:
            self.v = beta2 * self.v + (1 - beta2) * (g * g + self.eps1)
            u = 0.2 * self.lr * self.clipped(g / self.v.sqrt())
            if beta1 > 0:
                m = beta1 * self.m + (1 - beta1) * u
                self.m = self.store(m)
                delta = m
            else:
                delta = u
        delta = delta + self.lr * self.wd * self.matrix(self.p.detach().float())
        if self.cautious:
            mask = (delta * g > 0).float()
            delta = delta * mask / max(mask.mean().item(), 1e-8)
        with torch.no_grad():
            self.p.sub_(delta.reshape(self.p.shape).to(self.p.dtype))


class LionReference:
    """Lion on one fp32 tensor, as the specification states it (cautious masks ``sign + wd p``)."""

    def __init__(self, p: torch.Tensor, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                 momentum="float32", block=128, cautious=True, centralize=True) -> None:
        self.p, self.lr, self.betas, self.wd = p, lr, betas, weight_decay
        self.momentum, self.block = momentum, block
        self.cautious, self.centralize = cautious, centralize
        self.m = torch.zeros_like(p, dtype=torch.float32)

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        g = grad.float().clone()
        if self.centralize and g.ndim >= 2:
            rows = g.reshape(g.shape[0], -1)
            g = (rows - rows.mean(dim=1, keepdim=True)).reshape(g.shape)
        direction = torch.sign(beta1 * self.m + (1 - beta1) * g)
        m = beta2 * self.m + (1 - beta2) * g
        if self.momentum == "int8":
            m = quantize_int8_rows(m)
        elif self.momentum == "4bit":
            m = quantize_4bit_blocks(m, self.block)
        elif self.momentum == "bfloat16":
            m = m.to(torch.bfloat16).float()
        self.m = m
        delta = direction + self.wd * self.p.detach().float()
        if self.cautious:
            mask = (delta * g > 0).float()
            delta = delta * mask / max(mask.mean().item(), 1e-8)
        with torch.no_grad():
            self.p.sub_((self.lr * delta).to(self.p.dtype))


class AdaPNMReference:
    """AdaPNM on one fp32 tensor (any shape), following the written specification.

    Two fp32 momentum buffers whose roles swap with the step parity, a factored second moment
    with bias correction for ndim >= 2 (a full one, optionally AMS-bounded, otherwise), the RMS
    clip, cautious masking and multiplicative weight decay. The momentum can be rounded to
    bfloat16 / int8 / 4bit after each update, as kaon stores it.
    """

    def __init__(self, p: torch.Tensor, lr=1e-3, betas=(0.8, 0.999), beta0=0.5, eps=1e-8,
                 weight_decay=0.0, clip=1.0, cautious=True, centralize=True, ams_bound=False,
                 momentum="float32", block=128) -> None:
        self.p, self.lr, self.betas, self.beta0, self.eps = p, lr, betas, beta0, eps
        self.wd, self.clip, self.cautious, self.centralize = weight_decay, clip, cautious, centralize
        self.ams_bound, self.momentum, self.block = ams_bound, momentum, block
        self.factored = p.ndim >= 2
        shape = (p.shape[0], p.numel() // p.shape[0]) if self.factored else (max(p.numel(), 1),)
        self.buffers = [torch.zeros(shape), torch.zeros(shape)]  # [m_pos, m_neg]
        if self.factored:
            self.row, self.col = torch.zeros(shape[0]), torch.zeros(shape[1])
        else:
            self.v = torch.zeros(shape)
            self.v_max = torch.zeros(shape)
        self.t = 0

    def stored(self, m: torch.Tensor) -> torch.Tensor:
        if self.momentum == "bfloat16":
            return m.to(torch.bfloat16).float()
        if self.momentum == "int8":
            return quantize_int8_rows(m)
        if self.momentum == "4bit":
            return quantize_4bit_blocks(m, self.block)
        return m

    def step(self, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        t = self.t
        g = grad.float().reshape(self.buffers[0].shape).clone()
        if self.centralize and self.factored:
            g = g - g.mean(dim=1, keepdim=True)
        positive = 0 if t % 2 == 1 else 1
        m_pos = beta1**2 * self.buffers[positive] + (1 - beta1**2) * g
        m_neg = self.buffers[1 - positive]
        self.buffers[positive] = self.stored(m_pos)
        noise = ((1 + self.beta0) ** 2 + self.beta0**2) ** 0.5
        pn = ((1 + self.beta0) * m_pos - self.beta0 * m_neg) / noise
        bc2 = 1 - beta2**t
        if self.factored:
            sq = g * g + max(self.eps, 1e-30)
            self.row = beta2 * self.row + (1 - beta2) * sq.mean(dim=1)
            self.col = beta2 * self.col + (1 - beta2) * sq.mean(dim=0)
            v_hat = torch.outer(self.row, self.col) / self.row.mean() / bc2
            u = pn / v_hat.sqrt()
        else:
            self.v = beta2 * self.v + (1 - beta2) * g * g
            self.v_max = torch.maximum(self.v_max, self.v)
            v = self.v_max if self.ams_bound else self.v
            u = pn / ((v + 1e-15).sqrt() + self.eps) * bc2**0.5
        if self.clip > 0:
            rms = u.pow(2).mean().sqrt().item()
            u = u / max(1.0, rms / self.clip)
        step = self.lr / (1 - beta1**t) * u
        if self.cautious:
            mask = (step * g > 0).float()
            step = step * mask / max(mask.mean().item(), 1e-8)
        with torch.no_grad():
            decayed = self.p.float().reshape(step.shape) * (1 - self.lr * self.wd)
            self.p.copy_((decayed - step).reshape(self.p.shape).to(self.p.dtype))


def grads_for(shape, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Reproducible gradients of varying scale for reference comparisons."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + i % 3) for i in range(steps)]


def step_both(opt, ref, p: torch.Tensor, grads: Iterable[torch.Tensor],
              check: Callable[[], None] | None = None) -> None:
    """Step a kaon optimizer (over ``p``) and a reference with the same gradients, running
    ``check`` after every step."""
    for g in grads:
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        if check is not None:
            check()


def quantized_momentum_run(opt_cls, ref_cls, momentum: str, steps: int):
    """A kaon optimizer with ``momentum_dtype=momentum`` (4-bit block 64) and its reference
    with the same codec, stepped ``steps`` times from the same [32, 40] weights with the same
    gradients; returns ``(p, q)``, the optimizer's and the reference's weights."""
    torch.manual_seed(2)
    shape = (32, 40)
    p = torch.nn.Parameter(torch.randn(shape))
    q = p.detach().clone()
    ref = ref_cls(q, lr=1e-2, momentum=momentum, block=64)
    opt = opt_cls([p], lr=1e-2, momentum_dtype=momentum, momentum_4bit_block=64)
    step_both(opt, ref, p, grads_for(shape, steps))
    return p.detach(), q



class Adafactor8BitReference:
    """Adafactor8Bit without quantization on one fp32 tensor, from the written rule.

    Covers the paths the package references do not: Adam-style momentum on the factored and
    full paths, the Adam denominator with bias correction, SGD mode, Fira, and APOLLO (channel
    or tensor scaling, optionally factorized). ``projection(step_seed)`` supplies APOLLO's
    matrix for the current seed (the seeded generator is the definition of P); everything else
    is plain torch on one tensor, with Python loops for the row/column statistics.
    """

    def __init__(self, p: torch.Tensor, lr=1e-2, beta1=None, beta2=None, beta2_decay=-0.8,
                 eps1=1e-30, eps2=1e-3, weight_decay=0.0, d=1.0, relative_step=True,
                 scale_parameter=True, factored=True, apollo_rank=0, apollo_gap=200,
                 apollo_scale_type="channel", apollo_scale=1.0, apollo_eps=1e-6,
                 apollo_factorize=False, fira=False, fira_apollo=True, fira_margin=0.01,
                 bias_correction=None, projection=None, next_seed=None, seed=0) -> None:
        self.p = p
        self.__dict__.update(dict(
            lr=lr, beta1=beta1, beta2=beta2, beta2_decay=beta2_decay, eps1=eps1, eps2=eps2,
            wd=weight_decay, d=d, relative_step=relative_step, scale_parameter=scale_parameter,
            factored=factored, rank=apollo_rank, gap=apollo_gap, scale_type=apollo_scale_type,
            apollo_scale=apollo_scale, apollo_eps=apollo_eps, factorize=apollo_factorize,
            fira=fira, fira_apollo=fira_apollo, margin=fira_margin,
            bias_correction=bias_correction, projection=projection, next_seed=next_seed,
            seed=seed))
        self.t = 0
        self.state: dict[str, torch.Tensor] = {}
        self.prev_norm = 0.0

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(-1)

    def _zeros(self, key, shape):
        if key not in self.state:
            self.state[key] = torch.zeros(shape)
        return self.state[key]

    def _fira(self, norm: float) -> float:
        gamma = 1.0 + self.margin
        if self.prev_norm < 1e-6:
            factor = 1.0
        else:
            factor = 1.0 / (max(norm / (self.prev_norm + 1e-8), gamma) / gamma)
        self.prev_norm = norm * factor
        return factor

    def step(self, grad: torch.Tensor) -> None:
        self.t += 1
        t = self.t
        g = self.matrix(grad.float())
        p = self.matrix(self.p.detach().float())
        rho = min(self.lr, t ** -0.5) if self.relative_step else self.lr
        rms_p = p.pow(2).mean().sqrt().item()
        alpha = max(self.eps2, rms_p) * rho if self.scale_parameter else rho
        b = 1.0 - self.beta2 if self.beta2 is not None else t ** self.beta2_decay
        apollo = self.rank > 0 and g.ndim == 2
        adam = not apollo and (not self.factored) and self.beta2 is not None
        correct = (adam or apollo) if self.bias_correction is None else self.bias_correction
        correct = correct and not self.relative_step
        bc = 1.0
        if correct:
            if self.beta2 is not None:
                bc *= math.sqrt(1.0 - self.beta2 ** t)
            if self.beta1 is not None:
                bc /= 1.0 - self.beta1 ** t
        if apollo:
            delta = self._apollo(g, b, alpha, bc)
        else:
            if g.ndim == 2 and self.factored:
                rows, cols = g.shape
                row = self._zeros("row", (rows,))
                col = self._zeros("col", (cols,))
                for i in range(rows):
                    row[i] = (1 - b) * row[i] + b * ((g[i] ** 2).mean() + self.eps1)
                for j in range(cols):
                    col[j] = (1 - b) * col[j] + b * ((g[:, j] ** 2).mean() + self.eps1)
                v_hat = row[:, None] * col[None, :] / row.mean()
                denom = v_hat.sqrt()
            else:
                v = self._zeros("v", g.shape)
                if adam:
                    v.mul_(self.beta2).add_((1 - self.beta2) * g * g)
                    eps = self.eps1 * (math.sqrt(1 - self.beta2 ** t) if correct else 1.0)
                    denom = v.sqrt() + eps
                else:
                    v.mul_(1 - b).add_(b * (g * g + self.eps1))
                    denom = v.sqrt()
            source = g
            if self.beta1 is not None:
                m = self._zeros("m", g.shape)
                m.mul_(self.beta1).add_((1 - self.beta1) * g)
                source = m
            u = source / denom
            if self.d > 0:
                rms = u.pow(2).mean().sqrt().item()
                u = u / max(1.0, rms / self.d)
            factor = self._fira(u.norm().item()) if self.fira else 1.0
            delta = alpha * bc * factor * u
        delta = delta + self.wd * alpha * p
        with torch.no_grad():
            self.p.sub_(delta.reshape(self.p.shape).to(self.p.dtype))

    def _apollo(self, g, b, alpha, bc):
        rows, cols = g.shape
        right = rows >= cols
        if (self.t - 1) % self.gap == 0:
            self.seed = self.next_seed(self.seed)
        proj = self.projection(self.seed, (self.rank, cols) if right else (rows, self.rank))
        low = g @ proj.T if right else proj.T @ g
        if self.factorize:
            r = self._zeros("row_low", (low.shape[0],))
            c = self._zeros("col_low", (low.shape[1],))
            r.mul_(1 - b).add_(b * (low ** 2).mean(dim=1))
            c.mul_(1 - b).add_(b * (low ** 2).mean(dim=0))
            v_hat = r[:, None] * c[None, :] / max(r.mean().item(), self.apollo_eps)
        else:
            v = self._zeros("v_low", low.shape)
            v.mul_(1 - b).add_(b * low ** 2).clamp_(min=1.17549435e-38)
            v_hat = v
        num = low
        if self.beta1 is not None:
            m = self._zeros("m_low", low.shape)
            m.mul_(self.beta1).add_((1 - self.beta1) * low)
            num = m
        upd = num / (v_hat.sqrt() + self.apollo_eps)
        if self.scale_type == "channel":
            if right:
                s = torch.stack([upd[i].norm() / (low[i].norm() + 1e-8) for i in range(rows)])
                scaled = g * s[:, None]
            else:
                s = torch.stack([upd[:, j].norm() / (low[:, j].norm() + 1e-8)
                                 for j in range(cols)])
                scaled = g * s[None, :]
        else:
            s = upd.norm() / (low.norm() + 1e-8)
            scaled = g * s
        norm = scaled.norm().item()
        factor = self._fira(norm) if self.fira_apollo else 1.0
        clip = max(1.0, norm / (math.sqrt(g.numel()) * self.d)) if self.d > 0 else 1.0
        return (alpha * bc / clip) * factor * math.sqrt(self.apollo_scale) * scaled
