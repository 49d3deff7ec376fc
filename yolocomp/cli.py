"""`yolocomp` command line: argument parsing only. Each stage's flags are generated from its config
(:mod:`yolocomp.config`); every subcommand calls one command function and prints a summary table.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 unexpected failure (one line; the traceback with
YOLOCOMP_DEBUG=1), 130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from yolocomp.config import STAGE_CONFIGS
from yolocomp.config.options import add_flags, given_flags
from yolocomp.errors import UserError, first_line

STAGE_HELP = {
    "prune": "structured pruning (BN-γ slimming, CAP, L1, random)",
    "distill": "knowledge distillation from a teacher (FGD, fine-grained imitation, logit)",
    "qat": "quantization-aware training, INT8 / INT4, heads included",
    "ptq": "post-training quantization with calibration",
    "export": "export to ONNX (Q/DQ for quantized models), a TensorRT engine or an OpenVINO IR folder",
}


def _model_and_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cfg", help="recipe yaml (configs/*.yaml) or a plain Ultralytics model yaml")
    p.add_argument("--model", help="model: .pt checkpoint or Ultralytics model yaml (replaces the recipe's)")
    p.add_argument("--data", help="Ultralytics data yaml ('synthetic' = built-in demo set)")
    p.add_argument("--imgsz", type=int, help="image size (default: recipe's, else 640)")
    p.add_argument("--device", help="auto, cpu, 0 or cuda:0 (default: recipe's, else auto: a CUDA GPU if there is one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolocomp", description="Compress Ultralytics YOLO detectors.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for stage, help_text in STAGE_HELP.items():
        p = sub.add_parser(stage, help=help_text)
        _model_and_data(p)
        p.add_argument("--out", help="output folder (nothing outside it is written)")
        if stage == "prune":
            p.add_argument("--weights", help="start from these weights (overrides the recipe's model)")
        add_flags(p, STAGE_CONFIGS[stage])

    export_size = "image size (default: an exported model's own size from its metadata, else 640)"
    p = sub.add_parser("eval", help="COCO AP / AP50 / AP75 with pycocotools (PyTorch, ONNX Runtime, TensorRT, OpenVINO)")
    p.add_argument("--model", required=True, help=".pt, .onnx, .engine, or an OpenVINO folder / .xml")
    p.add_argument("--data", required=True, help="Ultralytics data yaml")
    p.add_argument("--imgsz", type=int, help=export_size)
    p.add_argument("--device", default="cpu", help="auto, cpu, 0 or cuda:0 (default: cpu)")
    p.add_argument("--json", help="write every figure and the settings to this JSON file")
    add_flags(p, STAGE_CONFIGS["eval"])

    p = sub.add_parser("bench", help="latency p50/p90/p99 and FPS, params, GFLOPs, size")
    p.add_argument("--model", required=True, help=".pt, .onnx, .engine, or an OpenVINO folder / .xml")
    p.add_argument("--compare", nargs="+", default=[], help="more models timed in the same process, interleaved")
    p.add_argument("--imgsz", type=int, help=export_size)
    p.add_argument("--device", default="cpu", help="auto, cpu, 0 or cuda:0 (default: cpu)")
    p.add_argument("--json", help="write the results to this JSON file")
    add_flags(p, STAGE_CONFIGS["bench"])

    p = sub.add_parser("info", help="params, GFLOPs, size and per-layer channels")
    p.add_argument("--model", required=True)
    p.add_argument("--imgsz", type=int, default=640, help="image size (default: 640)")

    p = sub.add_parser("run", help="run every stage of a recipe end to end (resumable)")
    p.add_argument("recipe", nargs="?", help="recipe yaml, e.g. configs/demo.yaml")
    p.add_argument("--cfg", help="same as the positional recipe")
    p.add_argument("--out", help="run folder")
    p.add_argument("--model", help="override the recipe's model (.pt or model yaml)")
    p.add_argument("--weights", help="same as --model")
    p.add_argument("--data", help="override the recipe's data")
    p.add_argument("--imgsz", type=int, help="override the recipe's image size")
    p.add_argument("--device", help="override the recipe's device")
    return parser


# --- recipe resolution ------------------------------------------------------------------------------------------------
def _recipe(args: argparse.Namespace, stage: str):  # noqa: ANN202
    from yolocomp import recipe as rc

    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in ("data", "imgsz", "device", "out")}
    model = getattr(args, "weights", None) or getattr(args, "model", None)
    overrides["model"] = model
    for key, value in given_flags(args, STAGE_CONFIGS[stage]).items():
        overrides[f"{stage}.{key}"] = value
    if args.cfg:
        return rc.load(args.cfg, overrides)
    if not model:
        raise UserError(f"yolocomp {stage} needs --cfg RECIPE or --model PATH (see yolocomp {stage} --help)")
    return rc.validate(rc.apply_overrides({"model": model}, overrides), source="command line")


def _stage_command(args: argparse.Namespace) -> dict:
    from yolocomp.commands.common import run_stage_command, size_mb
    from yolocomp.report import print_table

    recipe = _recipe(args, args.command)
    out, result = run_stage_command(args.command, recipe, args.out,
                                    weights_flag="--weights" if args.command == "prune" else "--model")
    rows = [{"artifact": k, "path": v, "size_mb": size_mb(v)} for k, v in result.artifacts.items()]
    print_table(rows, f"yolocomp {args.command} — outputs in {out}")
    summary = _summary_rows(result.report)
    pairs = [r for r in summary if "before" in r]
    aps = [r for r in summary if "ap" in r]
    if pairs:
        print_table(pairs, f"yolocomp {args.command} — before / after")
    if aps:
        print_table(aps, f"yolocomp {args.command} — AP (fractions)")
    return result.report


def _summary_rows(report: dict) -> list[dict]:
    """Figures worth a glance from a stage report: before/after pairs and every AP result it holds."""
    rows: list[dict] = []

    def walk(value: Any, path: str, depth: int) -> None:
        if not isinstance(value, dict) or depth > 2:
            return
        if {"before", "after"} <= set(value) and not isinstance(value["before"], (dict, list)):
            rows.append({"figure": path, "before": value["before"], "after": value["after"]})
            return
        if path and isinstance(value.get("ap"), float):  # a report's own top-level `ap` repeats one of its rows
            rows.append({"figure": path, "ap": value["ap"], "ap50": value.get("ap50"), "ap75": value.get("ap75")})
            return
        for key, child in value.items():
            walk(child, f"{path}.{key}" if path else key, depth + 1)

    walk(report or {}, "", 0)
    return rows


# --- commands ---------------------------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> None:
    from yolocomp.commands.common import resolve_device
    from yolocomp.commands.measure import evaluate, export_imgsz
    from yolocomp.eval.metrics import AP_KEYS
    from yolocomp.report import print_table

    args.imgsz = args.imgsz or export_imgsz(args.model)
    result = evaluate(args.model, args.data, imgsz=args.imgsz, device=resolve_device(args.device), json_out=args.json,
                      **given_flags(args, STAGE_CONFIGS["eval"]))
    print_table([{"model": args.model, "backend": result.get("backend"), "images": result.get("images"),
                  **{k: result.get(k) for k in AP_KEYS}}], "yolocomp eval")


def _cmd_bench(args: argparse.Namespace) -> None:
    from yolocomp.commands.common import resolve_device
    from yolocomp.commands.measure import bench, bench_rows, export_imgsz
    from yolocomp.report import print_table

    args.imgsz = args.imgsz or export_imgsz(args.model)
    result = bench([args.model, *args.compare], imgsz=args.imgsz, device=resolve_device(args.device),
                   json_out=args.json, **given_flags(args, STAGE_CONFIGS["bench"]))
    print_table(bench_rows(result), f"yolocomp bench — {args.device}, imgsz {args.imgsz} (speedup = first model's p50 / this p50)")
    for model in result["models"]:
        for note in model.get("notes", []):
            print(f"note: {model['name']}: {note}")


def _cmd_info(args: argparse.Namespace) -> None:
    from yolocomp.commands.measure import info
    from yolocomp.report import print_table

    result = info(args.model, imgsz=args.imgsz)
    print_table(result.get("layers", []), f"{args.model} — layers")
    print_table([{k: result.get(k) for k in ("params", "gflops", "size_mb")}], f"{args.model} — summary")


def _cmd_run(args: argparse.Namespace) -> None:
    from yolocomp import recipe as rc
    from yolocomp.commands.run import run

    path = args.recipe or args.cfg
    if not path:
        raise UserError("yolocomp run needs a recipe: yolocomp run configs/demo.yaml")
    overrides = {"data": args.data, "device": args.device, "imgsz": args.imgsz, "model": args.weights or args.model}
    run(rc.load(path, overrides), out=args.out)


COMMANDS = {
    "eval": _cmd_eval,
    "bench": _cmd_bench,
    "info": _cmd_info,
    "run": _cmd_run,
    **{name: _stage_command for name in STAGE_HELP},
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
        from yolocomp.integration.threads import use_cpu_threads

        use_cpu_threads()  # every core, not Ultralytics' cpu_count - 1
        COMMANDS[args.command](args)
    except UserError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        stage = getattr(e, "stage", None) or args.command
        print(f"\ninterrupted in stage {stage}; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a library failure the checks did not foresee: one line; the traceback on request
        if os.environ.get("YOLOCOMP_DEBUG"):
            raise
        print(f"error: yolocomp {args.command} failed: {type(e).__name__}: {first_line(e)} (set YOLOCOMP_DEBUG=1 for "
              "the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
