"""`yolocomp run`: chain a recipe's stages in one run folder, resumably, and report every stage's model.

Layout of a run folder::

    data/                 (synthetic data set, when the recipe asks for it)
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
from pathlib import Path
from typing import Any

from yolocomp.api import require, resolve_data
from yolocomp.errors import UserError
from yolocomp.integration import resume_interrupted
from yolocomp.recipe import BRANCH_STAGES, MODEL_STAGES, Recipe
from yolocomp.report import pareto_plot, print_table, write_json, write_report
from yolocomp.stages import RUNNERS, StageResult

REPORT_COLUMNS = ("stage", "model", "ap", "ap50", "ap75", "params_m", "gflops", "latency_ms", "size_mb")


def run(recipe: Recipe, out: str | Path | None = None) -> dict:
    """Run every stage of ``recipe`` that is built, then measure each stage's model and write the report."""
    run_dir = Path(out or recipe.out or Path("runs") / "yolocomp" / Path(recipe.source).stem)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "recipe.json", recipe.to_dict())
    data = resolve_data(recipe, run_dir)
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
            # a stage whose method is missing raises NotBuiltError: the run stops with exit 2 (finished stages
            # keep their markers), rather than reporting a pipeline that silently left a stage out
            with resume_interrupted():  # an interrupted training inside the stage continues from last.pt
                result: StageResult = RUNNERS[name](recipe, current, stage_dir, data, reference)
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
    report["settings"] = {"imgsz": recipe.imgsz, "device": recipe.device, "eval": recipe.stage("eval"), "bench": recipe.stage("bench")}
    write_report(run_dir, report, f"yolocomp run — {recipe.source}", rows=[{c: r.get(c) for c in REPORT_COLUMNS} for r in rows])
    if any(r.get("ap") is not None for r in rows):
        pareto_plot(rows, run_dir / "pareto.png", title=f"{Path(recipe.source).stem}: AP vs latency / size")
    print_table(rows, f"yolocomp run — {run_dir}", REPORT_COLUMNS)
    return report


def _initial_model(recipe: Recipe) -> str:
    return str(recipe.model)


def _measure(recipe: Recipe, records: list[dict], run_dir: Path, data: Path | None) -> list[dict]:
    """AP (cached per artifact under ``metrics/``), parameters, GFLOPs and latency of every stage artifact."""
    ev = require("yolocomp.eval", "evaluation")
    bench_mod = require("yolocomp.eval.bench", "benchmarking")
    from tqdm import tqdm

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
            result = ev.evaluate(
                str(path), str(data), imgsz=recipe.imgsz, device=recipe.device, conf=e_cfg["conf"], iou=e_cfg["iou"],
                max_det=e_cfg["max_det"], images=e_cfg["images"], batch=e_cfg["batch"], progress=False,
            )
            row.update({k: result.get(k) for k in ("ap", "ap50", "ap75")})
        write_json(cache, row)
        rows.append(row)
    if rows:
        # Every stage's model timed in one process, interleaved, so the latencies compare side by side.
        timing = bench_mod.bench(
            [r["model"] for r in rows], imgsz=recipe.imgsz, device=recipe.device, batch_sizes=tuple(b_cfg["batch_sizes"]),
            runs=b_cfg["runs"], warmup=b_cfg["warmup"], threads=b_cfg["threads"],
        )
        for row, stats in zip(rows, timing["models"]):
            row["params"] = stats.get("params")
            row["params_m"] = stats["params"] / 1e6 if stats.get("params") else None
            row["gflops"] = stats.get("gflops")
            row["latency_ms"] = (stats.get("latency_ms") or {}).get("p50")
            row["size_mb"] = stats.get("size_mb")
    return rows
