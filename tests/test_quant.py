"""Quantizer maths, BN folding, calibration, model conversion, and one QAT epoch through the Ultralytics trainer."""

from __future__ import annotations

import math
from copy import deepcopy

import pytest
import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.quant.calibrate import calibrate, is_calibrated
from yolocomp.quant.convert import quantize_model
from yolocomp.quant.modules import QBottleneck, QConv, quant_convs, quantizers, set_quant_state
from yolocomp.quant.observers import HistogramObserver, choose_range
from yolocomp.quant.quantizer import Quantizer, qrange


@pytest.fixture(scope="module")
def lively() -> nn.Module:
    return lively_detector()


def lively_detector(nc: int = 3, seed: int = 0) -> nn.Module:
    """YOLOv8n with random weights whose BN statistics come from data, so activations do not vanish."""
    from yolocomp.integration import load_model

    torch.manual_seed(seed)
    model = load_model("yolov8n.yaml", nc=nc)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, 64, 64))
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = 0.03
    return model.eval()


# --- quantizer maths --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
def test_round_trip_error_is_half_a_step_inside_the_range(bits, signed):
    q = Quantizer(bits, signed=signed).eval()
    q.scale.data.fill_(0.05)
    q.initialized.fill_(1)
    qn, qp = qrange(bits, signed)
    x = torch.linspace(qn * 0.05, qp * 0.05, 1001)
    err = (q(x) - x).abs()
    assert err.max() <= 0.05 / 2 + 1e-6
    outside = torch.tensor([qp * 0.05 + 1.0, qn * 0.05 - 1.0])
    assert torch.allclose(q(outside), torch.tensor([qp * 0.05, qn * 0.05]))  # saturates at the grid ends


def test_per_channel_scales_follow_each_channel():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(-1, 1, 1, 1)
    q = Quantizer(8, channels=4).eval()
    q.init_from_weight(w)
    amax = w.reshape(4, -1).abs().amax(1)
    assert torch.allclose(q.scale.data, amax / 127, rtol=1e-5)
    err = (q(w) - w).abs().reshape(4, -1).amax(1)
    assert torch.all(err <= q.scale.data / 2 + 1e-7)
    assert err[0] < 1e-2 * err[3]  # a per-tensor scale would give the small channel the big channel's error


def test_lsq_step_gradient_equals_the_paper_formula():
    torch.manual_seed(0)
    q = Quantizer(4, signed=True).train()
    q.scale.data.fill_(0.3)
    q.initialized.fill_(1)
    x = torch.randn(5, 7) * 1.5
    upstream = torch.randn(5, 7)
    (q(x) * upstream).sum().backward()
    s, (qn, qp) = 0.3, qrange(4, True)
    v = x / s
    dq_ds = torch.where(v <= qn, torch.full_like(v, qn), torch.where(v >= qp, torch.full_like(v, qp), v.round() - v))
    g = 1 / math.sqrt(x.numel() * qp)
    expected = (upstream * dq_ds).sum() * g
    assert torch.allclose(q.scale.grad.reshape(()), expected, rtol=1e-5, atol=1e-7)
    # straight-through estimator: gradient 1 inside the range, 0 where clipped
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert torch.equal(xg.grad, ((v > qn) & (v < qp)).float() + ((v == qn) | (v == qp)).float())


def test_four_bit_values_take_at_most_16_levels():
    w = torch.randn(8, 16, 3, 3)
    qw = Quantizer(4, channels=8).eval()
    qw.init_from_weight(w)
    out = qw(w)
    for c in range(8):
        assert out[c].unique().numel() <= 16
    qa = Quantizer(4, signed=False).eval()
    qa._lazy_init(torch.rand(1000) * 3)
    assert qa(torch.rand(10000) * 5).unique().numel() <= 16


# --- calibration ------------------------------------------------------------------------------------------------------
def test_calibrators_clip_outliers_and_minmax_does_not():
    torch.manual_seed(0)
    obs = HistogramObserver()
    for _ in range(4):  # the histogram range grows across batches
        x = torch.randn(20000) * (1 + _)
        obs.update(x)
    obs.update(torch.tensor([400.0]))  # one outlier
    ranges = {m: choose_range(obs, m, levels=127) for m in ("minmax", "percentile", "mse")}
    assert ranges["minmax"] == pytest.approx(400.0)
    assert 2.0 < ranges["percentile"] < 50.0, ranges
    # MSE keeps a range only while the outlier's clipping error outweighs the rounding error of everything else
    assert 2.0 < ranges["mse"] <= ranges["minmax"]
    assert obs.hist.sum() == pytest.approx(obs.count)


def test_meanmax_is_the_mean_over_images_of_each_images_largest_value():
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32) * (1 + i) for i in range(3)]  # batches of 4 images, growing ranges
    batches[1][2, 0, 0, 0] = -500.0  # one image with an outlier moves one of the 12 maxima, not the whole range
    obs = HistogramObserver()
    for b in batches:
        obs.update(b)
    per_image = torch.cat([b.abs().flatten(1).amax(1) for b in batches])
    assert obs.samples == 12
    assert choose_range(obs, "meanmax") == pytest.approx(float(per_image.mean()), rel=1e-6)
    assert choose_range(obs, "percentile") < choose_range(obs, "meanmax") < choose_range(obs, "minmax") == 500.0


def test_auto_calibrator_is_mse_below_8_bits_percentile_for_symmetric_and_meanmax_for_shifted_8_bit_grids():
    torch.manual_seed(0)
    x = torch.randn(50000) * torch.rand(50000).pow(4) * 8  # heavy-tailed, like SiLU outputs
    clips = {}
    for bits in (8, 4):
        for method in ("auto", "percentile", "mse"):
            q = Quantizer(bits, signed=True)
            q.start_observing()
            q(x)
            q.finish_observing(method)
            clips[bits, method] = float(q.step()) * q.qrange[1]
    assert clips[8, "auto"] == clips[8, "percentile"]  # signed=True: the symmetric grid
    assert clips[4, "auto"] == clips[4, "mse"]
    shifted = {}
    for method in ("auto", "meanmax", "percentile"):
        q = Quantizer(8, signed=None, offset=True)
        q.start_observing()
        for part in x.abs().reshape(5, -1):  # five "images"
            q(part[None])
        q.finish_observing(method)
        shifted[method] = float(q.step()) * q.qrange[1]
    assert shifted["auto"] == shifted["meanmax"] != shifted["percentile"]
    assert clips[4, "mse"] < 0.75 * clips[4, "percentile"]  # 16 levels cannot afford the 99.99th percentile
    with pytest.raises(ValueError, match="resolve auto"):
        choose_range(HistogramObserver(), "auto")


def test_four_bit_mse_grid_puts_few_levels_below_zero_for_silu_and_half_for_symmetric_data():
    from yolocomp.quant.observers import shifted_grid

    torch.manual_seed(0)
    silu = nn.functional.silu(torch.randn(200000) * 2)
    errors = {}
    for signed in (None, True):  # None: calibration chooses the grid; True: the symmetric signed grid, as asked
        q = Quantizer(4, signed=signed).eval()
        q.start_observing()
        q(silu)
        q.finish_observing("mse")
        out = q(silu)
        errors[signed] = float(((out - silu) ** 2).mean())
        assert out.unique().numel() <= 16
        if signed is None:
            qn, qp = q.qrange
            assert -3 <= qn <= -1 and qp - qn == 15  # one to three of the 16 levels for SiLU's dip to -0.28
            assert out.min() < 0  # negatives kept, not clipped to 0 (which biases every channel)
    assert q.qrange == (-8, 7) and q.neg_levels is None  # an explicit sign is kept
    assert errors[None] < 0.6 * errors[True]
    obs = HistogramObserver()
    obs.update(torch.randn(200000))
    assert shifted_grid(obs, 4)[0] in (7, 8)  # symmetric data: half the levels on either side
    q = Quantizer(4, signed=None).eval()
    for method, grid_is_shifted in (("mse", True), ("percentile", False), ("mse", True)):  # recalibration re-decides
        q.start_observing()
        q(silu)
        q.finish_observing(method)
        assert (q.qrange != (-8, 7)) == grid_is_shifted, method
    obs, negatives = HistogramObserver(), 0
    for scale in (1.0, 3.0, 9.0):  # the range grows across batches: the negative counts merge with the rest
        x = nn.functional.silu(torch.randn(20000) * scale)
        obs.update(x)
        negatives += int((x < 0).sum())
    assert obs.neg_hist.sum() == negatives and (obs.neg_hist <= obs.hist).all()
    assert obs.neg_hist[obs.edges[:-1] > 0.3].sum() == 0  # SiLU never goes below -0.28


def test_eight_bit_offset_grid_puts_few_levels_below_zero_and_keeps_image_pixels_exact():
    torch.manual_seed(0)
    silu = nn.functional.silu(torch.randn(200000) * 2)
    errors, grids = {}, {}
    for offset in (True, False):
        q = Quantizer(8, signed=None, offset=offset).eval()
        q.start_observing()
        q(silu)
        q.finish_observing("percentile")
        out = q(silu)
        errors[offset], grids[offset] = float(((out - silu) ** 2).mean()), q.qrange
        assert out.unique().numel() <= 256
        if offset:
            qn, qp = q.qrange
            assert -16 <= qn <= -1 and qp - qn == 255  # SiLU's dip to -0.28 needs a few of the 256 levels
            assert q.container_offset == qp - 127 and out.min() < 0
            container = q.quantize_shifted(silu) / q.step()  # what the signed INT8 Q/DQ holds
            assert container.min() >= -128 and container.max() <= 127
            assert torch.allclose(container, container.round(), atol=1e-3)
    assert grids[False] == (-128, 127)  # --no-act-offset: the symmetric grid
    assert errors[True] < 0.4 * errors[False]  # about twice the resolution: a quarter of the squared error
    image = torch.randint(0, 256, (2, 3, 16, 16)).float() / 255  # 8-bit pixels as the loader gives them
    q = Quantizer(8, signed=None, offset=True).eval()
    q.start_observing()
    q(image)
    q.finish_observing("minmax")
    assert q.qrange == (0, 255) and q.container_offset == 128
    assert torch.allclose(q(image), image, atol=1e-6)  # every pixel value is a level


@pytest.mark.parametrize("padding", [0, 1])
def test_conv_behind_a_shifted_grid_equals_the_plain_quantized_conv_borders_included(padding):
    from ultralytics.nn.modules import Conv

    from yolocomp.quant.modules import freeze_for_export

    torch.manual_seed(0)
    conv = Conv(4, 6, 3 if padding else 1)
    with torch.no_grad():
        conv.bn.running_mean.uniform_(-1, 1)
    q = QConv(conv.conv, conv.bn, conv.act).eval()
    x = nn.functional.silu(torch.randn(2, 4, 9, 9) * 3)
    q.act_quant.start_observing()
    q.act_quant(x)
    q.act_quant.finish_observing("percentile")
    assert q.act_quant.container_offset > 0 and q.reads_shifted()
    with torch.no_grad():
        w, b = q.folded()
        plain = conv.act(nn.functional.conv2d(q.act_quant(x), q.weight_quant(w), b, 1, padding))  # zero borders
        shifted = q(x)  # conv(q(x) - c) + c * sum(W): what the exported graph computes
        frozen = deepcopy(q)
        freeze_for_export(frozen)
        exported = frozen(x)
    assert shifted.shape == plain.shape == exported.shape
    assert torch.allclose(shifted, plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(exported, shifted)  # evaluation and export do the same float arithmetic


def test_activation_sign_is_signed_at_8_bits_and_decided_by_data_below(lively, tmp_path):
    from yolocomp.export.lint import lint_qdq
    from yolocomp.export.onnx_qdq import export_onnx

    images = [torch.rand(2, 3, 64, 64)]
    model = deepcopy(lively)
    quantize_model(model)
    calibrate(model, images, "percentile", progress=False)
    assert model.model[0].act_quant.signed is True  # images are >= 0, but TensorRT's INT8 is signed only
    assert lint_qdq(export_onnx(model, tmp_path / "w8a8.onnx", imgsz=64)) == []
    model.model[0].act_quant.signed = False  # asked for explicitly: a UINT8 input, which TensorRT cannot take
    findings = lint_qdq(export_onnx(model, tmp_path / "uint8.onnx", imgsz=64))
    assert findings and {f.rule for f in findings} == {"unsigned-int8"}  # the input's Q and DQ, nothing else
    four = deepcopy(lively)
    quantize_model(four, 4, 4)
    calibrate(four, images, "percentile", progress=False)
    assert four.model[0].act_quant.signed is False  # below 8 bits: the image gets all 16 levels of 0..15
    assert four.model[1].act_quant.signed is True  # SiLU outputs go down to -0.28
    x = images[0]
    assert four.model[0].act_quant(x).unique().numel() == 16  # an unsigned 4-bit grid, stored in an INT8 container


# --- BN folding -------------------------------------------------------------------------------------------------------
def test_folded_bn_gives_the_same_float_output_as_conv_bn():
    from ultralytics.nn.modules import Conv

    torch.manual_seed(0)
    ref = Conv(8, 16, 3, 1)
    with torch.no_grad():
        ref.bn.weight.uniform_(0.5, 2)
        ref.bn.bias.normal_()
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.5, 2)
    work = deepcopy(ref)
    q = QConv(work.conv, work.bn, work.act)
    set_quant_state(q, enabled=False)
    x = torch.randn(4, 8, 12, 12)
    ref.eval(), q.eval()
    assert torch.allclose(q(x), ref(x), atol=1e-5)
    ref.train(), q.train()  # live BN: batch statistics normalise, running statistics update identically
    assert torch.allclose(q(x), ref(x), atol=1e-4)
    assert torch.allclose(q.bn.running_mean, ref.bn.running_mean, atol=1e-5)
    assert torch.allclose(q.bn.running_var, ref.bn.running_var, atol=1e-5)
    q.bn_frozen = True  # frozen BN: the deployed folded conv, running statistics untouched
    before = q.bn.running_mean.clone()
    ref.eval()
    assert torch.allclose(q(x), ref(x), atol=1e-5)
    assert torch.equal(q.bn.running_mean, before)


def test_quantized_weights_are_the_folded_ones():
    from ultralytics.nn.modules import Conv

    conv = Conv(4, 6, 1)
    with torch.no_grad():
        conv.bn.weight.uniform_(0.1, 3)
    q = QConv(conv.conv, conv.bn, conv.act).eval()
    w, _ = q.folded()
    q.weight_quant.init_from_weight(w)
    assert torch.allclose(q.weight_quant.scale.data, w.reshape(6, -1).abs().amax(1) / 127)


# --- conversion -------------------------------------------------------------------------------------------------------
def test_full_quantization_covers_first_layer_and_head_but_not_dfl(lively):
    model = deepcopy(lively)
    info = quantize_model(model)
    assert not is_calibrated(model)  # conversion (and its tracing pass) must leave step sizes to calibration
    names = [q.name for q in quant_convs(model)]
    assert "model.0" in names
    head = [n for n in names if n.startswith("model.22.")]
    assert {f"model.22.cv{b}.{i}.2" for b in (2, 3) for i in range(3)} <= set(head)  # final box/class convs
    assert isinstance(model.model[-1].dfl.conv, nn.Conv2d) and not isinstance(model.model[-1].dfl, QConv)
    plain = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and not any(
        n.startswith(q + ".") for q in names)]
    assert plain == ["model.22.dfl.conv"]
    assert len(info["quantized"]) == len(names) and info["excluded"] == []
    assert any(isinstance(m, QBottleneck) for m in model.modules())
    # shared quantizers: Detect's box and class branches of one level see the same tensor -> one scale
    det = model.model[-1]
    assert det.cv2[0][0].act_quant is det.cv3[0][0].act_quant
    assert len(quantizers(model)) < 2 * len(names)
    assert quantize_model(model)["changed"] is False  # idempotent


def test_exclusions_by_index_and_name_are_listed(lively):
    model = deepcopy(lively)
    info = quantize_model(model, exclude=[0, "model.22.cv3.*.2"])
    assert "model.0" in info["excluded"] and "model.22.cv3.1.2" in info["excluded"]
    assert "model.0" not in [q.name for q in quant_convs(model)]
    with pytest.raises(UserError, match="matches no conv"):
        quantize_model(deepcopy(lively), exclude=["model.99"])


def test_quantized_model_stays_close_to_float(lively):
    model = deepcopy(lively)
    ref = deepcopy(model)
    quantize_model(model)
    x = torch.rand(2, 3, 64, 64)
    calibrate(model, [x], "percentile", progress=False)
    y, r = model(x)[0], ref(x)[0]
    rel = (y[:, :4] - r[:, :4]).norm() / r[:, :4].norm()
    assert 0 < rel < 0.3  # random weights are far more fragile than trained ones


def test_qat_tracks_8_bit_weight_ranges_and_learns_4_bit_ones(lively):
    from yolocomp.quant.qat import QuantizationAwareTraining

    model = deepcopy(lively)
    QuantizationAwareTraining(bits=8, layer_bits={"model.0": 4}).prepare(model)
    convs = quant_convs(model)
    assert convs[0].weight_quant.bits == 4 and convs[0].weight_quant.learn
    assert not any(c.weight_quant.learn for c in convs[1:]) and all(c.act_quant.learn for c in convs)
    calibrate(model, [torch.rand(2, 3, 64, 64)], "minmax", progress=False)
    conv = convs[5]
    with torch.no_grad():
        conv.conv.weight[0] *= 2  # an update that pushes channel 0 past its calibrated range
    w = conv.folded()[0].detach()
    expected = w.reshape(w.shape[0], -1).abs().amax(1) / 127
    model.eval()
    with torch.inference_mode():  # evaluation follows the new range without writing inference tensors into it
        q = conv.weight_quant(w)
    assert ((q - w).abs().reshape(w.shape[0], -1).amax(1) <= expected / 2 + 1e-7).all()  # nothing clipped
    assert conv.weight_quant.scale[0] < expected[0] * 0.75  # the stored step is untouched in evaluation
    model.train()
    conv.weight_quant(w)
    assert torch.allclose(conv.weight_quant.scale, expected)  # training stores the tracked step
    conv.weight_quant.scale.data.fill_(1.0)  # a stale stored step must not reach the export
    conv.freeze_for_export()
    assert torch.allclose(conv.weight_quant.export_scale, expected)
    assert (conv.export_weight / expected.view(-1, 1, 1, 1)).sub((w / expected.view(-1, 1, 1, 1)).round()).abs().max() < 1e-3


# --- QAT through the Ultralytics trainer ------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_qat_epoch_on_synthetic_data(synthetic_data, tmp_path, lively):
    from yolocomp.integration import load_model, train
    from yolocomp.quant.qat import QuantizationAwareTraining

    model = deepcopy(lively)
    method = QuantizationAwareTraining(bits=8, freeze_bn_epoch=1, calib_batches=2)
    result = train(model, str(synthetic_data), [method], project=tmp_path, name="qat", epochs=1, imgsz=64, batch=8)
    trained = result.model
    convs = quant_convs(trained)
    assert len(convs) == 63 and all(c.bn_frozen for c in convs if c.bn is not None)
    assert all(q.initialized.item() == 1 for q in quantizers(trained))
    # calibrated on the training images (0-1): the (signed, TensorRT) input quantizer's step is about 1/127
    assert trained.model[0].act_quant.signed is True
    assert 0.5 / 127 < trained.model[0].act_quant.scale.abs().item() < 2 / 127
    reloaded = load_model(result.last)
    assert len(quant_convs(reloaded)) == 63
    x = torch.rand(1, 3, 64, 64)
    out = reloaded.float().eval()(x)[0]
    assert out.shape == (1, 4 + 3, 84) and torch.isfinite(out).all()
    assert (result.save_dir / "results.csv").exists()


@pytest.mark.slow
def test_qat_api_with_teacher_writes_checkpoint_and_report(synthetic_data, tmp_path, lively):
    from yolocomp.commands.qat import qat
    from yolocomp.integration import load_model

    report = qat(deepcopy(lively), synthetic_data, tmp_path, bits=8, epochs=1, imgsz=64, batch=8, teacher=lively,
                 evaluate_float=False, calibrator="minmax")
    assert "HeadKD" in report["teacher"] and report["excluded"] == []
    assert (tmp_path / "qat.pt").exists() and (tmp_path / "report.json").exists()
    assert len(quant_convs(load_model(tmp_path / "qat.pt"))) == 63
    cols = (tmp_path / "train" / "results.csv").read_text().splitlines()[0]
    assert "kdcls_loss" in cols  # the teacher's loss trained alongside the quantized student
    with pytest.raises(UserError, match="bits"):
        qat(deepcopy(lively), synthetic_data, tmp_path / "bad", bits=6)


def test_qat_learning_rate_default_depends_on_the_bit_width():
    from yolocomp.config import QAT_LOW_BIT_LR0, QAT_RECONSTRUCTED_DEFAULTS, QAT_TRAIN_DEFAULTS, qat_train_defaults

    assert qat_train_defaults(8, 8) == QAT_TRAIN_DEFAULTS
    assert qat_train_defaults(4, 8)["lr0"] == qat_train_defaults(8, 4)["lr0"] == QAT_LOW_BIT_LR0
    assert qat_train_defaults(8, 8, {"model.0": (4, 8)})["lr0"] == QAT_LOW_BIT_LR0
    assert qat_train_defaults(8, 8, {"model.0": 8})["optimizer"] == "SGD"
    # a reconstructed start is already close to the float model: the 8-bit lr0 and no mosaic at any bit width
    assert qat_train_defaults(4, 4, reconstructed=True) == {**QAT_TRAIN_DEFAULTS, **QAT_RECONSTRUCTED_DEFAULTS}
    assert QAT_RECONSTRUCTED_DEFAULTS["mosaic"] == 0.0 and "lr0" not in QAT_RECONSTRUCTED_DEFAULTS


def test_qat_distillation_method_follows_the_start_unless_set():
    from yolocomp.config import QatConfig

    assert QatConfig().distillation(reconstructed=True) == "block"
    assert QatConfig().distillation(reconstructed=False) == "logit"
    assert QatConfig(kd_method="logit").distillation(reconstructed=True) == "logit"
    assert QatConfig(kd_method="block").distillation(reconstructed=False) == "block"


@pytest.mark.slow
def test_qat_defaults_self_distil_without_label_loss(synthetic_data, tmp_path, lively):
    import csv

    from yolocomp.commands.qat import qat
    from yolocomp.config import QAT_TRAIN_DEFAULTS

    model = deepcopy(lively)
    report = qat(model, synthetic_data, tmp_path, bits=8, epochs=1, imgsz=64, batch=8, evaluate_float=False)
    assert report["teacher"].startswith("self") and report["label_loss"] is False
    assert {k: report["train_settings"][k] for k in QAT_TRAIN_DEFAULTS} == QAT_TRAIN_DEFAULTS
    assert report["train_settings"]["box"] == report["train_settings"]["cls"] == 0.0
    assert not quant_convs(model)  # the caller's float model (and so the teacher) stays float
    rows = list(csv.DictReader((tmp_path / "train" / "results.csv").open()))
    losses = {k.strip(): float(v) for k, v in rows[-1].items() if k.strip().startswith("train/")}
    assert losses["train/box_loss"] == losses["train/cls_loss"] == 0.0 and losses["train/kdcls_loss"] > 0
    with pytest.raises(UserError, match="teacher"):
        qat(deepcopy(lively), synthetic_data, tmp_path / "bad", teacher=None, label_loss=False)


def test_qat_never_quantizes_distillation_adapters():
    from ultralytics.nn.tasks import DetectionModel

    from yolocomp.distill import FineGrainedImitation
    from yolocomp.methods import training_module
    from yolocomp.quant.qat import QuantizationAwareTraining

    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    kd = FineGrainedImitation(DetectionModel("yolov8s.yaml", nc=3, verbose=False))
    assert kd.prepare(student)  # adapters first: the order a user may attach them in
    assert QuantizationAwareTraining().prepare(student)
    adapters = training_module(student, kd.name)
    assert adapters is not None and any(isinstance(m, nn.Conv2d) for m in adapters.modules())
    assert not any(isinstance(m, QConv) for m in adapters.modules())
    assert len(quant_convs(student)) == 63  # the student itself is fully quantized
