"""What ONNX Runtime actually runs: the op types of its optimized CPU graph (QLinearConv & co. = integer kernels)."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx

INTEGER_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QLinearAdd", "QLinearMul",
               "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool",
               "DynamicQuantizeLinear", "NhwcQLinearConv", "QLinearSoftmax"}


def optimized_op_counts(path: str | Path, threads: int = 1) -> Counter:
    """Op-type histogram of the graph ONNX Runtime builds for CPU at its default (all) optimization level."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(opt)
        so.intra_op_num_threads = threads
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(str(opt)).graph.node)


def integer_ops(path: str | Path) -> dict:
    """Summary for reports: integer op counts, float convs left, and Q/DQ nodes left in the optimized graph."""
    ops = optimized_op_counts(path)
    return {
        "integer_ops": {k: v for k, v in sorted(ops.items()) if k in INTEGER_OPS},
        "float_convs": ops.get("Conv", 0) + ops.get("FusedConv", 0) + ops.get("NchwcConv", 0),
        "quantize_nodes": ops.get("QuantizeLinear", 0),
        "dequantize_nodes": ops.get("DequantizeLinear", 0),
        "all_ops": dict(sorted(ops.items())),
    }
