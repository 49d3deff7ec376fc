"""Timing and the benchmark JSON written by both deploy bench scripts: the schema of ``yolocomp bench``.

``{settings, host, models: [{name, model, backend, precision, params, gflops, size_mb, by_batch: {"1": {latency_ms,
fps}}, notes, latency_ms, fps, batch}], ratios: [{name, vs, speedup, params, gflops, size_mb}]}``; ``latency_ms`` is
``{p50, p90, p99, mean, min}`` in milliseconds, top-level ``latency_ms`` / ``fps`` are those of the first batch size
that ran, ``params`` / ``gflops`` are null when unknown.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

# Keys every per-model entry carries (the contract); the tests compare the whole schema with yolocomp bench.
MODEL_KEYS = ("latency_ms", "fps", "params", "gflops", "size_mb")
_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def latency_stats(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    stats = {f"p{q}": round(float(np.percentile(a, q)), 3) for q in (50, 90, 99)}
    return {**stats, "mean": round(float(a.mean()), 3), "min": round(float(a.min()), 3)}


def time_interleaved(models: list[Callable[[np.ndarray], object]], x: np.ndarray, runs: int, warmup: int) -> list[list[float]]:
    """Milliseconds per call for each model, taking turns round-robin (rotating start) so background load hits all
    models alike; each call must block until its output is on the host."""
    samples: list[list[float]] = [[] for _ in models]
    for r in range(warmup + runs):
        for i in [*range(r % len(models), len(models)), *range(r % len(models))]:
            t0 = time.perf_counter()
            models[i](x)
            if r >= warmup:
                samples[i].append((time.perf_counter() - t0) * 1000)
    return samples


def onnx_param_count(path: str | Path) -> int | None:
    """Weights and biases of the Conv/Gemm/MatMul layers of an ONNX graph (FP32 or Q/DQ alike), counted per layer;
    None without the onnx package."""
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {init.name: int(np.prod(init.dims)) if init.dims else 1 for init in graph.initializer}
    # a weight may reach its layer through DequantizeLinear (Q/DQ models) or Identity (the exporter deduplicates
    # equal tensors, e.g. freshly initialised biases): follow those to the stored tensor
    source = {n.output[0]: n.input[0] for n in graph.node if n.op_type in {"DequantizeLinear", "Identity"}}
    total = 0
    for node in graph.node:
        if node.op_type not in _WEIGHT_OPS:
            continue
        for name in node.input[1:3]:
            for _ in range(4):
                if name in sizes or name not in source:
                    break
                name = source[name]
            total += sizes.get(name, 0)
    return total


def model_size_mb(model) -> float:  # noqa: ANN001 - duck-typed backend model
    """The model's file size; for a model of several files (an OpenVINO .xml + .bin) their sum."""
    files = getattr(model, "files", None) or [model.path]
    return round(sum(Path(f).stat().st_size for f in files if Path(f).is_file()) / 1e6, 3)


def entry(name: str, model, gflops: float | None) -> dict:  # noqa: ANN001 - duck-typed backend model
    return {"name": name, "model": str(model.path), "backend": model.backend, "precision": model.precision,
            "params": model.params, "gflops": gflops if gflops is not None else getattr(model, "gflops", None), "size_mb": model_size_mb(model),
            "by_batch": {}, "notes": []}


def finish(entries: list[dict], settings: dict, host: dict) -> dict:
    for e in entries:  # top-level latency / fps: the first batch size that ran (yolocomp bench's contract)
        first = next(((int(b), v) for b, v in e["by_batch"].items() if "latency_ms" in v), None)
        e["latency_ms"] = first[1]["latency_ms"] if first else None
        e["fps"] = first[1]["fps"] if first else None
        e["batch"] = first[0] if first else None
    return {"settings": settings, "host": host, "models": entries, "ratios": ratios(entries)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def ratios(entries: list[dict]) -> list[dict]:
    """Against the first model: speedup = its p50 / this p50 (>1 faster); params, gflops, size as this / first."""
    base, out = entries[0], []
    for e in entries:
        speedup = {b: _ratio(base["by_batch"][b]["latency_ms"]["p50"], v["latency_ms"]["p50"])
                   for b, v in e["by_batch"].items() if "latency_ms" in v and "latency_ms" in base["by_batch"].get(b, {})}
        out.append({"name": e["name"], "vs": base["name"], "speedup": speedup, "params": _ratio(e["params"], base["params"]),
                    "gflops": _ratio(e["gflops"], base["gflops"]), "size_mb": _ratio(e["size_mb"], base["size_mb"])})
    return out


def host_info(**extra: object) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), **extra}
