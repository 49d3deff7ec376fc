"""`yolocomp run`: chain a recipe's stages in one run folder, resumably, and report every stage's model.

Layout of a run folder::

    work/                 working files: the absolute-path data yaml, the synthetic data set when asked for
    (a .pt input model is measured first as "baseline"; it gets no folder)
    01_train/  02_prune/  03_distill/ ...   one folder per stage, in the order of recipe.MODEL_STAGES
        stage.json        written last: a stage with this file is finished and skipped on re-run
    report.json  report.md  pareto.png

A stage without ``stage.json`` was interrupted; it runs again in its folder, and every Ultralytics training inside it
(base training, sparsity / attention training, fine-tune, distillation, QAT) resumes from its own unfinished
``last.pt``. Finished stages are never overwritten.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from yolocomp.commands import STAGE_RUNNERS
from yolocomp.commands.common import (
    StageResult,
    ensure_weights,
    recipe_data,
    resolve_device,
    restore_on_error,
    work_dir,
)
from yolocomp.config.options import settings
from yolocomp.errors import StageInterrupted, UserError
from yolocomp.integration import resume_interrupted
from yolocomp.recipe import BRANCH_STAGES, MODEL_STAGES, Recipe
from yolocomp.report import pareto_plot, print_table, write_json, write_report

REPORT_COLUMNS = ("stage", "runtime", "model", "ap", "ap50", "ap75", "params_m", "gflops", "latency_ms", "size_mb")


def run(recipe: Recipe, out: str | Path | None = None) -> dict:
    """Run every stage of ``recipe``, then measure each stage's model once and write the report.

    Bad input leaves the run folder as it was (finished stages stay); Ctrl-C raises :class:`StageInterrupted`
    naming the stage, whose training the same call resumes."""
    run_dir = Path(out or recipe.out or Path("runs") / "yolocomp" / Path(recipe.source).stem)
    recipe = replace(recipe, device=resolve_device(recipe.device))
    with restore_on_error(run_dir, keep=_in_finished_stage):
        ensure_weights(str(recipe.model), "--model")
        return _run(recipe, run_dir)


def _in_finished_stage(path: Path) -> bool:
    return any((parent / "stage.json").exists() for parent in (path, *path.parents))


def _run(recipe: Recipe, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "recipe.json", recipe.to_dict())
    data = recipe_data(recipe, work_dir(run_dir))
    stages = [name for name in MODEL_STAGES if name in recipe.stages]
    if not stages and not any(name in recipe.stages for name in ("eval", "bench")):
        raise UserError(f"{recipe.source}: no stages to run; add e.g. stages: {{prune: {{ratio: 0.3}}}}")

    current = _initial_model(recipe)
    reference = current if current.endswith(".pt") else None  # teacher for distillation: the uncompressed model
    records: list[dict[str, Any]] = []
    if current.endswith(".pt"):
        records.append({"stage": "baseline", "artifacts": {"input": current}, "status": "done"})
    for index, name in enumerate(stages, start=1):
        stage_dir = run_dir / f"{index:02d}_{name}"
        marker = stage_dir / "stage.json"
        if marker.exists():
            record = json.loads(marker.read_text())
            print(f"[yolocomp run] {name}: finished earlier, skipped ({stage_dir})", flush=True)
        else:
            print(f"[yolocomp run] {name}: running in {stage_dir}", flush=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            started = time.time()
            # stages do not evaluate their own models here: the run measures every artifact once, below
            try:
                with resume_interrupted():  # an interrupted training inside the stage continues from last.pt
                    result: StageResult = STAGE_RUNNERS[name](recipe, current, stage_dir, data, reference,
                                                              evaluate=False)
            except KeyboardInterrupt:
                raise StageInterrupted(name) from None
            record = {
                "stage": name,
                "status": "done",
                "seconds": round(time.time() - started, 1),
                "next_model": result.next_model,
                "artifacts": result.artifacts,
                "report": result.report,
            }
            write_json(marker, record)
        records.append(record)
        if name not in BRANCH_STAGES:
            current = record["next_model"]
        if name == "train":
            reference = current

    rows = _measure(recipe, records, run_dir, data)
    report = {"run_dir": str(run_dir), "recipe": recipe.to_dict(), "stages": records, "models": rows}
    report["settings"] = {"imgsz": recipe.imgsz, "device": recipe.device, "eval": settings(recipe.stage("eval")),
                          "bench": settings(recipe.stage("bench"))}
    write_report(run_dir, report, f"yolocomp run — {recipe.source}", rows=[{c: r.get(c) for c in REPORT_COLUMNS} for r in rows])
    if any(r.get("ap") is not None for r in rows):
        pareto_plot(rows, run_dir / "pareto.png", title=f"{Path(recipe.source).stem}: AP vs latency / size")
    print_table(rows, f"yolocomp run — {run_dir}", REPORT_COLUMNS)
    return report


def _initial_model(recipe: Recipe) -> str:
    return str(recipe.model)


def _measure(recipe: Recipe, records: list[dict], run_dir: Path, data: Path | None) -> list[dict]:
    """AP (cached per artifact under ``metrics/``), parameters, GFLOPs and latency of every stage artifact."""
    from tqdm import tqdm

    from yolocomp.eval import evaluate
    from yolocomp.eval.bench import bench

    e_cfg, b_cfg = recipe.stage("eval"), recipe.stage("bench")
    rows = []
    todo = [
        (record, label, path)
        for record in records
        for label, path in record.get("artifacts", {}).items()
        if str(path).endswith((".pt", ".onnx", ".engine")) and Path(path).exists()
    ]
    for record, label, path in tqdm(todo, desc="evaluating stage models", unit="model"):
        cache = run_dir / "metrics" / f"{record['stage']}_{label}.json"
        if cache.exists():
            rows.append(json.loads(cache.read_text()))
            continue
        row: dict[str, Any] = {"stage": f"{record['stage']}/{label}", "model": str(path)}
        if data is not None:
            result = evaluate(str(path), str(data), imgsz=recipe.imgsz, device=recipe.device, progress=False,
                              **settings(e_cfg))
            row.update({k: result.get(k) for k in ("ap", "ap50", "ap75")})
        write_json(cache, row)
        rows.append(row)
    if b_cfg.openvino and recipe.device == "cpu":
        rows += _openvino_rows(recipe, records, run_dir, data, settings(e_cfg))
    if rows:
        # Every stage's model timed in one process, interleaved, so the latencies compare side by side.
        timing = bench([r["model"] for r in rows], imgsz=recipe.imgsz, device=recipe.device,
                       batch_sizes=tuple(b_cfg.batch_sizes), runs=b_cfg.runs, warmup=b_cfg.warmup, threads=b_cfg.threads)
        for row, stats in zip(rows, timing["models"]):
            row["runtime"] = stats.get("backend")
            row["params"] = stats.get("params")
            row["params_m"] = stats["params"] / 1e6 if stats.get("params") else None
            row["gflops"] = stats.get("gflops")
            row["latency_ms"] = (stats.get("latency_ms") or {}).get("p50")
            row["size_mb"] = stats.get("size_mb")
    return rows


def _openvino_rows(recipe: Recipe, records: list[dict], run_dir: Path, data: Path | None, eval_settings: dict) -> list[dict]:
    """Every stage's deliverable converted to OpenVINO (its ONNX when the stage wrote one, else its .pt) and
    evaluated there, so the report compares runtimes side by side; nothing when OpenVINO is not installed."""
    from yolocomp.eval import evaluate
    from yolocomp.eval.runners.openvino import openvino_version
    from yolocomp.export.openvino import export_openvino

    if openvino_version() is None:
        return []
    rows = []
    for record in records:
        artifacts = {k: v for k, v in record.get("artifacts", {}).items() if Path(v).exists()}
        onnx = {k: v for k, v in artifacts.items() if v.endswith(".onnx")}
        for label, path in (onnx or {k: v for k, v in artifacts.items() if v.endswith(".pt")}).items():
            cache = run_dir / "metrics" / f"{record['stage']}_{label}_openvino.json"
            if cache.exists():
                rows.append(json.loads(cache.read_text()))
                continue
            row: dict[str, Any] = {"stage": f"{record['stage']}/{label} (openvino)"}
            try:
                folder = export_openvino(path, work_dir(run_dir) / "openvino", imgsz=recipe.imgsz,
                                         stem=f"{record['stage']}_{label}")
            except UserError as e:  # a model OpenVINO cannot take stays measured in its own runtime
                print(f"[yolocomp run] {row['stage']}: not measured in OpenVINO ({e})", flush=True)
                continue
            row["model"] = str(folder)
            if data is not None:
                result = evaluate(str(folder), str(data), imgsz=recipe.imgsz, device="cpu", progress=False,
                                  **eval_settings)
                row.update({k: result.get(k) for k in ("ap", "ap50", "ap75")})
            write_json(cache, row)
            rows.append(row)
    return rows
