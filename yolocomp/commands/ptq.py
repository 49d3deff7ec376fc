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


def ptq(model: Any, data: str | Path, out: str | Path, *, imgsz: int = 640, device: str = "cpu",
        evaluate: bool = True, evaluate_float: bool = True, config: PtqConfig | None = None, **options: Any) -> dict:
    """Post-training quantization: calibrate on ``images`` train images with ``calibrator``, export
    ``out/model_int8.onnx`` (Q/DQ), evaluate it, write ``out/report.json`` (with a sensitivity table and a suggested
    mixed-precision plan when ``sensitivity``). ``ort=True`` also writes ``out/model_int8_ort.onnx``: the flavour
    ONNX Runtime runs fast on x86 CPUs (uint8 asymmetric activations, integer SiLU; not for TensorRT).
    ``options`` are :class:`~yolocomp.config.PtqConfig`'s."""
    from yolocomp.eval import evaluate as coco_eval
    from yolocomp.eval.metrics import ap_summary
    from yolocomp.integration import load_model, resolve_data
    from yolocomp.quant.calibrate import calibrate, calibration_images, image_batches
    from yolocomp.quant.convert import quantize_model

    cfg = config or stage_config("ptq", options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_abs = resolve_data(data, work_dir(out))
    float_model = load_model(model).float().eval()
    t0 = time.time()
    wb, ab = cfg.bit_widths()
    report: dict = {"title": f"PTQ ({cfg.calibrator})", "model": model_name(model), "data": str(data),
                    "calibrator": cfg.calibrator, "imgsz": imgsz, "settings": settings(cfg)}
    if evaluate and evaluate_float:
        report["ap_float"] = ap_summary(coco_eval(float_model, data_abs, imgsz=imgsz, device=device,
                                                  images=cfg.eval_images), extra=("backend", "images"))
    qmodel = deepcopy(float_model)  # the caller's model (or our float reference) stays untouched
    info = quantize_model(qmodel, wb, ab, exclude=layer_refs(cfg.exclude), layer_bits=cfg.layer_bits)
    paths = calibration_images(data_abs, cfg.images)
    seen = calibrate(qmodel, image_batches(paths, imgsz, cfg.batch), cfg.calibrator, device=device)
    report.update(weight_bits=wb, act_bits=ab, calibration_images=seen, quantized_layers=len(info["quantized"]),
                  excluded=info["excluded"])
    if cfg.sensitivity:
        from yolocomp.quant.sensitivity import layer_sensitivity, mixed_precision_plan

        probe = list(image_batches(paths[: max(1, min(cfg.sensitivity_images, len(paths)))], imgsz, cfg.batch))
        rows = layer_sensitivity(qmodel, probe)
        report["sensitivity"] = rows
        report["mixed_precision_plan"] = mixed_precision_plan(rows, min(wb, ab))
    report.update(export_and_check(qmodel, out, onnx_name(wb, ab), data_abs, imgsz, device, cfg.eval_images, evaluate))
    if "ap_float" in report and "ap_onnx" in report:
        report["ap_drop"] = round(report["ap_float"]["ap"] - report["ap_onnx"]["ap"], 4)
    if cfg.ort:
        from yolocomp.export.ort_check import integer_ops
        from yolocomp.export.ort_int8 import export_ort_int8

        path = export_ort_int8(float_model, out / "model_int8_ort.onnx", image_batches(paths, imgsz, cfg.batch), imgsz,
                               cfg.calibrator)
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
