"""The runner protocol every backend implements, and the one chunk/pad helper for fixed-batch runtimes.

``x`` is a letterboxed batch, (N, 3, H, W) float32 RGB in [0, 1]; ``y`` is (N, 4 + nc, A) float32 of decoded xywh boxes
(pixels) and class scores, exactly what an Ultralytics DetectionModel returns in eval mode and what its ONNX export
outputs. Keeping pre- and post-processing outside the runners is what makes numbers from different backends compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """``runner(x) -> y`` for one backend; evaluation and benchmarks need nothing else from it."""

    backend: str  #: "torch", "onnxruntime", "tensorrt", ...
    source: str  #: the model file (or "<in-memory>"), for messages and reports
    nc: int  #: classes the model predicts; 0 when the backend cannot tell
    fixed_batch: int | None  #: the batch an export was built for; None when any batch runs in one call
    fixed_imgsz: int | None  #: the square input size of a static export; None when dynamic

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def synchronize(self) -> None:
        """Wait for queued device work, so a timer around a call measures the whole call."""


def run_in_chunks(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, chunk: int, pad: bool) -> np.ndarray:
    """``run`` over ``x`` in slices of at most ``chunk`` images; with ``pad`` a short last slice is zero-padded to
    ``chunk`` (a static-batch engine or ONNX takes only full batches) and the padding's outputs are dropped."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = []
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        n = part.shape[0]
        if pad and n < chunk:
            part = np.concatenate([part, np.zeros((chunk - n, *part.shape[1:]), np.float32)])
        outs.append(run(part)[:n])
    return outs[0] if len(outs) == 1 else np.concatenate(outs)
