"""Benchmark structured pruning on the real YOLOv8n and coco-real: BN-γ slimming, CAP, L1 and random side by side.

For each method: importance (BN-γ after a short sparsity training, CAP after a short attention training, L1 / random
from the weights as they are), prune at each ratio, evaluate right after pruning (pycocotools via yolocomp.eval),
fine-tune the same number of epochs on coco-real train, evaluate again; params, GFLOPs and ONNX Runtime CPU latency
(batch 1) against the unpruned model. Results go to one JSON file, rewritten after every run so partial results
survive an interruption.

    nice -n 10 python tools/bench_prune.py --out runs/bench_prune.json --imgsz 320 --epochs 1 --ratios 0.2,0.3,0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from copy import deepcopy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n-coco-dq.pt"))
    p.add_argument("--data", default=str(SHARED / "coco-real" / "coco-real.yaml"))
    p.add_argument("--out", default="runs/bench_prune.json", help="JSON result file")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs after pruning (same for every method)")
    p.add_argument("--pre-epochs", type=int, default=1, help="BN sparsity / CAP attention training epochs")
    p.add_argument("--equal-budget", action=argparse.BooleanOptionalAction, default=True,
                   help="L1 and random get --pre-epochs of plain training too, so every method is ranked on a model "
                        "trained equally long (--no-equal-budget: they rank the untouched weights)")
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--finetune-ratios", default=None, help="ratios that get the fine-tune (default: all)")
    p.add_argument("--methods", default="bn,cap,l1,random")
    p.add_argument("--same-flops", action=argparse.BooleanOptionalAction, default=True,
                   help="prune every later method to the FLOPs reduction the first method reaches at each ratio, so "
                        "AP is compared at equal GFLOPs (--no-same-flops: every method at the same channel ratio)")
    p.add_argument("--s", type=float, default=1e-4, help="BN-γ sparsity strength")
    p.add_argument("--fraction", type=float, default=1.0, help="share of coco-real train used for training")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr0", type=float, default=1e-4,
                   help="AdamW learning rate for every training (1e-3 took the unpruned model from 25.7 to 5.1 AP in "
                        "one epoch of coco-real train at 256 px; 1e-4 fine-tunes a 5 %%-pruned one to 9.0 AP in two "
                        "epochs where 1e-3 gives 5.0)")
    p.add_argument("--nbs", type=int, default=None,
                   help="nominal batch size (default: --batch, one optimizer step per batch; Ultralytics' 64 would "
                        "leave a few-epoch CPU fine-tune with a handful of steps)")
    p.add_argument("--val-images", type=int, default=None, help="limit evaluation to the first N val images")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    p.add_argument("--runs", type=int, default=30, help="timed ONNX Runtime runs per model and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best round's median is kept)")
    return p.parse_args(argv)


def training_data(data_abs: Path, work: Path, val_images: int = 8) -> Path:
    """Same train split, but a tiny val list so Ultralytics' per-epoch validation costs little (we evaluate ourselves)."""
    import yaml

    cfg = yaml.safe_load(data_abs.read_text())
    root = Path(cfg["path"])
    val_dir = root / cfg["val"]
    images = sorted(p for p in val_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:val_images]
    listing = (work / "val_subset.txt").resolve()  # Ultralytics resolves a relative val against the data path
    listing.write_text("\n".join(str(p) for p in images) + "\n")
    cfg["val"] = str(listing)
    out = work / "train_data.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from yolocomp.integration.threads import use_cpu_threads

    use_cpu_threads()  # Ultralytics would train on cpu_count - 1 threads
    weights, data = Path(args.weights), Path(args.data)
    if not weights.exists() or not data.exists():
        print(f"needs {weights} and {data} (the shared real weights and coco-real)", file=sys.stderr)
        return 2
    from yolocomp.commands.prune import export_onnx
    from yolocomp.eval import evaluate
    from yolocomp.eval.timing import time_onnx
    from yolocomp.integration import load_model, mirror_dataset, resolve_data, train
    from yolocomp.prune import count_params, gflops, prune_model
    from yolocomp.prune.cap import ChannelAttentionPruning
    from yolocomp.prune.compensate import calibration_images
    from yolocomp.prune.slimming import BNSlimming

    out = Path(args.out)
    work = out.parent / f"{out.stem}_work"
    work.mkdir(parents=True, exist_ok=True)
    data_abs = resolve_data(mirror_dataset(data, work), work)  # Ultralytics caches stay out of ../shared
    train_data = str(training_data(data_abs, work))
    ratios = [float(r) for r in args.ratios.split(",")]
    ft_ratios = [float(r) for r in args.finetune_ratios.split(",")] if args.finetune_ratios else ratios
    methods = args.methods.split(",")
    train_args = {"imgsz": args.imgsz, "batch": args.batch, "fraction": args.fraction, "warmup_epochs": 0,
                  "device": "cpu", "val": False, "optimizer": "AdamW", "lr0": args.lr0, "nbs": args.nbs or args.batch}
    t_start = time.perf_counter()

    def ap_of(model) -> dict:
        r = evaluate(model, str(data_abs), imgsz=args.imgsz, images=args.val_images, progress=False)
        return {k: round(r[k], 4) for k in ("ap", "ap50", "ap75")}

    onnx_files: dict[str, str] = {}
    flops_targets: dict[float, float] = {}  # ratio -> FLOPs reduction of the first method (--same-flops)
    plain, plain_ap = None, None  # --equal-budget: the plainly trained model L1 and random share

    def export(model, tag: str) -> None:
        onnx_files[tag] = export_onnx(model, args.imgsz, work / f"lat_{tag}")

    base = load_model(weights)
    calib = calibration_images(str(data_abs), args.imgsz, n=32)
    result = {
        "settings": {
            **{k: v for k, v in vars(args).items()},
            "device": "cpu",
            "note": " ".join([
                f"CPU-only run: reduced image size {args.imgsz} (not 640), {args.pre_epochs} sparsity/attention "
                f"epoch(s) and a {args.epochs}-epoch fine-tune on coco-real train (fraction {args.fraction});",
                "AP from pycocotools on coco-real val; latency = ONNX Runtime CPU p50, batch 1,",
                f"{args.threads} thread(s), best of {args.rounds} interleaved rounds' medians, on a machine shared "
                "with other jobs. Removed channels' mean contribution is folded into the next BatchNorm (32 coco-real "
                "train images). BN and CAP get their pre-training epochs on top of the common fine-tune;",
                "L1 and random get as many epochs of plain training first (equal budget)." if args.equal_budget
                else "L1 and random rank the untouched weights.",
                f"Every method is pruned to the FLOPs reduction {methods[0]} reaches at each ratio." if args.same_flops
                else "Every method is pruned to the same channel ratio.",
            ]),
        },
        "baseline": {},
        "runs": [],
        "importance_training": {},
    }

    def save() -> None:
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        out.write_text(json.dumps(result, indent=2, default=str))

    export(base, "base")
    result["baseline"] = {"params": count_params(base), "gflops": round(gflops(base, args.imgsz), 3),
                          "gflops_640": round(gflops(base, 640), 3), **ap_of(base)}
    save()
    print(json.dumps(result["baseline"]), flush=True)

    for method in methods:
        t0 = time.perf_counter()
        importance, source = None, base
        if method == "bn" and args.pre_epochs:
            slim = BNSlimming(s=args.s, imgsz=args.imgsz)
            source = train(deepcopy(base), train_data, [slim], project=work, name="bn_sparsity", epochs=args.pre_epochs,
                           **train_args).model
            result["importance_training"]["bn"] = {"gamma_history": slim.history, **ap_of(source)}
        elif method == "cap":
            cap = ChannelAttentionPruning(ratio=None, imgsz=args.imgsz)
            source = train(deepcopy(base), train_data, [cap], project=work, name="cap_attention",
                           epochs=max(args.pre_epochs, 1), **train_args).model
            importance = cap.scores()
            result["importance_training"]["cap"] = {"batches": cap.batches, **ap_of(source)}
        elif method in {"l1", "random"} and args.pre_epochs and args.equal_budget:
            if plain is None:  # L1 and random rank the same plainly trained model: train it once
                plain = train(deepcopy(base), train_data, [], project=work, name="plain",
                              epochs=args.pre_epochs, **train_args).model
                plain_ap = ap_of(plain)
            source = plain
            result["importance_training"][method] = plain_ap
        for ratio in ratios:
            target = {"ratio": ratio} if ratio not in flops_targets else {"flops_reduction": flops_targets[ratio]}
            pruned, summary = prune_model(source, method=method, importance=importance, imgsz=args.imgsz,
                                          calib=calib, **target)
            if args.same_flops:
                flops_targets.setdefault(ratio, summary["achieved"]["flops_reduction"])
            export(pruned, f"{method}_{ratio}")
            row = {
                "method": method,
                "ratio": ratio,
                "achieved_ratio": summary["achieved"]["ratio"],
                "pruned_to": "ratio" if "ratio" in target else f"flops_reduction of {methods[0]}",
                "params": summary["params"]["after"],
                "params_ratio": round(summary["params"]["after"] / result["baseline"]["params"], 4),
                "gflops": summary["gflops"]["after"],
                "gflops_reduction": round(1 - summary["gflops"]["after"] / result["baseline"]["gflops"], 4),
                "stage_pruned_share": summary["stage_pruned_share"],
                "ap_pruned": ap_of(pruned),
            }
            if ratio in ft_ratios and args.epochs:
                tuned = train(pruned, train_data, [], project=work, name=f"ft_{method}_{ratio}", epochs=args.epochs,
                              **train_args).model
                row["ap_finetuned"] = ap_of(tuned)
            result["runs"].append(row)
            save()
            print(json.dumps(row), flush=True)
        print(f"{method}: {time.perf_counter() - t0:.0f}s", flush=True)
    # Latency last, all models interleaved (see time_onnx), so load from other jobs hits every model alike.
    lat = time_onnx(onnx_files, args.imgsz, runs=args.runs, threads=args.threads, rounds=args.rounds)
    result["baseline"]["latency_ms_p50"] = lat["base"]
    for row in result["runs"]:
        row["latency_ms_p50"] = lat[f"{row['method']}_{row['ratio']}"]
        row["speedup"] = round(lat["base"] / row["latency_ms_p50"], 3)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
