"""Thin adapters for the trainers that construct and drive optimizers for their users.

Each module is importable without its trainer installed (the trainer is imported only where a
function needs it):

* :mod:`kaon.integrations.kohya`: sd-scripts / musubi-tuner (``--optimizer_type kaon.Adakaon``
  with ``--optimizer_args``, the fused backward pass through ``step_param``);
* :mod:`kaon.integrations.onetrainer`: OneTrainer's ``step_parameter(p, group, i)`` and its
  ``stochastic_rounding`` flag;
* :mod:`kaon.integrations.huggingface`: ``transformers.Trainer(optimizer_cls_and_kwargs=...)``
  with a class or a model-aware factory, and ``optim_args`` strings;
* :mod:`kaon.integrations.accelerate`: finding the kaon optimizer inside accelerate's and
  Lightning's wrappers, and a Lightning callback that calls ``train()`` / ``eval()``.

See ``docs/trainers/``.
"""
