"""What ``ptq`` and ``qat`` share: ONNX naming, the Q/DQ export with its checks, the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def onnx_name(weight_bits: int, act_bits: int) -> str:
    """model_int8.onnx for W8A8, else model_w{W}a{A}.onnx."""
    return "model_int8.onnx" if (weight_bits, act_bits) == (8, 8) else f"model_w{weight_bits}a{act_bits}.onnx"


def layer_refs(exclude: list) -> list:
    """Exclusions as quantize_model takes them: digit strings from the command line become layer indices."""
    return [int(x) if isinstance(x, str) and x.isdigit() else x for x in exclude]


def export_and_check(model: Any, out: Path, name: str, data: Path, imgsz: int, device: str, eval_images: int | None,
                     evaluate: bool = True) -> dict:
    """Q/DQ ONNX export, its placement lint, the integer ops ONNX Runtime sees, and its AP (when ``evaluate``)."""
    from yolocomp.eval.metrics import ap_summary
    from yolocomp.export.lint import lint_qdq
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.export.ort_check import integer_ops

    info: dict = {}
    path = export_onnx(model, out / name, imgsz=imgsz, info=info)
    findings = lint_qdq(path)
    result = {"onnx": str(path), "export": info, "lint": [str(f) for f in findings], "ort_integer_ops": integer_ops(path)}
    if evaluate:
        from yolocomp.eval import evaluate as coco_eval

        result["ap_onnx"] = ap_summary(coco_eval(str(path), data, imgsz=imgsz, device=device, images=eval_images),
                                       extra=("backend", "images"))
    return result


def write_quant_report(out: Path, report: dict) -> Path:
    from yolocomp.report import write_report

    rows = [{"model": k, **v} for k, v in report.items() if k.startswith("ap_") and isinstance(v, dict)]
    return write_report(out, report, report.get("title", "quantization"), rows)[0]
