"""PyTorch runner: an Ultralytics DetectionModel (or a .pt / model .yaml) in eval mode, fused as Ultralytics' val."""

from __future__ import annotations

import copy
import platform
from typing import Any

import numpy as np

from yolocomp.errors import UserError


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
