"""OneTrainer: the ``step_parameter(p, group, i)`` fused back pass and the
``stochastic_rounding`` flag.

OneTrainer builds its optimizers from a closed list in its own code, so using a kaon optimizer
there takes a (small) change on OneTrainer's side; this module gives that change the two
conventions it relies on:

* **fused back pass**: OneTrainer registers a post-accumulate-grad hook per parameter that
  calls ``optimizer.step_parameter(tensor, param_group, i)`` (``i``: the parameter's index in
  its group) and frees the gradient, for optimizers in its ``supports_fused_back_pass`` list.
  Every kaon optimizer has ``step_parameter`` with that signature (it checks that ``i`` holds
  ``tensor``); :func:`supports_fused_back_pass` says which can run it (all but KProdigy).
* **stochastic rounding**: OneTrainer passes ``stochastic_rounding=True/False``; kaon's knob is
  ``bf16_method`` (``"stochastic_rounding"``, ``"kahan"``, ``"none"``). :func:`create` maps the
  flag. kaon's random stream is a generator owned by the optimizer, seeded by ``seed`` and
  saved in its ``state_dict()``, so runs are reproducible and resume exactly without a
  per-step reseed.

Example::

    from kaon.integrations import onetrainer

    opt = onetrainer.create("Adakaon", model.parameters(), lr=1e-4, stochastic_rounding=True)
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            p.register_post_accumulate_grad_hook(
                lambda t, g=group, i=i: (opt.step_parameter(t, g, i), setattr(t, "grad", None)))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from kaon import registry
from kaon.optimizer import KaonOptimizer

__all__ = ["create", "supports_fused_back_pass"]


def create(name: str | type, params: Iterable[Any], *, stochastic_rounding: bool | None = None,
           **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer ``name`` (registered name or class) over ``params``.

    ``stochastic_rounding`` (default ``None``: the optimizer's default, stochastic rounding):
    ``True`` gives ``bf16_method="stochastic_rounding"``, ``False`` ``bf16_method="none"``
    (round to nearest). Passing both it and ``bf16_method`` raises ``TypeError``; a
    non-boolean raises ``TypeError``.
    """
    if stochastic_rounding is not None:
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be True, False or None; got "
                            f"{stochastic_rounding!r}")
        if "bf16_method" in kwargs:
            raise TypeError("pass either stochastic_rounding or bf16_method, not both")
        kwargs["bf16_method"] = "stochastic_rounding" if stochastic_rounding else "none"
    cls = name if isinstance(name, type) else registry.get(name)
    return cls(params, **kwargs)


def supports_fused_back_pass(optimizer: torch.optim.Optimizer | type) -> bool:
    """Whether ``optimizer`` (an instance, or a class) can step one parameter at a time.

    For an instance this is ``gradient_release_blocker() is None`` (a state-dependent answer
    for optimizers whose ability changes during training); for a class, whether it is a kaon
    optimizer that does not override ``gradient_release_blocker`` to refuse always (KProdigy).
    """
    if isinstance(optimizer, KaonOptimizer):
        return optimizer.gradient_release_blocker() is None
    if isinstance(optimizer, type) and issubclass(optimizer, KaonOptimizer):
        return optimizer.gradient_release_blocker is KaonOptimizer.gradient_release_blocker
    return False
