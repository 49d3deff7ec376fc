"""CPU deployment benchmark on the real YOLOv8n and ../shared/coco-real (JSON out): ONNX Runtime vs OpenVINO.

Rows (each model measured in the runtime it runs in):
  fp32_onnx_ort       yolocomp's FP32 ONNX in ONNX Runtime (the reference of every ratio)
  fp32_ir_ov          the same ONNX converted by ``yolocomp.export.openvino.export_openvino`` (FP32 IR) in OpenVINO
  ultralytics_fp32_ov Ultralytics' own ``export(format="openvino")``
  ultralytics_int8_ov Ultralytics' ``export(format="openvino", int8=True)`` (NNCF PTQ, calibrated on the train split;
                      needs ``nncf``, skipped with a note without it; nncf is not a yolocomp dependency)
  ptq_int8_ort        ``yolocomp.commands.ptq.ptq`` INT8 (TensorRT-layout Q/DQ ONNX) in ONNX Runtime
  ptq_int8_ov         the same Q/DQ ONNX converted to an INT8 IR, in OpenVINO
  pruned_fp32_ort     a ``ratio``-pruned model (``yolocomp.commands.prune.prune``, BN-γ, no fine-tune) in ONNX Runtime
  pruned_fp32_ov      its FP32 IR in OpenVINO
  pruned_int8_ov      pruned + PTQ INT8 Q/DQ -> INT8 IR, in OpenVINO
AP with ``yolocomp.eval.evaluate`` (the same letterbox and NMS for both runtimes); latency batch 1 on random input,
at 1 thread and at all cores, every model timed interleaved (``yolocomp.eval.timing``) in one process, ratios vs
``fp32_onnx_ort`` of the same run and thread count. OpenVINO runs float layers in f32 (``--ov-float-precision``).

    nice -n 10 python tools/bench_deploy.py --out runs/bench_deploy --imgsz 320 --runs 10 --rounds 3
    nice -n 10 python tools/bench_deploy.py --out runs/bench_deploy_640 --imgsz 640 --no-ap --calib-images 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = "fp32_onnx_ort"


def runner_for(path: Path, runtime: str, threads: int | None, float_precision: str | None):
    from yolocomp.eval.runners.onnxruntime import OnnxRunner
    from yolocomp.eval.runners.openvino import OpenVINORunner

    if runtime == "openvino":
        return OpenVINORunner(path, threads=threads, float_precision=float_precision)
    return OnnxRunner(path, threads=threads)


def latency(models: dict[str, tuple[Path, str]], imgsz: int, runs: int, rounds: int, threads: int | None,
            float_precision: str | None) -> dict[str, dict]:
    """Batch-1 latency of every model, interleaved: each round every model takes ``runs`` timed calls after 2
    untimed ones (rotating start); one whole warm-up round first. p50 over all samples and the best round's median."""
    from yolocomp.eval.timing import best_round_median, flat, interleaved_latency

    runners = {n: runner_for(p, rt, threads, float_precision) for n, (p, rt) in models.items()}
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    calls = {n: partial(r, x) for n, r in runners.items()}
    samples = interleaved_latency(calls, runs=runs, warmup=2, rounds=rounds, warmup_rounds=1)
    out = {}
    for n, rounds_ in samples.items():
        t = flat(rounds_)
        r = runners[n]
        out[n] = {"p50_ms": round(float(np.median(t)), 2), "best_round_ms": round(best_round_median(rounds_), 2),
                  "min_ms": round(float(np.min(t)), 2),
                  "threads": getattr(r, "threads", None) if r.backend == "openvino" else threads or os.cpu_count()}
    base = out[REFERENCE]
    for v in out.values():
        v["speedup_vs_ort_fp32"] = round(base["p50_ms"] / v["p50_ms"], 2)
        v["speedup_best_round"] = round(base["best_round_ms"] / v["best_round_ms"], 2)
    return out


def metrics(res: dict) -> dict:
    return {k: round(100 * res[k], 2) for k in ("ap", "ap50", "ap75")} | {"images": res["images"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_deploy")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--val-images", type=int, default=None, help="val images for AP (default: all)")
    ap.add_argument("--no-ap", action="store_true", help="latency only")
    ap.add_argument("--calib-images", type=int, default=64, help="PTQ / NNCF calibration images (train split)")
    ap.add_argument("--calibrator", default="percentile", help="yolocomp ptq calibrator")
    ap.add_argument("--prune-ratio", type=float, default=0.3)
    ap.add_argument("--runs", type=int, default=10, help="timed calls per model per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per thread setting")
    ap.add_argument("--threads", default="1,all", help="thread settings to time, e.g. 1,all")
    ap.add_argument("--ov-float-precision", default="f32", help="OpenVINO INFERENCE_PRECISION_HINT for float layers "
                                                                "(f32, bf16, or 'default': the plugin's choice)")
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n-coco-dq.pt"))
    ap.add_argument("--data", default=str(SHARED / "coco-real" / "coco-real.yaml"))
    args = ap.parse_args(argv)

    import importlib.util

    import torch

    from yolocomp.commands.prune import prune
    from yolocomp.commands.ptq import ptq
    from yolocomp.errors import first_line
    from yolocomp.eval import evaluate
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.export.openvino import export_openvino
    from yolocomp.integration import load_model, mirror_dataset, resolve_data

    torch.set_num_threads(2)
    float_precision = None if args.ov_float_precision == "default" else args.ov_float_precision
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(mirror_dataset(Path(args.data), out), out)  # caches stay out of ../shared
    weights = out / Path(args.weights).name  # Ultralytics writes exports next to the weights: work on a copy
    if not weights.exists():
        shutil.copy(args.weights, weights)
    t_start = time.time()
    import onnxruntime
    import openvino

    report: dict = {
        "settings": {**vars(args), "python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                     "nncf": _version("nncf"), "processor": platform.processor() or platform.machine(),
                     "cpu_count": os.cpu_count(), "cpu_flags": _cpu_flags(),
                     "latency": "batch 1, random input, interleaved round-robin, one warm-up round"},
        "rows": [],
    }
    models: dict[str, tuple[Path, str]] = {}
    imgsz = args.imgsz

    def add(name: str, make, runtime: str, extra: dict | None = None) -> Path | None:
        row: dict = {"model": name, "runtime": runtime, **(extra or {})}
        t = time.time()
        path = None
        try:
            path = Path(make())
            row["path"] = str(path)
            models[name] = (path, runtime)
            if runtime == "openvino":
                row["conv_precisions"] = runner_for(path, runtime, 1, float_precision).precisions()
            if not args.no_ap:
                res = evaluate(str(path), data, imgsz=imgsz, images=args.val_images, progress=False)
                row.update(metrics(res))
        except Exception as e:  # one failing row must not lose the others
            row["error"] = f"{type(e).__name__}: {first_line(e, 300)}"
            traceback.print_exc()
        row["seconds"] = round(time.time() - t, 1)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "bench_deploy.json").write_text(json.dumps(report, indent=2, default=str))
        return path

    float_model = load_model(weights).float().eval()
    fp32 = add(REFERENCE, lambda: export_onnx(float_model, out / "fp32.onnx", imgsz=imgsz), "onnxruntime")
    add("fp32_ir_ov", lambda: export_openvino(fp32, out / "ov", imgsz=imgsz), "openvino")

    from ultralytics import YOLO

    add("ultralytics_fp32_ov", lambda: YOLO(str(weights)).export(format="openvino", imgsz=imgsz, verbose=False),
        "openvino", {"export": "ultralytics export(format='openvino')"})
    if importlib.util.find_spec("nncf") is None:
        report["rows"].append({"model": "ultralytics_int8_ov", "runtime": "openvino",
                               "note": "skipped: export(int8=True) needs nncf (pip install nncf; not a yolocomp dependency)"})
    else:
        fraction = min(1.0, args.calib_images / 288)  # coco-real train holds 288 images
        add("ultralytics_int8_ov", lambda: YOLO(str(weights)).export(format="openvino", int8=True, data=str(data),
                                                                      split="train", fraction=fraction, imgsz=imgsz,
                                                                      verbose=False),
            "openvino", {"export": f"ultralytics export(format='openvino', int8=True), NNCF, calibrated on "
                                   f"{fraction:.0%} of coco-real train"})

    ptq_dir = out / "ptq"
    qdq = add("ptq_int8_ort", lambda: ptq(weights, data, ptq_dir, imgsz=imgsz, evaluate=False,
                                          calibrator=args.calibrator, calib_images=args.calib_images, batch=8)["onnx"],
              "onnxruntime", {"export": f"yolocomp ptq --calibrator {args.calibrator}, TensorRT-layout Q/DQ"})
    if qdq is not None:
        add("ptq_int8_ov", lambda: export_openvino(qdq, out / "ov", imgsz=imgsz), "openvino")

    prune_dir = out / "prune"
    try:
        rep = prune(weights, prune_dir, None, imgsz=imgsz, evaluate=False, latency=False, ratio=args.prune_ratio)
        pruned = prune_dir / "pruned.pt"
        report["prune"] = {k: rep.get(k) for k in ("method", "target", "achieved") if k in rep}
    except Exception as e:
        traceback.print_exc()
        pruned = None
        report["rows"].append({"model": "pruned", "error": f"{type(e).__name__}: {first_line(e, 300)}"})
    if pruned is not None:
        note = {"export": f"BN-γ prune ratio {args.prune_ratio}, no fine-tune"}
        p_onnx = add("pruned_fp32_ort", lambda: export_onnx(load_model(pruned).float().eval(), out / "pruned.onnx",
                                                            imgsz=imgsz), "onnxruntime", note)
        if p_onnx is not None:
            add("pruned_fp32_ov", lambda: export_openvino(p_onnx, out / "ov", imgsz=imgsz), "openvino", note)
        p_qdq = out / "ptq_pruned"
        add("pruned_int8_ov", lambda: export_openvino(
            ptq(pruned, data, p_qdq, imgsz=imgsz, evaluate=False, calibrator=args.calibrator,
                calib_images=args.calib_images, batch=8)["onnx"], out / "ov", imgsz=imgsz, stem="pruned_int8"),
            "openvino", {**note, "export": note["export"] + f", then yolocomp ptq --calibrator {args.calibrator}"})

    for setting in [s for s in args.threads.split(",") if s]:
        threads = None if setting == "all" else int(setting)
        key = f"latency_{imgsz}_threads_{setting}"
        report[key] = latency(models, imgsz, args.runs, args.rounds, threads, float_precision)
        print(json.dumps({key: report[key]}), flush=True)
        for row in report["rows"]:
            if row["model"] in report[key]:
                v = report[key][row["model"]]
                row[f"ms_threads_{setting}"] = v["p50_ms"]
                row[f"speedup_threads_{setting}"] = v["speedup_vs_ort_fp32"]
        (out / "bench_deploy.json").write_text(json.dumps(report, indent=2, default=str))
    ref = next((r for r in report["rows"] if r["model"] == REFERENCE), {})
    for row in report["rows"]:
        if isinstance(row.get("ap"), float) and isinstance(ref.get("ap"), float):
            row["ap_delta_vs_ort_fp32"] = round(row["ap"] - ref["ap"], 2)
    report["seconds"] = round(time.time() - t_start, 1)
    (out / "bench_deploy.json").write_text(json.dumps(report, indent=2, default=str))
    cols = ("model", "runtime", "ap", "ap50", *[k for r in report["rows"] for k in r if k.startswith(("ms_", "speedup_"))])
    cols = tuple(dict.fromkeys(cols))
    print(json.dumps([{k: r.get(k) for k in (*cols, "error", "note") if k in r} for r in report["rows"]], indent=1))
    return report


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_flags() -> list[str]:
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return [f for f in wanted if f in flags]


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
