"""Stage runners: one function per model-producing stage, shared by the single-stage CLI commands and `yolocomp run`.

Every runner takes the same inputs (recipe, input model path, output folder, data yaml, reference model) and returns
a :class:`StageResult` naming the artifacts it wrote; the next stage consumes ``result.next_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolocomp.api import load_model, require
from yolocomp.errors import UserError
from yolocomp.recipe import Recipe

_TRAIN_KEYS = ("epochs", "batch", "fraction", "lr0", "workers", "optimizer")


@dataclass
class StageResult:
    stage: str
    next_model: str  #: what the following stage consumes
    artifacts: dict[str, str] = field(default_factory=dict)  #: label -> path of every model to evaluate
    report: dict = field(default_factory=dict)


def _train_overrides(settings: dict) -> dict:
    out = {k: settings[k] for k in _TRAIN_KEYS if k in settings and settings[k] is not None}
    out.pop("epochs", None)
    return out


def stage_train(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None) -> StageResult:
    """Plain Ultralytics training (the demo's base model, or a warm-up before compression)."""
    from yolocomp.integration import save_model, train

    if data is None:
        raise UserError("stage train needs data: set data: in the recipe or pass --data")
    s = recipe.stage("train")
    overrides = {"epochs": s["epochs"], "imgsz": recipe.imgsz, "device": recipe.device, **_train_overrides(s)}
    net = load_model(_with_model(recipe, model), data)
    result = train(net, str(data), [], project=out, name="train", **overrides)
    path = save_model(result.model, out / "model.pt")
    return StageResult("train", str(path), {"trained": str(path)}, {"metrics": result.metrics})


def _with_model(recipe: Recipe, model: str) -> Recipe:
    from dataclasses import replace

    return replace(recipe, model=model)


def stage_prune(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None) -> StageResult:
    prune_api = require("yolocomp.prune.api", "pruning")
    s = recipe.stage("prune")
    needs_training = s["sparsity_epochs"] > 0 or s["finetune_epochs"] > 0 or s["method"] == "cap"
    if needs_training and data is None:
        raise UserError("pruning with sparsity/attention training or fine-tuning needs data: pass --data")
    report = prune_api.prune(
        model=model,
        out=str(out),
        data=str(data) if data else None,
        method=s["method"],
        ratio=None if s["flops_reduction"] is not None else s["ratio"],
        flops_reduction=s["flops_reduction"],
        sparsity_epochs=s["sparsity_epochs"],
        finetune_epochs=s["finetune_epochs"],
        s=s["s"],
        s_schedule=s["s_schedule"],
        imgsz=recipe.imgsz,
        device=recipe.device,
        min_channels=s["min_channels"],
        round_to=s["round_to"],
        ignore=tuple(s["ignore"]),
        evaluate=False,
        latency=False,  # the run measures every stage's model itself
        **_train_overrides(s),
    )
    artifacts = {"pruned": str(out / "pruned.pt")}
    if (out / "finetuned.pt").exists():
        artifacts["finetuned"] = str(out / "finetuned.pt")
    return StageResult("prune", list(artifacts.values())[-1], artifacts, report)


def stage_distill(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None) -> StageResult:
    distill_api = require("yolocomp.distill.api", "distillation")
    s = recipe.stage("distill")
    teacher = s["teacher"] or reference
    if not teacher:
        raise UserError("distillation needs a teacher: pass --teacher path/to/teacher.pt (or stages.distill.teacher)")
    if data is None:
        raise UserError("distillation needs data: pass --data path/to/data.yaml")
    report = distill_api.distill(
        model=model,
        teacher=teacher,
        data=str(data),
        out=str(out),
        method=s["method"],
        epochs=s["epochs"],
        imgsz=recipe.imgsz,
        device=recipe.device,
        layers=s["layers"],
        evaluate=False,
        **_train_overrides(s),
    )
    return StageResult("distill", str(out / "student.pt"), {"student": str(out / "student.pt")}, report)


def stage_qat(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None) -> StageResult:
    quant_api = require("yolocomp.quant.api", "quantization-aware training")
    s = recipe.stage("qat")
    if data is None:
        raise UserError("QAT needs data: pass --data path/to/data.yaml")
    report = quant_api.qat(
        model=model,
        data=str(data),
        out=str(out),
        bits=s["bits"],
        epochs=s["epochs"],
        imgsz=recipe.imgsz,
        device=recipe.device,
        export=s["export"],
        exclude=tuple(s["exclude"]),
        **_train_overrides(s),
    )
    artifacts = {"qat": str(out / "qat.pt")}
    artifacts.update({p.stem: str(p) for p in sorted(out.glob("model_*.onnx"))})
    return StageResult("qat", str(out / "qat.pt"), artifacts, report)


def stage_ptq(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None) -> StageResult:
    quant_api = require("yolocomp.quant.api", "post-training quantization")
    s = recipe.stage("ptq")
    if data is None:
        raise UserError("PTQ needs calibration data: pass --data path/to/data.yaml")
    if str(model).endswith(".onnx"):
        raise UserError(f"PTQ needs a float PyTorch model, got {model}; put ptq before export in the recipe")
    report = quant_api.ptq(
        model=model,
        data=str(data),
        out=str(out),
        calibrator=s["calibrator"],
        images=s["images"],
        imgsz=recipe.imgsz,
        bits=s["bits"],
        sensitivity=s["sensitivity"],
        device=recipe.device,
        ort=s["ort"],
    )
    onnx = sorted(out.glob("model_*.onnx"))
    if not onnx:
        raise UserError(f"PTQ wrote no model_*.onnx into {out}")
    return StageResult("ptq", str(onnx[0]), {p.stem: str(p) for p in onnx}, report)


def stage_export(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None) -> StageResult:
    s = recipe.stage("export")
    report: dict[str, Any] = {}
    if str(model).endswith(".onnx"):
        onnx = Path(model)
    else:
        onnx_mod = require("yolocomp.export.onnx_qdq", "ONNX export")
        net = load_model(_with_model(recipe, model), data)
        onnx = Path(onnx_mod.export_onnx(net, out / "model.onnx", imgsz=recipe.imgsz))
    artifacts = {"onnx": str(onnx)}
    if s["check"]:
        lint = require("yolocomp.export.lint", "the Q/DQ placement check")
        findings = lint.lint_qdq(onnx)
        print(lint.format_findings(findings, onnx), flush=True)
        report["check"] = [{"node": f.node, "rule": f.rule, "message": f.message, "severity": f.severity} for f in findings]
    if s["format"] == "engine":
        trt = require("yolocomp.export.tensorrt", "TensorRT export")
        report["engine"] = trt.export_engine(
            str(onnx), out=str(out / f"{onnx.stem}.engine"), precision=s["precision"], imgsz=recipe.imgsz,
            dla_core=s["dla_core"], calibration_data=s["calibration_data"], calibration_cache=s["calibration_cache"],
        )
        artifacts["engine"] = str(report["engine"].get("engine", out / f"{onnx.stem}.engine"))
    return StageResult("export", artifacts.get("engine", str(onnx)), artifacts, report)


RUNNERS: dict[str, Callable[..., StageResult]] = {
    "train": stage_train,
    "prune": stage_prune,
    "distill": stage_distill,
    "qat": stage_qat,
    "ptq": stage_ptq,
    "export": stage_export,
}
