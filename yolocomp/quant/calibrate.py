"""Calibration: run images through a quantized model with observers on, then set every step size."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from yolocomp.errors import UserError
from yolocomp.eval.images import IMAGE_SUFFIXES, dataset_images
from yolocomp.quant.modules import quant_convs, quantizers
from yolocomp.quant.observers import CALIBRATORS

__all__ = ["IMAGE_SUFFIXES", "calibrate", "calibration_images", "image_batches", "init_weight_scales", "is_calibrated",
           "split_images", "spread"]


def calibration_images(data: str | Path, images: int = 256, split: str = "train") -> list[Path]:
    """Up to ``images`` image paths of a split of an Ultralytics data yaml (train by default: calibrating on the
    val images would leak them into the numbers measured on val). Falls back to val when there is no train split."""
    if images < 1:
        raise UserError(f"--images {images}: calibration needs at least 1 image (256 is the usual choice)")
    files = spread(dataset_images(data, split, missing_ok=True), images)
    if not files:
        raise UserError(f"no images found for split '{split}' of {data}; check the yaml's paths")
    return files


def split_images(cfg: dict, split: str = "train", images: int | None = None) -> list[Path]:
    """Up to ``images`` image paths (all when None) of a split of a data config whose ``path`` is absolute (a
    resolved yaml, or Ultralytics' ``trainer.data``), spread evenly over the sorted list; [] when there are none.
    Falls back to val when there is no such split."""
    files = dataset_images(cfg, split, missing_ok=True)
    return files if images is None else spread(files, images)


def spread(files: list[Path], n: int) -> list[Path]:
    """Up to ``n`` of ``files`` spread over the whole sorted list (sorted lists are often grouped by source)."""
    if not files:
        return files
    idx = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
    return [files[i] for i in sorted(set(idx.tolist()))]


def image_batches(paths: list[Path], imgsz: int, batch: int = 8) -> Iterator[torch.Tensor]:
    """Letterboxed (N, 3, imgsz, imgsz) float batches in [0, 1], the same preprocessing as evaluation."""
    from yolocomp.eval.preprocess import batches

    for b in batches(paths, imgsz, batch):
        yield torch.from_numpy(b.array)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], method: str = "auto",
              device: str | torch.device = "cpu", progress: bool = True, **kwargs: float) -> int:
    """Observe activations over ``batches`` and set every activation step size with ``method``; weight step sizes
    come from the (BN-folded) weights. The model runs in eval mode, so BN statistics are untouched. Returns the
    number of images seen."""
    if method not in CALIBRATORS + ("ema",):
        raise UserError(f"unknown calibrator {method!r}; choose one of {', '.join(CALIBRATORS)}")
    acts = [q for q in quantizers(model) if q.channels is None]
    for q in acts:
        q.start_observing()
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for x in tqdm(batches, desc=f"calibrate ({method})", disable=not progress, leave=False):
            model(x.to(device).float())
            seen += x.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise UserError("calibration saw no images; check the data yaml")
    for q in acts:
        q.finish_observing(method, **kwargs)
    init_weight_scales(model)
    return seen


@torch.no_grad()
def init_weight_scales(model: nn.Module) -> None:
    """Per-channel weight step sizes from each conv's BN-folded weight."""
    for conv in quant_convs(model):
        conv.weight_quant.init_from_weight(conv.folded()[0])


def is_calibrated(model: nn.Module) -> bool:
    return all(q.initialized.item() > 0.5 for q in quantizers(model))
