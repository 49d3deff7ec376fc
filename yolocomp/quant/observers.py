"""Range observers and calibrators.

Activations: a histogram of ``|x|`` whose range doubles (merging bins) when a larger value arrives, so any number of
batches fits in a fixed memory; the clipping threshold is then chosen by min-max, percentile or MSE. Weights:
per-output-channel max-abs, or an MSE-optimal clip per channel (for 4 bits).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from yolocomp.config.ptq import CALIBRATORS  # the option vocabulary is defined once, in the stage config


class HistogramObserver:
    """Histogram of absolute values with a range that grows by powers of two; ``neg_hist`` counts, on the same bins,
    the values that were negative (so a grid with few levels below zero can be scored)."""

    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.hist = np.zeros(bins, dtype=np.float64)
        self.neg_hist = np.zeros(bins, dtype=np.float64)
        self.upper = 0.0  # histogram covers [0, upper]
        self.max_value = 0.0
        self.min_value = math.inf
        self.count = 0
        self.ema_max: float | None = None  # EMA of per-batch max |x| (the "EMA observer")
        self.sample_max_sum = 0.0  # sum over images of each image's max |x| (the "meanmax" range)
        self.samples = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.min_value = min(self.min_value, x.min().item())
        a = x.abs().flatten()
        batch_max = a.max().item()
        self.max_value = max(self.max_value, batch_max)
        self.ema_max = batch_max if self.ema_max is None else 0.9 * self.ema_max + 0.1 * batch_max
        self.count += a.numel()
        per_image = a.reshape(x.shape[0], -1).amax(1) if x.ndim > 1 else a.max().reshape(1)  # a: |x| flattened
        self.sample_max_sum += per_image.sum().item()
        self.samples += per_image.numel()
        if batch_max <= 0:
            self.hist[0] += a.numel()
            self.neg_hist[0] += (x < 0).sum().item()
            return
        if self.upper == 0.0:
            self.upper = batch_max
        elif batch_max > self.upper:
            factor = 2 ** math.ceil(math.log2(batch_max / self.upper))
            self.hist, self.neg_hist = (_merged(h, factor) for h in (self.hist, self.neg_hist))
            self.upper *= factor
        self.hist += torch.histc(a, bins=self.bins, min=0.0, max=self.upper).double().cpu().numpy()
        negative = -x[x < 0]
        if negative.numel():
            self.neg_hist += torch.histc(negative, bins=self.bins, min=0.0, max=self.upper).double().cpu().numpy()

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, self.upper, self.bins + 1)


def _merged(hist: np.ndarray, factor: int) -> np.ndarray:
    """``hist`` with every ``factor`` neighbouring bins summed into one, padded back to its length with zeros."""
    merged = hist.reshape(-1, factor).sum(1) if factor <= hist.size else hist.sum(keepdims=True)
    out = np.zeros(hist.size)
    out[: merged.size] = merged
    return out


def range_method(method: str, bits: int, shifted: bool = False) -> str:
    """The calibrator a quantizer of ``bits`` uses: ``auto`` is mse below 8 bits, where 16 levels spread up to the
    99.99th percentile leave most values on a handful of them; at 8 bits meanmax for a shifted grid and percentile
    for a symmetric one (the better of the two for each grid, measured in tools/README.md)."""
    if method != "auto":
        return method
    if bits < 8:
        return "mse"
    return "meanmax" if shifted else "percentile"


def choose_range(obs: HistogramObserver, method: str, levels: int = 127, percentile: float = 99.99) -> float:
    """Clipping threshold (>= 0) for ``|x|`` from a histogram, by the named calibration method."""
    if method not in (*CALIBRATORS, "ema") or method == "auto":
        raise ValueError(f"unknown calibrator {method!r}; choose one of {', '.join(CALIBRATORS[1:])} (resolve auto "
                         f"with range_method)")
    if obs.max_value <= 0:
        return 0.0
    if method == "minmax":
        return obs.max_value
    if method == "ema":
        return float(obs.ema_max or obs.max_value)
    if method == "meanmax":
        return float(obs.sample_max_sum / max(obs.samples, 1))
    if method == "percentile":
        cdf = np.cumsum(obs.hist) / obs.hist.sum()
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(obs.edges[min(idx + 1, obs.bins)], obs.max_value))
    return _mse_threshold(obs, levels)


def _mse_threshold(obs: HistogramObserver, levels: int, candidates: int = 200) -> float:
    """The clip minimising the expected squared quantization error over the histogram (bin centres as values)."""
    centers, clips = _centers(obs), _clip_candidates(obs, candidates)
    err = _grid_errors(centers, obs.hist, clips / levels, levels)
    return float(clips[int(np.argmin(err))])


def shifted_grid(obs: HistogramObserver, bits: int, candidates: int = 200) -> tuple[int, float]:
    """The grid of ``2**bits`` levels ``-z .. 2**bits - 1 - z`` (times the step) and its positive clip that minimise the
    expected squared error over the histogram: returns ``(z, clip)``. A symmetric signed grid (``z = 2**(bits-1)``)
    spends half its levels on negatives; SiLU outputs only reach -0.28, so below 8 bits one or two levels there
    usually leave more for the positive range, while clipping every negative to 0 (``z = 0``) biases each channel."""
    levels = 2**bits - 1
    centers, clips = _centers(obs), _clip_candidates(obs, candidates)
    neg = np.minimum(obs.neg_hist, obs.hist)
    pos = obs.hist - neg
    best = (math.inf, 2 ** (bits - 1), obs.max_value)
    for z in range(2 ** (bits - 1) + 1):
        top = levels - z  # levels above zero
        steps = clips / top
        err = _grid_errors(centers, pos, steps, top) + _grid_errors(centers, neg, steps, z)
        i = int(np.argmin(err))
        if err[i] < best[0]:
            best = (float(err[i]), z, float(clips[i]))
    return best[1], best[2]


def _centers(obs: HistogramObserver) -> np.ndarray:
    return (obs.edges[:-1] + obs.edges[1:]) / 2


def _clip_candidates(obs: HistogramObserver, candidates: int) -> np.ndarray:
    return np.linspace(obs.max_value / candidates, obs.max_value, candidates)


def _grid_errors(values: np.ndarray, counts: np.ndarray, steps: np.ndarray, levels: int) -> np.ndarray:
    """Squared error of rounding the magnitudes ``values`` (weighted by ``counts``) onto ``0..levels`` times each of
    ``steps``: one total per step."""
    q = np.clip(np.round(values[None, :] / steps[:, None]), 0, levels) * steps[:, None]
    return ((q - values[None, :]) ** 2 * counts[None, :]).sum(1)


def weight_scales(w: torch.Tensor, qp: int, mse: bool = False, candidates: int = 100) -> torch.Tensor:
    """Per-output-channel step sizes for weight ``w`` (C_out, ...): max|w|/Qp, or the MSE-optimal clip when ``mse``."""
    flat = w.reshape(w.shape[0], -1).float()
    amax = flat.abs().amax(1).clamp_min(1e-8)
    if not mse:
        return amax / qp
    ratios = torch.linspace(0.3, 1.0, candidates, device=w.device)
    steps = amax[None, :] * ratios[:, None] / qp  # (K, C)
    qn = -qp - 1
    q = torch.clamp(torch.round(flat[None] / steps[..., None]), qn, qp) * steps[..., None]
    err = ((q - flat[None]) ** 2).sum(-1)  # (K, C)
    best = err.argmin(0)
    return steps.gather(0, best[None]).squeeze(0)


def offset_grid(min_value: float, clip: float, bits: int = 8) -> int:
    """Levels below zero of an asymmetric grid of ``2**bits`` levels for values in ``[min_value, clip]``: as few as
    reach ``min_value`` with the step ``clip / (2**bits - 1 - z)``, at most half. A SiLU output (minimum -0.28) gets
    a few levels below zero instead of the 128 a symmetric signed grid spends there."""
    levels, half = 2**bits - 1, 2 ** (bits - 1)
    below = max(0.0, -min_value)
    if clip <= 0:
        return half
    z = 0
    for _ in range(32):  # z and the step depend on each other; a few rounds settle
        z_next = min(half, math.ceil(below / (clip / (levels - z)) - 1e-9))
        if z_next == z:
            break
        z = z_next
    return z
