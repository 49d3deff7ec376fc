"""``yolocomp distill``: fine-tune a student with a frozen teacher and report AP before/after."""

from __future__ import annotations

import csv
import inspect
import time
from pathlib import Path
from typing import Any

from torch import nn

from yolocomp.commands.common import (
    StageResult,
    data_classes,
    kd_training_data,
    require_data,
    warn_if_untrained,
    work_dir,
)
from yolocomp.config import DistillConfig
from yolocomp.config.options import settings
from yolocomp.distill.base import TeacherDistiller
from yolocomp.distill.block_kd import BlockKD
from yolocomp.distill.fgd import FGD
from yolocomp.distill.fgfi import FineGrainedImitation
from yolocomp.distill.frozen_bn import FrozenBatchNorm
from yolocomp.distill.head_kd import HeadKD
from yolocomp.errors import UserError
from yolocomp.recipe import Recipe, stage_config

#: method name (yolocomp.config.DISTILL_METHODS) -> class; ``none`` fine-tunes without distillation: the baseline
METHODS: dict[str, type[TeacherDistiller] | None] = {"block": BlockKD, "fgd": FGD, "fgfi": FineGrainedImitation, "logit": HeadKD, "none": None}


def make_method(
    method: str, teacher: str | Path | nn.Module, layers: list[int] | None = None, loss_weights: dict | None = None
) -> TeacherDistiller | None:
    """Build a distillation method by its name; ``loss_weights`` are its keyword arguments (e.g. alpha, beta)."""
    key = str(method).lower()
    if key not in METHODS:
        raise UserError(f"unknown distillation method '{method}'; use one of {', '.join(METHODS)}")
    cls = METHODS[key]
    if cls is None:
        return None
    kwargs = dict(loss_weights or {})
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in {"self", "teacher", "layers", "teacher_layers"}]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(f"{key} does not take {', '.join(unknown)}; its settings are {', '.join(allowed)}")
    if "layers" in inspect.signature(cls.__init__).parameters:
        kwargs["layers"] = layers
    elif layers:
        raise UserError(f"{key} distils head outputs and takes no feature layers; drop --layers")
    return cls(teacher, **kwargs)


def read_loss_columns(results_csv: Path) -> dict[str, list[float]]:
    """Per-epoch values of every ``train/*`` column in Ultralytics' results.csv."""
    if not results_csv.exists():
        return {}
    with results_csv.open() as f:
        rows = [{k.strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("train/")]
    return {c.split("/", 1)[1]: [float(r[c]) for r in rows if r.get(c) not in (None, "")] for c in columns}


def distill(
    model: str | Path | nn.Module,
    teacher: str | Path | nn.Module,
    data: str | Path,
    out: str | Path,
    *,
    imgsz: int = 640,
    device: str = "cpu",
    evaluate: bool = True,
    config: DistillConfig | None = None,
    **options: Any,
) -> dict:
    """Fine-tune ``model`` on ``data`` with ``method`` distilling from ``teacher``; write ``out/student.pt`` (a plain
    Ultralytics checkpoint: no teacher, no adapters) and ``out/report.json``; return the report. ``options`` are
    :class:`~yolocomp.config.DistillConfig`'s."""
    from yolocomp.eval.metrics import ap_summary
    from yolocomp.integration import load_model, resolve_data, save_model, train

    cfg = config or stage_config("distill", options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_yaml = resolve_data(data, work_dir(out))
    nc = data_classes(data_yaml)
    student = load_model(model, nc=nc if str(model).endswith((".yaml", ".yml")) else None)
    if student.model[-1].nc != nc:
        raise UserError(f"student predicts {student.model[-1].nc} classes but {data} names {nc}; use a student for these classes")
    kd = make_method(cfg.method, teacher, cfg.layers, cfg.loss_weights)
    if kd is not None:
        kd.check_compatible(student)

    from yolocomp.eval import evaluate as coco_eval

    before = coco_eval(student, data_yaml, imgsz=imgsz, device=device) if evaluate else None
    data_record: dict = {}
    train_yaml, overrides = kd_training_data(cfg, str(data_yaml), teacher, work_dir(out), imgsz, device, data_record)
    start = time.perf_counter()
    methods = [*([kd] if kd is not None else []), *([FrozenBatchNorm()] if cfg.freeze_bn else [])]
    result = train(student, train_yaml, methods, project=out, name="train",
                   epochs=cfg.epochs, imgsz=imgsz, device=device, **{**cfg.trainer_overrides(), **overrides})
    train_seconds = time.perf_counter() - start
    report_settings = {
        **settings(cfg),
        "method_repr": repr(kd),
        "teacher": str(teacher) if not isinstance(teacher, nn.Module) else type(teacher).__name__,
        "student": str(model) if not isinstance(model, nn.Module) else type(model).__name__,
        "data": str(data),
        "imgsz": imgsz,
        "device": device,
    }
    student_path = save_model(result.model, out / "student.pt", extra={"distill": report_settings})
    after = coco_eval(student_path, data_yaml, imgsz=imgsz, device=device) if evaluate else None
    losses = read_loss_columns(result.save_dir / "results.csv")
    report = {
        "student_pt": str(student_path),
        "ap_before": ap_summary(before),
        "ap_after": ap_summary(after),
        "ap_gain": (after["ap"] - before["ap"]) if before and after else None,
        "losses": losses,
        "distill_columns": [c for c in losses if c not in {"box_loss", "cls_loss", "dfl_loss"}],
        "train_dir": str(result.save_dir),
        "train_seconds": round(train_seconds, 1),
        "training_data": data_record or {"labelled": str(data)},
        "settings": report_settings,
    }
    _write(out, report)
    return report


def _write(out: Path, report: dict) -> None:
    from yolocomp.report import write_report

    rows = [
        {"model": name, **(report[key] or {})}
        for name, key in (("before", "ap_before"), ("after", "ap_after"))
        if report.get(key)
    ]
    write_report(out, report, f"yolocomp distill ({report['settings']['method']})", rows=rows)


def run_stage(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None,
              evaluate: bool = True) -> StageResult:
    cfg = recipe.stage("distill")
    teacher = cfg.teacher or reference
    if not teacher:
        raise UserError("distillation needs a teacher: pass --teacher path/to/teacher.pt (or stages.distill.teacher)")
    require_data(data, "distillation")
    warn_if_untrained(model, "distill")
    report = distill(model, teacher, str(data), str(out), imgsz=recipe.imgsz, device=recipe.device, evaluate=evaluate,
                     config=cfg)
    return StageResult("distill", str(out / "student.pt"), {"student": str(out / "student.pt")}, report)
