"""Quantization benchmark on the real YOLOv8n and ../shared/coco-real (JSON out).

Rows: FP32 ONNX; PTQ INT8 with TensorRT-style symmetric Q/DQ for each calibrator; PTQ INT8 in the ONNX Runtime
flavour (uint8 activations, integer SiLU); QAT INT8 / W4A8 / W4A4 (full, heads included, TensorRT-style Q/DQ);
Ultralytics' own ``export(format="onnx", quantize=8)`` and, where nvidia-modelopt is installed, ``train(quantize=8)``
then ``export(format="onnx")``. QAT rows use qat()'s defaults (self-distillation from the FP32 weights, no label loss,
BN frozen, SGD, lr0=1e-4 for INT8 and 1e-3 for 4 bits); the FP32 fine-tune and Ultralytics' QAT rows train with the
INT8 QAT row's optimizer, lr and budget.
AP/AP50/AP75 with ``yolocomp.eval.evaluate`` (ONNX Runtime); latency: ONNX Runtime CPU, batch 1, all models run
round-robin in one process so machine load hits them alike; ratios are FP32 p50 / model p50.

    nice -n 10 python tools/bench_quant.py --out runs/bench_quant --imgsz 320 --epochs 1 --images 64
"""

from __future__ import annotations

import argparse
import json
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


def latency(paths: dict[str, Path], imgsz: int, runs: int, threads: int) -> dict[str, dict]:
    """Batch-1 ONNX Runtime CPU latency per model, interleaved call by call after 3 warm-up rounds."""
    import onnxruntime as ort

    from yolocomp.eval.timing import flat, interleaved_latency

    sessions = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    calls = {n: partial(s.run, None, {"images": x}) for n, s in sessions.items()}
    samples = interleaved_latency(calls, runs=1, rounds=runs, warmup_rounds=3, rotate=False)
    times = {n: flat(rounds) for n, rounds in samples.items()}
    return {n: {"p50_ms": round(float(np.median(t)), 2), "min_ms": round(float(np.min(t)), 2)} for n, t in times.items()}


def ul_qat_int8(args: argparse.Namespace, data: Path, weights: Path, out: Path, train_settings: dict, add) -> None:
    """The ``ultralytics_qat_int8`` row (or its error row)."""
    import importlib.util

    from yolocomp.errors import first_line

    missing = [m for m in ("modelopt", "huggingface_hub") if importlib.util.find_spec(m) is None]
    if missing:  # checked here: Ultralytics would otherwise try to pip-install them at run time
        add("ultralytics_qat_int8", None, {"error": f"not run: train(quantize=8) needs nvidia-modelopt and "
                                                    f"huggingface_hub; missing: {', '.join(missing)}"})
        return
    try:
        from importlib.metadata import version

        from ultralytics import YOLO

        folder = (out / "ultralytics_qat").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        copy = folder / weights.name  # Ultralytics writes next to the weights: its own copy
        shutil.copy(weights, copy)
        t = time.time()
        yolo = YOLO(str(copy))
        yolo.train(data=str(data), quantize=8, epochs=args.epochs, imgsz=args.imgsz, batch=16,
                   fraction=args.qat_fraction, device="cpu", workers=0, plots=False, project=str(folder),
                   name="train", exist_ok=True, **train_settings)
        best = Path(yolo.trainer.best)
        train_s = round(time.time() - t, 1)
        path = YOLO(str(best)).export(format="onnx", quantize=8, imgsz=args.imgsz)
        add("ultralytics_qat_int8", Path(path), {"placement": "ultralytics (ModelOpt Q/DQ, head output convs float)",
                                                 "modelopt": version("nvidia-modelopt"), "train_s": train_s})
    except Exception as e:
        traceback.print_exc()
        add("ultralytics_qat_int8", None, {"error": f"{type(e).__name__}: {first_line(e, 300)}"})


def metrics(result: dict) -> dict:
    return {k: (round(100 * result[k], 2) if isinstance(result.get(k), float) else result.get(k))
            for k in ("ap", "ap50", "ap75")}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_quant")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=1, help="QAT epochs (CPU: keep 1)")
    ap.add_argument("--images", type=int, default=64, help="calibration images (train split)")
    ap.add_argument("--val-images", type=int, default=None, help="val images for AP (default: all)")
    ap.add_argument("--qat-fraction", type=float, default=0.5, help="fraction of coco-real train per QAT epoch")
    ap.add_argument("--qat", default="8,w4a8,w4a4", help="QAT variants to run ('' for none)")
    ap.add_argument("--freeze-bn-epoch", type=int, default=0, help="QAT: freeze BN statistics after N epochs (0: "
                    "from the start, best for the 1-epoch CPU budget)")
    ap.add_argument("--qat-lr0", type=float, default=None, help="lr0 of every training row (default: qat()'s, "
                    "yolocomp.config.qat_train_defaults: 1e-4, 1e-3 for the 4-bit QAT rows)")
    ap.add_argument("--ft-baseline", type=int, default=1, help="also run a plain FP32 fine-tune with the QAT budget")
    ap.add_argument("--calibrators", default="minmax,percentile,entropy,mse")
    ap.add_argument("--runs", type=int, default=30, help="latency runs per model")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    ap.add_argument("--latency-imgsz", type=int, default=640,
                    help="also time FP32 / PTQ INT8 (both placements) at this size, latency only (0 = skip)")
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n-coco-dq.pt"))
    ap.add_argument("--data", default=str(SHARED / "coco-real" / "coco-real.yaml"))
    args = ap.parse_args(argv)

    import torch

    from yolocomp.commands.ptq import ptq
    from yolocomp.commands.qat import qat
    from yolocomp.config import qat_train_defaults
    from yolocomp.errors import first_line
    from yolocomp.eval import evaluate
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.export.ort_check import integer_ops
    from yolocomp.integration import load_model, mirror_dataset, resolve_data

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(mirror_dataset(Path(args.data), out), out)  # caches stay out of ../shared
    weights = out / Path(args.weights).name  # Ultralytics writes exports next to the weights: work on a copy
    if not weights.exists():
        shutil.copy(args.weights, weights)
    t_start = time.time()
    report: dict = {
        "settings": {**vars(args), "python": platform.python_version(), "torch": torch.__version__,
                     "note": f"CPU only: imgsz {args.imgsz} (not 640), {args.images} calibration images, QAT "
                             f"{args.epochs} epoch(s) on {args.qat_fraction:.0%} of coco-real train at "
                             f"{args.imgsz} px (CPU budget; the issue's QAT numbers use 15 epochs on an H100)"},
        "rows": [],
    }
    onnx_paths: dict[str, Path] = {}

    def add(name: str, path: Path | None, extra: dict | None = None, eval_model=None) -> None:
        row = {"model": name, **(extra or {})}
        t = time.time()
        try:
            if path is not None:
                row["onnx"] = str(path)
                res = evaluate(str(path), data, imgsz=args.imgsz, images=args.val_images, progress=False)
                row.update(metrics(res))
                ops = integer_ops(path)
                row["ort_integer_ops"] = sum(ops["integer_ops"].values())
                row["ort_float_convs"] = ops["float_convs"]
                onnx_paths[name] = path
            elif eval_model is not None:
                row.update(metrics(evaluate(eval_model, data, imgsz=args.imgsz, images=args.val_images,
                                            progress=False)))
        except Exception as e:  # one failing variant must not lose the others
            row["error"] = f"{type(e).__name__}: {first_line(e, 300)}"
            traceback.print_exc()
        row["eval_s"] = round(time.time() - t, 1)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        (out / "bench_quant.json").write_text(json.dumps(report, indent=2, default=str))

    float_model = load_model(weights).float().eval()

    add("fp32", export_onnx(float_model, out / "fp32.onnx", imgsz=args.imgsz))

    # PTQ exactly as `yolocomp ptq` runs it: the TensorRT-layout Q/DQ file, and for two calibrators also the ONNX
    # Runtime flavour (uint8 asymmetric activations, integer SiLU); AP of both measured below, in ONNX Runtime
    for cal in [c for c in args.calibrators.split(",") if c]:
        try:
            rep = ptq(weights, data, out / f"ptq_{cal}", imgsz=args.imgsz, evaluate=False, calibrator=cal,
                      images=args.images, batch=8, ort=cal in ("percentile", "entropy"))
            add(f"ptq_{cal}", Path(rep["onnx"]), {"placement": "tensorrt", "lint_findings": len(rep["lint"])})
            if "ort_flavour" in rep:
                add(f"ptq_{cal}_ort", Path(rep["ort_flavour"]["onnx"]),
                    {"placement": "onnxruntime (uint8 asym, via onnxruntime.quantization)"})
        except Exception as e:
            add(f"ptq_{cal}", None, {"error": f"{type(e).__name__}: {first_line(e, 300)}"})

    # Ultralytics' own INT8 ONNX export
    try:
        from ultralytics import YOLO

        ul = YOLO(str(weights)).export(format="onnx", quantize=8, data=str(data), imgsz=args.imgsz,
                                       fraction=min(1.0, args.images / 288), verbose=False)
        add("ultralytics_onnx_int8", Path(ul), {"placement": "ultralytics (onnxruntime quantize_static)"})
    except Exception as e:
        add("ultralytics_onnx_int8", None, {"error": f"{type(e).__name__}: {first_line(e, 300)}"})
    # the INT8 QAT row's optimizer / lr / warmup for the FP32 fine-tune and Ultralytics' QAT too, so those rows differ
    # only in what they train
    lr_override = {"lr0": args.qat_lr0} if args.qat_lr0 is not None else {}
    train_settings = {**qat_train_defaults(8, 8), **lr_override}
    report["settings"]["train_settings"] = train_settings

    # plain FP32 fine-tune with the QAT budget: separates "short fine-tune on few images" from "quantization"
    if args.qat and args.ft_baseline:
        try:
            from yolocomp.integration import train

            res = train(load_model(weights).float(), str(data), [], project=out, name="fp32_finetune",
                        epochs=args.epochs, imgsz=args.imgsz, batch=16, fraction=args.qat_fraction, **train_settings)
            add("fp32_finetune_same_budget", export_onnx(res.model.float().eval(), out / "fp32_finetune.onnx",
                                                         imgsz=args.imgsz))
        except Exception as e:
            add("fp32_finetune_same_budget", None, {"error": f"{type(e).__name__}: {e}"})

    # QAT, full (heads included), TensorRT-style Q/DQ
    variants = {"8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
    for key in [v for v in args.qat.split(",") if v]:
        wb, ab = variants[key]
        name = f"qat_w{wb}a{ab}"
        try:
            rep = qat(str(weights), data, out / name, bits=max(wb, ab), weight_bits=wb, act_bits=ab,
                      epochs=args.epochs, imgsz=args.imgsz, batch=16, fraction=args.qat_fraction, export=True,
                      evaluate_float=False, eval_images=args.val_images, freeze_bn_epoch=args.freeze_bn_epoch,
                      **lr_override)
            add(name, Path(rep["onnx"]), {"placement": "tensorrt", "export": rep["export"],
                                          "ap_fake_quant_torch": metrics(rep["ap_fake_quant"]),
                                          "teacher": rep.get("teacher"), "label_loss": rep["label_loss"],
                                          "train_settings": rep["train_settings"],
                                          "lint_findings": len(rep["lint"]), "train_s": rep["seconds"]})
        except Exception as e:
            traceback.print_exc()
            add(name, None, {"error": f"{type(e).__name__}: {e}"})

    # Ultralytics' own QAT: train(quantize=8) (NVIDIA ModelOpt fake-quant with fixed max-calibrated ranges, BN live,
    # head output convs left float, label loss) with the same epochs / images / batch / optimizer / lr as the QAT rows,
    # then Ultralytics' export(format="onnx") of the QAT checkpoint (Q/DQ). ModelOpt is optional and never a yolocomp
    # dependency; without it (or the huggingface_hub it imports) this row only records why it did not run.
    if "8" in args.qat.split(","):
        ul_qat_int8(args, data, weights, out, train_settings, add)

    lat = latency(onnx_paths, args.imgsz, args.runs, args.threads)
    base = lat["fp32"]["p50_ms"]
    for row in report["rows"]:
        if row["model"] in lat:
            row.update(latency_p50_ms=lat[row["model"]]["p50_ms"], latency_min_ms=lat[row["model"]]["min_ms"],
                       speedup_vs_fp32=round(base / lat[row["model"]]["p50_ms"], 2))
    fp = next(r for r in report["rows"] if r["model"] == "fp32")
    for row in report["rows"]:
        if "ap" in row and isinstance(row["ap"], float) and isinstance(fp.get("ap"), float):
            row["ap_delta_vs_fp32"] = round(row["ap"] - fp["ap"], 2)
    if args.latency_imgsz:
        size = args.latency_imgsz
        paths = {"fp32": export_onnx(float_model, out / f"fp32_{size}.onnx", imgsz=size)}
        rep = ptq(weights, data, out / f"ptq_{size}", imgsz=size, evaluate=False, calibrator="percentile", images=16,
                  batch=8, ort=True)  # latency only: a few calibration images suffice
        paths["ptq_int8_tensorrt_placement"] = Path(rep["onnx"])
        paths["ptq_int8_ort_flavour"] = Path(rep["ort_flavour"]["onnx"])
        lat_big = latency(paths, size, max(10, args.runs // 2), args.threads)
        report[f"latency_{size}"] = {n: {**v, "speedup_vs_fp32": round(lat_big["fp32"]["p50_ms"] / v["p50_ms"], 2)}
                                     for n, v in lat_big.items()}
        print(json.dumps(report[f"latency_{size}"]), flush=True)
    report["seconds"] = round(time.time() - t_start, 1)
    (out / "bench_quant.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps([{k: r.get(k) for k in ("model", "ap", "ap50", "ap75", "ap_delta_vs_fp32", "speedup_vs_fp32",
                                             "error")} for r in report["rows"]], indent=1))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
