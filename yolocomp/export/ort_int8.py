"""INT8 ONNX tuned for ONNX Runtime on x86 CPUs without VNNI.

ONNX Runtime is fast there only when every conv runs as QLinearConv with *unsigned* 8-bit activations and the SiLU in
between stays integer too (QLinearSigmoid + QLinearMul); that needs asymmetric uint8 activations (SiLU outputs go
below zero) and Q/DQ around every op, which TensorRT's symmetric placement (``onnx_qdq.export_onnx``) does not give.
This flavour therefore uses ONNX Runtime's own static quantizer on the simplified float export, with our calibration
images; the Detect decode (DFL softmax, box arithmetic) stays float.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.export.onnx_metadata import stamp
from yolocomp.export.onnx_qdq import export_onnx, is_quantized

#: yolocomp calibrator -> ONNX Runtime CalibrationMethod (8-bit); meanmax has no counterpart there
ORT_CALIBRATORS = {"auto": "Percentile", "minmax": "MinMax", "percentile": "Percentile", "mse": "Distribution"}


class _Reader:
    """ONNX Runtime CalibrationDataReader over our letterboxed batches, one image per call (the graph is batch 1).
    It supports ``set_range``, so ONNX Runtime calibrates chunk by chunk (``CalibStridedMinMax``) and keeps the
    intermediate outputs of one chunk only: its histogram calibrators otherwise store every output of every image."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches = list(batches)
        self.index = [(b, i) for b, x in enumerate(self.batches) for i in range(len(x))]
        self.set_range(0, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.index))

    def get_next(self) -> dict | None:
        if self.position >= self.end:
            return None
        b, i = self.index[self.position]
        self.position += 1
        return {"images": self.batches[b][i : i + 1].numpy().astype(np.float32)}


def chunk_size(total: int, largest: int = 8) -> int:
    """The largest chunk up to ``largest`` images that divides ``total`` (ONNX Runtime requires equal chunks)."""
    return next(d for d in range(min(largest, total), 0, -1) if total % d == 0)


def decode_nodes(model: onnx.ModelProto) -> list[str]:
    """Detect's post-processing nodes (everything in the head except its box/class conv branches)."""
    head = max((n.name.split("/")[2] for n in model.graph.node if n.name.startswith("/model/model.")),
               key=lambda s: int(s.split(".")[-1]) if s.split(".")[-1].isdigit() else -1, default=None)
    if head is None:
        return []
    prefix = f"/model/{head}/"
    return [n.name for n in model.graph.node
            if n.name.startswith(prefix) and not n.name.startswith((prefix + "cv2", prefix + "cv3"))]


def export_ort_int8(model: nn.Module, path: str | Path, batches: Iterable[torch.Tensor], imgsz: int = 640,
                    calibrator: str = "auto") -> Path:
    """Float ``model`` -> uint8-activation / int8 per-channel-weight QDQ ONNX for ONNX Runtime CPU."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if is_quantized(model):
        raise UserError("export_ort_int8 needs the float model (it calibrates its own asymmetric ranges)")
    if calibrator not in ORT_CALIBRATORS:
        raise UserError(f"calibrator {calibrator!r}: choose one of {', '.join(ORT_CALIBRATORS)}")
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_onnx(model, Path(tmp) / "float.onnx", imgsz=imgsz)
        exclude = decode_nodes(onnx.load(str(float_path)))
        reader = _Reader(batches)
        quantize_static(str(float_path), str(path), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, ORT_CALIBRATORS[calibrator]),
                        nodes_to_exclude=exclude, extra_options={"CalibMovingAverage": False,
                                                                "CalibStridedMinMax": chunk_size(len(reader))})
    return stamp(path, model, imgsz)  # ONNX Runtime's quantizer does not keep the float file's metadata
