"""`yolocomp run` end to end on a tiny synthetic recipe: report contract, skip-on-rerun, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from yolocomp import recipe as rc
from yolocomp.commands.run import run
from yolocomp.errors import UserError
from yolocomp.integration import is_resumable

pytestmark = pytest.mark.slow

TINY = {
    "model": "yolov8n.yaml",
    "data": "synthetic",
    "imgsz": 64,
    "synthetic": {"train": 24, "val": 8, "size": 64},
    "stages": {
        "train": {"epochs": 2, "batch": 8},
        "prune": {"method": "l1", "ratio": 0.3},
        "export": {"format": "onnx", "check": False},
        "eval": {"batch": 8},
        "bench": {"batch_sizes": [1], "runs": 3, "warmup": 1, "openvino": False},
    },
}


def _recipe(tmp_path: Path, **changes) -> Path:
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        raw["stages"][key].update(value)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    report = run(rc.load(_recipe(tmp)), out=out)
    return out, report


def test_report_contract(finished_run):
    out, report = finished_run
    assert (out / "report.md").exists() and (out / "pareto.png").stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    stages = [m["stage"] for m in saved["models"]]
    assert stages == ["train/trained", "prune/pruned", "export/onnx"]  # a yaml model has no baseline to measure
    for entry in saved["models"]:
        for key in ("ap", "ap50", "ap75", "params", "gflops", "latency_ms"):
            assert entry[key] is not None, (entry["stage"], key)
        assert 0.0 <= entry["ap"] <= entry["ap50"] <= 1.0
    by_stage = {m["stage"]: m for m in saved["models"]}
    assert by_stage["prune/pruned"]["params"] < by_stage["train/trained"]["params"]
    # the float ONNX export is the pruned model: same detections, so the same AP within rounding of the backends
    assert abs(by_stage["export/onnx"]["ap"] - by_stage["prune/pruned"]["ap"]) < 0.02
    for index, name in enumerate(["train", "prune", "export"], start=1):
        assert (out / f"{index:02d}_{name}" / "stage.json").exists()


def test_rerun_skips_finished_stages(finished_run, tmp_path):
    out, report = finished_run
    markers = sorted(out.glob("*/stage.json"))
    stamps = [m.stat().st_mtime_ns for m in markers]
    again = run(rc.load(_recipe(tmp_path)), out=out)
    assert [m.stat().st_mtime_ns for m in markers] == stamps  # nothing finished was rewritten
    assert [m["stage"] for m in again["models"]] == [m["stage"] for m in report["models"]]


def _complete(checkpoint):
    try:
        return is_resumable(checkpoint)
    except UserError:  # frozen while Ultralytics was still writing it
        return False


def test_killed_stage_resumes_from_checkpoint(tmp_path):
    recipe = _recipe(tmp_path, train={"epochs": 4})
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "yolocomp.cli", "run", str(recipe), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = out / "01_train" / "train" / "weights" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            os.killpg(proc.pid, signal.SIGSTOP)  # freeze at once; kill only once the checkpoint is complete
            if _complete(last):
                break
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "training never wrote a checkpoint"
    assert not (out / "01_train" / "stage.json").exists()
    csv = out / "01_train" / "train" / "results.csv"
    rows_before = csv.read_text().splitlines()[1:]
    assert 1 <= len(rows_before) < 4
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]  # 0-based last finished epoch
    finished = [r for r in rows_before if int(float(r.split(",")[0])) <= epoch + 1]

    report = run(rc.load(recipe), out=out)
    rows_after = csv.read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows_after] == [1, 2, 3, 4]  # no epoch trained twice, none skipped
    assert finished and rows_after[: len(finished)] == finished  # resumed, not restarted: finished epochs were kept
    assert [m["stage"] for m in report["models"]] == ["train/trained", "prune/pruned", "export/onnx"]
