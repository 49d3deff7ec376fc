"""Runners: one per backend, all with the same call ``runner(x) -> y``.

``x`` is a letterboxed batch, (N, 3, H, W) float32 RGB in [0, 1]; ``y`` is (N, 4 + nc, A) float32 of decoded xywh boxes
(pixels) and class scores, exactly what an Ultralytics DetectionModel returns in eval mode and what its ONNX export
outputs. Keeping pre- and post-processing outside the runners is what makes numbers from different backends compare.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path
from typing import Any

import numpy as np

from yolocomp.errors import UserError, first_line

TENSORRT_MISSING = "TensorRT is not installed: pip install 'yolocomp[tensorrt]' on a machine with an NVIDIA GPU"
SUFFIXES = (".pt", ".onnx", ".engine", ".yaml", ".yml")


def torch_device(device: str | int | None) -> Any:
    """'cpu', 'cuda', 'cuda:1', '0' or 0 -> torch.device; a CUDA request without a GPU is a UserError."""
    import torch

    text = "cpu" if device is None else str(device).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{device}' asked for CUDA but no GPU is visible to torch; use --device cpu")
    try:
        return torch.device(text)
    except RuntimeError as e:
        raise UserError(f"unknown device '{device}': use cpu, cuda, cuda:0 or a GPU index") from e


def only_stock_modules(model: Any) -> bool:
    """True when every module comes from torch or Ultralytics. Fusing replaces convs with plain ``nn.Conv2d``, which
    would silently drop yolocomp's quantizers or other custom layers, so such models run unfused."""
    return all(type(m).__module__.split(".")[0] in {"torch", "ultralytics"} for m in model.modules())


class TorchRunner:
    """A PyTorch detection model in eval mode (a fused copy: BN folded into convs, as Ultralytics' val runs it)."""

    backend = "torch"
    fixed_batch: int | None = None
    fixed_imgsz: int | None = None

    def __init__(self, model: Any, device: str = "cpu", threads: int | None = None, fuse: bool = True):
        import torch

        from yolocomp.integration import load_model

        self.source = str(model) if not isinstance(model, torch.nn.Module) else getattr(model, "pt_path", None) or "<in-memory>"
        module = load_model(model)
        self.original = module  #: the model as given (unfused), for params / GFLOPs
        self.device = torch_device(device)
        if threads:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-model thread pool
        module = copy.deepcopy(module).float().eval()  # never change the caller's model
        self.fused = False
        if fuse and hasattr(module, "fuse") and only_stock_modules(module):
            module = module.fuse(verbose=False)
            self.fused = True
        # As Ultralytics' AutoBackend: channels-last weights let oneDNN pick faster x86 CPU kernels
        self.channels_last = self.device.type == "cpu" and platform.machine() in {"AMD64", "x86_64"} and (
            torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        )
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = module.to(self.device, memory_format=memory_format)
        self.nc = int(getattr(self.model.model[-1], "nc", 0)) if hasattr(self.model, "model") else 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.device))
            if isinstance(y, (tuple, list)):
                y = y[0]
            return y.float().cpu().numpy()

    def synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class OnnxRunner:
    """An ONNX model in ONNX Runtime (FP32 or Q/DQ INT8 graphs alike)."""

    backend = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.source = str(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # ORT warns about unused initializers in Q/DQ graphs; not the user's concern
        if threads:
            options.intra_op_num_threads = int(threads)
        # ORT's worker threads spin after each run by default; interleaved with PyTorch models (bench --compare, the
        # run report) that spinning steals the cores from the next model and inflates its latency many times over.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        want_cuda = str(device).lower().startswith("cuda") or str(device).isdigit()
        providers = ["CPUExecutionProvider"]
        if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"ONNX Runtime cannot load {path}: {first_line(e)} (re-export the model)") from e
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.fixed_imgsz = shape[2] if len(shape) == 4 and isinstance(shape[2], int) else None
        out_shape = self.session.get_outputs()[0].shape
        # (N, 4 + nc, A); an end-to-end head (YOLOv10 / YOLO26) outputs (N, max_det, 6) and names no class count
        end2end = len(out_shape) == 3 and out_shape[-1] == 6
        self.nc = out_shape[1] - 4 if len(out_shape) == 3 and isinstance(out_shape[1], int) and not end2end else 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return self._run(x)
        # A fixed-batch export (Ultralytics' default is batch 1): run in chunks, zero-padding the last one.
        b = self.fixed_batch
        outs = []
        for start in range(0, x.shape[0], b):
            chunk = x[start : start + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), np.float32)])
            outs.append(self._run(chunk)[:n])
        return np.concatenate(outs)

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def synchronize(self) -> None:
        """ORT's run() returns host arrays, so it is already synchronous."""


def tensorrt_runner(path: str | Path, device: str = "cuda") -> Any:
    """A TensorRT engine runner (written in :mod:`yolocomp.export.tensorrt`); a clear error where TensorRT is absent."""
    try:
        import tensorrt  # noqa: F401

        from yolocomp.export.tensorrt import TensorRTRunner
    except ImportError as e:
        raise UserError(TENSORRT_MISSING) from e
    if str(device).lower() == "cpu":  # an engine runs only on its GPU; "cpu" is just the CLI default
        device = 0
    runner = TensorRTRunner(path, device=device)
    runner.backend = "tensorrt"
    return runner


def make_runner(model: Any, device: str = "cpu", threads: int | None = None) -> Any:
    """A runner for a ``.pt`` / ``.onnx`` / ``.engine`` path, a model ``.yaml`` (random weights) or an in-memory model."""
    import torch

    if isinstance(model, torch.nn.Module):
        return TorchRunner(model, device, threads)
    if not isinstance(model, (str, Path)):
        raise UserError(f"cannot evaluate a {type(model).__name__}: give a .pt/.onnx/.engine path or a DetectionModel")
    path = Path(model)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"unsupported model file {model}: give a .pt checkpoint, an .onnx model or a TensorRT .engine")
    if suffix in {".yaml", ".yml"}:  # an architecture only (e.g. yolov8n.yaml): load_model finds bundled yamls
        return TorchRunner(str(model), device, threads)
    if not path.exists():
        raise UserError(f"model file not found: {model} (check the path)")
    if suffix == ".pt":
        return TorchRunner(path, device, threads)
    if suffix == ".onnx":
        return OnnxRunner(path, device, threads)
    return tensorrt_runner(path, device)
