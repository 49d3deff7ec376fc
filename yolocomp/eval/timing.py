"""The one latency timer: models interleaved over rounds, so load on a shared machine hits them all alike.

A model timed alone in a quiet moment looks faster than one timed during a burst of background work; taking turns
(and rotating who goes first) spreads such bursts over every model, so the ratios between them stay fair even when
the absolute numbers drift. :func:`interleaved_latency` records the samples; :func:`percentiles` and
:func:`best_round_median` summarise them the way ``bench`` and the stage reports do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import numpy as np

Key = TypeVar("Key", bound=Hashable)


def interleaved_latency(
    calls: Mapping[Key, Callable[[], object]],
    runs: int,
    warmup: int = 0,
    rounds: int = 1,
    warmup_rounds: int = 0,
    sync: Mapping[Key, Callable[[], None]] | None = None,
    rotate: bool = True,
    on_call: Callable[[], None] | None = None,
) -> dict[Key, list[list[float]]]:
    """Milliseconds per call of every model, one list per recorded round: ``{key: [[ms, ...], ...]}``.

    Each round every model takes a turn (``rotate``: the first model moves one place per round) of ``warmup``
    untimed calls and then ``runs`` timed ones. ``warmup_rounds`` whole rounds run first and are not recorded.
    ``sync[key]`` is called before and after each timed call (GPU backends queue work; without it the timer would
    stop before the device finishes). ``on_call`` is called after every call (a progress bar).
    """
    keys = list(calls)
    samples: dict[Key, list[list[float]]] = {k: [] for k in keys}
    for r in range(warmup_rounds + rounds):
        shift = r % len(keys) if rotate and keys else 0
        for key in keys[shift:] + keys[:shift]:
            call, wait = calls[key], (sync or {}).get(key)
            for _ in range(warmup):
                call()
                if on_call:
                    on_call()
            times = []
            for _ in range(runs):
                if wait:
                    wait()
                t0 = time.perf_counter()
                call()
                if wait:
                    wait()
                times.append((time.perf_counter() - t0) * 1000)
                if on_call:
                    on_call()
            if r >= warmup_rounds:
                samples[key].append(times)
    return samples


def flat(rounds: list[list[float]]) -> list[float]:
    """All samples of all rounds in one list."""
    return [t for round_ in rounds for t in round_]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 / mean / min in ms, rounded to 3 decimals (``bench``'s ``latency_ms``)."""
    a = np.asarray(samples_ms)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
        "min": round(float(a.min()), 3),
    }


def best_round_median(rounds: list[list[float]]) -> float:
    """The lowest per-round median: the round least disturbed by other work on the machine (inf without rounds)."""
    return min((float(np.median(r)) for r in rounds), default=float("inf"))


def time_onnx(paths: dict[str, str], imgsz: int, runs: int = 30, warmup: int = 5, threads: int | None = None,
              rounds: int = 3) -> dict[str, float]:
    """Batch-1 ONNX Runtime CPU latency (ms, 3 decimals) per model: models interleaved over ``rounds``, each turn
    ``warmup`` untimed and ``runs`` timed calls; the best round's median."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    calls = {k: _session_call(s, x) for k, s in sessions.items()}
    samples = interleaved_latency(calls, runs=runs, warmup=warmup, rounds=rounds, rotate=False)
    return {k: round(best_round_median(v), 3) for k, v in samples.items()}


def _session_call(session: Any, x: np.ndarray) -> Callable[[], object]:
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)
