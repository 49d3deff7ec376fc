"""Small read/write helpers for a running Ultralytics trainer, so methods never reach into its attributes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn


def ema_model(trainer: Any) -> nn.Module | None:
    """The trainer's EMA copy of the model (None before Ultralytics built it, or without EMA)."""
    ema = getattr(trainer, "ema", None)
    return getattr(ema, "ema", None)


def restart_ema(trainer: Any) -> None:
    """Start the EMA afresh from the current model (after a method changed weights or calibration state that is not
    all in the state dict, e.g. a quantizer's sign decided at calibration)."""
    if getattr(trainer, "ema", None) is not None:
        from ultralytics.utils.torch_utils import ModelEMA

        trainer.ema = ModelEMA(trainer.model)


def training_images(trainer: Any, batches: int) -> Iterator[torch.Tensor]:
    """Up to ``batches`` preprocessed (augmented) float image batches from the trainer's training loader."""
    for i, batch in enumerate(trainer.train_loader):
        if i >= batches:
            return
        yield trainer.preprocess_batch(batch)["img"].float()


def dataset_config(trainer: Any) -> dict | None:
    """The trainer's parsed data yaml (paths resolved by Ultralytics), or None."""
    data = getattr(trainer, "data", None)
    return data if isinstance(data, dict) else None


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> int:
    """Sum ``tensors`` in place over all DDP ranks (one collective); returns the world size (1 without DDP)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    if tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return torch.distributed.get_world_size()


def planned_iterations(trainer: Any) -> int:
    """Training batches the run will see in all (epochs x batches per epoch; per rank under DDP)."""
    return int(getattr(trainer, "epochs", 0) or 0) * len(trainer.train_loader)
