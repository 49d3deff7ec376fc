"""Q/DQ ONNX export: output contract, PyTorch <-> ONNX Runtime parity, Q/DQ before every conv, the placement lint,
INT4 export, and the PTQ API end to end on the synthetic set."""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_quant import lively_detector

from yolocomp.export.lint import format_findings, lint_qdq
from yolocomp.export.onnx_qdq import export_onnx
from yolocomp.export.ort_check import integer_ops
from yolocomp.quant.calibrate import calibrate
from yolocomp.quant.convert import quantize_model
from yolocomp.quant.modules import set_quant_state

IMGSZ = 64


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"] and len(sess.get_outputs()) == 1
    return sess.run(None, {"images": x.numpy()})[0]


@pytest.fixture(scope="module")
def float_model():
    return lively_detector()


@pytest.fixture(scope="module")
def calib_images():
    torch.manual_seed(1)
    return [torch.rand(2, 3, IMGSZ, IMGSZ) for _ in range(2)]


@pytest.fixture(scope="module")
def int8(float_model, calib_images, tmp_path_factory):
    model = deepcopy(float_model)
    quantize_model(model)
    calibrate(model, calib_images, "percentile", progress=False)
    path = export_onnx(model, tmp_path_factory.mktemp("int8") / "model_int8.onnx", imgsz=IMGSZ)
    return model.eval(), path


def test_float_export_matches_the_model(float_model, tmp_path):
    path = export_onnx(float_model, tmp_path / "fp32.onnx", imgsz=IMGSZ)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    y = _run(path, x)
    ref = float_model(x)[0].detach().numpy()
    assert y.shape == ref.shape == (1, 4 + 3, 84)
    assert np.abs(y - ref).max() < 1e-2 * max(1.0, np.abs(ref).max())
    assert lint_qdq(path)[0].rule == "not-quantized"


@pytest.fixture(scope="module")
def int8_symmetric(float_model, calib_images, tmp_path_factory):
    model = deepcopy(float_model)
    quantize_model(model, act_offset=False)
    calibrate(model, calib_images, "percentile", progress=False)
    path = export_onnx(model, tmp_path_factory.mktemp("sym") / "model_int8.onnx", imgsz=IMGSZ)
    return model.eval(), path


def test_qdq_onnx_matches_the_fake_quant_model_in_onnxruntime(int8_symmetric, float_model):
    # the symmetric grids: values near zero round the same in both runtimes (see the shifted grids' test below)
    model, path = int8_symmetric
    torch.manual_seed(3)
    x = torch.rand(4, 3, IMGSZ, IMGSZ)
    y = np.concatenate([_run(path, x[i : i + 1]) for i in range(len(x))])
    with torch.no_grad():
        fake = model(x)[0].numpy()
        flt = float_model(x)[0].numpy()
    assert y.shape == fake.shape
    parity = np.abs(y - fake)
    quant_noise = np.abs(fake - flt)
    # ONNX Runtime's float conv sums in another order, so a few values land on the other side of a rounding
    # boundary (on this 64-px detector one flip in a 2x2 stride-32 map moves a whole level's boxes); that must stay
    # well below the quantization error itself
    assert np.median(parity[:, :4]) < 0.5 * np.median(quant_noise[:, :4])
    assert np.quantile(parity[:, 4:], 0.99) < 0.02 and parity[:, 4:].max() < 0.5


def test_shifted_grids_export_the_same_arithmetic_as_the_fake_quant_model(int8, tmp_path):
    """With every activation Q/DQ bypassed, ONNX Runtime must compute exactly what the fake-quant model computes with
    its activation rounding off: the Pads, Subs and shifted biases then cancel to the plain zero-padded convs. (With
    rounding on, values ~125 steps from zero round apart now and then: ONNX Runtime divides by the scale, torch
    multiplies by its reciprocal.)"""
    from yolocomp.export.onnx_qdq import _export_copy
    from yolocomp.quant.quantizer import Quantizer

    model, path = int8
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name for i in m.graph.initializer}
    bypass = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits and producer[n.input[0]].op_type == "QuantizeLinear":
            bypass[n.output[0]] = producer[n.input[0]].input[0]
    assert len(bypass) > 20
    for n in m.graph.node:
        for i, t in enumerate(n.input):
            if t in bypass:
                n.input[i] = bypass[t]
    stripped = tmp_path / "no_act_qdq.onnx"
    onnx.save(m, str(stripped))
    torch.manual_seed(4)
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    y = np.concatenate([_run(stripped, x[i : i + 1]) for i in range(len(x))])
    exported = _export_copy(model, dynamic=False)
    plain = deepcopy(model)
    for copy in (exported, plain):
        for q in copy.modules():
            if isinstance(q, Quantizer) and q.channels is None:
                q._fake_quant_container = lambda v, step=None: v  # activation rounding off, the shift kept
    with torch.no_grad():
        ref = exported(x).numpy()
        for q in plain.modules():
            if isinstance(q, Quantizer) and q.channels is None:
                q.enabled = False  # conv(x) with the quantized weights: zero padding, no shift at all
        unshifted = plain(x)[0].numpy()
    scale = np.abs(ref).max()
    assert np.abs(y - ref).max() < 1e-3 * scale  # float sums only (the DFL softmax magnifies them)
    assert np.abs(unshifted - ref).max() < 1e-3 * scale  # the shift and its bias cancel, borders included


def test_shifted_activation_grids_export_as_pad_sub_qdq_conv_and_symmetric_ones_do_not(int8, int8_symmetric):
    def ops_before_q(path):
        m = onnx.load(str(path))
        producer = {o: n for n in m.graph.node for o in n.output}
        return [producer[n.input[0]].op_type if n.input[0] in producer else "input" for n in m.graph.node
                if n.op_type == "QuantizeLinear"]

    before = ops_before_q(int8[1])
    assert before and set(before) == {"Sub"}  # every activation grid is shifted (SiLU outputs, the image)
    path = int8_symmetric[1]
    assert "Sub" not in ops_before_q(path)
    nodes = onnx.load(str(path)).graph.node
    assert not any(n.op_type == "Pad" for n in nodes)
    assert lint_qdq(path) == []


def test_every_conv_has_qdq_on_input_and_weight_including_the_head(int8):
    _, path = int8
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type == "Conv" and "dfl" not in n.name]
    assert len(convs) == 63
    for conv in convs:
        dq_x, dq_w = producer[conv.input[0]], producer[conv.input[1]]
        assert dq_x.op_type == "DequantizeLinear" and producer[dq_x.input[0]].op_type == "QuantizeLinear", conv.name
        assert dq_w.op_type == "DequantizeLinear" and dq_w.input[0] in inits, conv.name
        w = onnx.numpy_helper.to_array(inits[dq_w.input[0]])
        scale = onnx.numpy_helper.to_array(inits[dq_w.input[1]])
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)  # per-output-channel
        assert next(a.i for a in dq_w.attribute if a.name == "axis") == 0
        assert not onnx.numpy_helper.to_array(inits[dq_w.input[2]]).any()  # zero-point 0
    head_last = [c.name for c in convs if c.name.count("model.22/cv") and c.name.split("/")[-2].endswith(".2")]
    assert len(head_last) == 6  # the final box and class convs of the three levels


def test_lint_passes_on_export_and_flags_a_planted_misplacement(int8, tmp_path):
    _, path = int8
    assert lint_qdq(path) == [], format_findings(lint_qdq(path))
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    target = next(n for n in m.graph.node if n.op_type == "Conv" and "cv3.2/cv3.2.2" in n.name)
    q = producer[producer[target.input[0]].input[0]]
    target.input[0] = q.input[0]  # feed the float tensor: no Q/DQ before the last class conv
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    findings = lint_qdq(bad)
    assert [(f.node, f.rule) for f in findings if f.severity == "error"] == [(target.name, "conv-input-not-quantized")]
    assert "conv-input-not-quantized" in format_findings(findings, bad)
    # a residual Add fed by float tensors only: TensorRT cannot fuse it into the conv
    m = onnx.load(str(path))
    producer = {o: n for n in m.graph.node for o in n.output}
    add = next(n for n in m.graph.node if n.op_type == "Add" and any(
        producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input))
    i = next(k for k, t in enumerate(add.input) if producer[t].op_type == "DequantizeLinear")
    quantized = producer[producer[add.input[i]].input[0]].input[0]
    if producer[quantized].op_type == "Sub":  # a shifted grid's Q reads x - c: take x itself
        quantized = producer[quantized].input[0]
    add.input[i] = quantized
    onnx.save(m, str(bad))
    assert [(f.node, f.rule) for f in lint_qdq(bad)] == [(add.name, "add-not-fused")]


def test_lint_reports_unshared_scales(float_model, calib_images, tmp_path):
    model = deepcopy(float_model)
    quantize_model(model, share=False)
    calibrate(model, calib_images, "minmax", progress=False)
    findings = lint_qdq(export_onnx(model, tmp_path / "unshared.onnx", imgsz=IMGSZ))
    rules = {f.rule for f in findings}
    assert "tensor-multi-scale" in rules
    assert all(f.severity == "warning" for f in findings)


def test_int4_export_holds_4bit_weights_and_runs(float_model, calib_images, tmp_path):
    model = deepcopy(float_model)
    quantize_model(model, w_bits=4, a_bits=8)
    calibrate(model, calib_images, "mse", progress=False)
    info: dict = {}
    path = export_onnx(model, tmp_path / "model_w4a8.onnx", imgsz=IMGSZ, info=info)
    assert info["int4"] in {"native", "simulated"}
    m = onnx.load(str(path))
    weights = [i for i in m.graph.initializer if i.name.endswith("export_weight_quantized")]
    assert len(weights) == 63
    if info["int4"] == "native":
        assert all(w.data_type == onnx.TensorProto.INT4 for w in weights) and info["opset"] == 21
    else:
        assert all(-8 <= onnx.numpy_helper.to_array(w).min() and onnx.numpy_helper.to_array(w).max() <= 7
                   for w in weights)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        fake = model.eval()(x)[0].numpy()
    assert np.abs(_run(path, x)[:, 4:] - fake[:, 4:]).max() < 0.05


def test_uncalibrated_model_is_refused(float_model, tmp_path):
    from yolocomp.errors import UserError

    model = deepcopy(float_model)
    quantize_model(model)
    with pytest.raises(UserError, match="never calibrated"):
        export_onnx(model, tmp_path / "x.onnx", imgsz=IMGSZ)
    assert not (tmp_path / "x.onnx").exists()


def test_quantizers_off_give_the_float_detector_back(int8, float_model):
    model, _ = int8
    plain = deepcopy(model)
    set_quant_state(plain, enabled=False)
    torch.manual_seed(0)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        ref, off, on = float_model(x)[0], plain(x)[0], model(x)[0]
    assert torch.allclose(off, ref, atol=1e-3, rtol=1e-4)  # BN folding + residual/concat sharing change nothing
    assert not torch.allclose(on, ref, atol=1e-3)


@pytest.mark.slow
def test_ptq_api_writes_onnx_and_report(synthetic_data, tmp_path):
    from yolocomp.commands.ptq import ptq
    from yolocomp.errors import UserError

    model = lively_detector()
    report = ptq(model, synthetic_data, tmp_path, calibrator="mse", calib_images=8, imgsz=IMGSZ, sensitivity=True,
                 sensitivity_images=2, ort=True)
    assert (tmp_path / "model_int8.onnx").exists()
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["calibrator"] == "mse" and saved["calibration_images"] == 8
    assert saved["ap_onnx"]["backend"] == "onnxruntime" and saved["lint"] == []
    rows = [r for r in report["sensitivity"] if r["layer"] != "<all>"]
    assert len(rows) == 63 and rows[0]["output_error"] >= rows[-1]["output_error"] > 0
    assert report["mixed_precision_plan"]["exclude"]
    assert integer_ops(tmp_path / "model_int8.onnx")["dequantize_nodes"] > 0
    # the ONNX Runtime flavour runs its convs as integer kernels
    ort_ops = report["ort_flavour"]["ort_integer_ops"]
    assert ort_ops["integer_ops"].get("QLinearConv", 0) >= 60 and ort_ops["float_convs"] <= 1
    with pytest.raises(UserError, match="calibrator"):
        ptq(model, synthetic_data, tmp_path / "x", calibrator="kl")
