"""Benchmark recovery after pruning on the real YOLOv8n: one-shot + labels, one-shot + KD, progressive + KD,
progressive + reconstruction + KD, the label-free run, every importance criterion under one recovery, and the same
protocol on the unpruned model (distilling a model into itself must not lower its AP).

Every variant is cut to the same GFLOPs (the FLOPs reduction the first variant's channel ratio reaches) and recovers
for the same wall-clock budget (``--minutes``, ``prune``'s ``--recover-minutes``: the progressive steps, the
reconstruction and the training together). AP with pycocotools on coco-real val (yolocomp.eval); the AP-vs-minutes curve of every recovery comes from its
per-epoch Ultralytics validation on the same images. One JSON file, rewritten after every variant.

    python tools/bench_recover.py --out runs/bench_recover --imgsz 320 --flops-reduction 0.36 --minutes 10
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"

#: variant -> prune() options (the importance criterion and the budget are added per run)
RECOVERIES = {
    "oneshot_labels": {"recover": "labels", "steps": 1},
    "oneshot_head_kd": {"recover": "kd", "steps": 1, "kd_method": "logit", "reconstruct": False},
    "oneshot_kd": {"recover": "kd", "steps": 1, "reconstruct": False},
    "oneshot_recon_kd": {"recover": "kd", "steps": 1, "reconstruct": True},  # prune --recover kd's defaults
    # the defaults with YOLO11's depthwise class branch in place of Detect's 3x3 one (prune --head light)
    "oneshot_recon_kd_light": {"recover": "kd", "steps": 1, "reconstruct": True, "head": "light"},
    "progressive_kd": {"recover": "kd", "steps": 3, "reconstruct": False},
    "progressive_recon_kd": {"recover": "kd", "steps": 3, "reconstruct": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n-coco-dq.pt"))
    p.add_argument("--data", default=str(SHARED / "coco-real" / "coco-real.yaml"))
    p.add_argument("--images", default=str(SHARED / "coco-unlabeled" / "images"),
                   help="unlabelled images for the KD recoveries (next to coco-real train)")
    p.add_argument("--out", default="runs/bench_recover", help="output folder (bench_recover.json and one folder per run)")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--ratio", type=float, default=0.3, help="channel ratio of the first variant; later ones match its GFLOPs")
    p.add_argument("--flops-reduction", type=float, default=None,
                   help="cut every variant to this share of GFLOPs instead (e.g. 0.36; replaces --ratio)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of every variant's whole recovery "
                                                               "(progressive steps, reconstruction and training)")
    p.add_argument("--recoveries", default=",".join(RECOVERIES))
    p.add_argument("--steps", type=int, default=3, help="steps of the progressive variants")
    p.add_argument("--step-epochs", type=int, default=1, help="distillation epochs of each progressive step (they count "
                                                              "against --minutes; the final training gets the rest)")
    p.add_argument("--best", default=None, help="recovery used for the importance comparison, the label-free run and the "
                                                "self-distillation check (default: the best AP among --recoveries)")
    p.add_argument("--methods", default="bn,cap,l1,random", help="importance criteria compared under the best recovery")
    p.add_argument("--method", default="bn", help="importance criterion of the recovery comparison")
    p.add_argument("--label-free", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the best recovery on --images alone (no labels at all)")
    p.add_argument("--self-distill", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the best recovery's distillation on the unpruned model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr0", type=float, default=None, help="recovery learning rate (default: prune's)")
    return p.parse_args(argv)


def curve(run_dir: Path) -> list[dict]:
    """(minutes, Ultralytics mAP50-95) per epoch from a training's results.csv."""
    rows = []
    for path in sorted(run_dir.rglob("results.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                row = {k.strip(): v for k, v in row.items()}
                if row.get("time") and row.get("metrics/mAP50-95(B)"):
                    rows.append({"run": path.parent.name, "minutes": round(float(row["time"]) / 60, 2),
                                 "map50_95": round(100 * float(row["metrics/mAP50-95(B)"]), 2)})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from yolocomp.integration.threads import use_cpu_threads

    use_cpu_threads()  # Ultralytics would train on cpu_count - 1 threads
    weights, data = Path(args.weights), Path(args.data)
    if not weights.exists() or not data.exists():
        print(f"needs {weights} and {data} (the shared real weights and coco-real)", file=sys.stderr)
        return 2
    from yolocomp.commands.distill import distill
    from yolocomp.commands.prune import prune
    from yolocomp.integration import mirror_dataset
    from yolocomp.report import print_table, write_json

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_abs = mirror_dataset(data, out / "data")  # Ultralytics' label caches stay out of ../shared
    local = out / weights.name  # Ultralytics writes exports beside the weights: work on a copy
    if not local.exists():
        shutil.copy(weights, local)
    result: dict = {"settings": vars(args), "runs": {}}
    json_path = out / "bench_recover.json"
    train = {"batch": args.batch, "recover_minutes": args.minutes, **({"lr0": args.lr0} if args.lr0 else {})}
    target: dict = {"flops_reduction": args.flops_reduction} if args.flops_reduction else {"ratio": args.ratio}

    def run(name: str, method: str, options: dict) -> dict:
        folder = out / name
        started = time.perf_counter()
        try:
            report = prune(str(local), folder, str(data_abs), imgsz=args.imgsz, latency=False, method=method,
                           **target, **train, **options)  # the time limit ends training
            entry = {"method": method, **options, "ap": {k: (v or {}).get("ap") for k, v in report["ap"].items()
                                                         if isinstance(v, dict)},
                     "ap_steps": report.get("ap", {}).get("steps"), "gflops": report["gflops"],
                     "recovery": report.get("recovery"), "curve": curve(folder)}
        except Exception as e:  # one failing variant must not lose the others
            entry = {"method": method, **options, "error": f"{type(e).__name__}: {e}"}
        entry["seconds"] = round(time.perf_counter() - started, 1)
        result["runs"][name] = entry
        write_json(json_path, result)
        print(json.dumps({name: {k: entry.get(k) for k in ("ap", "gflops", "error", "seconds")}}), flush=True)
        return entry

    recoveries = [r for r in args.recoveries.split(",") if r]
    for i, name in enumerate(recoveries):
        options = dict(RECOVERIES[name])
        if options["steps"] > 1:
            options.update(steps=args.steps, step_epochs=args.step_epochs)
        if options["recover"] == "kd":
            options["images"] = args.images
        entry = run(name, args.method, options)
        if i == 0 and "gflops" in entry and not args.flops_reduction:  # every later run is cut to the GFLOPs this one reached
            before, after = entry["gflops"]["before"], entry["gflops"]["after"]
            target = {"flops_reduction": round(1 - after / before, 4)}
    finished = {n: r for n, r in result["runs"].items() if r.get("ap", {}).get("finetuned") is not None}
    best = args.best or (max(finished, key=lambda n: finished[n]["ap"]["finetuned"]) if finished else None)
    result["best_recovery"] = best
    if best:
        options = {k: v for k, v in result["runs"][best].items()
                   if k in ("recover", "steps", "step_epochs", "reconstruct", "images", "kd_method", "head")}
        for method in [m for m in args.methods.split(",") if m and m != args.method]:
            run(f"{best}_{method}", method, options)
        if args.label_free and options.get("recover") == "kd":
            run(f"{best}_label_free", args.method, {**options, "label_free": True})
        if args.self_distill:
            started = time.perf_counter()
            from yolocomp.config.prune import KD_RECOVERY_TRAIN_DEFAULTS

            # the recovery's own trainer settings (prune --recover kd applies them), so this checks the same protocol
            recipe = {**KD_RECOVERY_TRAIN_DEFAULTS, "nbs": args.batch, **({"lr0": args.lr0} if args.lr0 else {})}
            rep = distill(str(local), str(local), str(data_abs), out / "self_distill", imgsz=args.imgsz,
                          method=options.get("kd_method", "block"),
                          epochs=1000, images=args.images, batch=args.batch, trainer={"time": args.minutes / 60},
                          label_free=options.get("label_free", False), freeze_bn=True, **recipe)
            before, after = rep["ap_before"]["ap"], rep["ap_after"]["ap"]
            result["self_distill"] = {"ap_before": before, "ap_after": after, "ap_change": round(after - before, 4),
                                      "seconds": round(time.perf_counter() - started, 1), "curve": curve(out / "self_distill")}
    write_json(json_path, result)
    rows = [{"run": n, "method": r.get("method"), "steps": r.get("steps"), "recover": r.get("recover"),
             "ap_before": (r.get("ap") or {}).get("before"), "ap_pruned": (r.get("ap") or {}).get("pruned"),
             "ap_recovered": (r.get("ap") or {}).get("finetuned"),
             "gflops": (r.get("gflops") or {}).get("after"), "error": r.get("error")} for n, r in result["runs"].items()]
    print_table(rows, f"bench_recover — {args.imgsz} px, {args.minutes} min of recovery each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
