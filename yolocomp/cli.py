"""`yolocomp` command line: argument parsing only; every subcommand calls one function and prints a summary table.

Exit codes: 0 success, 2 bad input or a method not built yet (one line on stderr), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yolocomp.errors import NotBuiltError, UserError


def _common(p: argparse.ArgumentParser, model: bool = True, data: bool = True) -> None:
    if model:
        p.add_argument("--cfg", help="recipe yaml (configs/*.yaml) or a plain Ultralytics model yaml")
        p.add_argument("--model", help="model: .pt checkpoint or Ultralytics model yaml (replaces --cfg)")
    if data:
        p.add_argument("--data", help="Ultralytics data yaml ('synthetic' = built-in demo set)")
    p.add_argument("--imgsz", type=int, help="image size (default: recipe's, else 640)")
    p.add_argument("--device", help="cpu, 0 or cuda:0 (default cpu)")
    p.add_argument("--out", help="output folder (nothing outside it is written)")


def _training(p: argparse.ArgumentParser, epochs_flag: bool = True) -> None:
    if epochs_flag:
        p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--batch", type=int, help="batch size")
    p.add_argument("--fraction", type=float, help="share of the train set to use, e.g. 0.25")
    p.add_argument("--lr0", type=float, help="initial learning rate")
    p.add_argument("--workers", type=int, help="dataloader workers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolocomp", description="Compress Ultralytics YOLO detectors.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("prune", help="structured pruning (BN-γ slimming, CAP, L1, random)")
    _common(p)
    p.add_argument("--method", choices=["bn", "cap", "l1", "random"])
    target = p.add_mutually_exclusive_group()
    target.add_argument("--ratio", type=float, help="share of prunable channels to remove, in (0, 1)")
    target.add_argument("--flops-reduction", type=float, help="share of GFLOPs to remove, in (0, 1)")
    p.add_argument("--weights", help="start from these weights (overrides the recipe's model)")
    p.add_argument("--sparsity-epochs", type=int, help="BN-γ sparsity / CAP attention training epochs (0 = skip)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tune epochs after pruning (0 = skip)")
    p.add_argument("--s", type=float, help="L1 sparsity strength on BN γ")
    _training(p, epochs_flag=False)

    p = sub.add_parser("distill", help="knowledge distillation from a teacher (FGD, fine-grained imitation, logit)")
    _common(p)
    p.add_argument("--teacher", help="teacher checkpoint (.pt) with the same classes")
    p.add_argument("--method", choices=["fgd", "fgfi", "logit"])
    _training(p)

    p = sub.add_parser("qat", help="quantization-aware training, INT8 / INT4, heads included")
    _common(p)
    p.add_argument("--bits", type=int, help="4 or 8")
    p.add_argument("--export", action="store_true", default=None, help="also write the Q/DQ ONNX")
    _training(p)

    p = sub.add_parser("ptq", help="post-training quantization with calibration")
    _common(p)
    p.add_argument("--calibrator", choices=["minmax", "percentile", "entropy", "mse"])
    p.add_argument("--images", type=int, help="calibration images (default 256)")
    p.add_argument("--bits", type=int, help="4 or 8")
    p.add_argument("--sensitivity", action="store_true", default=None, help="per-layer sensitivity analysis")
    p.add_argument("--ort", action="store_true", default=None,
                   help="also write model_int8_ort.onnx: integer conv+SiLU chains for ONNX Runtime CPU (not for TensorRT)")

    p = sub.add_parser("export", help="export to ONNX (Q/DQ for quantized models) or a TensorRT engine")
    _common(p, data=True)
    p.add_argument("--format", choices=["onnx", "engine"])
    p.add_argument("--check", action="store_true", default=None, help="lint Q/DQ placement for TensorRT")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "int8"])
    p.add_argument("--dla-core", type=int, help="TensorRT: run on this DLA core (Jetson), GPU fallback")
    p.add_argument("--calibration-data", help="TensorRT <= 10, float ONNX + int8: folder of calibration images")
    p.add_argument("--calibration-cache", help="TensorRT: calibration cache to reuse (or write)")

    p = sub.add_parser("eval", help="COCO AP / AP50 / AP75 with pycocotools (PyTorch, ONNX Runtime, TensorRT)")
    p.add_argument("--model", required=True, help=".pt, .onnx or .engine")
    p.add_argument("--data", required=True, help="Ultralytics data yaml")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write every figure and the settings to this JSON file")
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.7)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--images", type=int, help="evaluate only the first N images")
    p.add_argument("--batch", type=int, default=8)

    p = sub.add_parser("bench", help="latency p50/p90/p99 and FPS, params, GFLOPs, size")
    p.add_argument("--model", required=True, help=".pt, .onnx or .engine")
    p.add_argument("--compare", nargs="+", default=[], help="more models timed in the same process, interleaved")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, help="CPU threads (default: all)")

    p = sub.add_parser("info", help="params, GFLOPs, size and per-layer channels")
    p.add_argument("--model", required=True)
    p.add_argument("--imgsz", type=int, default=640)

    p = sub.add_parser("run", help="run every stage of a recipe end to end (resumable)")
    p.add_argument("recipe", nargs="?", help="recipe yaml, e.g. configs/demo.yaml")
    p.add_argument("--cfg", help="same as the positional recipe")
    p.add_argument("--out", help="run folder")
    p.add_argument("--data", help="override the recipe's data")
    p.add_argument("--device", help="override the recipe's device")
    return parser


# --- recipe resolution ------------------------------------------------------------------------------------------------
_STAGE_FLAGS = {
    "prune": ("method", "ratio", "flops_reduction", "sparsity_epochs", "finetune_epochs", "s", "batch", "fraction", "lr0", "workers"),
    "distill": ("teacher", "method", "epochs", "batch", "fraction", "lr0", "workers"),
    "qat": ("bits", "export", "epochs", "batch", "fraction", "lr0", "workers"),
    "ptq": ("calibrator", "images", "bits", "sensitivity", "ort"),
    "export": ("format", "check", "precision", "dla_core", "calibration_data", "calibration_cache"),
}


def _recipe(args: argparse.Namespace, stage: str):  # noqa: ANN202
    from yolocomp import recipe as rc

    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in ("data", "imgsz", "device", "out")}
    model = getattr(args, "weights", None) or getattr(args, "model", None)
    overrides["model"] = model
    for flag in _STAGE_FLAGS.get(stage, ()):
        overrides[f"{stage}.{flag}"] = getattr(args, flag, None)
    if args.cfg:
        return rc.load(args.cfg, overrides)
    if not model:
        raise UserError(f"yolocomp {stage} needs --cfg RECIPE or --model PATH (see yolocomp {stage} --help)")
    return rc.validate(rc.apply_overrides({"model": model}, overrides), source="command line")


def _stage_command(args: argparse.Namespace) -> dict:
    from yolocomp.api import out_dir, resolve_data
    from yolocomp.report import print_table
    from yolocomp.stages import RUNNERS

    recipe = _recipe(args, args.command)
    out = out_dir(recipe, args.command, args.out)
    data = resolve_data(recipe, out)
    result = RUNNERS[args.command](recipe, str(recipe.model), out, data, recipe.stages.get("distill", {}).get("teacher"))
    rows = [{"artifact": k, "path": v, "size_mb": _size_mb(v)} for k, v in result.artifacts.items()]
    print_table(rows, f"yolocomp {args.command} — outputs in {out}")
    summary = _summary_rows(result.report)
    pairs = [r for r in summary if "before" in r]
    aps = [r for r in summary if "ap" in r]
    if pairs:
        print_table(pairs, f"yolocomp {args.command} — before / after")
    if aps:
        print_table(aps, f"yolocomp {args.command} — AP (fractions)")
    return result.report


def _size_mb(path: str) -> float | None:
    p = Path(path)
    return round(p.stat().st_size / 1e6, 2) if p.exists() else None


def _summary_rows(report: dict) -> list[dict]:
    """Figures worth a glance from a stage report: before/after pairs and every AP result it holds."""
    rows: list[dict] = []

    def walk(value: Any, path: str, depth: int) -> None:
        if not isinstance(value, dict) or depth > 2:
            return
        if {"before", "after"} <= set(value) and not isinstance(value["before"], (dict, list)):
            rows.append({"figure": path, "before": value["before"], "after": value["after"]})
            return
        if isinstance(value.get("ap"), float):
            rows.append({"figure": path, "ap": value["ap"], "ap50": value.get("ap50"), "ap75": value.get("ap75")})
            return
        for key, child in value.items():
            walk(child, f"{path}.{key}" if path else key, depth + 1)

    walk(report or {}, "", 0)
    return rows


# --- commands ---------------------------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> None:
    from yolocomp.api import evaluate
    from yolocomp.report import print_table

    result = evaluate(
        args.model, args.data, imgsz=args.imgsz, device=args.device, json_out=args.json,
        conf=args.conf, iou=args.iou, max_det=args.max_det, images=args.images, batch=args.batch,
    )
    keys = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar100")
    print_table([{"model": args.model, "backend": result.get("backend"), "images": result.get("images"), **{k: result.get(k) for k in keys}}], "yolocomp eval")


def _cmd_bench(args: argparse.Namespace) -> None:
    from yolocomp.api import bench
    from yolocomp.report import print_table

    result = bench(
        [args.model, *args.compare], imgsz=args.imgsz, device=args.device, json_out=args.json,
        batch_sizes=tuple(args.batch_sizes), runs=args.runs, warmup=args.warmup, threads=args.threads,
    )
    rows = []
    for model, ratio in zip(result["models"], result["ratios"]):
        for bs, t in model["by_batch"].items():
            if "latency_ms" not in t:
                continue
            lat = t["latency_ms"]
            rows.append({"model": model["name"], "backend": model["backend"], "batch": int(bs), "p50_ms": lat["p50"], "p90_ms": lat["p90"],
                         "p99_ms": lat["p99"], "fps": t["fps"], "speedup": ratio["speedup"].get(bs), "params": model["params"],
                         "gflops": model["gflops"], "size_mb": model["size_mb"]})
    print_table(rows, f"yolocomp bench — {args.device}, imgsz {args.imgsz} (speedup = first model's p50 / this p50)")
    for model in result["models"]:
        for note in model.get("notes", []):
            print(f"note: {model['name']}: {note}")


def _cmd_info(args: argparse.Namespace) -> None:
    from yolocomp.api import info
    from yolocomp.report import print_table

    result = info(args.model, imgsz=args.imgsz)
    print_table(result.get("layers", []), f"{args.model} — layers")
    print_table([{k: result.get(k) for k in ("params", "gflops", "size_mb")}], f"{args.model} — summary")


def _cmd_run(args: argparse.Namespace) -> None:
    from yolocomp import recipe as rc
    from yolocomp.pipeline import run

    path = args.recipe or args.cfg
    if not path:
        raise UserError("yolocomp run needs a recipe: yolocomp run configs/demo.yaml")
    recipe = rc.load(path, {"data": args.data, "device": args.device})
    run(recipe, out=args.out)


COMMANDS = {
    "eval": _cmd_eval,
    "bench": _cmd_bench,
    "info": _cmd_info,
    "run": _cmd_run,
    **{name: _stage_command for name in ("prune", "distill", "qat", "ptq", "export")},
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from yolocomp import __version__

        print(f"yolocomp {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        COMMANDS[args.command](args)
    except NotBuiltError as e:
        print(f"yolocomp {args.command}: not built yet — {e}", file=sys.stderr)
        return 2
    except UserError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
