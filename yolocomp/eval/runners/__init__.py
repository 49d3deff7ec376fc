"""Runners: one module per backend, all with the same call ``runner(x) -> y`` (see :mod:`.base`).

``make_runner`` picks one by the model's type or file suffix (an OpenVINO IR: its folder or ``.xml``). A new backend
is one more module here and one more branch in :func:`make_runner`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yolocomp.errors import UserError
from yolocomp.eval.runners.base import Runner, run_in_chunks
from yolocomp.eval.runners.openvino import OPENVINO_MISSING, is_openvino
from yolocomp.eval.runners.tensorrt import TENSORRT_MISSING
from yolocomp.eval.runners.torch import TorchRunner, only_stock_modules, torch_device

SUFFIXES = (".pt", ".onnx", ".engine", ".xml", ".yaml", ".yml")


def make_runner(model: Any, device: str = "cpu", threads: int | None = None) -> Runner:
    """A runner for a ``.pt`` / ``.onnx`` / ``.engine`` path, an OpenVINO folder or ``.xml``, a model ``.yaml`` (random
    weights) or an in-memory model."""
    import torch

    if isinstance(model, torch.nn.Module):
        return TorchRunner(model, device, threads)
    if not isinstance(model, (str, Path)):
        raise UserError(f"cannot evaluate a {type(model).__name__}: give a .pt/.onnx/.engine path or a DetectionModel")
    path = Path(model)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".xml":
        if suffix == ".xml" and not path.exists():
            raise UserError(f"model file not found: {model} (check the path)")
        if not is_openvino(path):
            raise UserError(f"{model} is a folder without an OpenVINO .xml: give a model file or an OpenVINO folder")
        from yolocomp.eval.runners.openvino import OpenVINORunner

        return OpenVINORunner(path, device, threads)
    if suffix not in SUFFIXES:
        raise UserError(f"unsupported model file {model}: give a .pt checkpoint, an .onnx model, an OpenVINO folder "
                        "or a TensorRT .engine")
    if suffix in {".yaml", ".yml"}:  # an architecture only (e.g. yolov8n.yaml): load_model finds bundled yamls
        return TorchRunner(str(model), device, threads)
    if not path.exists():
        raise UserError(f"model file not found: {model} (check the path)")
    if suffix == ".pt":
        return TorchRunner(path, device, threads)
    if suffix == ".onnx":
        from yolocomp.eval.runners.onnxruntime import OnnxRunner

        return OnnxRunner(path, device, threads)
    from yolocomp.eval.runners.tensorrt import tensorrt_runner

    return tensorrt_runner(path, device)


__all__ = ["OPENVINO_MISSING", "SUFFIXES", "TENSORRT_MISSING", "Runner", "TorchRunner", "make_runner", "only_stock_modules",
           "run_in_chunks", "torch_device"]
