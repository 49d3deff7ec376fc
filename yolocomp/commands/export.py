"""``yolocomp export``: ONNX (Q/DQ for quantized models), the Q/DQ placement lint, TensorRT engines, OpenVINO IR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yolocomp.commands.common import StageResult, load_recipe_model, with_model
from yolocomp.recipe import Recipe


def run_stage(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None,
              evaluate: bool = True) -> StageResult:
    cfg = recipe.stage("export")
    report: dict[str, Any] = {}
    if cfg.format == "engine":  # before writing anything: a missing TensorRT must not leave an ONNX behind
        from yolocomp.export.tensorrt import import_tensorrt

        import_tensorrt()
    if cfg.format == "openvino":  # the same for a missing OpenVINO
        from yolocomp.export.openvino import import_openvino

        import_openvino()
    if str(model).endswith(".onnx"):
        onnx = Path(model)
    else:
        from yolocomp.export.onnx_qdq import export_onnx

        net = load_recipe_model(with_model(recipe, model), data)
        onnx = Path(export_onnx(net, out / "model.onnx", imgsz=recipe.imgsz, dynamic=cfg.dynamic))
    artifacts = {"onnx": str(onnx)}
    if cfg.check:
        from yolocomp.export.lint import format_findings, lint_qdq

        findings = lint_qdq(onnx)
        print(format_findings(findings, onnx), flush=True)
        report["check"] = [{"node": f.node, "rule": f.rule, "message": f.message, "severity": f.severity} for f in findings]
    if cfg.format == "engine":
        from yolocomp.export.tensorrt import export_engine

        report["engine"] = export_engine(
            str(onnx), out=str(out / f"{onnx.stem}.engine"), precision=cfg.precision, imgsz=recipe.imgsz,
            dla_core=cfg.dla_core, calibration_data=cfg.calibration_data, calibration_cache=cfg.calibration_cache,
        )
        artifacts["engine"] = str(report["engine"].get("engine", out / f"{onnx.stem}.engine"))
    if cfg.format == "openvino":
        from yolocomp.export.openvino import export_openvino

        stem = onnx.stem if str(model).endswith(".onnx") else Path(str(model)).stem
        info: dict[str, Any] = {}
        folder = export_openvino(onnx, out, imgsz=recipe.imgsz, precision=cfg.precision, stem=stem, info=info)
        report["openvino"] = info
        artifacts["openvino"] = str(folder)
        artifacts["openvino_weights"] = str(Path(info["xml"]).with_suffix(".bin"))
        return StageResult("export", str(folder), artifacts, report)
    return StageResult("export", artifacts.get("engine", str(onnx)), artifacts, report)
