"""What the CLI calls: ``qat()`` and ``ptq()``. Each writes its artifacts and a report.json under ``out``."""

from __future__ import annotations

import time
from copy import deepcopy
from pathlib import Path
from typing import Any

from yolocomp.errors import UserError
from yolocomp.quant.calibrate import calibrate, calibration_images, image_batches
from yolocomp.quant.convert import quantize_model
from yolocomp.quant.observers import CALIBRATORS


def onnx_name(weight_bits: int, act_bits: int) -> str:
    """model_int8.onnx for W8A8, else model_w{W}a{A}.onnx."""
    return "model_int8.onnx" if (weight_bits, act_bits) == (8, 8) else f"model_w{weight_bits}a{act_bits}.onnx"


def _check_bits(*bits: int | None) -> None:
    for b in bits:
        if b is not None and b not in (4, 8):
            raise UserError(f"--bits {b} is not supported; use 8 or 4")


def _write_report(out: Path, report: dict) -> Path:
    from yolocomp.report import write_report

    rows = [{"model": k, **v} for k, v in report.items() if k.startswith("ap_") and isinstance(v, dict)]
    return write_report(out, report, report.get("title", "quantization"), rows)[0]


def _model_name(model: Any) -> str:
    return str(getattr(model, "pt_path", None) or ("<in-memory model>" if hasattr(model, "parameters") else model))


def _metrics(result: dict) -> dict:
    return {k: result.get(k) for k in ("ap", "ap50", "ap75", "backend", "images")}


def _export_and_check(model: Any, out: Path, name: str, data: Path, imgsz: int, device: str,
                      eval_images: int | None) -> dict:
    from yolocomp.eval import evaluate
    from yolocomp.export.lint import lint_qdq
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.export.ort_check import integer_ops

    info: dict = {}
    path = export_onnx(model, out / name, imgsz=imgsz, info=info)
    findings = lint_qdq(path)
    return {
        "onnx": str(path),
        "export": info,
        "lint": [str(f) for f in findings],
        "ort_integer_ops": integer_ops(path),
        "ap_onnx": _metrics(evaluate(str(path), data, imgsz=imgsz, device=device, images=eval_images)),
    }


def ptq(model: Any, data: str | Path, out: str | Path, calibrator: str = "percentile", images: int = 256,
        imgsz: int = 640, bits: int = 8, sensitivity: bool = False, device: str = "cpu",
        weight_bits: int | None = None, act_bits: int | None = None, exclude: tuple = (),
        layer_bits: dict | None = None, eval_images: int | None = None, evaluate_float: bool = True,
        batch: int = 8, sensitivity_images: int = 8, ort: bool = False) -> dict:
    """Post-training quantization: calibrate on ``images`` train images with ``calibrator``, export
    ``out/model_int8.onnx`` (Q/DQ), evaluate it, write ``out/report.json`` (with a sensitivity table and a suggested
    mixed-precision plan when ``sensitivity``). ``ort=True`` also writes ``out/model_int8_ort.onnx``: the flavour
    ONNX Runtime runs fast on x86 CPUs (uint8 asymmetric activations, integer SiLU; not for TensorRT)."""
    from yolocomp.eval import evaluate
    from yolocomp.integration import load_model, resolve_data

    if calibrator not in CALIBRATORS:
        raise UserError(f"--calibrator {calibrator!r} is unknown; choose one of {', '.join(CALIBRATORS)}")
    _check_bits(bits, weight_bits, act_bits)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_abs = resolve_data(data, out)
    float_model = load_model(model).float().eval()
    t0 = time.time()
    report: dict = {"title": f"PTQ ({calibrator})", "model": _model_name(model), "data": str(data), "calibrator": calibrator,
                    "imgsz": imgsz}
    if evaluate_float:
        report["ap_float"] = _metrics(evaluate(float_model, data_abs, imgsz=imgsz, device=device,
                                                    images=eval_images))
    qmodel = deepcopy(float_model)  # the caller's model (or our float reference) stays untouched
    wb, ab = weight_bits or bits, act_bits or bits
    info = quantize_model(qmodel, wb, ab, exclude=exclude, layer_bits=layer_bits)
    paths = calibration_images(data_abs, images)
    seen = calibrate(qmodel, image_batches(paths, imgsz, batch), calibrator, device=device)
    report.update(weight_bits=wb, act_bits=ab, calibration_images=seen, quantized_layers=len(info["quantized"]),
                  excluded=info["excluded"])
    if sensitivity:
        from yolocomp.quant.sensitivity import layer_sensitivity, mixed_precision_plan

        probe = list(image_batches(paths[: max(1, min(sensitivity_images, len(paths)))], imgsz, batch))
        rows = layer_sensitivity(qmodel, probe)
        report["sensitivity"] = rows
        report["mixed_precision_plan"] = mixed_precision_plan(rows, min(wb, ab))
    report.update(_export_and_check(qmodel, out, onnx_name(wb, ab), data_abs, imgsz, device, eval_images))
    if evaluate_float:
        report["ap_drop"] = round(report["ap_float"]["ap"] - report["ap_onnx"]["ap"], 4)
    if ort:
        from yolocomp.eval import evaluate as _evaluate
        from yolocomp.export.ort_check import integer_ops
        from yolocomp.export.ort_int8 import export_ort_int8

        path = export_ort_int8(float_model, out / "model_int8_ort.onnx", image_batches(paths, imgsz, batch), imgsz,
                               calibrator)
        report["ort_flavour"] = {"onnx": str(path), "ort_integer_ops": integer_ops(path),
                                 "ap_onnx": _metrics(_evaluate(str(path), data_abs, imgsz=imgsz, device=device,
                                                            images=eval_images))}
    report["seconds"] = round(time.time() - t0, 1)
    _write_report(out, report)
    return report


#: Training settings ``qat`` uses unless the caller passes its own (Ultralytics' own defaults suit training from
#: scratch, not a short QAT of a converged detector). Measured on YOLOv8n / coco-real at 320 px, 1 epoch:
#: * SGD: ``optimizer="auto"`` picks AdamW (lr ~1.2e-4) for short runs, whose per-parameter steps moved every weight,
#:   BN parameter and step size at once and raised the head-output error vs FP32 5-7x (-2 AP);
#: * lr0=1e-4: Ultralytics clips the gradient norm to 10 and a detector's norm is ~1e3, so each SGD step has norm
#:   lr0*10; at lr0=1e-3 that overshoots (even the distillation loss rises during the epoch), at 1e-4 it descends;
#: * warmup_epochs=0: warmup ramps the bias lr from 0.1, far above a fine-tune's.
QAT_TRAIN_DEFAULTS: dict[str, Any] = {"optimizer": "SGD", "lr0": 1e-4, "warmup_epochs": 0}
#: lr0 when any layer has fewer than 8 bits: a 4-bit model starts far from its float outputs and needs larger steps
#: (W4A8, same budget: 7.2 AP at lr0=1e-4 (no better than no training), 13.9 at 1e-3, 11.6 at 3e-3).
QAT_LOW_BIT_LR0 = 1e-3


def qat_train_defaults(weight_bits: int = 8, act_bits: int = 8, layer_bits: dict | None = None) -> dict[str, Any]:
    """The Ultralytics settings ``qat`` uses unless given: :data:`QAT_TRAIN_DEFAULTS`, with lr0
    :data:`QAT_LOW_BIT_LR0` when the weights, activations or any ``layer_bits`` entry use fewer than 8 bits."""
    bits = [weight_bits, act_bits]
    for v in (layer_bits or {}).values():
        bits += list(v) if isinstance(v, (tuple, list)) else [v]
    return {**QAT_TRAIN_DEFAULTS, **({"lr0": QAT_LOW_BIT_LR0} if min(bits) < 8 else {})}


def qat(model: Any, data: str | Path, out: str | Path, bits: int = 8, epochs: int = 1, imgsz: int = 640,
        batch: int = 16, fraction: float = 1.0, device: str = "cpu", export: bool = False, exclude: tuple = (),
        weight_bits: int | None = None, act_bits: int | None = None, freeze_bn_epoch: int = 0,
        teacher: Any = "self", label_loss: bool | None = None, resume: str | Path | None = None,
        calibrator: str = "percentile", layer_bits: dict | None = None, eval_images: int | None = None,
        evaluate_float: bool = True, calib_images: int = 128, **train_overrides: Any) -> dict:
    """Quantization-aware training of the whole detector; writes ``out/qat.pt`` (loadable by
    ``yolocomp.integration.load_model``; needs yolocomp importable, it holds quantizer modules), with ``export`` the
    Q/DQ ONNX, and ``out/report.json`` (AP before/after, exclusions).

    The defaults are for what QAT usually is: a short fine-tune of a converged float detector.

    * ``teacher="self"``: head-output distillation (:class:`yolocomp.distill.HeadKD`) from a frozen float copy of
      ``model``, i.e. the quantized model learns to reproduce its own float outputs; ``label_loss`` (default: off
      with ``"self"``, on with any other teacher or ``teacher=None``) keeps Ultralytics' box/cls/DFL loss on the
      labels. On a converged model the label loss of a short fine-tune mostly pulls towards the few training
      images (a plain FP32 fine-tune of YOLOv8n for one epoch of 288 images lost 0.9 AP), while self-distillation
      only removes quantization error. Other teachers: a checkpoint path / DetectionModel (HeadKD) or any
      distillation :class:`~yolocomp.methods.Method`.
    * ``freeze_bn_epoch=0`` freezes BN statistics from the start: the folded weights keep the float model's
      statistics (live BN over a few small batches drifted them and raised the output error vs FP32 2-4x); FQN's
      schedule of freezing after N epochs is for longer runs.
    * calibration on ``calib_images`` letterboxed train images, like PTQ (:class:`QuantizationAwareTraining`).
    * ``train_overrides`` go to Ultralytics' trainer (lr0, optimizer, warmup_epochs, nbs, mosaic...); unset ones
      default to :func:`qat_train_defaults` (SGD, lr0=1e-4, 1e-3 below 8 bits, no warmup)."""
    from yolocomp.eval import evaluate
    from yolocomp.integration import load_model, resolve_data, save_model, train
    from yolocomp.quant.qat import QuantizationAwareTraining

    _check_bits(bits, weight_bits, act_bits)
    if epochs < 1:
        raise UserError(f"--epochs {epochs}: QAT needs at least 1 epoch")
    if calibrator not in CALIBRATORS:
        raise UserError(f"--calibrator {calibrator!r} is unknown; choose one of {', '.join(CALIBRATORS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_abs = resolve_data(data, out)
    wb, ab = weight_bits or bits, act_bits or bits
    t0 = time.time()
    report: dict = {"title": f"QAT W{wb}A{ab}", "model": _model_name(model), "data": str(data), "imgsz": imgsz,
                    "epochs": epochs, "weight_bits": wb, "act_bits": ab}
    method = QuantizationAwareTraining(bits, weight_bits=wb, act_bits=ab, exclude=exclude, layer_bits=layer_bits,
                                       calibrator=calibrator, freeze_bn_epoch=freeze_bn_epoch,
                                       calib_images=calib_images)
    methods: list = [method]
    self_teacher = isinstance(teacher, str) and teacher == "self"
    # read once: the student's start and the self-distillation teacher are copies of the same float model
    loaded = load_model(model) if self_teacher or resume is None else None
    if self_teacher:
        from yolocomp.quant.modules import quant_convs

        teacher = deepcopy(loaded).float()  # the caller's model stays untouched
        if quant_convs(teacher):  # already quantized: no float reference to distil from
            teacher, self_teacher = None, False
    if label_loss is None:
        label_loss = not self_teacher
    if teacher is not None:  # distillation from a float teacher during QAT (head-output KD unless a Method is given)
        from yolocomp.methods import Method

        if isinstance(teacher, Method):
            methods.append(teacher)
        else:
            from yolocomp.distill.head_kd import HeadKD

            methods.append(HeadKD(teacher))
        report["teacher"] = ("self (float input model): " if self_teacher else "") + repr(methods[-1])
    elif not label_loss:
        raise UserError("label_loss=False needs a teacher (the default teacher='self' distils from the float model)")
    if not label_loss:
        for key in ("box", "cls", "dfl"):
            train_overrides.setdefault(key, 0.0)
    report["label_loss"] = bool(label_loss)
    train_overrides = {**qat_train_defaults(wb, ab, layer_bits), **train_overrides}
    report["train_settings"] = {k: train_overrides[k] for k in sorted(train_overrides)}
    m = None
    if resume is None:
        m = deepcopy(loaded).float()
        if evaluate_float:
            report["ap_float"] = _metrics(evaluate(m, data_abs, imgsz=imgsz, device=device, images=eval_images))
        method.prepare(m)  # so exclusions are validated before training starts
    result = train(m, str(data_abs), methods, project=out, name="train", resume=resume, epochs=epochs, imgsz=imgsz,
                   batch=batch, fraction=fraction, device=device, **train_overrides)
    qmodel = result.model.float().eval()
    method.prepare(qmodel)  # idempotent: fills the summary on resume
    ckpt = save_model(qmodel, out / "qat.pt", extra={"quant": {"weight_bits": wb, "act_bits": ab,
                                                               "excluded": method.summary.get("excluded", [])}})
    report.update(qat_pt=str(ckpt), train_dir=str(result.save_dir), quantized_layers=len(method.summary["quantized"]),
                  excluded=method.summary["excluded"])
    report["ap_fake_quant"] = _metrics(evaluate(qmodel, data_abs, imgsz=imgsz, device=device,
                                                 images=eval_images))
    if export:
        report.update(_export_and_check(qmodel, out, onnx_name(wb, ab), data_abs, imgsz, device, eval_images))
    if "ap_float" in report:
        final = report.get("ap_onnx", report["ap_fake_quant"])
        report["ap_drop"] = round(report["ap_float"]["ap"] - final["ap"], 4)
    report["seconds"] = round(time.time() - t0, 1)
    _write_report(out, report)
    return report
