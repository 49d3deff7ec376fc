"""TensorRT engines from yolocomp's ONNX files: ONNX inspection, version rules, metadata, the builder.

One job per module: :mod:`.onnx_info` (what the ONNX holds), :mod:`.rules` (which build a request gets on which
TensorRT, checked without TensorRT), :mod:`.metadata` (the JSON beside an engine), :mod:`.calibrator` (implicit-INT8
calibration) and :mod:`.builder` (``build_engine`` and the CLI's ``export_engine``). The runner that executes engines
is :mod:`yolocomp.eval.runners.tensorrt`.
"""

from yolocomp.export.tensorrt.builder import build_engine, export_engine
from yolocomp.export.tensorrt.metadata import (
    engine_metadata,
    metadata_path,
    read_engine_metadata,
    write_engine_metadata,
)
from yolocomp.export.tensorrt.onnx_info import QDQ_OPS, OnnxInfo, inspect_onnx
from yolocomp.export.tensorrt.rules import (
    INSTALL_HINT,
    PRECISIONS,
    BuildPlan,
    import_tensorrt,
    installed_tensorrt_version,
    plan_build,
)

__all__ = [
    "INSTALL_HINT",
    "PRECISIONS",
    "QDQ_OPS",
    "BuildPlan",
    "OnnxInfo",
    "build_engine",
    "engine_metadata",
    "export_engine",
    "import_tensorrt",
    "inspect_onnx",
    "installed_tensorrt_version",
    "metadata_path",
    "plan_build",
    "read_engine_metadata",
    "write_engine_metadata",
]
