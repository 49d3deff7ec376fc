"""The INT8 entropy calibrator TensorRT <= 10 uses to calibrate a float ONNX (implicit INT8)."""

from __future__ import annotations

from typing import Any

import numpy as np

from yolocomp.errors import UserError
from yolocomp.export.calibration import CalibrationCache, calibration_batches
from yolocomp.export.tensorrt.rules import BuildPlan


def entropy_calibrator(trt: Any, plan: BuildPlan) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding letterboxed batches from CUDA memory owned by torch (no pycuda)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("INT8 calibration needs a CUDA build of torch on the GPU machine (torch.cuda is unavailable)")
    cache_path = plan.calibration_cache
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else None
    batches = calibration_batches(plan.calibration_images, plan.imgsz, plan.batch) if cache_bytes is None else iter(())
    if cache_bytes is None and len(plan.calibration_images) < plan.batch:
        raise UserError(f"{len(plan.calibration_images)} calibration images are fewer than the batch {plan.batch}")

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_batch: torch.Tensor | None = None  # kept alive until TensorRT asks for the next batch

        def get_batch_size(self) -> int:
            return plan.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(batches, None)
            if batch is None:
                return None
            self.device_batch = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache_bytes

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is not None and cache_bytes is None:  # a cache the user gave is never rewritten
                CalibrationCache.from_bytes(bytes(cache), source="TensorRT's cache")  # sanity: the format we document
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                cache_path.write_bytes(bytes(cache))

    return EntropyCalibrator()
