"""ONNX export for float and fake-quantized detectors.

Float models export as plain ONNX (BN fused). Quantized models export through ``torch.fake_quantize_*`` ops, which the
TorchScript exporter writes as QuantizeLinear / DequantizeLinear pairs; the graph is then post-processed with ``onnx``:
weight Q nodes are folded into integer initializers (DQ(int8 W) -> Conv, zero-point 0, per-channel scales on axis 0),
and 4-bit weights / activations become INT4 / UINT4 Q/DQ at opset 21 when ONNX Runtime accepts that graph; otherwise
they stay in 8-bit containers clamped to the 4-bit grid (numerically identical, "simulated") and the export says so.

Output contract: input ``images`` (N, 3, H, W float 0-1), one output (N, 4 + nc, A) of decoded xywh boxes and class
scores, exactly like Ultralytics' ONNX export.
"""

from __future__ import annotations

import warnings
from copy import deepcopy
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from yolocomp.errors import UserError
from yolocomp.export.onnx_metadata import model_metadata, set_metadata
from yolocomp.quant.modules import QConv, freeze_for_export, quant_convs, quantizers

DEFAULT_OPSET = 17


def is_quantized(model: nn.Module) -> bool:
    return bool(quant_convs(model))


def export_onnx(model: nn.Module, path: str | Path, imgsz: int = 640, opset: int | None = None, batch: int = 1,
                dynamic: bool = False, int4: str = "auto", info: dict | None = None, simplify: bool = True) -> Path:
    """Export ``model`` (float or quantized DetectionModel) to ``path``; returns the path.

    ``int4``: ``"auto"`` (native INT4/UINT4 Q/DQ at opset 21 if ONNX Runtime loads it, else 8-bit containers),
    ``"native"`` (require it), ``"simulated"`` (always 8-bit containers). ``info`` (a dict) receives what was done.
    """
    if int4 not in {"auto", "native", "simulated"}:
        raise UserError(f"int4={int4!r}: choose auto, native or simulated")
    if imgsz % 32:
        raise UserError(f"imgsz {imgsz} must be a multiple of 32 (the detector's largest stride)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {} if info is None else info
    if is_quantized(model):
        missing = [q for q in quantizers(model) if q.enabled and q.channels is None and q.initialized.item() < 0.5]
        if missing:
            raise UserError(f"{len(missing)} activation quantizers were never calibrated; run calibration "
                            "(yolocomp ptq) or QAT before exporting")
    m = _export_copy(model, dynamic)
    quantized = is_quantized(m)
    weight_scales = {f"{n}.export_weight": c.weight_quant.export_scale.numpy()
                     for n, c in m.named_modules() if isinstance(c, QConv)}
    low_bits = quantized and any(q.bits < 8 for q in quantizers(m))
    x = torch.zeros(batch, 3, imgsz, imgsz)
    dyn = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}} if dynamic else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, x, str(path), opset_version=opset or DEFAULT_OPSET, input_names=["images"],
                          output_names=["output0"], dynamic_axes=dyn, do_constant_folding=False, dynamo=False)
    onnx_model = onnx.load(str(path))
    info.update(quantized=quantized, opset=opset or DEFAULT_OPSET, int4="none")
    if quantized:
        insert_weight_dequant(onnx_model, weight_scales)
        if low_bits:
            info["int4"] = "simulated"
            if int4 != "simulated":
                native = to_native_int4(deepcopy(onnx_model))
                error = _ort_load_error(native)
                if error is None:
                    onnx_model, info["int4"], info["opset"] = native, "native", 21
                elif int4 == "native":
                    raise UserError(f"ONNX Runtime rejects INT4 Q/DQ: {error}; export with int4='simulated'")
                else:
                    info["int4_note"] = f"ONNX Runtime rejected INT4 Q/DQ ({error}); 4-bit values kept in 8-bit containers"
    if simplify and info.get("int4") != "native":
        onnx_model = _slim(onnx_model, info)
    set_metadata(onnx_model, model_metadata(model, imgsz, batch, dynamic))
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
    return path


def _slim(model: onnx.ModelProto, info: dict) -> onnx.ModelProto:
    """onnxslim folds the exporter's shape arithmetic (Shape/Gather/Slice chains) into constants and merges duplicate
    Q nodes; ONNX Runtime's integer fusions need that static graph."""
    try:
        import onnxslim

        slim = onnxslim.slim(model)
        info["simplified"] = True
        return slim
    except Exception as e:  # onnxslim is an optimisation: keep the unsimplified graph if it fails
        info["simplified"] = f"onnxslim failed: {type(e).__name__}"
        return model


class _Head(nn.Module):
    """Returns the single decoded output tensor (eval-mode ``model(x)[0]``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return y[0] if isinstance(y, (list, tuple)) else y


def _export_copy(model: nn.Module, dynamic: bool) -> nn.Module:
    m = deepcopy(model).float().cpu().eval()
    if hasattr(m, "criterion"):
        m.criterion = None
    if not is_quantized(m) and hasattr(m, "fuse"):
        m = m.fuse(verbose=False)
    freeze_for_export(m)
    head = m.model[-1] if hasattr(m, "model") else None
    if head is not None and hasattr(head, "dynamic"):
        head.dynamic = dynamic
        head.format = "onnx"
    for p in m.parameters():
        p.requires_grad_(False)
    return _Head(m)


# --- graph post-processing ------------------------------------------------------------------------------------------
def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in model.graph.initializer}


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    init = _initializers(model).get(name)
    if init is not None:
        return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.output and node.output[0] == name:
            if node.op_type == "Constant":
                return numpy_helper.to_array(node.attribute[0].t)
            if node.op_type == "Cast":  # the exporter casts constant clip bounds / zero-points
                value = _const(model, node.input[0])
                return None if value is None else value.astype(onnx.helper.tensor_dtype_to_np_dtype(
                    next(a.i for a in node.attribute if a.name == "to")))
    return None


def insert_weight_dequant(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> int:
    """Store each quantized conv's weight as int8 + per-channel scale (axis 0, zero-point 0) behind a
    DequantizeLinear. ``weights`` maps initializer name -> per-output-channel step sizes. Returns how many."""
    graph = model.graph
    inits = _initializers(model)
    done = 0
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights or node.input[1] not in inits:
            continue
        name = node.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = weights[name].astype(np.float32).reshape(-1)
        q = np.rint(w / scale.reshape(-1, *([1] * (w.ndim - 1))))
        if np.abs(q * scale.reshape(-1, *([1] * (w.ndim - 1))) - w).max() > 1e-4 * max(1.0, np.abs(w).max()):
            raise RuntimeError(f"weight {name} is not on its quantization grid; export the frozen copy")
        q = np.clip(q, -128, 127).astype(np.int8)
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{name}_quantized"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point"),
        ])
        dq = helper.make_node("DequantizeLinear", [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                              [f"{name}_dequantized"], name=f"{name}_DequantizeLinear", axis=0)
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[1] = f"{name}_dequantized"
        done += 1
    _drop_unused_initializers(model)
    return done


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def to_native_int4(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn 4-bit-grid Q/DQ in 8-bit containers into INT4 / UINT4 Q/DQ (opset 21): integer weights whose values fit
    [-8, 7] become INT4 initializers; a Clip to [qn*s, qp*s] right before a Q with the range 0..15 or -8..7 is removed
    and the Q/DQ zero-points become (U)INT4. A shifted activation grid (e.g. -1..14) keeps its Clip and 8-bit
    container: as UINT4 it would need a zero point, which TensorRT's layout forbids."""
    graph = model.graph
    inits = _initializers(model)
    producers = {o: n for n in graph.node for o in n.output}
    # weights
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        if w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7:
            _replace_init(model, node.input[0], w, TensorProto.INT4)
            if len(node.input) > 2:
                _retype_zero_point(model, node, TensorProto.INT4)
    # activations: Clip -> Q -> DQ where the clip bounds are the 4-bit range
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear":
            continue
        clip = producers.get(node.input[0])
        if clip is None or clip.op_type != "Clip":
            continue
        scale = float(_const(model, node.input[1]).reshape(-1)[0])
        lo, hi = (float(_const(model, clip.input[i]).reshape(-1)[0]) if len(clip.input) > i and clip.input[i] else None
                  for i in (1, 2))
        if lo is None or hi is None:
            continue
        q_lo, q_hi = round(lo / scale), round(hi / scale)
        if (q_lo, q_hi) == (0, 15):
            dtype = TensorProto.UINT4
        elif (q_lo, q_hi) == (-8, 7):
            dtype = TensorProto.INT4
        else:
            continue
        node.input[0] = clip.input[0]
        _retype_zero_point(model, node, dtype)
        for dq in graph.node:
            if dq.op_type == "DequantizeLinear" and dq.input[0] == node.output[0]:
                _retype_zero_point(model, dq, dtype)
    _remove_dead_nodes(model)
    _drop_unused_initializers(model)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 21
    model.ir_version = max(model.ir_version, 10)
    return model


def _replace_init(model: onnx.ModelProto, name: str, values: np.ndarray, dtype: int) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            new = helper.make_tensor(name, dtype, values.shape, values.flatten().tolist())
            model.graph.initializer[i].CopyFrom(new)
            return


def _retype_zero_point(model: onnx.ModelProto, node: onnx.NodeProto, dtype: int) -> None:
    zp = _const(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    shape = zp.shape if zp is not None else ()
    name = f"{node.name or node.output[0]}_zp4"
    model.graph.initializer.append(helper.make_tensor(name, dtype, shape, [0] * int(np.prod(shape))))
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _ort_load_error(model: onnx.ModelProto) -> str | None:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        shape[2:] = [s if s > 1 else 64 for s in shape[2:]]
        sess.run(None, {inp.name: np.zeros(shape, np.float32)})
        return None
    except Exception as e:  # ORT raises its own exception types
        return str(e).splitlines()[0][:200]
