"""The two command lines shared by deploy/cpu and deploy/jetson: ``infer`` (detect and draw) and ``bench`` (time).

Each backend supplies a model object with ``names``, ``imgsz`` (h, w), ``batch`` (static batch or None),
``precision``, ``device``, ``backend``, ``params`` and ``__call__(NCHW float32) -> (N, 4+nc, A)``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .benchmark import entry, finish, host_info, latency_stats, time_interleaved
from .detect import (
    IMAGE_SUFFIXES,
    FpsMeter,
    detections_json,
    draw,
    iter_source,
    letterbox,
    postprocess,
    scale_boxes,
    to_blob,
    write_json,
)


def infer_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="model file (.onnx for deploy/cpu, .engine for deploy/jetson)")
    p.add_argument("--source", required=True, help="image, folder of images, video file, or camera index (0)")
    p.add_argument("--conf", type=float, default=0.25, help="score threshold (default 0.25)")
    p.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    p.add_argument("--max-det", type=int, default=300, help="most detections kept per image (default 300)")
    p.add_argument("--out", default="runs/deploy", help="output folder for summary.json and drawn images")
    p.add_argument("--save", action="store_true", help="write annotated images (video: annotated .mp4) under --out")
    p.add_argument("--show", action="store_true", help="display frames in a window (needs a display)")
    p.add_argument("--limit", type=int, default=0, help="stop after this many frames (0: all)")
    return p


def bench_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", nargs="+", required=True, help="one or more model files, timed interleaved")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="batch sizes (static-batch models skip others)")
    p.add_argument("--runs", type=int, default=50, help="timed calls per model and batch size (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default 10)")
    p.add_argument("--gflops", type=float, nargs="*", default=None, help="optional GFLOPs per model, same order")
    p.add_argument("--json", default=None, help="write the result JSON here (also printed)")
    return p


def check_common(args: argparse.Namespace) -> None:
    if not 0.0 <= args.conf < 1.0:
        raise SystemExit(f"--conf {args.conf} is outside [0, 1); pick e.g. 0.25")
    if not 0.0 < args.iou <= 1.0:
        raise SystemExit(f"--iou {args.iou} is outside (0, 1]; pick e.g. 0.7")
    if args.max_det < 1:
        raise SystemExit(f"--max-det {args.max_det} must be >= 1")


def run_infer(model, args: argparse.Namespace) -> dict:  # noqa: ANN001 - duck-typed backend model
    """Detect on every frame of ``args.source``; write ``summary.json`` (and drawn frames) under ``args.out``."""
    check_common(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meter, writer, results, per_class = FpsMeter(), None, [], Counter()
    t_pre = t_inf = t_post = 0.0
    frames, t_start = 0, time.perf_counter()
    for name, img in iter_source(args.source):
        t0 = time.perf_counter()
        lb = letterbox(img, model.imgsz)
        blob = to_blob([lb.image])
        t1 = time.perf_counter()
        pred = model(blob)
        t2 = time.perf_counter()
        det = scale_boxes(postprocess(pred, args.conf, args.iou, args.max_det)[0], lb)
        t3 = time.perf_counter()
        t_pre, t_inf, t_post = t_pre + t1 - t0, t_inf + t2 - t1, t_post + t3 - t2
        frames += 1
        per_class.update(model.names.get(int(c), str(int(c))) for c in det[:, 5])
        results.append({"image": name, "detections": detections_json(det, model.names)})
        if args.save or args.show:
            drawn = draw(img, det, model.names, meter.tick())
            writer = _emit(drawn, name, out, args, writer)
        if args.limit and frames >= args.limit:
            break
    if writer is not None:
        writer.release()
    total = time.perf_counter() - t_start
    summary = {
        "model": str(model.path),
        "backend": model.backend,
        "precision": model.precision,
        "device": model.device,
        "imgsz": list(model.imgsz),
        "source": args.source,
        "settings": {"conf": args.conf, "iou": args.iou, "max_det": args.max_det},
        "frames": frames,
        "speed_ms": {k: round(v * 1000 / max(frames, 1), 3) for k, v in (("preprocess", t_pre), ("inference", t_inf),
                                                                          ("postprocess", t_post))},
        "fps": round(frames / total, 2) if total > 0 else None,
        "detections_total": int(sum(per_class.values())),
        "per_class": dict(sorted(per_class.items())),
        "results": results,
    }
    write_json(out / "summary.json", summary)
    return summary


def _emit(drawn: np.ndarray, name: str, out: Path, args: argparse.Namespace, writer):  # noqa: ANN001, ANN202
    import cv2

    if args.show:
        cv2.imshow("yolocomp", drawn)
        cv2.waitKey(1)
    if args.save:
        src = Path(args.source)
        if not src.is_dir() and src.suffix.lower() not in IMAGE_SUFFIXES:  # video or camera: one annotated .mp4
            if writer is None:
                h, w = drawn.shape[:2]
                writer = cv2.VideoWriter(str(out / "annotated.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 30, (w, h))
            writer.write(drawn)
        else:
            cv2.imwrite(str(out / f"{Path(name).stem}.jpg"), drawn)
    return writer


def run_bench(make_model: Callable[[str], object], args: argparse.Namespace, device: str, **host: object) -> dict:
    """Time the models interleaved at each batch size on random input; the JSON schema of ``yolocomp bench``."""
    if args.runs < 1 or args.warmup < 0 or any(b < 1 for b in args.batch_sizes):
        raise SystemExit("--runs must be >= 1, --warmup >= 0 and --batch-sizes positive")
    if args.gflops is not None and len(args.gflops) != len(args.model):
        raise SystemExit(f"--gflops got {len(args.gflops)} values for {len(args.model)} models; give one per model")
    models = [make_model(p) for p in args.model]
    sizes = {m.imgsz for m in models}
    if len(sizes) > 1:
        raise SystemExit(f"the models take different input sizes {sorted(sizes)}; time them in separate runs")
    imgsz = sizes.pop()
    names = []
    for p in args.model:
        names.append(Path(p).name if Path(p).name not in names else f"{Path(p).name}#{len(names)}")
    entries = [entry(n, m, args.gflops[i] if args.gflops else None) for i, (n, m) in enumerate(zip(names, models))]
    rng = np.random.default_rng(0)
    for b in args.batch_sizes:
        x = rng.random((b, 3, *imgsz), dtype=np.float32)
        active = []
        for i, m in enumerate(models):
            if m.batch not in (None, b):
                note = f"batch {b} skipped: the model has a fixed batch of {m.batch} (export with dynamic=True)"
                entries[i]["by_batch"][str(b)] = {"skipped": note}
                entries[i]["notes"].append(note)
            else:
                active.append(i)
        if not active:
            continue
        samples = time_interleaved([models[i] for i in active], x, args.runs, args.warmup)
        for i, ms in zip(active, samples):
            lat = latency_stats(ms)
            entries[i]["by_batch"][str(b)] = {"latency_ms": lat, "fps": round(b * 1000 / lat["p50"], 2)}
    settings = {"imgsz": imgsz[0], "device": device, "batch_sizes": list(args.batch_sizes), "runs": args.runs,
                "warmup": args.warmup, "threads": getattr(args, "threads", None),
                "input": "random float32 NCHW in [0, 1]",
                "timed": "one forward pass per sample (input and output copies included; no decode, no NMS)",
                "order": "interleaved round-robin, rotating start", "fps": "batch * 1000 / p50 latency"}
    result = finish(entries, settings, host_info(**host))
    if args.json:
        write_json(args.json, result)
    return result
