"""Options of the ``export`` stage: ONNX (Q/DQ for quantized models), a TensorRT engine or an OpenVINO IR folder."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import non_negative, option

EXPORT_FORMATS = ("onnx", "engine", "openvino")
PRECISIONS = ("auto", "fp32", "fp16", "int8")


@dataclass
class ExportConfig:
    format: str = option("onnx", "onnx, a TensorRT engine, or openvino (an IR folder Ultralytics loads)",
                         hint="use onnx, engine or openvino", choices=EXPORT_FORMATS)
    dynamic: bool = option(False, "ONNX with a dynamic batch dimension (so bench can time batch N)",
                           hint="use true for a dynamic batch dimension")
    check: bool = option(False, "lint Q/DQ placement for TensorRT", hint="use true to lint Q/DQ placement for TensorRT")
    precision: str = option("auto", "TensorRT precision (auto: INT8 from Q/DQ, else FP16); OpenVINO: auto (INT8 from "
                            "Q/DQ, else FP32), fp32, fp16 (compressed weights), int8 (Q/DQ models)",
                            hint="use auto, fp32, fp16 or int8", choices=PRECISIONS)
    dla_core: int | None = option(None, "TensorRT: run on this DLA core (Jetson), GPU fallback",
                                  hint="use a DLA core index such as 0 (Jetson) or null", check=non_negative)
    calibration_data: str | None = option(None, "TensorRT <= 10, float ONNX + int8: folder of calibration images",
                                          hint="give a folder of images for implicit INT8 calibration (TensorRT <= 10)")
    calibration_cache: str | None = option(None, "TensorRT: calibration cache to reuse (or write)",
                                           hint="give a calibration cache path to reuse or write")
