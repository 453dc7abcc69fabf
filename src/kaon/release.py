"""Gradient release: step each parameter from its backward hook and free its gradient.

In a normal loop every gradient of the model is alive between ``loss.backward()`` and
``optimizer.step()``. With gradient release (a *fused backward pass*), each parameter is stepped
as soon as autograd has finished accumulating its gradient, and the gradient is freed at once,
so at most a few gradients exist at any time: the memory of a full set of gradients (2 bytes per
parameter for bf16 weights, 4 for fp32) is saved.

::

    kaon.prepare_for_gradient_release(model, optimizer)
    for batch in loader:
        loss = model(batch).loss
        loss.backward()        # every parameter is stepped here, its gradient freed
        optimizer.step()       # a no-op (no gradients are left); harmless to keep
        optimizer.zero_grad()  # likewise
    kaon.remove_gradient_release(model)

Each hook calls ``optimizer.step_param(p, group)``, the code ``step()`` runs on a chunk of one
parameter, so the result equals a normal ``step()`` loop: bit for bit on CPU for fp32 weights
and for bf16 weights written with ``bf16_method="kahan"`` or ``"none"``; with stochastic
rounding the random stream is consumed parameter by parameter in backward order instead of
chunk by chunk in group order, so the two runs round differently and agree in distribution.

**Optimizer accumulation** (gradient accumulation with released gradients): set
``optimizer.optimizer_accumulation = True`` for every micro-batch but the last. The hook then
moves the gradient into the optimizer state (key ``"accumulated_grad"``, in the gradient's
dtype) or adds it there, and frees ``p.grad``; on the last micro-batch (``False``) the hook adds
the stored sum to the new gradient, steps, and frees both. The sum is formed by the same
additions, in the same order and dtype, as autograd's accumulation into ``p.grad``, so the
result equals ordinary gradient accumulation exactly. Memory: the buffer holds one gradient per
parameter between micro-batches (2 B/param for bf16 gradients, 4 for fp32), the same as
ordinary accumulation keeps in ``p.grad``; only on the last micro-batch are the gradients
released as they arrive. The buffer is part of ``state_dict()`` while it exists (a checkpoint
taken between micro-batches resumes exactly) and is counted by ``state_bytes()``.

Optimizers that need a reduction over every gradient before any update (KProdigy's D
estimate) cannot step one parameter at a time; :func:`prepare_for_gradient_release` refuses
them with ``RuntimeError`` (their :meth:`~kaon.KaonOptimizer.gradient_release_blocker` says
why) before registering anything.

Limits: gradients are stepped one at a time, so a clip of the *global* gradient norm and AMP's
``GradScaler`` (which unscales all gradients first) do not apply; ``max_grad_norm`` clips each
gradient on its own instead (sd-scripts' fused backward pass does the same). Parameters added to the
optimizer later (``add_param_group``) need ``remove_gradient_release`` and a new
``prepare_for_gradient_release``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from kaon.optimizer import KaonOptimizer

__all__ = ["ACCUMULATED_GRAD", "prepare_for_gradient_release", "remove_gradient_release",
           "GradientRelease"]

#: the optimizer-state key of the gradient sum kept between micro-batches
ACCUMULATED_GRAD = "accumulated_grad"
_ATTRIBUTE = "_kaon_gradient_release"


class GradientRelease:
    """The hooks of one model and optimizer (kept on the model as ``_kaon_gradient_release``).

    ``handles`` are the hook handles; ``params`` the hooked parameters, in the model's order.
    """

    def __init__(self, optimizer: KaonOptimizer, params: list[Tensor],
                 max_grad_norm: float | None = None) -> None:
        self.optimizer = optimizer
        self.params = params
        self.max_grad_norm = max_grad_norm
        self.handles: list[Any] = []
        self._where: dict[int, tuple[int, int]] = {}
        self._index()
        # accumulation without optimizer_accumulation (issue 17, case 16): once the loop is
        # seen calling optimizer.step(), a parameter stepped twice between two such calls
        # means its gradients were meant to be accumulated; refuse instead of stepping again
        self._stepped: set[int] = set()
        self._loop_steps = False
        self._step_hook = optimizer.register_step_pre_hook(self._on_optimizer_step)

    def _on_optimizer_step(self, *_: Any) -> None:
        self._loop_steps = True
        self._stepped.clear()

    def _index(self) -> None:
        self._where = {
            id(p): (gi, pi)
            for gi, group in enumerate(self.optimizer.param_groups)
            for pi, p in enumerate(group["params"])
        }

    def group_of(self, p: Tensor) -> dict[str, Any]:
        """``p``'s current group (``load_state_dict`` replaces the group dicts)."""
        groups = self.optimizer.param_groups
        where = self._where.get(id(p))
        if where is None or where[0] >= len(groups) or where[1] >= len(groups[where[0]]["params"]) \
                or groups[where[0]]["params"][where[1]] is not p:
            self._index()
            where = self._where.get(id(p))
            if where is None:
                raise RuntimeError(
                    "gradient release: a hooked parameter is no longer in the optimizer; call "
                    "kaon.remove_gradient_release(model) before changing the optimizer's groups"
                )
        return groups[where[0]]

    @torch.no_grad()
    def hook(self, p: Tensor) -> None:
        """The post-accumulate-grad hook: accumulate, or step and free the gradient."""
        opt = self.optimizer
        grad = p.grad
        if grad is None:
            return
        state = opt.state.get(p)
        pending = state.get(ACCUMULATED_GRAD) if state else None
        if _accumulating(opt):
            if pending is None:
                opt.state[p][ACCUMULATED_GRAD] = grad  # the gradient itself: no copy
            else:
                pending.add_(grad)
            p.grad = None
            return
        if self._loop_steps and id(p) in self._stepped:
            raise RuntimeError(
                "gradient release: a second backward pass reached a parameter before "
                "optimizer.step() was called again: gradient accumulation? Set "
                "optimizer.optimizer_accumulation = True for every micro-batch but the last "
                "(kaon reads accelerate's sync_gradients, as transformers.Trainer and "
                "accelerator.accumulate set it, by itself); see docs/gradient-release.md")
        if pending is not None:
            del state[ACCUMULATED_GRAD]
            p.grad = pending.add_(grad)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        try:
            opt.step_param(p, self.group_of(p))
            self._stepped.add(id(p))
        finally:
            p.grad = None

    def remove(self) -> None:
        """Remove the hooks; gradient sums still pending go back into ``p.grad``."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._step_hook.remove()
        for p in self.params:
            state = self.optimizer.state.get(p)
            pending = state.pop(ACCUMULATED_GRAD, None) if state else None
            if pending is not None:
                p.grad = pending if p.grad is None else pending.add_(p.grad)


def _accumulating(optimizer: Any) -> bool:
    """Whether this backward pass only accumulates: ``optimizer.optimizer_accumulation``, or
    accelerate's gradient state saying the micro-batch does not end an accumulation cycle
    (``sync_gradients`` False: ``transformers.Trainer`` with ``gradient_accumulation_steps``,
    ``accelerator.accumulate``). Without accelerate imported only the attribute counts."""
    if getattr(optimizer, "optimizer_accumulation", False):
        return True
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None)
    return isinstance(shared, dict) and shared.get("sync_gradients", True) is False


def prepare_for_gradient_release(model: nn.Module, optimizer: KaonOptimizer, *,
                                 max_grad_norm: float | None = None) -> GradientRelease:
    """Step ``optimizer`` from the backward pass of ``model`` and free each gradient at once.

    Registers one ``register_post_accumulate_grad_hook`` on every parameter of ``model`` that
    requires a gradient and belongs to ``optimizer`` (other parameters are left alone: a
    parameter of the optimizer outside ``model`` is still stepped by ``optimizer.step()``). Sets
    ``optimizer.optimizer_accumulation = False`` unless the attribute exists. Returns the
    :class:`GradientRelease` (also kept on ``model``).

    ``max_grad_norm`` (default ``None``: no clipping): clip each parameter's (accumulated)
    gradient to this norm on its own before its step, as sd-scripts' fused backward pass does.
    This is *per tensor*, not the global norm of a normal loop's ``clip_grad_norm_``, which
    needs every gradient at once.

    Raises ``TypeError`` if ``optimizer`` is not a kaon optimizer or ``model`` not a module,
    ``RuntimeError`` if ``model`` is already prepared or the optimizer cannot step one parameter
    at a time (:meth:`KaonOptimizer.gradient_release_blocker`); nothing is registered then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_for_gradient_release: model must be an nn.Module; got "
                        f"{type(model).__name__}")
    if not isinstance(optimizer, KaonOptimizer):
        raise TypeError(
            "prepare_for_gradient_release: optimizer must be a kaon optimizer (KaonOptimizer); "
            f"got {type(optimizer).__name__}"
        )
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise RuntimeError(
            "prepare_for_gradient_release: the model is already prepared; call "
            "kaon.remove_gradient_release(model) first"
        )
    if max_grad_norm is not None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
            raise TypeError("prepare_for_gradient_release: max_grad_norm must be a number > 0 "
                            f"or None; got {max_grad_norm!r}")
        if not max_grad_norm > 0:
            raise ValueError("prepare_for_gradient_release: max_grad_norm must be > 0 or None; "
                             f"got {max_grad_norm!r}")
    blocker = optimizer.gradient_release_blocker()
    if blocker:
        raise RuntimeError(f"prepare_for_gradient_release: {blocker}")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    seen: set[int] = set()
    params = []
    for p in model.parameters():
        if p.requires_grad and id(p) in owned and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise ValueError(
            "prepare_for_gradient_release: no parameter of the model that requires a gradient "
            "is in the optimizer"
        )
    release = GradientRelease(optimizer, params,
                              None if max_grad_norm is None else float(max_grad_norm))
    release.handles = [p.register_post_accumulate_grad_hook(release.hook) for p in params]
    if not hasattr(optimizer, "optimizer_accumulation"):
        optimizer.optimizer_accumulation = False
    setattr(model, _ATTRIBUTE, release)
    return release


def remove_gradient_release(model: nn.Module) -> None:
    """Undo :func:`prepare_for_gradient_release` on ``model`` (a no-op if it is not prepared).

    Gradient sums pending from optimizer accumulation are put back into ``p.grad``, so a normal
    ``optimizer.step()`` afterwards uses them.
    """
    release = getattr(model, _ATTRIBUTE, None)
    if release is None:
        return
    release.remove()
    delattr(model, _ATTRIBUTE)
