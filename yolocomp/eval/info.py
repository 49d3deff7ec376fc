"""``model_info``: params, GFLOPs at an image size, size on disk and a per-layer channel table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yolocomp.errors import UserError


def size_mb(model: Any) -> float:
    """File size for a path; for an in-memory model the bytes of its parameters and buffers as stored."""
    if isinstance(model, (str, Path)) and Path(model).is_file():
        return round(Path(model).stat().st_size / 1e6, 3)
    tensors = list(model.parameters()) + list(model.buffers())
    return round(sum(t.numel() * t.element_size() for t in tensors) / 1e6, 3)


def count_params(model: Any) -> int:
    """Elements of every parameter (buffers such as BN running statistics are not parameters)."""
    return int(sum(p.numel() for p in model.parameters()))


def gflops(model: Any, imgsz: int = 640, digits: int | None = None) -> float | None:
    """Conv + linear GFLOPs (2 x MACs, as Ultralytics reports them) of one ``imgsz`` x ``imgsz`` image, rounded to
    ``digits`` when given.

    Counted from the layers' shapes during one forward pass on a copy (the model is untouched), so it matches what
    :func:`yolocomp.eval.onnx_stats.onnx_stats` counts on the exported graph. None when some conv does not run as a
    module (yolocomp's fake-quantized convs call the functional conv): the count would be silently partial.
    """
    import copy

    import torch
    from torch import nn

    model = copy.deepcopy(model)
    macs: dict[str, int] = {}

    def counter(name: str):
        def hook(module: nn.Module, _inputs: Any, out: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                per_pixel = k * (module.in_channels // module.groups) * module.out_channels
                macs[name] = per_pixel * out.shape[-1] * out.shape[-2]
            else:  # Linear: one in x out product per output row
                macs[name] = module.in_features * module.out_features * (out.numel() // module.out_features)

        return hook

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    hooks = [m.register_forward_hook(counter(n)) for n, m in layers.items()]
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, imgsz, imgsz, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d)]
    if not convs or any(n not in macs for n in convs):
        return None
    value = 2 * sum(macs.values()) / 1e9
    return value if digits is None else round(value, digits)


def _layer_table(model: Any) -> list[dict]:
    """One row per top-level layer of a DetectionModel; output channels measured with a small forward pass."""
    import torch

    outputs: dict[int, Any] = {}
    hooks = [m.register_forward_hook(_Recorder(outputs, i)) for i, m in enumerate(model.model)]
    was_training = model.training
    stride = int(max(getattr(model, "stride", torch.tensor([32])).max().item(), 32))
    try:
        param = next(model.parameters())
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, 3, 2 * stride, 2 * stride, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    rows = []
    for i, m in enumerate(model.model):
        rows.append(
            {"index": getattr(m, "i", i), "type": getattr(m, "type", type(m).__name__).split(".")[-1],
             "from": getattr(m, "f", -1), "out_channels": outputs.get(i), "params": sum(p.numel() for p in m.parameters())}
        )
    return rows


class _Recorder:
    def __init__(self, store: dict, index: int):
        self.store, self.index = store, index

    def __call__(self, module: Any, args: Any, out: Any) -> None:
        if isinstance(out, (tuple, list)):  # Detect in eval mode returns (decoded, raw)
            out = out[0]
        self.store[self.index] = int(out.shape[1]) if hasattr(out, "shape") and out.ndim > 1 else None


def model_info(model: Any, imgsz: int = 640) -> dict:
    """Params, GFLOPs at ``imgsz``, size (MB) and per-layer rows (index, type, from, out_channels, params).

    ``model``: a ``.pt`` / model ``.yaml`` / ``.onnx`` path or an in-memory DetectionModel. A TensorRT ``.engine`` has
    no readable graph: give its ONNX instead.
    """
    import torch

    from yolocomp.integration import load_model

    if isinstance(model, (str, Path)):
        path = Path(model)
        suffix = path.suffix.lower()
        if suffix not in {".pt", ".onnx", ".yaml", ".yml"}:
            hint = "; for a TensorRT .engine pass the .onnx it was built from" if suffix == ".engine" else ""
            raise UserError(f"unsupported model file {model}: give a .pt, .onnx or model .yaml{hint}")
        if suffix != ".yaml" and suffix != ".yml" and not path.exists():
            raise UserError(f"model file not found: {model} (check the path)")
        if suffix == ".onnx":
            from yolocomp.eval.onnx_stats import onnx_stats

            stats = onnx_stats(path, imgsz)
            return {"model": str(model), "backend": "onnxruntime", "imgsz": imgsz, "params": stats["params"],
                    "gflops": stats["gflops"], "size_mb": size_mb(path), "qdq": stats["qdq"], "layers": stats["layers"]}
    module = load_model(model)
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"cannot describe {model}")
    return {
        "model": str(model) if isinstance(model, (str, Path)) else getattr(module, "pt_path", None) or "<in-memory>",
        "backend": "torch",
        "imgsz": imgsz,
        "params": count_params(module),
        "gflops": gflops(module, imgsz, digits=4),
        "size_mb": size_mb(model if isinstance(model, (str, Path)) and Path(model).is_file() else module),
        "layers": _layer_table(module),
    }
