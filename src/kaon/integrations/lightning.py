"""Lightning: ``train()`` / ``eval()`` for ScheduleFreeAdamW and Nekaon around validation.

Lightning never calls an optimizer's ``train()`` or ``eval()`` itself. Optimizers that keep a
training view of the weights (``ScheduleFreeAdamW``: the training point ``y`` vs the average
``x``; ``Nekaon``: the weights plus the look-ahead displacement) must be switched to
``eval()`` before validation and before a checkpoint is written, and back to ``train()`` before
the next training step. :func:`train_eval_callback` returns a Lightning ``Callback`` that does
this for every optimizer of the ``Trainer``:

* ``eval()`` at the start of validation and at the end of each training epoch (Lightning runs
  checkpoint callbacks after the others, so ``ModelCheckpoint`` saves the evaluation weights);
* ``train()`` at the start of fitting and before every training batch (a no-op when the
  optimizer is already in train mode).

Calling ``self.optimizers().eval()`` from a ``LightningModule`` also works: Lightning's
``LightningOptimizer`` subclasses the optimizer's class and forwards attribute reads, and both
optimizers keep their mode where the wrapper shares it (``ScheduleFreeAdamW`` in its
``param_groups``, ``Nekaon`` in one shared dict).

Example::

    import lightning
    from kaon.integrations.lightning import train_eval_callback

    trainer = lightning.Trainer(max_epochs=3, callbacks=[train_eval_callback()])
"""

from __future__ import annotations

from typing import Any

from kaon.integrations.accelerate import eval_mode, train_mode

__all__ = ["train_eval_callback"]


def train_eval_callback() -> Any:
    """A ``lightning.pytorch.Callback`` switching the Trainer's optimizers (see the module
    docstring). Imports Lightning (``lightning`` or ``pytorch_lightning``) when called."""
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the standalone package
        from pytorch_lightning import Callback

    class KaonTrainEval(Callback):
        """``eval()`` for validation and checkpoints, ``train()`` for training steps."""

        @staticmethod
        def _all(trainer: Any, switch: Any) -> None:
            for optimizer in trainer.optimizers:
                switch(optimizer)

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self._all(trainer, train_mode)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any,
                                 batch_idx: int) -> None:
            self._all(trainer, train_mode)

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._all(trainer, eval_mode)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self._all(trainer, eval_mode)

    return KaonTrainEval()
