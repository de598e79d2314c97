"""Injection points of the training loop. The production loop runs :class:`TrainHooks` (no-ops);
tests pass their own subclass to :func:`rectok_fast.training.trainer.run` (``hooks=``) to corrupt a
loss or kill the process at a chosen step, so that no test switch lives in the loop itself."""
from __future__ import annotations

import torch


class TrainHooks:
    def loss(self, step: int, kind: str, loss: torch.Tensor) -> torch.Tensor:
        """Called on every micro batch's loss before its backward; ``kind`` is 'generator' or
        'discriminator'. Returns the loss to back-propagate."""
        return loss

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based count of finished steps) and its checkpoint."""
