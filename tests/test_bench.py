"""yolocomp.eval.bench: JSON schema, ratios against the first model, fixed-batch handling, errors."""

from __future__ import annotations

import json

import pytest

from yolocomp.errors import UserError
from yolocomp.eval.bench import bench

IMGSZ = 128


def test_bench_schema_and_ratios(tiny_detector, tmp_path):
    import torch

    from yolocomp.integration import load_model

    small = load_model("yolov8n.yaml", nc=3)
    out = tmp_path / "bench.json"
    threads_before = torch.get_num_threads()
    res = bench([tiny_detector["pt"], tiny_detector["onnx"], small], imgsz=IMGSZ, batch_sizes=(1, 2), runs=4, warmup=1,
                threads=1, json_out=out, progress=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))  # JSON-serialisable as returned
    assert torch.get_num_threads() == threads_before  # threads=1 applied while timing, then given back
    s = res["settings"]
    assert (s["imgsz"], s["device"], s["batch_sizes"], s["runs"], s["warmup"], s["threads"]) == (IMGSZ, "cpu", [1, 2], 4, 1, 1)
    pt, onnx, mem = res["models"]
    assert [m["backend"] for m in res["models"]] == ["torch", "onnxruntime", "torch"]
    for entry in res["models"]:
        lat = entry["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert entry["fps"] == pytest.approx(1000 / lat["p50"], rel=1e-2)  # top level: batch 1
        assert entry["params"] > 1e6 and entry["gflops"] > 0 and entry["size_mb"] > 0
    for entry in (pt, mem):  # dynamic batch: batch 2 timed, FPS counts images
        b2 = entry["by_batch"]["2"]
        assert b2["fps"] == pytest.approx(2000 / b2["latency_ms"]["p50"], rel=1e-2)
    assert "skipped" in onnx["by_batch"]["2"] and "fixed batch of 1" in onnx["notes"][0]
    assert pt["params"] == mem["params"]  # same architecture
    assert onnx["gflops"] == pytest.approx(pt["gflops"], rel=0.05)
    assert pt["size_mb"] == pytest.approx(tiny_detector["pt"].stat().st_size / 1e6, abs=1e-3)

    r_pt, r_onnx, r_mem = res["ratios"]
    assert r_pt["speedup"] == {"1": 1.0, "2": 1.0} and r_pt["params"] == 1.0 and r_pt["gflops"] == 1.0
    assert set(r_onnx["speedup"]) == {"1"}  # batch 2 not comparable: skipped for the ONNX model
    assert r_onnx["speedup"]["1"] == pytest.approx(pt["latency_ms"]["p50"] / onnx["latency_ms"]["p50"], rel=1e-3)
    assert r_onnx["params"] == pytest.approx(onnx["params"] / pt["params"], rel=1e-3)
    assert r_mem["params"] == 1.0 and r_mem["vs"] == pt["name"]


def test_bench_rejects_bad_input(tmp_path, tiny_detector):
    with pytest.raises(UserError, match="at least one model"):
        bench([])
    with pytest.raises(UserError, match="model file not found"):
        bench([tmp_path / "missing.onnx"], imgsz=IMGSZ)
    with pytest.raises(UserError, match="takes 128px input"):
        bench([tiny_detector["onnx"]], imgsz=256, runs=1, warmup=0)
    with pytest.raises(UserError, match="batch sizes"):
        bench([tiny_detector["pt"]], imgsz=IMGSZ, batch_sizes=(0,))


def test_interleaved_timer_takes_turns_and_warms_up():
    from yolocomp.eval.timing import best_round_median, flat, interleaved_latency, percentiles

    log = []
    calls = {k: (lambda k=k: log.append(k)) for k in "abc"}
    syncs = {k: (lambda k=k: log.append(k.upper())) for k in "abc"}
    out = interleaved_latency(calls, runs=1, rounds=2, warmup_rounds=1, sync=syncs)
    # one call per turn, wrapped by syncs; the first model moves one place per round; round 0 is not recorded
    assert "".join(log) == "AaABbBCcC" + "BbBCcCAaA" + "CcCAaABbB"
    assert {k: [len(r) for r in v] for k, v in out.items()} == {"a": [1, 1], "b": [1, 1], "c": [1, 1]}
    log.clear()
    out = interleaved_latency(calls, runs=2, warmup=1, rounds=2, rotate=False)
    assert "".join(log) == "aaabbbccc" * 2 and all(len(flat(v)) == 4 for v in out.values())
    assert best_round_median([[3.0, 5.0], [1.0, 2.0, 9.0]]) == 2.0
    assert percentiles([1.0, 2.0, 3.0])["p50"] == 2.0


def test_time_onnx_best_round_median(tiny_detector):
    from yolocomp.eval.timing import time_onnx

    onnx = str(tiny_detector["onnx"])
    lat = time_onnx({"a": onnx, "b": onnx}, imgsz=IMGSZ, runs=2, warmup=1, threads=1, rounds=2)
    assert list(lat) == ["a", "b"] and all(v > 0 and round(v, 3) == v for v in lat.values())
