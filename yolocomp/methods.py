"""The one interface every compression method implements to take part in Ultralytics training.

A method never touches the trainer's internals directly; :mod:`yolocomp.integration` calls these hooks at the right
moments (before the optimizer, EMA and DDP exist, inside the loss, inside ``optimizer.step`` after AMP unscaling, at
epoch end, before saving) so that one method works the same from the CLI trainer and from a user's ``YOLO(...).train()``.
Methods must be picklable (Ultralytics DDP pickles the trainer's callbacks): keep runtime-only state (hooks, handles,
teachers built on a device) out of ``__getstate__`` or rebuild it lazily. State that must survive resume and reach
every DDP rank lives in the model (parameters, buffers, :func:`add_training_module`), never on the method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Method:
    """Base class: every hook is optional and does nothing by default."""

    #: Short name used in logs, reports and as prefix of loss columns.
    name: str = "method"

    def prepare(self, model: nn.Module) -> bool:
        """Change the model's structure before training (insert attention, swap in quantized convs, add adapters).

        Runs before Ultralytics builds the optimizer, EMA and DDP wrapper, so they all see the final parameters. Must be
        idempotent: a resumed checkpoint already holds the changed structure. Returns True when something changed.
        """
        return False

    def attach(self, trainer: Any) -> None:
        """Set up runtime state once the trainer is ready (feature taps, calibration); the EMA is then re-synced."""

    def extra_loss(self, trainer: Any, batch: dict, preds: Any) -> dict[str, torch.Tensor]:
        """Losses added to the detection loss; each key becomes a column in the progress bar and results.csv.

        Values are per-image means (scalars); the integration multiplies them by the batch size exactly like
        Ultralytics' own loss items, so gradient accumulation and AMP scaling treat them the same way.
        """
        return {}

    def before_batch(self, model: nn.Module) -> None:
        """Per batch, after Ultralytics put the model in train mode (e.g. keep BatchNorm in eval mode)."""

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


#: Attribute of the model holding training-only modules (distillation adapters): Ultralytics' optimizer, AMP, DDP,
#: gradient clipping, EMA and checkpoints handle them like any layer, and they are stripped from deliverables.
TRAINING_MODULES = "yolocomp_training_modules"


def add_training_module(model: nn.Module, key: str, module: nn.Module) -> nn.Module:
    """Register ``module`` on ``model`` under ``key`` as training-only (see :data:`TRAINING_MODULES`); returns it."""
    if not hasattr(model, TRAINING_MODULES):
        setattr(model, TRAINING_MODULES, nn.ModuleDict())
    getattr(model, TRAINING_MODULES)[key] = module
    return module


def training_module(model: nn.Module, key: str) -> nn.Module | None:
    """The training-only module registered under ``key`` (None when absent)."""
    modules = getattr(model, TRAINING_MODULES, None)
    return modules[key] if modules is not None and key in modules else None


def strip_training_modules(model: nn.Module) -> nn.Module:
    """Remove every training-only module in place (the model then has exactly its deliverable state dict)."""
    if hasattr(model, TRAINING_MODULES):
        delattr(model, TRAINING_MODULES)
    return model


@contextmanager
def without_training_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily take the training-only modules off ``model`` (e.g. so QAT never quantizes distillation adapters)."""
    modules = getattr(model, TRAINING_MODULES, None)
    strip_training_modules(model)
    try:
        yield model
    finally:
        if modules is not None:
            setattr(model, TRAINING_MODULES, modules)
