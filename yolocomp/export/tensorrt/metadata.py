"""Engine metadata: the ``<engine>.json`` written beside every engine (names, imgsz, precision, versions, ...).

The path rule and the reader live with the runtime (:mod:`yolocomp.eval.runners.engine_metadata`), which reads the
file without importing the export package; they are re-exported here so the format has one home for callers.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

from yolocomp.eval.runners.engine_metadata import metadata_path, read_engine_metadata
from yolocomp.export.tensorrt.rules import BuildPlan

__all__ = ["engine_metadata", "metadata_path", "read_engine_metadata", "write_engine_metadata"]


def engine_metadata(plan: BuildPlan, trt_version: str, extra: dict | None = None) -> dict:
    """Names, image size, stride, precision, batch and versions, read from the ONNX's Ultralytics metadata."""
    from yolocomp import __version__

    meta = plan.onnx.metadata
    names = ast.literal_eval(meta["names"]) if "names" in meta else {}
    return {
        **_onnx_complexity(plan.onnx.path, plan.imgsz),
        "task": meta.get("task", "detect"),
        "names": {int(k): str(v) for k, v in (dict(enumerate(names)) if isinstance(names, list) else names).items()},
        "imgsz": [plan.imgsz, plan.imgsz],
        "stride": int(meta.get("stride", 32)),
        "precision": plan.precision,
        "build_mode": plan.mode,
        "batch": plan.batch,
        "dla_core": plan.dla_core,
        "tensorrt": trt_version,
        "source_onnx": str(plan.onnx.path.resolve()),
        "yolocomp": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }


def _onnx_complexity(path: Path, imgsz: int) -> dict:
    """Params and GFLOPs of the source graph (an engine cannot be inspected for them); empty if not countable."""
    try:
        from yolocomp.eval.onnx_stats import onnx_stats

        stats = onnx_stats(path, imgsz)
    except Exception:  # optional information: an exotic graph must not stop the build
        return {}
    return {"params": stats["params"], "gflops": stats["gflops"]}


def write_engine_metadata(engine_path: str | Path, metadata: dict) -> Path:
    """Write ``metadata`` as ``<engine>.json``; return its path."""
    path = metadata_path(engine_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata, indent=2))
    return path
