"""The one interface every compression method implements to take part in Ultralytics training.

A method never touches the trainer's internals directly; :mod:`yolocomp.integration.ultralytics` calls these hooks at
the right moments (after the model is built, inside the loss, inside ``optimizer.step`` after AMP unscaling, at epoch
end, before saving) so that one method works the same from the CLI trainer and from a user's ``YOLO(...).train()``.
Methods must be picklable (Ultralytics DDP pickles the trainer's callbacks): keep runtime-only state (hooks, handles,
teachers built on a device) out of ``__getstate__`` or rebuild it lazily.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Method:
    """Base class: every hook is optional and does nothing by default."""

    #: Short name used in logs, reports and as prefix of loss columns.
    name: str = "method"

    def prepare(self, model: nn.Module) -> bool:
        """Change the model's structure before training (insert attention, swap in quantized convs).

        Must be idempotent: a resumed checkpoint already holds the changed structure. Return True when the structure
        or the parameter set changed, so the integration rebuilds the optimizer and EMA around it.
        """
        return False

    def attach(self, trainer: Any) -> None:
        """Set up training-time state once the trainer is ready (teacher, feature taps, extra parameter groups)."""

    def extra_loss(self, trainer: Any, batch: dict, preds: Any) -> dict[str, torch.Tensor]:
        """Losses added to the detection loss; each key becomes a column in the progress bar and results.csv.

        Values are per-image means (scalars); the integration multiplies them by the batch size exactly like
        Ultralytics' own loss items, so gradient accumulation and AMP scaling treat them the same way.
        """
        return {}

    def before_step(self, trainer: Any) -> None:
        """Edit gradients after AMP unscaling and accumulation, right before ``optimizer.step`` (e.g. BN-γ L1)."""

    def on_epoch_end(self, trainer: Any) -> None:
        """Per-epoch statistics, schedules, plots."""

    def on_train_end(self, trainer: Any) -> None:
        """Release runtime state (hooks, teacher) when training finishes."""

    def finalize(self, model: nn.Module) -> nn.Module:
        """Turn a trained model into the deliverable one (prune, strip attention/adapters, fold BN)."""
        return model

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
