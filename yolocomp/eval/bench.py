"""``bench``: forward-pass latency of several models timed interleaved in one process, plus params / GFLOPs / size.

What is timed: one runner call on a preprocessed random batch (host input -> host output, so device copies count for
GPU backends), not image decoding nor NMS, which are the same for every model. Models take turns round-robin, the
starting model rotating each round, so background load on a shared machine hits all of them alike and the ratios stay
fair even when absolute numbers drift.
"""

from __future__ import annotations

import json
import platform
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from yolocomp.errors import UserError
from yolocomp.eval.runners import make_runner
from yolocomp.eval.timing import flat, interleaved_latency, percentiles


def _static_stats(model: Any, runner: Any, imgsz: int) -> dict:
    """Params, GFLOPs and size of what the runner runs (ONNX: read from the graph; TensorRT: not readable)."""
    from yolocomp.eval.info import count_params, gflops, size_mb

    if runner.backend == "torch":
        module = runner.original
        return {"params": count_params(module), "gflops": gflops(module, imgsz, digits=4),
                "size_mb": size_mb(model if isinstance(model, (str, Path)) and Path(model).is_file() else module)}
    if runner.backend == "onnxruntime":
        from yolocomp.eval.onnx_stats import onnx_stats

        stats = onnx_stats(model, imgsz)
        return {"params": stats["params"], "gflops": stats["gflops"], "size_mb": size_mb(model)}
    if runner.backend == "openvino":
        xml = Path(runner.xml)
        files = [xml, xml.with_suffix(".bin")] if xml.suffix == ".xml" else [xml]
        return {"params": None, "gflops": None, "size_mb": round(sum(f.stat().st_size for f in files if f.is_file()) / 1e6, 3)}
    return {"params": None, "gflops": None, "size_mb": size_mb(model)}


def _names(models: list[Any]) -> list[str]:
    names = []
    for i, m in enumerate(models):
        name = Path(m).name if isinstance(m, (str, Path)) else getattr(m, "pt_path", None) or f"model{i}"
        names.append(name if name not in names else f"{name}#{i}")
    return names


def _host(device: str) -> dict:
    import onnxruntime
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "torch_threads": torch.get_num_threads()}
    from yolocomp.eval.runners.openvino import openvino_version

    if openvino_version():
        info["openvino"] = openvino_version()
    if torch.cuda.is_available() and str(device) != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def bench(
    models: list[Any],
    imgsz: int = 640,
    device: str = "cpu",
    batch_sizes: tuple[int, ...] = (1, 8),
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    json_out: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Latency p50/p90/p99 (ms) and FPS per model and batch size, params, GFLOPs at ``imgsz``, size (MB), and
    ``ratios`` against the first model. ``models``: ``.pt`` / ``.onnx`` / ``.engine`` / model ``.yaml`` paths, OpenVINO
    folders / ``.xml`` or in-memory DetectionModels. The top-level ``latency_ms`` / ``fps`` of each model are those of the first batch size.
    ``threads``: CPU threads for torch, ONNX Runtime and OpenVINO (default: each library's own default, all cores);
    ``settings.threads`` records it (null: all cores)."""
    if not models:
        raise UserError("bench needs at least one model (--model PATH)")
    if runs < 1 or warmup < 0:
        raise UserError(f"runs={runs}, warmup={warmup}: use runs >= 1 and warmup >= 0")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise UserError(f"batch sizes {batch_sizes}: use positive integers, e.g. 1 8")
    if not isinstance(imgsz, int) or imgsz < 32 or imgsz % 32:
        raise UserError(f"imgsz={imgsz}: use a multiple of 32, e.g. 640")
    from yolocomp.integration.threads import keep_threads

    with keep_threads():  # a torch runner with threads= sets the process-wide count
        return _bench(models, imgsz, device, batch_sizes, runs, warmup, threads, json_out, progress)


def _bench(models, imgsz, device, batch_sizes, runs, warmup, threads, json_out, progress) -> dict:
    from tqdm import tqdm

    runners = [make_runner(m, device, threads) for m in models]
    names = _names(models)
    for runner, name in zip(runners, names):
        if getattr(runner, "fixed_imgsz", None) and runner.fixed_imgsz != imgsz:
            raise UserError(f"{name} takes {runner.fixed_imgsz}px input; pass --imgsz {runner.fixed_imgsz} or re-export it")

    entries = []
    for model, runner, name in zip(models, runners, names):
        entries.append({"name": name, "model": runner.source, "backend": runner.backend, **_static_stats(model, runner, imgsz),
                        "by_batch": {}, "notes": []})
        if runner.backend == "openvino":
            entries[-1]["notes"].append(f"OpenVINO CPU, {runner.threads} inference threads")

    rng = np.random.default_rng(0)
    total = sum((warmup + runs) * len(runners) for _ in batch_sizes)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress)
    for b in (int(b) for b in batch_sizes):
        x = rng.random((b, 3, imgsz, imgsz), dtype=np.float32)
        active = []
        for i, runner in enumerate(runners):
            fixed = getattr(runner, "fixed_batch", None)
            if fixed is not None and fixed != b:
                note = f"batch {b} skipped: the model has a fixed batch of {fixed} (re-export it with yolocomp export --dynamic)"
                entries[i]["by_batch"][str(b)] = {"skipped": note}
                entries[i]["notes"].append(note)
                bar.update(warmup + runs)
            else:
                active.append(i)
        calls = {i: partial(runners[i], x) for i in active}
        syncs = {i: runners[i].synchronize for i in active}
        samples = interleaved_latency(calls, runs=1, rounds=runs, warmup_rounds=warmup, sync=syncs,
                                      on_call=lambda: bar.update(1))
        for i in active:
            lat = percentiles(flat(samples[i]))
            entries[i]["by_batch"][str(b)] = {"latency_ms": lat, "fps": round(b * 1000 / lat["p50"], 2)}
    bar.close()

    for e in entries:  # contract: top-level latency_ms / fps from the first batch size that ran
        first = next((v for v in e["by_batch"].values() if "latency_ms" in v), None)
        e["latency_ms"] = first["latency_ms"] if first else None
        e["fps"] = first["fps"] if first else None
        e["batch"] = next((int(k) for k, v in e["by_batch"].items() if "latency_ms" in v), None)

    result = {
        "settings": {"imgsz": imgsz, "device": str(device), "batch_sizes": [int(b) for b in batch_sizes], "runs": runs,
                     "warmup": warmup, "threads": threads, "input": "random float32 NCHW in [0, 1]",
                     "timed": "one forward pass per sample (input and output copies included; no decode, no NMS)",
                     "order": "interleaved round-robin, rotating start", "fps": "batch * 1000 / p50 latency"},
        "host": _host(device),
        "models": entries,
        "ratios": _ratios(entries),
    }
    if json_out is not None:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def _ratios(entries: list[dict]) -> list[dict]:
    """Against the first model: ``speedup`` = its p50 latency / this p50 (>1: faster); params, gflops, size as
    this / first (<1: smaller)."""
    base = entries[0]
    out = []
    for e in entries:
        speedup = {}
        for b, v in e["by_batch"].items():
            bv = base["by_batch"].get(b, {})
            if "latency_ms" in v and "latency_ms" in bv:
                speedup[b] = _ratio(bv["latency_ms"]["p50"], v["latency_ms"]["p50"])
        out.append({"name": e["name"], "vs": base["name"], "speedup": speedup, "params": _ratio(e["params"], base["params"]),
                    "gflops": _ratio(e["gflops"], base["gflops"]), "size_mb": _ratio(e["size_mb"], base["size_mb"])})
    return out
