"""``yolocomp qat``: quantization-aware training of the whole detector, Q/DQ export, report."""

from __future__ import annotations

import time
from copy import deepcopy
from pathlib import Path
from typing import Any

from yolocomp.commands.common import (
    StageResult,
    kd_training_data,
    model_name,
    require_data,
    warn_if_untrained,
    work_dir,
)
from yolocomp.commands.quant_common import export_and_check, layer_refs, onnx_name, write_quant_report
from yolocomp.config import QatConfig, qat_train_defaults
from yolocomp.config.options import settings
from yolocomp.errors import UserError
from yolocomp.recipe import Recipe, stage_config


def qat(model: Any, data: str | Path, out: str | Path, *, imgsz: int = 640, device: str = "cpu",
        resume: str | Path | None = None, evaluate: bool = True, evaluate_float: bool = True,
        config: QatConfig | None = None, **options: Any) -> dict:
    """Quantization-aware training of the whole detector; writes ``out/qat.pt`` (loadable by
    ``yolocomp.integration.load_model``; needs yolocomp importable, it holds quantizer modules), with ``export`` the
    Q/DQ ONNX, and ``out/report.json`` (AP before/after, exclusions). ``options`` are
    :class:`~yolocomp.config.QatConfig`'s; ``teacher`` may also be a DetectionModel or a distillation Method.

    The defaults are for what QAT usually is: a short fine-tune of a converged float detector.

    * ``teacher="self"``: distillation from a frozen float copy of ``model`` (``kd_method``: the head outputs,
      :class:`yolocomp.distill.HeadKD`; from a reconstructed start every layer's output too,
      :class:`yolocomp.distill.block_kd.BlockKD`), i.e. the quantized model learns to reproduce its own float outputs;
      ``label_loss`` (default: off with ``"self"``, on with any other teacher or ``teacher=None``) keeps
      Ultralytics' box/cls/DFL loss on the labels. On a converged model the label loss of a short fine-tune mostly
      pulls towards the few training images, while self-distillation only removes quantization error.
    * ``freeze_bn_epoch=0`` freezes BN statistics from the start: the folded weights keep the float model's
      statistics; FQN's schedule of freezing after N epochs is for longer runs.
    * calibration on ``calib_images`` letterboxed train images, like PTQ.
    * an already quantized ``model`` (``ptq``'s ``quantized.pt``, or a ``qat.pt``) keeps its rounding and step sizes
      and trains on from them; it needs the float ``teacher`` it came from and the same bits. ``ap_start`` in the
      report is the AP before training, so what training added shows.
    * unset trainer settings default to :func:`yolocomp.config.qat_train_defaults` (SGD, lr0=1e-4, 1e-3 below
      8 bits unless the start is reconstructed, no warmup; no mosaic from a reconstructed start)."""
    from yolocomp.eval import evaluate as coco_eval
    from yolocomp.eval.metrics import ap_summary
    from yolocomp.integration import load_model, resolve_data, save_model, train
    from yolocomp.quant.qat import QuantizationAwareTraining

    teacher_object = options.pop("teacher") if not isinstance(options.get("teacher", "self"), (str, type(None))) else None
    cfg = config or stage_config("qat", options)
    teacher: Any = teacher_object if teacher_object is not None else cfg.teacher
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_abs = resolve_data(data, work_dir(out))
    wb, ab = cfg.bit_widths()
    t0 = time.time()
    metrics = {"extra": ("backend", "images")}
    report: dict = {"title": f"QAT W{wb}A{ab}", "model": model_name(model), "data": str(data), "imgsz": imgsz,
                    "epochs": cfg.epochs, "weight_bits": wb, "act_bits": ab,
                    "settings": {k: v for k, v in settings(cfg).items() if k != "teacher"}}
    method = QuantizationAwareTraining(cfg.bits, weight_bits=wb, act_bits=ab, exclude=layer_refs(cfg.exclude),
                                       layer_bits=cfg.layer_bits, calibrator=cfg.calibrator,
                                       freeze_bn_epoch=cfg.freeze_bn_epoch, calib_images=cfg.calib_images,
                                       edge_bits=cfg.edge_bits, act_offset=cfg.act_offset)
    methods: list = [method]
    self_teacher = isinstance(teacher, str) and teacher == "self"
    # read once: the student's start and the self-distillation teacher are copies of the same float model
    loaded = load_model(model) if self_teacher or resume is None else None
    from yolocomp.quant.modules import quant_convs

    quantized_start = loaded is not None and bool(quant_convs(loaded))  # e.g. `ptq --reconstruct`'s quantized.pt
    if quantized_start:
        check_start_bits(loaded, model, wb, ab)
        if self_teacher:
            raise UserError(f"--model {model_name(model)} is already quantized, so it cannot be its own float teacher; "
                            "give --teacher the float .pt it was quantized from, or --teacher null to train on labels")
    if self_teacher:
        teacher = deepcopy(loaded).float()  # the caller's model stays untouched
    # how the training run started, also when resuming it: a resumed run keeps its distillation and settings
    reconstructed = quantized_start or cfg.reconstruct_first()
    label_loss = (not self_teacher) if cfg.label_loss is None else cfg.label_loss
    if teacher is not None:  # distillation from a float teacher during QAT (kd_method unless a Method is given)
        from yolocomp.methods import Method

        if isinstance(teacher, Method):
            methods.append(teacher)
        else:
            from yolocomp.commands.distill import make_method

            methods.append(make_method(cfg.distillation(reconstructed), teacher))
        report["teacher"] = ("self (float input model): " if self_teacher else "") + repr(methods[-1])
    elif not label_loss:
        raise UserError("label_loss=False needs a teacher (the default teacher='self' distils from the float model)")
    train_overrides = cfg.trainer_overrides()
    if not label_loss:
        for key in ("box", "cls", "dfl"):
            train_overrides.setdefault(key, 0.0)
    report["label_loss"] = bool(label_loss)
    train_overrides = {**qat_train_defaults(wb, ab, cfg.layer_bits, reconstructed), **train_overrides}
    report["train_settings"] = {k: train_overrides[k] for k in sorted(train_overrides)}
    float_teacher = teacher if teacher is not None and not isinstance(teacher, str) and hasattr(teacher, "names") else loaded
    if quantized_start:  # the float model is the teacher, not the quantized input
        float_teacher = (getattr(methods[-1], "load_teacher", lambda: None)() if len(methods) > 1 else None) or loaded
    m = None
    if resume is None:
        m = deepcopy(loaded).float()
        if evaluate and evaluate_float:
            reference = float_teacher if quantized_start else m
            if reference is not None:
                report["ap_float"] = ap_summary(coco_eval(reference, data_abs, imgsz=imgsz, device=device,
                                                          images=cfg.eval_images), **metrics)
        method.prepare(m)  # so exclusions are validated before training starts
        if quantized_start:
            report["start"] = f"quantized input {model_name(model)} (its rounding and step sizes are kept)"
        elif reconstructed:
            report["reconstruction"] = _warm_start(m, loaded, cfg, data_abs, imgsz, device)
        if evaluate:  # what training starts from, so the report shows what QAT itself added
            report["ap_start"] = ap_summary(coco_eval(m, data_abs, imgsz=imgsz, device=device, images=cfg.eval_images),
                                            **metrics)
    data_record: dict = {}
    train_yaml, overrides = kd_training_data(cfg, str(data_abs), float_teacher, work_dir(out), imgsz, device, data_record)
    report["training_data"] = data_record or {"labelled": str(data)}
    result = train(m, train_yaml, methods, project=out, name="train", resume=resume, epochs=cfg.epochs, imgsz=imgsz,
                   device=device, **{**train_overrides, **overrides})
    qmodel = result.model.float().eval()
    method.prepare(qmodel)  # idempotent: fills the summary on resume
    ckpt = save_model(qmodel, out / "qat.pt", extra={"quant": {"weight_bits": wb, "act_bits": ab,
                                                               "excluded": method.summary.get("excluded", [])}})
    report.update(qat_pt=str(ckpt), train_dir=str(result.save_dir), quantized_layers=len(method.summary["quantized"]),
                  excluded=method.summary["excluded"])
    if evaluate:
        report["ap_fake_quant"] = ap_summary(coco_eval(qmodel, data_abs, imgsz=imgsz, device=device,
                                                       images=cfg.eval_images), **metrics)
    if cfg.export:
        report.update(export_and_check(qmodel, out, onnx_name(wb, ab), data_abs, imgsz, device, cfg.eval_images,
                                       evaluate))
    if "ap_float" in report:
        final = report.get("ap_onnx", report["ap_fake_quant"])
        report["ap_drop"] = round(report["ap_float"]["ap"] - final["ap"], 4)
    report["seconds"] = round(time.time() - t0, 1)
    write_quant_report(out, report)
    return report


def check_start_bits(qmodel: Any, source: Any, weight_bits: int, act_bits: int) -> None:
    """A quantized start must hold the bits asked for: QAT keeps its quantizers, so other bits would be a false report."""
    from collections import Counter

    from yolocomp.quant.modules import quant_convs

    convs = quant_convs(qmodel)
    held = Counter((c.weight_quant.bits, c.act_quant.bits) for c in convs).most_common(1)[0][0]
    if held != (weight_bits, act_bits):
        raise UserError(f"--model {model_name(source)} holds W{held[0]}A{held[1]} quantizers but W{weight_bits}A{act_bits} "
                        f"was asked for; give --weight-bits {held[0]} --act-bits {held[1]}, or start from the float model")


def _warm_start(qmodel: Any, float_model: Any, cfg: Any, data: Path, imgsz: int, device: str) -> dict:
    """Calibrate ``qmodel`` and fit it block by block to the float model (the PTQ reconstruction), so training
    starts from learned rounding and step sizes; the method's own calibration then keeps them."""
    from yolocomp.commands.ptq import calibration_paths
    from yolocomp.quant.calibrate import calibrate, image_batches
    from yolocomp.quant.reconstruct import reconstruct_quantized

    t = time.time()
    batches = list(image_batches(calibration_paths(cfg, data), imgsz, 8))
    qmodel.to(device)
    calibrate(qmodel, batches, cfg.calibrator, device=device)
    report = reconstruct_quantized(qmodel, deepcopy(float_model).float().to(device), batches, iters=cfg.recon_iters,
                                   drop_prob=cfg.qdrop(), affine_lr=cfg.recon_affine_lr)
    qmodel.cpu()
    return {**report, "seconds": round(time.time() - t, 1)}


def run_stage(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None,
              evaluate: bool = True) -> StageResult:
    require_data(data, "QAT")
    warn_if_untrained(model, "qat")
    report = qat(model, str(data), str(out), imgsz=recipe.imgsz, device=recipe.device, evaluate=evaluate,
                 config=recipe.stage("qat"))
    artifacts = {"qat": str(out / "qat.pt")}
    artifacts.update({p.stem: str(p) for p in sorted(out.glob("model_*.onnx"))})
    return StageResult("qat", str(out / "qat.pt"), artifacts, report)
