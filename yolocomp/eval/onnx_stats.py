"""Parameters, MACs and a per-layer table read from an ONNX graph (FP32 or Q/DQ), with shape inference at an imgsz."""

from __future__ import annotations

import math
from pathlib import Path

from yolocomp.errors import UserError

WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
#: ops a weight passes through between its initializer and the layer using it (Q/DQ graphs, casts, reshapes)
PASS_THROUGH = {"DequantizeLinear", "QuantizeLinear", "Cast", "Identity", "Reshape", "Transpose", "Unsqueeze", "Squeeze"}


def _load(path: str | Path, imgsz: int):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise UserError(f"cannot read ONNX model {path}: {e} (file corrupt?)") from e
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) == 4:  # pin batch 1 and the image size so every conv output gets a concrete shape
        for d, v in zip(dims, (1, None, imgsz, imgsz)):
            if v is not None and not d.HasField("dim_value"):
                d.ClearField("dim_param")
                d.dim_value = v
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def _shapes(model) -> dict[str, list[int | None]]:
    from onnx import numpy_helper

    shapes: dict[str, list[int | None]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(numpy_helper.to_array(init).shape) if init.dims else []
    return shapes


def onnx_stats(path: str | Path, imgsz: int = 640) -> dict:
    """``params`` (elements of the weights and biases of every Conv/Gemm/MatMul, counted per layer), ``gflops``
    (2 x multiply-accumulates of those layers at batch 1, the convention Ultralytics/thop use) and ``layers``."""
    model = _load(path, imgsz)
    shapes = _shapes(model)
    initializers = {i.name: math.prod(i.dims) for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def source_initializer(name: str) -> str | None:
        """Follow a weight back through Q/DQ, casts and reshapes to the initializer it comes from."""
        seen = 0
        while name not in initializers and name in producer and seen < 8:
            node = producer[name]
            if node.op_type not in PASS_THROUGH:
                return None
            name, seen = node.input[0], seen + 1
        return name if name in initializers else None

    layers, total_params, total_macs = [], 0, 0
    for index, node in enumerate(model.graph.node):
        if node.op_type not in WEIGHTED_OPS:
            continue
        weights = [source_initializer(n) for n in node.input[1:3] if n]
        weights = [w for w in weights if w is not None]  # none for activation x activation MatMul (attention)
        params = sum(initializers[w] for w in weights)  # per use: exporters dedupe equal tensors (e.g. zero biases)
        total_params += params
        out = shapes.get(node.output[0]) or []
        w_shape = shapes.get(node.input[1]) or []
        macs = _macs(node.op_type, out, w_shape, shapes.get(node.input[0]) or [], node)
        total_macs += macs
        layers.append(
            {"index": index, "type": node.op_type, "name": node.name, "from": node.input[0],
             "out_channels": out[1] if len(out) > 1 else (out[-1] if out else None), "params": params,
             "gflops": round(2 * macs / 1e9, 6)}
        )
    return {
        "params": int(total_params),
        "gflops": round(2 * total_macs / 1e9, 4),
        "layers": layers,
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "qdq": any(n.op_type == "DequantizeLinear" for n in model.graph.node),
    }


def _macs(op: str, out: list, w: list, x: list, node) -> int:
    if not out or any(d is None for d in out) or not w or any(d is None for d in w):
        return 0
    if op == "Conv":  # each output element: Cin/groups * kh * kw MACs
        return math.prod(out) * math.prod(w[1:])
    if op == "ConvTranspose":  # each input element scatters into Cout/groups * kh * kw outputs
        return math.prod(x) * math.prod(w[1:]) if x and None not in x else 0
    if op in ("Gemm", "MatMul"):
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        k = w[-1] if (op == "Gemm" and trans_b) else w[-2] if len(w) >= 2 else w[0]
        return math.prod(out) * k
    return 0
