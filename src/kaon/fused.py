"""The fused path: a chunk's whole step compiled from the optimizer's one update rule.

The eager engine (:func:`kaon.engine.run_chunk`) runs a chunk as a sequence of whole-tensor
PyTorch operations: gather the gradients, screen them, decode the state, the rule's 20-30
operations, mask, encode, write back. Each is a pass over memory. Here the same phases, and the
optimizer's own :meth:`~kaon.optimizer.KaonOptimizer.update`, are traced by ``torch.compile``
(inductor) into one generated kernel per chunk layout: C++ with OpenMP and vector instructions
on the CPU, Triton on CUDA. Nothing of a rule is written twice: the graph *is* the rule.

What stays outside the graph, and why:

- the random words of stochastic rounding: drawn from the optimizer's ``torch.Generator`` by
  the same call the eager path makes, so both paths consume the same stream and round alike
  (a generator cannot be traced);
- stacking the parameters and gradients of a batched chunk (one ``stack`` each) and copying
  the results back: a traced list of N tensors would compile a graph per N. A chunk of one
  large tensor is passed as views and written in place by the kernel itself.

Shapes are dynamic (one graph serves every tensor size; dynamo specializes only sizes 0 and 1)
and Python floats of the group are symbolic, so a new learning rate is new data, not a
recompile. Graphs are keyed by what changes the arithmetic: the view's rank, the slot codecs,
the dtypes and the flags of the group. A model with 60 parameter shapes compiles a handful of
graphs. The first step pays the compile (measured in ``docs/architecture.md``); inductor's
on-disk caches make later processes cheaper.

Selection (the optimizer's ``fused`` argument; see :func:`wanted`): ``True`` always, ``False``
never, ``None`` only with ``KAON_FUSED_AUTO_COMPILE=1`` (:data:`AUTO`; measured no faster than
eager on the CPU so far, so off by default), and then on the CPU when the class is validated on
this path (``fusable``), the group holds at least :data:`MIN_NUMEL` elements (below that the
compile would not pay for itself in a typical run) and ``torch.compile`` works here. Where compiling fails, the chunk runs the eager
rule and one warning line says why; a run never silently gets slower.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kaon import precision

if TYPE_CHECKING:
    from kaon.engine import Slot, _Chunk
    from kaon.optimizer import KaonOptimizer

__all__ = ["MIN_NUMEL", "available", "wanted", "run_chunk", "chunk_step"]

#: ``fused=None`` compiles a group's chunks when the group holds at least this many elements
#: (``KAON_FUSED_MIN_NUMEL`` overrides it)
MIN_NUMEL = int(os.environ.get("KAON_FUSED_MIN_NUMEL", str(1 << 23)))

#: whether ``fused=None`` compiles at all (``KAON_FUSED_AUTO_COMPILE=1``). Off by default: on the
#: 2-core CPU measured so far the compiled step is no faster than the eager one (inductor's
#: generated loops recompute the rule's elementwise chain in each of its reduction loops;
#: benchmarks/RESULTS.md), so compiling by default would only add the first step's compile time
AUTO = os.environ.get("KAON_FUSED_AUTO_COMPILE", "0") not in ("", "0")

#: graphs the chunk function may keep (one per layout and flag combination)
RECOMPILE_LIMIT = 256


@functools.cache
def available(device_type: str = "cpu") -> bool:
    """Whether ``torch.compile`` works for tensors on ``device_type`` (probed once)."""
    from kaon.kernels.compiled import available as probe

    return probe(device_type)


def wanted(opt: KaonOptimizer, group: dict[str, Any], params: list[Tensor]) -> bool:
    """Whether ``params`` of ``group`` run on the fused path this step (see the module doc)."""
    setting = opt._fused
    if setting is False or setting == "triton" or not params:
        return False
    if getattr(opt, "_fused_broken", None) is not None:
        return False
    device = params[0].device
    if setting is None:
        if not AUTO or device.type != "cpu" or not type(opt).fusable:
            return False
        if sum(p.numel() for p in params) < MIN_NUMEL:
            return False
    if not available(device.type):
        _give_up(opt, f"torch.compile does not work on {device.type} here (no C++ compiler or "
                      "an unsupported platform)")
        return False
    return True


def _give_up(opt: KaonOptimizer, why: str) -> None:
    if getattr(opt, "_fused_broken", None) is None:
        opt._fused_broken = why
        warnings.warn(f"kaon: {type(opt).__name__} runs its eager rule: {why}", RuntimeWarning,
                      stacklevel=4)


def _per_tensor(values: Tensor, ndim: int) -> Tensor:
    return values.view(-1, *([1] * (ndim - 1)))


def _bf16_from_words(target: Tensor, words: Tensor) -> Tensor:
    """Stochastic rounding of fp32 ``target`` to bfloat16 with the eager path's noise.

    The eager path views the int64 ``words`` as int16 lanes ``s`` and adds ``s + 2**15`` to the
    fp32 bit pattern; lane ``k`` of a word is bits ``16k .. 16k+15`` (little-endian), and
    ``s + 2**15`` equals those 16 bits with the top one flipped. Extracted by shifts, which a
    generated loop computes in registers.
    """
    shifts = torch.arange(0, 64, 16, device=words.device, dtype=torch.int64)
    lanes = ((words.unsqueeze(-1) >> shifts) & 0xFFFF) ^ 0x8000
    noise = lanes.reshape(-1)[: target.numel()].view(target.shape)
    bits = (target.view(torch.int32).to(torch.int64) + noise) & -65536
    return bits.to(torch.int32).view(torch.float32).to(torch.bfloat16)


def chunk_step(opt: KaonOptimizer, group: dict[str, Any], slots: tuple[Slot, ...],
               view: tuple[int, ...], grad: Tensor, stored: dict[str, Tensor], param: Tensor,
               noise: Tensor | None, policy: str) -> None:
    """One chunk's whole step, written for tracing (every phase of the eager engine).

    ``grad`` and ``param`` are ``[N, *view]`` in their own dtypes; ``param`` is written in
    place (the live parameter, or a stack the caller copies back). ``stored`` maps state keys to
    the stored ``[N, ...]`` tensors, written in place. ``noise`` holds the random words (bf16
    stochastic rounding) or uniform draws (fp16) for the write-back. ``policy`` is the
    optimizer's ``nonfinite_grad``.
    """
    from kaon.engine import GRAD_SAFE_MAX, SHIFT, Batch

    ndim = grad.ndim
    grad = grad.float()
    if group.get("maximize", False):
        grad = -grad
    finite = None
    if policy != "none":
        dims = tuple(range(1, ndim))
        low, high = grad.amin(dim=dims), grad.amax(dim=dims)
        ok = torch.isfinite(low) & torch.isfinite(high)
        peak = torch.maximum(high, -low)
        large = ok & (peak > GRAD_SAFE_MAX)
        exponent = torch.log2(peak.double() / GRAD_SAFE_MAX).ceil().clamp_min(0.0)
        scale = torch.where(large, torch.exp2(-exponent), 1.0).float()
        grad = grad * _per_tensor(scale, ndim)
        if policy == "skip":
            finite = ok

    decoded = {}
    for slot in slots:
        if slot.name == SHIFT:
            continue
        raw = {sfx: stored[slot.name + sfx] for sfx in slot.codec.suffixes}
        # a slot shaped like the view gets the view's own sizes: the traced sizes of the slot
        # are other symbols, which the compiler could not prove equal to the gradient's
        shape = view if slot.shape == view else slot.shape
        # a copy: the rule may update it in place and masking needs the old values (the
        # compiler removes the copy where nothing needs it)
        decoded[slot.name] = slot.codec.decode(raw, shape).clone()
    batch = Batch(grad, decoded, group, [], view, None, True,
                  {slot.name: slot for slot in slots}, finite)
    batch._param = param.float()
    delta, new_state = opt.update(batch)

    keep = None if finite is None else _per_tensor(finite, ndim)
    if finite is not None:
        delta = torch.where(keep, delta, 0.0)
    method = group.get("bf16_method", "stochastic_rounding")
    target = batch._param - delta
    shift = stored.get(SHIFT)
    if param.dtype not in precision.LOW_PRECISION:
        param.copy_(target)
    elif method == "kahan":
        target = target + shift.float()
        rounded = target.to(param.dtype)
        new_shift = precision.round_toward_zero(target - rounded.float(), param.dtype)
        param.copy_(rounded)
        shift.copy_(new_shift if keep is None else torch.where(keep, new_shift, shift))
    elif method == "stochastic_rounding":
        if param.dtype == torch.bfloat16:
            param.copy_(_bf16_from_words(target, noise))
        else:
            param.copy_(precision.stochastic_round_with(target, torch.float16, noise))
    else:
        param.copy_(target.to(param.dtype))

    for slot in slots:
        if slot.name == SHIFT:
            continue
        for suffix, tensor in slot.codec.encode(new_state[slot.name]).items():
            old = stored[slot.name + suffix]
            if finite is not None:
                tensor = torch.where(_per_tensor(finite, tensor.ndim), tensor, old)
            old.copy_(tensor)

def _static_chunk_step(*args: Any) -> None:
    """:func:`chunk_step` under its own code object, so the per-shape graphs of static layouts
    keep a cache of their own beside the dynamic ones."""
    chunk_step(*args)


#: inductor keeps a ``bf16 -> fp32`` round trip in fp32 unless told to emulate it; the rules
#: and the Kahan write-back rely on rounding there (a residual ``x - bf16(x)`` read as 0)
_OPTIONS = {"emulate_precision_casts": True}


@functools.cache
def _compiled(static: bool) -> Any:
    if static:
        return torch.compile(_static_chunk_step, dynamic=False, fullgraph=True, options=_OPTIONS)
    return torch.compile(chunk_step, dynamic=True, fullgraph=True, options=_OPTIONS)


def _static_layout(slots: tuple[Slot, ...]) -> bool:
    """Whether a chunk's graph is compiled for its exact sizes: a state packed two codes per
    byte (4-bit, log-space 4-bit) makes the symbolic index arithmetic of a dynamic graph too
    costly to compile (minutes), so those layouts get one graph per parameter shape."""
    return any(getattr(slot.codec, "name", "") in ("4bit", "log4") for slot in slots)


def run_chunk(opt: KaonOptimizer, group: dict[str, Any], chunk: _Chunk,
              stored: dict[str, Tensor]) -> bool:
    """Run ``chunk`` on the fused path; False (nothing changed) if it cannot be compiled."""
    params, view = chunk.params, chunk.view
    count = len(params)
    single = count == 1 and params[0].is_contiguous()
    if single:
        param = params[0].detach().view(1, *view)
        grad = params[0].grad.reshape(1, *view)
    else:
        shape = params[0].shape if chunk.same_shape else torch.Size(view)
        param = torch.stack([p.detach().reshape(shape) for p in params]).view(count, *view)
        grad = torch.stack([p.grad.reshape(shape) for p in params]).view(count, *view)
    noise = before = None
    method = group.get("bf16_method", "stochastic_rounding")
    if param.dtype in precision.LOW_PRECISION and method == "stochastic_rounding":
        generator = opt._generator(param.device)
        before = generator.get_state()
        noise = precision.rounding_noise(param.shape, param.dtype, generator)
    static = _static_layout(chunk.slots)
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                        accumulated_recompile_limit=4 * RECOMPILE_LIMIT,
                                        automatic_dynamic_shapes=not static):
            _compiled(static)(opt, group, chunk.slots, view, grad, stored, param, noise,
                              opt.nonfinite_grad)
    except Exception as error:  # compiling failed: nothing ran; the eager rule takes over
        if before is not None:  # the eager path draws the same noise again
            opt._generator(param.device).set_state(before)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _give_up(opt, f"the fused path could not compile its rule ({type(error).__name__}: "
                      f"{first[:200]})")
        return False
    if not single:
        precision.copy_back(params, param)
    return True
