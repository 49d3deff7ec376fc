"""``yolocomp ptq``: calibrate, export the Q/DQ ONNX, evaluate it, report."""

from __future__ import annotations

import time
from copy import deepcopy
from pathlib import Path
from typing import Any

from yolocomp.commands.common import StageResult, model_name, require_data, warn_if_untrained, work_dir
from yolocomp.commands.quant_common import export_and_check, layer_refs, onnx_name, write_quant_report
from yolocomp.config import PtqConfig
from yolocomp.config.options import settings
from yolocomp.errors import UserError
from yolocomp.recipe import Recipe, stage_config

#: Calibration images the bias correction measures means on (block by block; more cost time, not accuracy).
BIAS_CORRECTION_IMAGES = 64


def calibration_paths(cfg: PtqConfig, data: Path) -> list[Path]:
    """The calibration images: ``cfg.images`` (a folder or list, no labels needed) or the data yaml's train split,
    ``cfg.calib_images`` of them spread over the sorted list."""
    from yolocomp.quant.calibrate import calibration_images, spread

    if cfg.images:
        from yolocomp.data import check_images

        if str(cfg.images).isdigit() and not Path(str(cfg.images)).exists():
            raise UserError(f"--images {cfg.images}: --images takes a folder or .txt list of images; the number of "
                            f"calibration images is --calib-images {cfg.images}")
        return spread(check_images(cfg.images), cfg.calib_images)
    return calibration_images(data, cfg.calib_images)


def mixed_plan(float_model: Any, cfg: PtqConfig, batches: list, act_bits: int, device: str) -> dict:
    """Weight bits per conv (4 or 8) under ``cfg.budget_mb``: each conv's output sensitivity to 4-bit weights, then
    the most sensitive per byte get 8 bits while the budget allows."""
    from yolocomp.quant.calibrate import calibrate
    from yolocomp.quant.convert import quantize_model
    from yolocomp.quant.sensitivity import layer_sensitivity, weight_bit_plan

    probe = deepcopy(float_model)
    quantize_model(probe, 4, act_bits, exclude=layer_refs(cfg.exclude), act_offset=cfg.act_offset)
    calibrate(probe, batches, cfg.calibrator, device=device, progress=False)
    rows = layer_sensitivity(probe, batches[: max(1, cfg.sensitivity_images // max(1, len(batches[0])))],
                             part="weight", metric=cfg.sensitivity_metric)
    return weight_bit_plan(probe, rows, cfg.budget_mb * 1e6)


def check_budget(float_model: Any, cfg: PtqConfig) -> None:
    """A weight budget below the all-4-bit size is refused before any calibration work."""
    from yolocomp.quant.sensitivity import model_weight_mb

    low = model_weight_mb(float_model, 4, exclude=layer_refs(cfg.exclude))
    if cfg.budget_mb < low:
        raise UserError(f"--budget-mb {cfg.budget_mb}: budget {cfg.budget_mb:.3f} MB is below the all-4-bit weights "
                        f"({low:.3f} MB); give at least that, or drop --budget-mb")


def ptq(model: Any, data: str | Path, out: str | Path, *, imgsz: int = 640, device: str = "cpu",
        evaluate: bool = True, evaluate_float: bool = True, config: PtqConfig | None = None, **options: Any) -> dict:
    """Post-training quantization: calibrate on ``calib_images`` images (``images``: a folder or list, else the train
    split) with ``calibrator``; optionally choose per-conv weight bits under ``budget_mb`` and learn the rounding
    and activation steps by block reconstruction (``reconstruct``); export the Q/DQ ONNX (``out/model_int8.onnx``,
    ``model_w{W}a{A}.onnx``, or ``model_mixed.onnx``) and the fake-quant model (``out/quantized.pt``, a start for
    ``qat``), evaluate the ONNX and write ``out/report.json`` (with a
    sensitivity table and a suggested plan when ``sensitivity``). ``ort=True`` also writes
    ``out/model_int8_ort.onnx``: the flavour ONNX Runtime runs fast on x86 CPUs (uint8 asymmetric activations,
    integer SiLU; not for TensorRT). ``options`` are :class:`~yolocomp.config.PtqConfig`'s."""
    from yolocomp.eval import evaluate as coco_eval
    from yolocomp.eval.metrics import ap_summary
    from yolocomp.integration import load_model, resolve_data
    from yolocomp.quant.calibrate import calibrate, image_batches
    from yolocomp.quant.convert import quantize_model

    cfg = config or stage_config("ptq", options)
    if cfg.reconstruct and cfg.bias_correction:
        raise UserError("--bias-correction with --reconstruct: the reconstruction already fits every block's output to "
                        "the float model, mean included, and shifting biases afterwards breaks that fit "
                        "(tools/README.md); drop --bias-correction")
    from yolocomp.export.ort_int8 import ORT_CALIBRATORS

    if cfg.ort and cfg.calibrator not in ORT_CALIBRATORS:
        raise UserError(f"--ort with --calibrator {cfg.calibrator}: ONNX Runtime's own calibration has no "
                        f"{cfg.calibrator}; use {', '.join(ORT_CALIBRATORS)} with --ort")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_abs = resolve_data(data, work_dir(out))
    paths = calibration_paths(cfg, data_abs)  # bad --images fail before any model work
    float_model = load_model(model).float().eval()
    if cfg.budget_mb is not None:
        check_budget(float_model, cfg)
    t0 = time.time()
    wb, ab = cfg.bit_widths()
    title = f"PTQ ({cfg.calibrator}{', reconstructed' if cfg.reconstruct else ''})"
    report: dict = {"title": title, "model": model_name(model), "data": str(data), "calibrator": cfg.calibrator,
                    "imgsz": imgsz, "calibration_source": str(cfg.images or "train split"), "settings": settings(cfg)}
    if evaluate and evaluate_float:
        report["ap_float"] = ap_summary(coco_eval(float_model, data_abs, imgsz=imgsz, device=device,
                                                  images=cfg.eval_images), extra=("backend", "images"))
    batches = list(image_batches(paths, imgsz, cfg.batch))  # held once: calibration, plan and reconstruction
    layer_bits, name = cfg.layer_bits, onnx_name(wb, ab)
    if cfg.budget_mb is not None:
        plan = mixed_plan(float_model, cfg, batches, ab, device)
        report["mixed_precision"] = plan
        from yolocomp.report import print_table

        print_table(plan["table"], f"mixed-precision plan: {plan['layers_high']} of {plan['layers']} convs at 8-bit "
                                   f"weights, {plan['weight_mb']} MB of {plan['budget_mb']} MB")
        layer_bits = {layer: (bits, ab) for layer, bits in plan["weight_bits"].items()}
        name = "model_mixed.onnx"
    qmodel = deepcopy(float_model)  # the caller's model (or our float reference) stays untouched
    # a mixed plan names every conv's bits itself
    info = quantize_model(qmodel, wb, ab, exclude=layer_refs(cfg.exclude), layer_bits=layer_bits,
                          edge_bits=cfg.edge_bits if cfg.budget_mb is None else None, act_offset=cfg.act_offset)
    seen = calibrate(qmodel, batches, cfg.calibrator, device=device)
    report.update(weight_bits=wb, act_bits=ab, calibration_images=seen, quantized_layers=len(info["quantized"]),
                  excluded=info["excluded"], edge_layers=info["edge_layers"])
    if cfg.reconstruct:
        from yolocomp.quant.reconstruct import reconstruct_quantized

        t = time.time()
        report["reconstruction"] = reconstruct_quantized(qmodel, float_model, batches, iters=cfg.recon_iters,
                                                         drop_prob=cfg.qdrop(), affine_lr=cfg.recon_affine_lr)
        report["reconstruction"]["seconds"] = round(time.time() - t, 1)
    if cfg.bias_correction:
        from yolocomp.quant.bias_correction import correct_bias

        report["bias_correction"] = correct_bias(qmodel, batches[: max(1, BIAS_CORRECTION_IMAGES // cfg.batch)],
                                                  reference=float_model)
    if cfg.sensitivity:
        from yolocomp.quant.sensitivity import layer_sensitivity, mixed_precision_plan

        probe = batches[: max(1, cfg.sensitivity_images // cfg.batch)]
        rows = layer_sensitivity(qmodel, probe, metric=cfg.sensitivity_metric)
        report["sensitivity"] = rows
        report["mixed_precision_plan"] = mixed_precision_plan(rows, min(wb, ab))
    report["quantize_seconds"] = round(time.time() - t0, 1)
    from yolocomp.integration import save_model

    # the fake-quant model itself, so `yolocomp qat --model OUT/quantized.pt` can train on from this result
    report["quantized_pt"] = str(save_model(qmodel, out / "quantized.pt", extra={"quant": {
        "weight_bits": wb, "act_bits": ab, "excluded": info["excluded"]}}))
    report.update(export_and_check(qmodel, out, name, data_abs, imgsz, device, cfg.eval_images, evaluate))
    if "ap_onnx" in report:
        report["ap"] = report["ap_onnx"]["ap"]  # the contract's number: AP of the exported file (fraction)
    if "ap_float" in report and "ap_onnx" in report:
        report["ap_drop"] = round(report["ap_float"]["ap"] - report["ap_onnx"]["ap"], 4)
    if cfg.ort:
        from yolocomp.export.ort_check import integer_ops
        from yolocomp.export.ort_int8 import export_ort_int8

        path = export_ort_int8(float_model, out / "model_int8_ort.onnx", batches, imgsz, cfg.calibrator)
        report["ort_flavour"] = {"onnx": str(path), "ort_integer_ops": integer_ops(path)}
        if evaluate:
            report["ort_flavour"]["ap_onnx"] = ap_summary(coco_eval(str(path), data_abs, imgsz=imgsz, device=device,
                                                                    images=cfg.eval_images), extra=("backend", "images"))
    report["seconds"] = round(time.time() - t0, 1)
    write_quant_report(out, report)
    return report


def run_stage(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None,
              evaluate: bool = True) -> StageResult:
    require_data(data, "PTQ (calibration)")
    if str(model).endswith(".onnx"):
        raise UserError(f"PTQ needs a float PyTorch model, got {model}; put ptq before export in the recipe")
    warn_if_untrained(model, "ptq")
    report = ptq(model, str(data), str(out), imgsz=recipe.imgsz, device=recipe.device, evaluate=evaluate,
                 config=recipe.stage("ptq"))
    onnx = sorted(out.glob("model_*.onnx"))
    if not onnx:
        raise UserError(f"PTQ wrote no model_*.onnx into {out}")
    return StageResult("ptq", str(onnx[0]), {p.stem: str(p) for p in onnx}, report)
