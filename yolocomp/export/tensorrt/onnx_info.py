"""What a TensorRT build needs to know about an ONNX file, read with the ``onnx`` package only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from yolocomp.errors import UserError

QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class OnnxInfo:
    """The image input, whether the graph is quantized or FP16, and Ultralytics' metadata."""

    path: Path
    qdq: bool  #: has QuantizeLinear/DequantizeLinear nodes (explicit quantization)
    fp16: bool  #: the graph input is float16 (already converted, e.g. by ModelOpt AutoCast)
    input_name: str
    input_shape: list[int | None]  #: None for a dynamic axis
    metadata: dict[str, str] = field(default_factory=dict)  #: Ultralytics metadata_props (names, stride, imgsz, ...)


def inspect_onnx(path: str | Path) -> OnnxInfo:
    """Read ``path`` (without external weights) into an :class:`OnnxInfo`; UserError unless it is one-image-input ONNX."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path} (export one first: yolocomp export --format onnx)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise UserError(f"cannot read ONNX model {path}: {type(e).__name__} (file corrupt or not ONNX)") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise UserError(f"{path} has {len(inputs)} inputs; a YOLO detector ONNX has one image input")
    tensor_type = inputs[0].type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    if len(shape) != 4 or shape[1] not in (3, None):
        raise UserError(f"{path} input {inputs[0].name} has shape {shape}; expected (N, 3, H, W) images")
    return OnnxInfo(
        path=path,
        qdq=any(n.op_type in QDQ_OPS for n in model.graph.node),
        fp16=tensor_type.elem_type == onnx.TensorProto.FLOAT16,
        input_name=inputs[0].name,
        input_shape=shape,
        metadata={p.key: p.value for p in model.metadata_props},
    )
