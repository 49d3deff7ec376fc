"""Lint a Q/DQ ONNX graph against TensorRT's explicit-quantization placement rules.

Rules (``rule`` field of each finding):

* ``conv-input-not-quantized`` (error): a Conv's data input does not come from DequantizeLinear(QuantizeLinear(x)),
  so TensorRT runs that conv in float.
* ``conv-weight-not-quantized`` (error): the weight is not DequantizeLinear(integer initializer).
* ``weight-not-per-channel`` (error): the weight's DQ is not per-output-channel on axis 0.
* ``nonzero-zero-point`` (error): TensorRT supports symmetric quantization only.
* ``unsigned-int8`` (error): a UINT8 Q/DQ; TensorRT's INT8 is signed only.
* ``qdq-scale-mismatch`` (error): a DequantizeLinear uses another scale than the QuantizeLinear feeding it.
* ``tensor-multi-scale`` (warning): one tensor is quantized with different scales (directly or, because TensorRT moves
  Q across Concat / MaxPool / Resize, through those ops): it needs a re-quantization instead of one fused int8 output.
* ``add-not-fused`` (warning): a residual Add with no quantized input: TensorRT cannot fuse it into the conv.

Convs whose name contains an entry of ``float_ok`` (default: the DFL decode, which has no trained weights) are exempt.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from yolocomp.errors import UserError

_TRANSPARENT = {"Concat", "MaxPool", "Resize", "Upsample"}  # TensorRT propagates Q across these
_FEATURE_OPS = {"Conv", "Mul", "Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid", "Add", "DequantizeLinear", "Split",
                "Slice", "Concat", "MaxPool", "Resize"}
_SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Constant", "ConstantOfShape", "Cast", "Range"}


@dataclass
class Finding:
    node: str
    rule: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule}: {self.node}: {self.message}"


def format_findings(findings: list[Finding], path: str | Path | None = None) -> str:
    """Plain-text report for ``yolocomp export --check``."""
    head = f"{path}: " if path else ""
    if not findings:
        return f"{head}Q/DQ placement OK (every conv quantized, scales consistent)"
    errors = sum(f.severity == "error" for f in findings)
    lines = [f"{head}{errors} error(s), {len(findings) - errors} warning(s)"] + [f"  {f}" for f in findings]
    return "\n".join(lines)


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.inits = {i.name: i for i in model.graph.initializer}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Cast":  # exporter casts constant zero-points
            return self.const(node.input[0])
        return None

    def zero_point_type(self, node: onnx.NodeProto) -> int | None:
        """The ONNX data type of a Q/DQ node's zero point (None: absent, or not a constant)."""
        if len(node.input) < 3 or not node.input[2]:
            return None
        name = node.input[2]
        if name in self.inits:
            return self.inits[name].data_type
        producer = self.producer.get(name)
        if producer is not None and producer.op_type == "Constant":
            return producer.attribute[0].t.data_type
        if producer is not None and producer.op_type == "Cast":
            return next((a.i for a in producer.attribute if a.name == "to"), None)
        return None

    def qparams(self, node: onnx.NodeProto) -> tuple[np.ndarray | None, np.ndarray | None]:
        scale = self.const(node.input[1])
        zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        return scale, zp


def lint_qdq(path: str | Path | onnx.ModelProto, float_ok: tuple[str, ...] = ("dfl",)) -> list[Finding]:
    """Check a Q/DQ ONNX model; returns findings (empty list = TensorRT can fuse every quantized conv)."""
    if isinstance(path, onnx.ModelProto):
        model = path
    else:
        if not Path(path).exists():
            raise UserError(f"ONNX file not found: {path}")
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise UserError(f"cannot read ONNX {path}: {e}") from e
    g = _Graph(model)
    findings: list[Finding] = []
    if not any(n.op_type == "QuantizeLinear" for n in g.nodes):
        return [Finding("<graph>", "not-quantized", "no QuantizeLinear nodes: this is a float model")]
    for n in g.nodes:
        if n.op_type in {"QuantizeLinear", "DequantizeLinear"}:
            _, zp = g.qparams(n)
            if zp is not None and np.any(zp != 0):
                findings.append(Finding(n.name, "nonzero-zero-point", "zero-point must be 0 (symmetric)"))
            if g.zero_point_type(n) == onnx.TensorProto.UINT8:
                findings.append(Finding(n.name, "unsigned-int8", "UINT8 quantization; TensorRT's INT8 is signed"))
        if n.op_type == "DequantizeLinear" and n.input[0] in g.producer:
            q = g.producer[n.input[0]]
            if q.op_type == "QuantizeLinear":
                (s1, _), (s2, _) = g.qparams(q), g.qparams(n)
                if s1 is not None and s2 is not None and not np.allclose(s1, s2):
                    findings.append(Finding(n.name, "qdq-scale-mismatch", f"DQ scale differs from its Q ({q.name})"))
        if n.op_type == "Conv" and not any(k in n.name.lower() for k in float_ok):
            findings += _check_conv(g, n)
        if n.op_type == "Add":
            findings += _check_add(g, n)
    findings += _check_scale_groups(g)
    return findings


def _check_conv(g: _Graph, n: onnx.NodeProto) -> list[Finding]:
    out: list[Finding] = []
    x = g.producer.get(n.input[0])
    if x is None or x.op_type != "DequantizeLinear" or g.producer.get(x.input[0]) is None \
            or g.producer[x.input[0]].op_type != "QuantizeLinear":
        out.append(Finding(n.name, "conv-input-not-quantized",
                           f"input comes from {x.op_type if x else 'a graph input'}, not Q->DQ: runs in float"))
    w = g.producer.get(n.input[1])
    if w is None or w.op_type != "DequantizeLinear" or w.input[0] not in g.inits:
        out.append(Finding(n.name, "conv-weight-not-quantized", "weight is not DequantizeLinear(integer initializer)"))
        return out
    weight = g.inits[w.input[0]]
    scale, _ = g.qparams(w)
    axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
    channels = weight.dims[0]
    if scale is None or (channels > 1 and (scale.size != channels or axis != 0)):
        out.append(Finding(n.name, "weight-not-per-channel",
                           f"weight scale has {None if scale is None else scale.size} values on axis {axis}; "
                           f"want {channels} on axis 0"))
    return out


def _check_add(g: _Graph, n: onnx.NodeProto) -> list[Finding]:
    producers = [g.producer.get(i) for i in n.input]
    if any(i in g.inits or p is None or p.op_type not in _FEATURE_OPS for i, p in zip(n.input, producers)):
        return []  # shape arithmetic, box decode or adds with constants: not a residual
    if any(p.op_type == "DequantizeLinear" for p in producers):
        return []
    return [Finding(n.name, "add-not-fused", "residual Add without a quantized input: TensorRT cannot fuse it into "
                    "the conv before it", "warning")]


def _is_shift(g: _Graph, node: onnx.NodeProto) -> bool:
    """Zero padding, or the subtraction of a constant: what a shifted activation grid puts before its Q."""
    if node.op_type == "Pad":
        value = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return value is None or not np.any(value)
    return node.op_type == "Sub" and g.const(node.input[1]) is not None


def _check_scale_groups(g: _Graph) -> list[Finding]:
    """Scales each float tensor receives, following Q back across TensorRT-transparent ops."""
    scales: dict[str, set[float]] = defaultdict(set)
    origin: dict[str, list[str]] = defaultdict(list)

    def assign(tensor: str, scale: float, q_name: str, depth: int = 0) -> None:
        scales[tensor].add(round(scale, 10))
        origin[tensor].append(q_name)
        node = g.producer.get(tensor)
        if node is not None and _is_shift(g, node) and depth < 20:
            assign(node.input[0], scale, q_name, depth + 1)  # a shifted grid: Q reads (padded) x - c
            return
        if node is not None and node.op_type in _TRANSPARENT and depth < 20:
            data_inputs = node.input if node.op_type == "Concat" else node.input[:1]
            for t in data_inputs:
                if t and t not in g.inits and g.producer.get(t, None) is not None \
                        and g.producer[t].op_type not in _SHAPE_OPS:
                    assign(t, scale, q_name, depth + 1)

    for n in g.nodes:
        if n.op_type == "QuantizeLinear" and n.input[0] not in g.inits:
            scale, _ = g.qparams(n)
            if scale is not None and scale.size == 1:
                assign(n.input[0], float(scale.reshape(-1)[0]), n.name)
    findings = []
    for tensor, values in scales.items():
        if len(values) > 1:
            producer = g.producer.get(tensor)
            findings.append(Finding(producer.name if producer else tensor, "tensor-multi-scale",
                                    f"output quantized with {len(values)} different scales by "
                                    f"{', '.join(sorted(set(origin[tensor]))[:4])}: needs re-quantization", "warning"))
    return findings
