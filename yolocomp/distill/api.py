"""``yolocomp distill``: fine-tune a student with a frozen teacher and report AP before/after."""

from __future__ import annotations

import csv
import inspect
import time
from pathlib import Path
from typing import Any

from torch import nn

from yolocomp.distill.base import TeacherDistiller
from yolocomp.distill.fgd import FGD
from yolocomp.distill.fgfi import FineGrainedImitation
from yolocomp.distill.head_kd import HeadKD
from yolocomp.errors import UserError

#: CLI method name -> class (``none`` fine-tunes without distillation: the baseline)
METHODS: dict[str, type[TeacherDistiller] | None] = {"fgd": FGD, "fgfi": FineGrainedImitation, "logit": HeadKD, "none": None}
_ALIASES = {"head": "logit", "headkd": "logit", "head_kd": "logit", "kd": "logit"}


def make_method(
    method: str, teacher: str | Path | nn.Module, layers: list[int] | None = None, loss_weights: dict | None = None
) -> TeacherDistiller | None:
    """Build a distillation method by its CLI name; ``loss_weights`` are its keyword arguments (e.g. alpha, beta)."""
    key = _ALIASES.get(str(method).lower(), str(method).lower())
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


def _data_classes(data_yaml: Path) -> int:
    import yaml

    names = yaml.safe_load(Path(data_yaml).read_text()).get("names")
    return len(names) if names is not None else 0


def _ap(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: metrics.get(k) for k in ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar100")}


def distill(
    model: str | Path | nn.Module,
    teacher: str | Path | nn.Module,
    data: str | Path,
    out: str | Path,
    method: str = "fgd",
    epochs: int = 1,
    imgsz: int = 640,
    batch: int = 16,
    fraction: float = 1.0,
    device: str = "cpu",
    layers: list[int] | None = None,
    loss_weights: dict | None = None,
    evaluate: bool = True,
    **train_overrides: Any,
) -> dict:
    """Fine-tune ``model`` on ``data`` with ``method`` distilling from ``teacher``; write ``out/student.pt`` (a plain
    Ultralytics checkpoint: no teacher, no adapters) and ``out/report.json``; return the report."""
    from yolocomp.integration import load_model, resolve_data, save_model, train

    if epochs < 1:
        raise UserError(f"--epochs {epochs}: distillation needs at least 1 epoch")
    if not 0 < fraction <= 1:
        raise UserError(f"--fraction {fraction} is outside (0, 1]; use e.g. 0.25")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_yaml = resolve_data(data, out)
    nc = _data_classes(data_yaml)
    student = load_model(model, nc=nc if str(model).endswith((".yaml", ".yml")) else None)
    if student.model[-1].nc != nc:
        raise UserError(f"student predicts {student.model[-1].nc} classes but {data} names {nc}; use a student for these classes")
    kd = make_method(method, teacher, layers, loss_weights)
    if kd is not None:
        kd.check_compatible(student)

    from yolocomp.eval import evaluate as coco_eval

    before = coco_eval(student, data_yaml, imgsz=imgsz, device=device) if evaluate else None
    start = time.perf_counter()
    result = train(
        student,
        str(data_yaml),
        [kd] if kd is not None else [],
        project=out,
        name="train",
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        fraction=fraction,
        device=device,
        **train_overrides,
    )
    train_seconds = time.perf_counter() - start
    settings = {
        "method": method,
        "method_repr": repr(kd),
        "teacher": str(teacher) if not isinstance(teacher, nn.Module) else type(teacher).__name__,
        "student": str(model) if not isinstance(model, nn.Module) else type(model).__name__,
        "data": str(data),
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "fraction": fraction,
        "device": device,
        "layers": layers,
        "loss_weights": loss_weights or {},
        **{k: v for k, v in train_overrides.items() if isinstance(v, (str, int, float, bool, type(None)))},
    }
    student_path = save_model(result.model, out / "student.pt", extra={"distill": settings})
    after = coco_eval(student_path, data_yaml, imgsz=imgsz, device=device) if evaluate else None
    losses = read_loss_columns(result.save_dir / "results.csv")
    report = {
        "student_pt": str(student_path),
        "ap_before": _ap(before),
        "ap_after": _ap(after),
        "ap_gain": (after["ap"] - before["ap"]) if before and after else None,
        "losses": losses,
        "distill_columns": [c for c in losses if c not in {"box_loss", "cls_loss", "dfl_loss"}],
        "train_dir": str(result.save_dir),
        "train_seconds": round(train_seconds, 1),
        "settings": settings,
    }
    _write(out, report)
    return report


def _write(out: Path, report: dict) -> None:
    try:
        from yolocomp.report import write_report
    except ImportError:  # the shared report module is optional here: plain JSON is the contract
        import json

        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        return
    rows = [
        {"model": name, **(report[key] or {})}
        for name, key in (("before", "ap_before"), ("after", "ap_after"))
        if report.get(key)
    ]
    write_report(out, report, f"yolocomp distill ({report['settings']['method']})", rows=rows)
