"""Quantization benchmark on the real YOLOv8n and ../shared/coco-real (JSON out, one run, one metric).

Rows (``--rows`` picks groups):
  fp32         the float ONNX
  ptq          ``yolocomp ptq`` W8A8 with each calibrator (TensorRT-layout Q/DQ); ``--symmetric`` adds each with the
               symmetric 8-bit activation grid
  recon        ``ptq --reconstruct`` W8A8, W4A8, W4A4 (AdaRound + LSQ, block by block, BRECQ); with ``--recon-drops``
               once per QDrop probability (rows ``..._qdrop<p>``), side by side
  mixed        ``ptq --reconstruct --budget-mb`` at each ``--budgets`` share of the INT8 weight bytes (and each
               ``--recon-drops`` value)
  qat          distilled W4A8 / W4A4 QAT from the reconstructed model (the ``recon`` row of the same bits when it ran
               in this run, else qat's own), float model as teacher, on coco-real train and ``--images``
               (unlabelled), for ``--qat-minutes`` each; the AP it started from is in the row
  ultralytics  Ultralytics' ``export(format="onnx", quantize=8)`` and, where openvino + nncf are installed,
               ``export(format="openvino", int8=True)`` (NNCF), both calibrated on coco-real train
Every file is scored with ``yolocomp.eval.evaluate`` (pycocotools) in ONNX Runtime and, where OpenVINO is installed,
the Q/DQ and float files also after ``yolocomp export --format openvino``. Each quantization's wall time and peak
resident memory above the process's level before it (sampled every 50 ms) are in its row; ``--latency`` adds
ONNX Runtime batch-1 latency, interleaved. The mixed-precision rows also go into ``ap_vs_size.png``.

    python tools/bench_quant.py --out runs/bench_quant --imgsz 320

``--eval-splits train+val --calib-source unlabeled`` scores on coco-real's train and val images together (446), with
calibration on coco-unlabeled, for differences the 158 val images cannot resolve.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GROUPS = ("fp32", "ptq", "recon", "mixed", "qat", "ultralytics")


class PeakMemory:
    """Peak resident set size of this process while the block runs, above its size when the block started."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = self.start = 0

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def record(self) -> dict:
        return {"peak_rss_mb": round(self.peak / 2**20), "extra_rss_mb": round((self.peak - self.start) / 2**20)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_quant")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--rows", default=",".join(GROUPS), help=f"groups to run, from {', '.join(GROUPS)}")
    ap.add_argument("--calibrators", default="minmax,percentile,mse")
    ap.add_argument("--calib-images", type=int, default=256, help="calibration / reconstruction images")
    ap.add_argument("--symmetric", action="store_true",
                    help="also run each calibrator with the symmetric 8-bit activation grid (ptq --no-act-offset)")
    ap.add_argument("--bias-correction-row", action=argparse.BooleanOptionalAction, default=True,
                    help="the ptq group's row with --bias-correction")
    ap.add_argument("--calib-counts", default="64,128", help="also run the default PTQ with these calibration image counts")
    ap.add_argument("--calib-source", default="train", choices=("train", "unlabeled"),
                    help="calibrate on coco-real train or on --images (unlabelled)")
    ap.add_argument("--recon-iters", type=int, default=1000, help="reconstruction iterations per block")
    ap.add_argument("--recon-bits", default="w8a8:200,w4a8,w4a4",
                    help="reconstructed PTQ variants, each optionally with its own iterations (w8a8:200)")
    ap.add_argument("--recon-drops", default="",
                    help="QDrop probabilities to compare in the recon and mixed rows, e.g. 0,0.5 (default: ptq's)")
    ap.add_argument("--budgets", default="0.55,0.75", help="mixed-precision weight budgets, as shares of the INT8 bytes")
    ap.add_argument("--qat-bits", default="w4a8,w4a4")
    ap.add_argument("--qat-minutes", type=float, default=20.0, help="wall-clock training budget of each QAT row")
    ap.add_argument("--qat-recon-iters", type=int, default=300, help="iterations per block of the QAT warm start")
    ap.add_argument("--ort", action="store_true", help="also write and score the ONNX Runtime INT8 flavour (ptq --ort)")
    ap.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=True,
                    help="also score every Q/DQ / float file in OpenVINO (where installed)")
    ap.add_argument("--latency", action="store_true", help="ONNX Runtime batch-1 latency of every file")
    ap.add_argument("--val-images", type=int, default=None, help="val images for AP (default: all)")
    ap.add_argument("--images", default=str(SHARED / "coco-unlabeled" / "images"), help="unlabelled images")
    ap.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n-coco-dq.pt"))
    ap.add_argument("--data", default=str(SHARED / "coco-real" / "coco-real.yaml"))
    ap.add_argument("--eval-splits", default="val", choices=("val", "train+val"),
                    help="images AP is measured on: val, or train and val together (446 on coco-real, about 1.7x "
                         "less scatter; needs --calib-source unlabeled so no calibration image is scored)")
    args = ap.parse_args(argv)
    if args.eval_splits == "train+val":
        if args.calib_source != "unlabeled":
            ap.error("--eval-splits train+val scores the train images, so they must not calibrate: add "
                     "--calib-source unlabeled")
        trained = {"qat", "ultralytics"} & set(args.rows.split(","))
        if trained:
            ap.error(f"--eval-splits train+val: the {', '.join(sorted(trained))} rows train or calibrate on the train "
                     f"split; leave them out of --rows")
    unknown = set(args.rows.split(",")) - set(GROUPS) - {""}
    if unknown:
        ap.error(f"--rows: unknown group(s) {', '.join(sorted(unknown))}; use {', '.join(GROUPS)}")
    return args


def train_val_data(data: Path, out: Path) -> Path:
    """A data yaml whose val split is the train and val images of ``data`` (a resolved yaml), with one COCO json
    merged from each split's ``annotations/instances_<split>.json``."""
    import yaml

    cfg = yaml.safe_load(data.read_text())
    root, merged = Path(cfg["path"]), None
    for split in ("train", "val"):
        entry = cfg[split][0] if isinstance(cfg[split], list) else cfg[split]
        path = root / "annotations" / f"instances_{Path(str(entry)).stem}.json"
        if not path.exists():
            sys.exit(f"--eval-splits train+val needs {path} (COCO annotations of each split)")
        part = json.loads(path.read_text())
        if merged is None:
            merged = {**part, "images": [], "annotations": []}
        merged["images"] += part["images"]
        merged["annotations"] += part["annotations"]
    (out / "instances_trainval.json").write_text(json.dumps(merged))
    cfg.update(val=[cfg["train"], cfg["val"]], coco_json=str((out / "instances_trainval.json").resolve()))
    target = out / f"{data.stem}_trainval.yaml"
    target.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return target


def bits(tag: str) -> tuple[int, int]:
    """'w4a8' -> (4, 8)."""
    w, a = tag.lower().lstrip("w").split("a")
    return int(w), int(a)


def metrics(result: dict) -> dict:
    return {k: (round(100 * result[k], 2) if isinstance(result.get(k), float) else result.get(k))
            for k in ("ap", "ap50", "ap75")}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from yolocomp.integration.threads import use_cpu_threads

    use_cpu_threads()  # Ultralytics would train on cpu_count - 1 threads
    import torch

    from yolocomp.commands.ptq import ptq
    from yolocomp.commands.qat import qat
    from yolocomp.errors import first_line
    from yolocomp.eval import evaluate
    from yolocomp.export.onnx_qdq import export_onnx
    from yolocomp.integration import load_model, mirror_dataset, resolve_data
    from yolocomp.quant.sensitivity import model_weight_mb

    torch.set_num_threads(2)
    groups = set(args.rows.split(","))
    has_openvino = args.openvino and importlib.util.find_spec("openvino") is not None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(mirror_dataset(Path(args.data), out), out)  # caches stay out of ../shared
    weights = out / Path(args.weights).name  # Ultralytics writes exports next to the weights: work on a copy
    if not weights.exists():
        shutil.copy(args.weights, weights)
    calib = {"images": args.images} if args.calib_source == "unlabeled" else {}
    scored = train_val_data(data, out) if args.eval_splits == "train+val" else data
    t_start = time.time()
    report: dict = {"settings": {**vars(args), "python": platform.python_version(), "torch": torch.__version__,
                                 "openvino": has_openvino}, "rows": []}
    files: dict[str, Path] = {}

    def save() -> None:
        (out / "bench_quant.json").write_text(json.dumps(report, indent=2, default=str))

    def score(row: dict, path: Path, runtime: str) -> None:
        key = "" if runtime == "onnxruntime" else "_openvino"
        try:
            target = path
            if runtime == "openvino":
                from yolocomp.export.openvino import export_openvino

                target = export_openvino(path, out / "openvino", imgsz=args.imgsz, stem=path.stem + f"_{row['model']}")
            res = evaluate(str(target), scored, imgsz=args.imgsz, images=args.val_images, progress=False)
            row.update({f"{k}{key}": v for k, v in metrics(res).items()})
        except Exception as e:  # one failing runtime must not lose the row
            row[f"error{key}"] = f"{type(e).__name__}: {first_line(e, 300)}"
            traceback.print_exc()

    def add(name: str, make, extra: dict | None = None, openvino: bool = True) -> dict:
        """Run ``make`` (-> ONNX path, report) under the timer and memory probe, then score the file."""
        row: dict = {"model": name, **(extra or {})}
        try:
            with PeakMemory() as mem:
                t = time.time()
                path, rep = make()
                row["quantize_s"] = round(time.time() - t, 1)
            row.update(mem.record())
            path = Path(path)
            row["onnx"] = str(path)
            files[name] = path
            if rep and "ap_start" in rep:  # QAT: the fake-quant AP it started from
                row["ap_start_fake_quant"] = rep["ap_start"]["ap"]
            for key in ("lint", "mixed_precision", "reconstruction"):
                if rep and key in rep:
                    value = rep[key]
                    if key == "lint":
                        row["lint_findings"] = len(value)
                    elif key == "mixed_precision":
                        row["weight_mb"] = value["weight_mb"]
                        row["layers_8bit"] = f"{value['layers_high']}/{value['layers']}"
                    else:
                        row["head_error"] = value["head_error"]
                        row["blocks_reverted"] = sum(b["reverted"] for b in value["blocks"])
            score(row, path, "onnxruntime")
            if openvino and has_openvino:
                score(row, path, "openvino")
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {first_line(e, 300)}"
            traceback.print_exc()
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
        return row

    def run_ptq(name: str, **options):
        rep = ptq(weights, data, out / name, imgsz=args.imgsz, evaluate=False, calib_images=args.calib_images,
                  **calib, **options)
        return rep["onnx"], rep

    float_model = load_model(weights).float().eval()
    report["int8_weight_mb"] = round(model_weight_mb(float_model, 8), 4)
    if "fp32" in groups:
        add("fp32", lambda: (export_onnx(float_model, out / "fp32.onnx", imgsz=args.imgsz), None))
    if "ptq" in groups:
        for cal in [c for c in args.calibrators.split(",") if c]:
            add(f"ptq_{cal}", lambda cal=cal: run_ptq(f"ptq_{cal}", calibrator=cal, ort=args.ort),
                {"placement": "tensorrt", "calibrator": cal})
            if args.symmetric:
                add(f"ptq_{cal}_symmetric", lambda cal=cal: run_ptq(f"ptq_{cal}_sym", calibrator=cal, act_offset=False),
                    {"placement": "tensorrt", "calibrator": cal, "act_offset": False})
        # the defaults with bias correction, and with other numbers of calibration images (more must not hurt)
        if args.bias_correction_row:
            add("ptq_percentile_bias_correction", lambda: run_ptq("ptq_percentile_bc", bias_correction=True),
                {"placement": "tensorrt", "calibrator": "percentile"})
        for n in [int(c) for c in args.calib_counts.split(",") if c]:
            add(f"ptq_percentile_{n}_images", lambda n=n: (lambda rep: (rep["onnx"], rep))(ptq(
                weights, data, out / f"ptq_percentile_{n}", imgsz=args.imgsz, evaluate=False, calib_images=n,
                **calib)), {"placement": "tensorrt", "calibrator": "percentile", "calib_images": n})
    # each QDrop probability asked for gets its own rows (suffix _qdrop<p>); none asked: ptq's default, no suffix
    drops = [(f"_qdrop{float(d):g}", {"recon_drop": float(d)}) for d in args.recon_drops.split(",") if d] or [("", {})]
    if "recon" in groups:
        for spec in [t for t in args.recon_bits.split(",") if t]:
            tag, _, iters = spec.partition(":")
            w, a = bits(tag)
            iters = int(iters or args.recon_iters)
            for suffix, drop in drops:
                name = f"ptq_recon_{tag}{suffix}"
                add(name, lambda w=w, a=a, iters=iters, name=name, drop=drop: run_ptq(
                    name, weight_bits=w, act_bits=a, reconstruct=True, recon_iters=iters, **drop),
                    {"weight_bits": w, "act_bits": a, "recon_iters": iters, **drop})
    if "mixed" in groups:
        int8_mb = report["int8_weight_mb"]
        for share in [float(s) for s in args.budgets.split(",") if s]:
            budget = round(share * int8_mb, 4)
            for suffix, drop in drops:
                name = f"ptq_mixed_{share:g}{suffix}"
                add(name, lambda budget=budget, name=name, drop=drop: run_ptq(
                    name, budget_mb=budget, reconstruct=True, recon_iters=args.recon_iters, **drop),
                    {"budget_mb": budget, "budget_share_of_int8": share, **drop})
    if "qat" in groups:
        for tag in [t for t in args.qat_bits.split(",") if t]:
            w, a = bits(tag)

            # this run's reconstruction row of the same bits is the start, else qat reconstructs first itself
            start = out / f"ptq_recon_{tag}" / "quantized.pt"
            start_options = ({"teacher": str(weights), "label_loss": False} if start.exists()
                             else {"recon_iters": args.qat_recon_iters})

            def run_qat(w=w, a=a, tag=tag, start=start, start_options=start_options):
                rep = qat(str(start if start.exists() else weights), data, out / f"qat_{tag}", bits=min(w, a),
                          weight_bits=w, act_bits=a, epochs=100, imgsz=args.imgsz, batch=16, images=args.images,
                          evaluate_float=False, eval_images=args.val_images, calib_images=args.calib_images,
                          trainer={"time": args.qat_minutes / 60}, **start_options)
                return rep["onnx"], rep

            add(f"qat_{tag}", run_qat, {"weight_bits": w, "act_bits": a, "qat_minutes": args.qat_minutes,
                                        "start": str(start) if start.exists() else "qat's own reconstruction",
                                        "data": "coco-real train + --images, float model as teacher"})
    if "ultralytics" in groups:
        from ultralytics import YOLO

        fraction = min(1.0, args.calib_images / 288)  # coco-real train holds 288 images
        add("ultralytics_onnx_int8", lambda: (YOLO(str(weights)).export(
            format="onnx", quantize=8, data=str(data), imgsz=args.imgsz, fraction=fraction, verbose=False), None),
            {"placement": "ultralytics (onnxruntime quantize_static)"}, openvino=False)
        if has_openvino and importlib.util.find_spec("nncf") is not None:
            row = {"model": "ultralytics_openvino_int8", "placement": "NNCF, Detect head float (Ultralytics' choice)"}
            try:
                with PeakMemory() as mem:
                    t = time.time()
                    folder = YOLO(str(weights)).export(format="openvino", int8=True, data=str(data), split="train",
                                                       fraction=fraction, imgsz=args.imgsz, verbose=False)
                    row["quantize_s"] = round(time.time() - t, 1)
                row.update(mem.record())
                res = evaluate(str(folder), scored, imgsz=args.imgsz, images=args.val_images, progress=False)
                row.update({f"{k}_openvino": v for k, v in metrics(res).items()})
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {first_line(e, 300)}"
                traceback.print_exc()
            report["rows"].append(row)
            print(json.dumps(row), flush=True)

    fp = next((r for r in report["rows"] if r["model"] == "fp32"), {})
    for row in report["rows"]:
        for key in ("ap", "ap_openvino"):
            if isinstance(row.get(key), float) and isinstance(fp.get(key, fp.get("ap")), float):
                row[f"{key}_delta_vs_fp32"] = round(row[key] - fp.get(key, fp["ap"]), 2)
    if args.latency and "fp32" in files:
        lat = latency(files, args.imgsz, runs=20, threads=1)
        for row in report["rows"]:
            if row["model"] in lat:
                row.update(latency_p50_ms=lat[row["model"]]["p50_ms"],
                           speedup_vs_fp32=round(lat["fp32"]["p50_ms"] / lat[row["model"]]["p50_ms"], 2))
    save()
    plot_ap_vs_size(report, out / "ap_vs_size.png")
    report["seconds"] = round(time.time() - t_start, 1)
    save()
    print_table(report)
    return report


def latency(paths: dict[str, Path], imgsz: int, runs: int, threads: int) -> dict[str, dict]:
    """Batch-1 ONNX Runtime CPU latency per file, interleaved call by call after 3 warm-up rounds."""
    from functools import partial

    import numpy as np
    import onnxruntime as ort

    from yolocomp.eval.timing import flat, interleaved_latency

    calls = {}
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        calls[name] = partial(ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]).run, None,
                              {"images": x})
    samples = interleaved_latency(calls, runs=1, rounds=runs, warmup_rounds=3, rotate=False)
    return {n: {"p50_ms": round(float(np.median(flat(r))), 2)} for n, r in samples.items()}


def plot_ap_vs_size(report: dict, path: Path) -> None:
    """AP (ONNX Runtime) against weight megabytes for the INT8, W4 and mixed-precision rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    int8_mb = report.get("int8_weight_mb")
    points = []
    for r in report["rows"]:
        if not isinstance(r.get("ap"), float):
            continue
        if "weight_mb" in r:
            points.append((r["weight_mb"], r["ap"], r["model"]))
        elif int8_mb and "weight_bits" in r:  # uniform W4 / W8 rows
            points.append((int8_mb * r["weight_bits"] / 8, r["ap"], r["model"]))
        elif int8_mb and r.get("placement") == "tensorrt":  # W8A8 PTQ rows
            points.append((int8_mb, r["ap"], r["model"]))
    if not points:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for x, y, name in points:
        ax.scatter(x, y)
        ax.annotate(name.replace("ptq_", ""), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fp = next((r for r in report["rows"] if r["model"] == "fp32" and isinstance(r.get("ap"), float)), None)
    if fp:
        ax.axhline(fp["ap"], ls="--", c="grey", lw=1, label=f"fp32 {fp['ap']}")
        ax.legend(fontsize=8)
    ax.set_xlabel("weight MB (conv weights)")
    ax.set_ylabel("AP (coco-real val, ONNX Runtime)")
    ax.set_title("AP vs weight size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    cols = ("model", "ap", "ap_openvino", "ap_delta_vs_fp32", "weight_mb", "quantize_s", "extra_rss_mb", "error")
    rows = [[str(r.get(c, "")) for c in cols] for r in report["rows"]]
    widths = [max(len(c), *(len(x[i]) for x in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for x in rows:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)))


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
