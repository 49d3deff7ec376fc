"""The metadata every yolocomp ONNX file carries, in Ultralytics' layout (``metadata_props``: names, stride, imgsz,
task, batch), so deploy scripts, ``yolocomp eval`` and Ultralytics itself label detections and size inputs."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import onnx
from torch import nn


def model_metadata(model: nn.Module, imgsz: int, batch: int = 1, dynamic: bool = False) -> dict[str, Any]:
    """Ultralytics' export metadata for a detection model."""
    from yolocomp import __version__

    names = getattr(model, "names", None) or {i: str(i) for i in range(int(model.model[-1].nc))}
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    return {
        "description": f"yolocomp {__version__} export",
        "author": "yolocomp",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "version": __version__,
        "stride": int(max(model.stride.tolist())) if hasattr(model, "stride") else 32,
        "task": "detect",
        "batch": batch,
        "dynamic": dynamic,
        "imgsz": [imgsz, imgsz],
        "names": {int(k): str(v) for k, v in names.items()},
    }


def set_metadata(onnx_model: onnx.ModelProto, metadata: dict[str, Any]) -> None:
    """Write ``metadata`` into ``onnx_model`` as string properties (replacing keys already there)."""
    keep = [p for p in onnx_model.metadata_props if p.key not in metadata]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = onnx_model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of an ONNX file (empty for a file without any)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def stamp(path: str | Path, model: nn.Module, imgsz: int, batch: int = 1, dynamic: bool = False) -> Path:
    """Add the metadata of ``model`` to the ONNX file at ``path`` in place."""
    onnx_model = onnx.load(str(path))
    set_metadata(onnx_model, model_metadata(model, imgsz, batch, dynamic))
    onnx.save(onnx_model, str(path))
    return Path(path)
