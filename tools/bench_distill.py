#!/usr/bin/env python
"""Distillation benchmark: recover a pruned YOLOv8n with no KD / head KD / FGFI / FGD / Ultralytics' built-in KD.

The real YOLOv8n (``../shared/weights/yolov8n-coco-dq.pt``) is pruned at ``--ratio`` (BN-gamma importance) and then
fine-tuned for the same number of epochs on ``../shared/coco-real`` train in every variant, with the unpruned YOLOv8n
as teacher. Reported per variant: AP / AP50 / AP75 on coco-real val (``yolocomp.eval.evaluate``, pycocotools) and the
mean training step time (forward + loss + backward (+ optimizer step when due), timed between Ultralytics'
``on_train_batch_start`` / ``on_train_batch_end``, data loading excluded) with its ratio to the no-KD run.
Issue target: FGD and FGFI each >= no-KD + 1.0 AP and not behind Ultralytics' KD; step time <= 1.6x no-KD.

    nice -n 10 python tools/bench_distill.py --imgsz 320 --epochs 1 --out runs/bench_distill
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
sys.path.insert(0, str(ROOT))

from yolocomp.methods import Method  # noqa: E402

VARIANTS = ("none", "logit", "fgfi", "fgd", "ultralytics")


class StepTimer(Method):
    """Times every training iteration (batch start -> batch end) through the trainer's own callbacks."""

    name = "timer"

    def __init__(self, skip: int = 2):
        self.skip = skip
        self.times: list[float] = []
        self._t0: float | None = None

    def attach(self, trainer: Any) -> None:
        trainer.add_callback("on_train_batch_start", self.start)
        trainer.add_callback("on_train_batch_end", self.stop)

    def start(self, trainer: Any) -> None:
        self._t0 = time.perf_counter()

    def stop(self, trainer: Any) -> None:
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
        self._t0 = None

    def mean_ms(self) -> float | None:
        t = self.times[self.skip :] or self.times
        return round(1000 * statistics.fmean(t), 1) if t else None


def _metrics(m: dict) -> dict:
    return {k: round(100 * m[k], 2) for k in ("ap", "ap50", "ap75")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_distill")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--nbs", type=int, default=None, help="nominal batch size (default: --batch, one optimizer step per batch)")
    p.add_argument("--lr0", type=float, default=1e-3, help="AdamW learning rate, the same for every variant")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--weights", default=str(SHARED / "weights" / "yolov8n-coco-dq.pt"))
    p.add_argument("--data", default=str(SHARED / "coco-real" / "coco-real.yaml"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-teacher-eval", action="store_true", help="do not evaluate the unpruned teacher (saves one val pass)")
    args = p.parse_args(argv)
    from yolocomp.integration.threads import use_cpu_threads

    use_cpu_threads()  # Ultralytics would train on cpu_count - 1 threads

    from yolocomp.commands.distill import make_method, read_loss_columns
    from yolocomp.errors import UserError
    from yolocomp.eval import evaluate
    from yolocomp.integration import load_model, mirror_dataset, resolve_data, save_model, train

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise UserError(f"unknown variant {bad[0]}; use {', '.join(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = resolve_data(mirror_dataset(Path(args.data), out), out)
    teacher_path = str(Path(args.weights).resolve())
    teacher = load_model(teacher_path)

    from yolocomp.prune import prune_model

    t0 = time.perf_counter()
    pruned, summary = prune_model(teacher, ratio=args.ratio, method="bn", imgsz=args.imgsz)
    pruned_path = save_model(pruned, out / "pruned.pt", extra={"bench_distill": {"ratio": args.ratio}})
    prune_s = time.perf_counter() - t0

    def ev(model: Any) -> dict:
        return _metrics(evaluate(model, data, imgsz=args.imgsz, device=args.device, progress=False))

    result: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items()},
        "teacher": None if args.skip_teacher_eval else ev(teacher_path),
        "pruned_before_finetune": ev(pruned_path),
        "prune": {"seconds": round(prune_s, 1), **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))}},
        "variants": {},
    }
    print(json.dumps({k: result[k] for k in ("teacher", "pruned_before_finetune")}), flush=True)
    common = dict(epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, fraction=args.fraction, device=args.device,
                  seed=args.seed, deterministic=False, val=False, optimizer="AdamW", lr0=args.lr0,
                  nbs=args.nbs or args.batch, warmup_epochs=args.warmup_epochs)
    for variant in variants:
        timer = StepTimer()
        overrides = dict(common)
        methods: list[Method] = [timer]
        if variant == "ultralytics":
            overrides["distill_model"] = teacher_path
        elif variant != "none":
            methods.insert(0, make_method(variant, teacher_path))
        student = load_model(pruned_path)
        start = time.perf_counter()
        res = train(deepcopy(student), str(data), methods, project=out, name=f"train_{variant}", **overrides)
        seconds = time.perf_counter() - start
        model = getattr(res.model, "student_model", res.model)
        path = save_model(model, out / f"student_{variant}.pt")
        row = {
            **ev(path),
            "step_ms": timer.mean_ms(),
            "steps": len(timer.times),
            "train_seconds": round(seconds, 1),
            "losses": {k: v[-1] for k, v in read_loss_columns(res.save_dir / "results.csv").items()},
        }
        result["variants"][variant] = row
        print(json.dumps({variant: row}), flush=True)

    base = result["variants"].get("none")
    for row in result["variants"].values():
        if base:
            row["ap_vs_none"] = round(row["ap"] - base["ap"], 2)
            row["step_time_ratio"] = round(row["step_ms"] / base["step_ms"], 2) if base["step_ms"] and row["step_ms"] else None
    ul = result["variants"].get("ultralytics")
    result["targets"] = {
        v: {
            "ap_gain_ge_1": (result["variants"][v].get("ap_vs_none") or -1e9) >= 1.0 if base else None,
            "not_behind_ultralytics": result["variants"][v]["ap"] >= ul["ap"] if ul else None,
            "step_time_le_1.6x": (result["variants"][v].get("step_time_ratio") or 1e9) <= 1.6 if base else None,
        }
        for v in ("fgfi", "fgd")
        if v in result["variants"]
    }
    (out / "bench_distill.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    from yolocomp.errors import UserError

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
