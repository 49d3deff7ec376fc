"""Every command in the README's command table: its --help, and one tiny real invocation on this CPU machine."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The subcommands the README's command table names (`yolocomp NAME ...` in its first column)."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| command | what it does |"):]
    table = table[: table.index("\n\n")]
    return re.findall(r"^\| `yolocomp (\w+)", table, flags=re.M)


def test_readme_table_lists_every_command():
    from yolocomp.cli import COMMANDS

    assert sorted(readme_commands()) == sorted(COMMANDS)


def _yolocomp(*args, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "yolocomp.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def invocations(tmp_path_factory, tiny_detector, synthetic_data):
    tmp = tmp_path_factory.mktemp("readme")
    pt, data = tiny_detector["pt"], synthetic_data
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(pt), "data": str(data), "imgsz": 64, "device": "cpu",
                                      "stages": {"export": {}, "eval": {"batch": 4},
                                                 "bench": {"batch_sizes": [1], "runs": 2, "warmup": 1}}}))
    small = ("--imgsz", 64, "--device", "cpu")
    return tmp, {
        "run": ("run", recipe, "--out", tmp / "run"),
        "prune": ("prune", "--model", pt, "--ratio", 0.2, *small, "--out", tmp / "prune"),
        "distill": ("distill", "--model", pt, "--teacher", pt, "--data", data, "--method", "logit", "--epochs", 1,
                    "--batch", 8, *small, "--out", tmp / "distill"),
        "qat": ("qat", "--model", pt, "--data", data, "--epochs", 1, "--batch", 8, "--calib-images", 8,
                "--eval-images", 2, *small, "--out", tmp / "qat"),
        "ptq": ("ptq", "--model", pt, "--data", data, "--calib-images", 8, "--eval-images", 2, *small, "--out", tmp / "ptq"),
        "export": ("export", "--model", pt, "--check", *small, "--out", tmp / "export"),
        "eval": ("eval", "--model", pt, "--data", data, "--images", 2, *small, "--json", tmp / "eval.json"),
        "bench": ("bench", "--model", pt, "--compare", tiny_detector["onnx"], "--imgsz", 128, "--batch-sizes", 1,
                  "--runs", 2, "--warmup", 1),
        "info": ("info", "--model", pt, "--imgsz", 64),
    }


@pytest.mark.parametrize("name", readme_commands())
def test_readme_command_help_and_tiny_run(name, invocations):
    tmp, calls = invocations
    helped = _yolocomp(name, "--help", cwd=tmp)
    assert helped.returncode == 0 and f"usage: yolocomp {name}" in helped.stdout
    proc = _yolocomp(*calls[name], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if name == "run":
        assert json.loads((tmp / "run" / "report.json").read_text())["models"]
    if name == "eval":
        assert 0 <= json.loads((tmp / "eval.json").read_text())["ap"] <= 1
