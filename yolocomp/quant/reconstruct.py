"""Post-training quantization by block reconstruction: the shared engine (:mod:`yolocomp.recon`) run with
:class:`~yolocomp.quant.adaround.AdaRoundFit` on a calibrated quantized model, against its float original."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from yolocomp.quant.adaround import AdaRoundFit
from yolocomp.recon.engine import reconstruct

#: Share of the calibration batches kept aside to check each fitted block (a fit that does worse there is undone).
HOLDOUT = 0.125


def reconstruct_quantized(qmodel: nn.Module, float_model: nn.Module, batches: list[torch.Tensor], *, iters: int = 500,
                          weight_lr: float = 1e-2, act_lr: float = 4e-5, drop_prob: float = 0.0,
                          affine_lr: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """Fit ``qmodel`` (calibrated, in place) block by block to ``float_model``; returns the engine's report with
    the rounding statistics of every block. ``drop_prob``: QDrop's share of activations kept float in the fit;
    ``affine_lr``: learning rate of each conv's per-channel step and bias (0: both stay as calibrated)."""
    fitter = AdaRoundFit(weight_lr=weight_lr, act_lr=act_lr, drop_prob=drop_prob, affine_lr=affine_lr)
    if len(batches) == 1 and len(batches[0]) > 1:  # one batch: halve it, so some images stay held out
        batches = list(batches[0].tensor_split(2))
    held = max(1, round(HOLDOUT * len(batches))) if len(batches) > 1 else 0
    fit, held_out = (batches[:-held], batches[-held:]) if held else (batches, batches)
    return reconstruct(qmodel, float_model.float().eval(), fit, held_out=held_out, iters=iters, fitter=fitter,
                       batch_size=max(len(b) for b in batches), progress=progress)
