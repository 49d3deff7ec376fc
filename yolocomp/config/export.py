"""Options of the ``export`` stage: ONNX (Q/DQ for quantized models) or a TensorRT engine."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import non_negative, option

EXPORT_FORMATS = ("onnx", "engine")
PRECISIONS = ("auto", "fp32", "fp16", "int8")


@dataclass
class ExportConfig:
    format: str = option("onnx", "onnx, or a TensorRT engine", hint="use onnx or engine", choices=EXPORT_FORMATS)
    dynamic: bool = option(False, "ONNX with a dynamic batch dimension (so bench can time batch N)",
                           hint="use true for a dynamic batch dimension")
    check: bool = option(False, "lint Q/DQ placement for TensorRT", hint="use true to lint Q/DQ placement for TensorRT")
    precision: str = option("auto", "TensorRT precision (auto: INT8 from Q/DQ, else FP16)",
                            hint="use auto, fp32, fp16 or int8", choices=PRECISIONS)
    dla_core: int | None = option(None, "TensorRT: run on this DLA core (Jetson), GPU fallback",
                                  hint="use a DLA core index such as 0 (Jetson) or null", check=non_negative)
    calibration_data: str | None = option(None, "TensorRT <= 10, float ONNX + int8: folder of calibration images",
                                          hint="give a folder of images for implicit INT8 calibration (TensorRT <= 10)")
    calibration_cache: str | None = option(None, "TensorRT: calibration cache to reuse (or write)",
                                           hint="give a calibration cache path to reuse or write")
