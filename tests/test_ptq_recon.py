"""Block-reconstruction PTQ (AdaRound + LSQ through the shared engine), bias correction, mixed precision, streaming
calibration and the ``ptq`` contract's bad inputs."""

from __future__ import annotations

import json
from copy import deepcopy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_quant import lively_detector

from yolocomp.config import QAT_TRAIN_DEFAULTS
from yolocomp.errors import UserError
from yolocomp.quant.adaround import AdaRound
from yolocomp.quant.bias_correction import correct_bias
from yolocomp.quant.calibrate import calibrate
from yolocomp.quant.convert import quantize_model
from yolocomp.quant.modules import quant_convs
from yolocomp.quant.observers import HistogramObserver, choose_range
from yolocomp.quant.quantizer import Quantizer
from yolocomp.quant.reconstruct import reconstruct_quantized
from yolocomp.quant.sensitivity import layer_sensitivity, weight_bit_plan, weight_bytes

IMGSZ = 64


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return lively_detector()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return [torch.rand(4, 3, IMGSZ, IMGSZ) for _ in range(4)]


def _quantized(model, images, w_bits=4, a_bits=8, layer_bits=None, calibrator="percentile", act_offset=True):
    q = deepcopy(model)
    quantize_model(q, w_bits, a_bits, layer_bits=layer_bits, act_offset=act_offset)
    calibrate(q, images, calibrator, progress=False)
    return q.eval()


@pytest.fixture(scope="module")
def reconstructed(float_model, images):
    q = _quantized(float_model, images)
    nearest = deepcopy(q)
    report = reconstruct_quantized(q, float_model, images, iters=200, progress=False)
    return nearest, q, report


# --- AdaRound -------------------------------------------------------------------------------------------------------
def test_adaround_starts_at_the_float_weight_and_ends_on_the_grid():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    q = Quantizer(4, channels=4)
    q.init_from_weight(w)
    rounding = AdaRound(w, q)
    s = q.step()
    with torch.no_grad():
        assert torch.allclose(rounding(w), torch.clamp(w / s, -8, 7) * s, atol=1e-3 * float(s.max()))  # soft start
        rounding.alpha.add_(torch.randn_like(rounding.alpha))
        rounding.hard = True
        k = rounding(w) / s
    assert torch.allclose(k, k.round(), atol=1e-5)  # on the 4-bit grid
    inside = (w / s > -8) & (w / s < 7)  # weights beyond the clip land on the clip
    up = (k.round() - torch.floor(w / s))[inside]
    assert set(up.unique().tolist()) == {0.0, 1.0}  # each weight rounded down or up, both used


def test_reconstruction_leaves_hard_rounded_weights_on_the_grid(reconstructed):
    nearest, q, report = reconstructed
    fitted = [r for r in report["blocks"] if r["fitted"] and not r["reverted"]]
    assert fitted and all(c.rounding is None for c in quant_convs(q))  # no AdaRound variables left behind
    layers = {r["layer"] for r in fitted}  # a reverted block keeps its float weights (nearest rounding on export)
    changed = 0
    for c_near, c in zip(quant_convs(nearest), quant_convs(q)):
        if int(c.name.split(".")[1]) not in layers:
            continue
        w0, w = c_near.folded()[0], c.folded()[0]
        k = w / c.weight_quant.step()
        assert torch.allclose(k, k.round(), atol=1e-3), c.name
        # the grid value is the float weight (clipped to the grid) rounded down or up, never further away
        qn, qp = c.weight_quant.qrange
        w0 = (w0 / c.weight_quant.step()).clamp(qn, qp)
        assert (k.round() - w0).abs().max() < 1 + 1e-3, c.name
        changed += int((k.round() != w0.round()).sum())
    assert changed > 0  # AdaRound chose another rounding than the nearest for some weights


def test_reconstruction_beats_nearest_rounding_on_held_out_images(reconstructed, float_model):
    from yolocomp.recon.engine import head_error

    nearest, q, report = reconstructed
    held = [torch.rand(4, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(9))]
    assert head_error(q, float_model, held) < head_error(nearest, float_model, held)
    assert any(r["error_after"] < r["error_before"] for r in report["blocks"] if r["fitted"])


def test_learned_steps_and_biases_keep_the_weights_on_their_grid_and_export_as_fitted(float_model, images, tmp_path):
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.quant.adaround import bias_parameter

    q = _quantized(float_model, images, calibrator="auto", act_offset=False)  # symmetric: see the parity test below
    before = {c.name: (c.weight_quant.step().clone(), bias_parameter(c).detach().clone()) for c in quant_convs(q)}
    report = reconstruct_quantized(q, float_model, images, iters=40, affine_lr=1e-2, progress=False)
    assert report["settings"]["affine_lr"] == 1e-2
    fitted = {r["layer"] for r in report["blocks"] if r["fitted"] and not r["reverted"]}
    assert fitted
    steps_moved = biases_moved = 0
    for c in quant_convs(q):
        step0, bias0 = before[c.name]
        if int(c.name.split(".")[1]) in fitted:
            k = c.folded()[0] / c.weight_quant.step()
            assert torch.allclose(k, k.round(), atol=1e-3), c.name  # the baked weight sits on the learned grid
            steps_moved += int(not torch.allclose(c.weight_quant.step(), step0))
            biases_moved += int(not torch.allclose(bias_parameter(c), bias0))
        else:  # a block that was not kept is as calibrated
            assert torch.equal(c.weight_quant.step(), step0) and torch.equal(bias_parameter(c), bias0), c.name
    assert steps_moved > 0 and biases_moved > 0
    path = export_onnx(q, tmp_path / "affine.onnx", imgsz=IMGSZ)
    x = images[0][:1]
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        fake, flt = q(x)[0].numpy(), float_model(x)[0].numpy()
    assert np.median(np.abs(y - fake)) < 0.3 * np.median(np.abs(fake - flt))


def _raw_head(model, x):
    """Detect's raw output (box-bin and class logits per anchor: the pre-activation of its last convs)."""
    from yolocomp.recon.blocks import OutputCache, detector_blocks

    blocks = detector_blocks(model)
    cache = OutputCache([x], blocks)
    for block in blocks:
        out = cache.advance(block, torch.device("cpu"))
    return out[0]


def test_bias_correction_gives_the_head_logits_their_float_means(float_model, images):
    q = _quantized(float_model, images, 4, 4)
    x = torch.cat(images)
    with torch.no_grad():
        ref = _raw_head(float_model, x)
        before = (_raw_head(q, x) - ref).mean((0, 2)).abs().mean()
        info = correct_bias(q, images)
        after = (_raw_head(q, x) - ref).mean((0, 2)).abs().mean()
    assert info["convs"] == len(quant_convs(q)) and after < 0.2 * before


def test_bias_correction_after_reconstruction_aims_at_the_float_model(float_model, images, reconstructed):
    _, fitted, _ = reconstructed  # its rounding is baked into the weights: quantizers off is no longer the float model
    x = torch.cat(images)
    with torch.no_grad():
        ref = _raw_head(float_model, x)
        before = (_raw_head(fitted, x) - ref).mean((0, 2)).abs().mean()
        with_reference, self_reference = deepcopy(fitted), deepcopy(fitted)
        correct_bias(with_reference, images, reference=float_model)
        correct_bias(self_reference, images)
        aimed = (_raw_head(with_reference, x) - ref).mean((0, 2)).abs().mean()
        missed = (_raw_head(self_reference, x) - ref).mean((0, 2)).abs().mean()
    assert aimed < 0.2 * before and aimed < 0.5 * missed


# --- exported parity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ["w8a8", "w4a8", "w4a4", "mixed"])
def test_exported_onnx_equals_the_fake_quant_model(bits, float_model, images, tmp_path):
    from yolocomp.export.lint import lint_qdq
    from yolocomp.export.onnx_qdq import export_onnx

    layer_bits = None
    if bits == "mixed":
        names = [c.name for c in quant_convs(_quantized(float_model, images[:1]))]
        layer_bits = {n: (8 if i % 3 == 0 else 4, 8) for i, n in enumerate(names)}
    w, a = 8 if bits == "w8a8" else 4, 4 if bits == "w4a4" else 8
    # auto: mse grids for 4-bit activations; symmetric 8-bit grids, because a shifted one puts most values ~125 steps
    # from zero, where ONNX Runtime's division and torch's reciprocal multiply round apart far more often (the
    # shifted export's arithmetic is checked without rounding in test_export_qdq)
    q = _quantized(float_model, images, w, a, layer_bits, calibrator="auto", act_offset=False)
    if bits == "w4a4":  # SiLU outputs get grids with a few levels below zero, exported as clamped INT8 Q/DQ
        grids = {c.act_quant.qrange for c in quant_convs(q)}
        assert any(-8 < qn < 0 for qn, _ in grids) and all(qp - qn == 15 for qn, qp in grids if qp < 100)
    reconstruct_quantized(q, float_model, images, iters=10, progress=False)
    path = export_onnx(q, tmp_path / f"{bits}.onnx", imgsz=IMGSZ)
    assert lint_qdq(path) == []
    x = images[0][:1]
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        fake, flt = q(x)[0].numpy(), float_model(x)[0].numpy()
    # float sums in another order move a few values across a rounding boundary: far below the quantization noise
    # (0.3: the mixed plan on the session's shared random detector sits at 0.27 since the image input is signed)
    assert np.median(np.abs(y - fake)) < 0.3 * np.median(np.abs(fake - flt))
    if bits == "mixed":  # 4-bit weights exactly where the plan says 4 (INT4 tensors, or int8 within -8..7)
        weights = [i for i in onnx.load(str(path)).graph.initializer if i.name.endswith("export_weight_quantized")]

        def four_bit(w):
            a = onnx.numpy_helper.to_array(w)
            return w.data_type == onnx.TensorProto.INT4 or (a.min() >= -8 and a.max() <= 7)

        assert len(weights) == len(layer_bits)
        assert sum(four_bit(w) for w in weights) == sum(b == 4 for b, _ in layer_bits.values())


# --- mixed precision plan --------------------------------------------------------------------------------------------
def test_weight_bit_plan_respects_the_budget_and_raises_the_sensitive_convs(float_model, images):
    q = _quantized(float_model, images, 4, 8)
    rows = layer_sensitivity(q, images[:1], progress=False, part="weight")
    convs = quant_convs(q)
    low, high = sum(weight_bytes(c, 4) for c in convs), sum(weight_bytes(c, 8) for c in convs)
    budget = low + 0.3 * (high - low)
    plan = weight_bit_plan(q, rows, budget)
    assert plan["weight_mb"] * 1e6 <= budget + 1 and 0 < plan["layers_high"] < len(convs)
    assert weight_bit_plan(q, rows, high)["layers_high"] == len(convs)
    assert weight_bit_plan(q, rows, low)["layers_high"] == 0
    with pytest.raises(ValueError, match="below the all-4-bit weights"):
        weight_bit_plan(q, rows, low - 10)


def test_head_kd_sensitivity_weighs_confident_anchors_and_ignores_box_position(float_model, images):
    from yolocomp.quant.sensitivity import _distance, _head_kd_distance

    torch.manual_seed(1)
    scores = torch.full((1, 3, 2), -6.0)
    scores[0, 0, 0] = 4.0  # anchor 0 holds an object, anchor 1 is background
    bins = torch.randn(1, 4 * 16, 2)
    ref = [{"scores": scores, "boxes": bins}]

    def moved(anchor):
        b = bins.clone()
        b[0, :16, anchor] += torch.linspace(-1, 1, 16)
        return [{"scores": scores, "boxes": b}]

    assert _head_kd_distance(ref, ref, 16) == 0.0
    on_object, on_background = _head_kd_distance(ref, moved(0), 16), _head_kd_distance(ref, moved(1), 16)
    assert on_object > 50 * on_background > 0
    # the decoded-output distance sees a 2-pixel shift of the same box as 10x smaller when the box sits 10x farther out
    near, far = torch.tensor([[[10.0], [10.0], [4.0], [4.0], [0.9]]]), torch.tensor([[[100.0], [100.0], [4.0], [4.0], [0.9]]])
    shift = torch.tensor([[[2.0], [0.0], [0.0], [0.0], [0.0]]])
    assert _distance([far], [far + shift]) < 0.2 * _distance([near], [near + shift])

    q = _quantized(float_model, images, 4, 8)
    rows = layer_sensitivity(q, images[:1], progress=False, part="weight", metric="head_kd")
    per_conv = rows[1:]
    assert rows[0]["layer"] == "<all>" and len(per_conv) == len(quant_convs(q))
    assert [r["output_error"] for r in per_conv] == sorted((r["output_error"] for r in per_conv), reverse=True)
    assert per_conv[0]["output_error"] > 0 and per_conv[-1]["output_error"] >= 0
    with pytest.raises(ValueError, match="use head_kd or output"):
        layer_sensitivity(q, images[:1], progress=False, metric="loss")


# --- streaming calibration -------------------------------------------------------------------------------------------
def test_streamed_histogram_gives_the_ranges_of_all_values_at_once():
    torch.manual_seed(0)
    chunks = [torch.randn(10000) * (1 + i) for i in range(8)]  # the range grows as chunks arrive
    streamed, whole = HistogramObserver(), HistogramObserver()
    for c in chunks:
        streamed.update(c)
    whole.update(torch.cat(chunks))
    assert streamed.max_value == whole.max_value and streamed.count == whole.count
    for method in ("minmax", "percentile", "mse"):
        a, b = choose_range(streamed, method), choose_range(whole, method)
        # the streamed histogram's range doubled as chunks came, so its bins are up to twice as wide: 1 % of the range
        assert abs(a - b) <= 0.01 * whole.max_value, method
    exact = float(torch.cat(chunks).abs().quantile(0.9999))
    assert abs(choose_range(streamed, "percentile") - exact) < 0.02 * exact


def test_ort_flavour_calibrates_in_chunks_with_the_same_ranges(float_model, images, tmp_path, monkeypatch):
    from yolocomp.export import ort_int8

    assert ort_int8.chunk_size(256) == 8 and ort_int8.chunk_size(18) == 6 and ort_int8.chunk_size(7) == 7
    chunked = ort_int8.export_ort_int8(float_model, tmp_path / "chunked.onnx", images, IMGSZ, "minmax")
    monkeypatch.setattr(ort_int8, "chunk_size", lambda total, largest=8: total)  # one chunk: every output kept
    whole = ort_int8.export_ort_int8(float_model, tmp_path / "whole.onnx", images, IMGSZ, "minmax")

    def scales(path):
        return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
                if i.name.endswith("_scale")}

    a, b = scales(chunked), scales(whole)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(np.allclose(a[k], b[k], rtol=1e-5) for k in a)


# --- the command ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ptq_reconstruct_on_unlabelled_images_writes_the_contract(synthetic_data, tmp_path):
    from yolocomp.commands.ptq import ptq

    folder = synthetic_data.parent / "images" / "train"
    report = ptq(lively_detector(), synthetic_data, tmp_path, bits=4, act_bits=8, images=str(folder), calib_images=8,
                 reconstruct=True, recon_iters=5, imgsz=IMGSZ, eval_images=2)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "model_w4a8.onnx").exists() and saved["lint"] == []
    assert 0 <= saved["ap"] == saved["ap_onnx"]["ap"] <= 1 and saved["calibration_source"] == str(folder)
    assert saved["settings"]["reconstruct"] is True and report["reconstruction"]["blocks"]
    assert saved["settings"]["edge_bits"] == 8 and saved["edge_layers"][0] == "model.0" and len(saved["edge_layers"]) == 7
    mixed = ptq(lively_detector(), synthetic_data, tmp_path / "mixed", bits=8, calib_images=8, imgsz=IMGSZ,
                budget_mb=2.0, evaluate=False)
    assert (tmp_path / "mixed" / "model_mixed.onnx").exists()
    plan = mixed["mixed_precision"]
    assert plan["weight_mb"] <= 2.0 and 0 < plan["layers_high"] < plan["layers"]


@pytest.mark.parametrize("args,message", [
    (["--act-bits", "3"], "act_bits = 3 is not 4 or 8; use 8 or 4"),
    (["--edge-bits", "16"], "edge_bits = 16 is not 4 or 8; use 8 (the default)"),
    (["--images", "64"], "--images 64: --images takes a folder or .txt list of images"),
    (["--budget-mb", "0.01"], "--budget-mb 0.01: budget 0.010 MB is below the all-4-bit weights"),
    (["--images", "EMPTY"], "no images found"),
    (["--recon-drop", "1"], "recon_drop = 1.0 is outside [0, 1)"),
    (["--reconstruct", "--bias-correction"], "--bias-correction with --reconstruct"),
    (["--ort", "--calibrator", "meanmax"], "--ort with --calibrator meanmax: ONNX Runtime's own calibration has no"),
])
def test_bad_ptq_input_is_one_line_and_exit_2(args, message, synthetic_data, tiny_detector, tmp_path):
    import subprocess
    import sys

    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "yolocomp.cli", "ptq", "--model", str(tiny_detector["pt"]), "--data",
                           str(synthetic_data), "--calib-images", "4", "--imgsz", "64", "--out", str(tmp_path / "o"),
                           *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_config_rejects_bad_values():
    from yolocomp.recipe import stage_config

    with pytest.raises(UserError, match="budget_mb"):
        stage_config("ptq", {"budget_mb": -1})


def test_qdrop_is_on_only_below_8_bit_activations_unless_set():
    from yolocomp.recipe import stage_config

    for stage in ("ptq", "qat"):
        assert stage_config(stage, {"bits": 4}).qdrop() == 0.5
        assert stage_config(stage, {"bits": 4, "act_bits": 8}).qdrop() == 0.0
        assert stage_config(stage, {"layer_bits": {"model.0": [8, 4]}}).qdrop() == 0.5
        assert stage_config(stage, {"layer_bits": {"model.0": 8}}).qdrop() == 0.0
        assert stage_config(stage, {"bits": 4, "recon_drop": 0.0}).qdrop() == 0.0
        assert stage_config(stage, {"recon_drop": 0.25}).qdrop() == 0.25


# --- distilled low-bit QAT starts from the reconstruction ---------------------------------------------------------------
def test_qat_reconstructs_first_below_8_bits():
    from yolocomp.recipe import stage_config

    assert stage_config("qat", {"bits": 4}).reconstruct_first()
    assert stage_config("qat", {"act_bits": 4}).reconstruct_first()
    assert stage_config("qat", {"layer_bits": {"model.0": 4}}).reconstruct_first()
    assert not stage_config("qat", {}).reconstruct_first()
    assert not stage_config("qat", {"bits": 4, "reconstruct": False}).reconstruct_first()


@pytest.mark.slow
def test_four_bit_qat_trains_from_the_reconstructed_model(synthetic_data, tiny_detector, tmp_path):
    from yolocomp.commands.qat import qat

    folder = synthetic_data.parent / "images" / "train"
    report = qat(str(tiny_detector["pt"]), synthetic_data, tmp_path, bits=4, act_bits=8, epochs=1, imgsz=IMGSZ, batch=8,
                 images=str(folder), evaluate_float=False, calib_images=8, recon_iters=5, eval_images=2)
    recon = report["reconstruction"]
    assert recon["images"]["fit"] + recon["images"]["held_out"] == 8 and any(b["fitted"] for b in recon["blocks"])
    assert report["teacher"].startswith("self") and report["label_loss"] is False
    assert (tmp_path / "model_w4a8.onnx").exists() and report["lint"] == []
    # a reconstructed start fine-tunes gently: every layer distilled, no mosaic, the 8-bit lr0 despite 4-bit weights
    assert "BlockKD" in report["teacher"]
    assert report["train_settings"]["mosaic"] == 0.0 and report["train_settings"]["lr0"] == QAT_TRAIN_DEFAULTS["lr0"]
    header = (tmp_path / "train" / "results.csv").read_text().splitlines()[0]
    assert "kdfeat_loss" in header and "kdcls_loss" in header


@pytest.mark.slow
def test_qat_trains_on_from_the_ptq_checkpoint_with_the_float_teacher(synthetic_data, tmp_path):
    from yolocomp.commands.ptq import ptq
    from yolocomp.commands.qat import qat
    from yolocomp.integration import load_model, save_model

    float_model = lively_detector()
    teacher = save_model(float_model, tmp_path / "float.pt")
    report = ptq(deepcopy(float_model), synthetic_data, tmp_path / "ptq", bits=4, act_bits=8, calib_images=8,
                 reconstruct=True, recon_iters=5, imgsz=IMGSZ, evaluate=False)
    start = tmp_path / "ptq" / "quantized.pt"
    assert report["quantized_pt"] == str(start)
    loaded = load_model(start).float().eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(5))
    y = ort.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        fake, flt = loaded(x)[0].numpy(), float_model.eval()(x)[0].numpy()
    # the checkpoint holds the exported model (its learned rounding and steps), not the float one
    assert np.median(np.abs(y - fake)) < 0.3 * np.median(np.abs(fake - flt))

    with pytest.raises(UserError, match="already quantized, so it cannot be its own float teacher; give --teacher"):
        qat(str(start), synthetic_data, tmp_path / "self", bits=4, act_bits=8)
    with pytest.raises(UserError, match="holds W4A8 quantizers but W8A8 was asked for; give --weight-bits 4"):
        qat(str(start), synthetic_data, tmp_path / "bits", bits=8, teacher=str(teacher))
    trained = qat(str(start), synthetic_data, tmp_path / "qat", bits=4, act_bits=8, teacher=str(teacher),
                  label_loss=False, epochs=1, imgsz=IMGSZ, batch=8, eval_images=2, export=False)
    assert "reconstruction" not in trained and trained["start"].startswith("quantized input")
    assert "BlockKD" in trained["teacher"] and trained["train_settings"]["mosaic"] == 0.0
    assert {"ap_float", "ap_start", "ap_fake_quant"} <= trained.keys()  # float = the teacher, start = the ptq result


def test_openvino_refuses_four_bit_activations_with_one_line(float_model, images, tmp_path):
    pytest.importorskip("openvino")
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.export.openvino import export_openvino, low_bit_activation_nodes

    q = _quantized(float_model, images, 4, 4)
    path = export_onnx(q, tmp_path / "model_w4a4.onnx", imgsz=IMGSZ)
    assert len(low_bit_activation_nodes(path)) >= 50  # one per distinct activation quantizer
    with pytest.raises(UserError, match="4-bit activation quantizers, which OpenVINO cannot run"):
        export_openvino(path, tmp_path / "ov", imgsz=IMGSZ)
    assert not (tmp_path / "ov").exists()  # nothing written
    w4a8 = export_onnx(_quantized(float_model, images, 4, 8), tmp_path / "model_w4a8.onnx", imgsz=IMGSZ)
    assert low_bit_activation_nodes(w4a8) == []


# --- QDrop -------------------------------------------------------------------------------------------------------
def test_qdrop_keeps_float_activations_only_while_a_block_is_fitted():
    torch.manual_seed(0)
    q = Quantizer(4, signed=True)
    q.scale.data.fill_(0.3)
    q.initialized.fill_(1.0)
    x = torch.randn(20000)
    q.train()
    quantized = q(x)
    assert not (quantized == x).any()  # no value of a standard normal lies on the 0.3 grid
    q.drop_prob = 0.5
    mixed = q(x)
    kept = mixed == x
    assert 0.48 < float(kept.float().mean()) < 0.52  # about half the elements keep their float value
    assert torch.equal(mixed[~kept], quantized[~kept])  # the others are the quantized values
    q.eval()
    assert torch.equal(q(x), quantized.detach())  # evaluation and export never drop


def test_qdrop_reconstruction_clears_the_drop_and_records_it(float_model, images):
    q = _quantized(float_model, images)
    report = reconstruct_quantized(q, float_model, images, iters=5, drop_prob=0.5, progress=False)
    assert report["settings"]["qdrop"] == 0.5
    assert {m.drop_prob for m in q.modules() if isinstance(m, Quantizer)} == {0.0}
    with pytest.raises(ValueError, match="drop_prob=1.0 must be in"):
        reconstruct_quantized(q, float_model, images, iters=1, drop_prob=1.0, progress=False)


# --- the convs at the ends keep 8 bits ------------------------------------------------------------------------------
def test_first_and_output_convs_keep_8_bits_below_8_bit_quantization(float_model):
    from ultralytics.nn.tasks import DetectionModel

    from yolocomp.quant.convert import edge_layers

    edges = edge_layers(float_model)
    head = len(float_model.model) - 1
    assert edges[0] == "model.0" and len(edges) == 7  # the image conv; box and class output convs of three scales
    assert sorted(e.rsplit(".", 2)[0] for e in edges[1:]) == [f"model.{head}.cv{b}" for b in (2, 2, 2, 3, 3, 3)]
    yolo11 = DetectionModel("yolo11n.yaml", nc=5, verbose=False)  # its class branch ends in nested Sequentials
    assert all(isinstance(yolo11.get_submodule(n), torch.nn.Conv2d) for n in edge_layers(yolo11)[1:])
    assert len(edge_layers(yolo11)) == 7

    q = deepcopy(float_model)
    info = quantize_model(q, 4, 4, edge_bits=8)
    bits = {c.name: (c.weight_quant.bits, c.act_quant.bits) for c in quant_convs(q)}
    assert info["edge_layers"] == edges
    assert {n for n, b in bits.items() if b == (8, 8)} == set(edges)
    assert all(b == (4, 4) for n, b in bits.items() if n not in edges)
    # the user's layer_bits win over the rule; at 8 bits, or without edge_bits, there is no exception to make
    assert quantize_model(deepcopy(float_model), 4, 8, layer_bits={edges[-1]: 4}, edge_bits=8)["edge_layers"] == edges[:-1]
    assert quantize_model(deepcopy(float_model), 8, 8, edge_bits=8)["edge_layers"] == []
    q = deepcopy(float_model)
    assert quantize_model(q, 4, 8)["edge_layers"] == [] and {c.weight_quant.bits for c in quant_convs(q)} == {4}
