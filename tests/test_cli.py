"""CLI: help for every subcommand, exit codes, one-line errors."""

import subprocess
import sys

import pytest

from yolocomp.cli import COMMANDS, main

SUBCOMMANDS = ["prune", "distill", "qat", "ptq", "export", "eval", "bench", "info", "run"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "yolocomp.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: yolocomp " + name in capsys.readouterr().out
    assert name in COMMANDS


def test_no_command_exits_2(capsys):
    assert main([]) == 2


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_bad_recipe_value_one_line_exit_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: yolov8n.yaml\nstages: {prune: {ratio: 1.5}}\n")
    assert main(["prune", "--cfg", str(recipe)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "stages.prune.ratio = 1.5 is outside (0, 1)" in lines[0]


def test_flag_value_validated_like_recipe(capsys):
    assert main(["prune", "--model", "yolov8n.yaml", "--ratio", "1.2"]) == 2
    assert "stages.prune.ratio = 1.2 is outside (0, 1)" in _error_lines(capsys)[0]


def test_stage_without_model_says_what_to_pass(capsys):
    assert main(["qat"]) == 2
    assert "needs --cfg RECIPE or --model PATH" in _error_lines(capsys)[0]


def test_eval_missing_model_exit_2(tmp_path, capsys):
    data = tmp_path / "d.yaml"
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.jpg")
    data.write_text(f"path: {tmp_path}\nval: images\nnames: {{0: a}}\n")
    assert main(["eval", "--model", str(tmp_path / "missing.pt"), "--data", str(data)]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "missing.pt" in lines[0]


def test_run_with_missing_data_exit_2(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: yolov8n.yaml\ndata: nowhere/data.yaml\nstages: {train: {epochs: 1}}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert "data = nowhere/data.yaml not found" in _error_lines(capsys)[0]


def test_summary_lists_every_ap_of_a_report_with_a_top_level_ap():
    from yolocomp.cli import _summary_rows

    ap = {"ap": 0.30, "ap50": 0.44, "ap75": 0.33}
    report = {"ap": 0.28, "ap_float": ap, "ap_onnx": {**ap, "ap": 0.28}, "reconstruction": {
        "head_error": {"before": 0.12, "after": 0.05}}}
    rows = _summary_rows(report)
    assert [r["figure"] for r in rows if "ap" in r] == ["ap_float", "ap_onnx"]
    assert rows[0]["ap50"] == 0.44 and rows[1]["ap"] == 0.28
    assert {"figure": "reconstruction.head_error", "before": 0.12, "after": 0.05} in rows
