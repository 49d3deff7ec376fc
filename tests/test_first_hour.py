"""The first hour of a new user (CPU only, offline): the headline commands work as written, fail in one line, and
leave nothing behind when they fail."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from yolocomp.cli import main

REPO = Path(__file__).resolve().parents[1]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def offline(monkeypatch):
    """No network: Ultralytics' asset download fails the way it does offline."""
    import ultralytics.utils.downloads as downloads

    def refuse(*args, **kwargs):
        raise ConnectionError("❌  Download failure for https://example.invalid/w.pt. Environment may be offline.")

    monkeypatch.setattr(downloads, "attempt_download_asset", refuse)


# 1 -------------------------------------------------------------------------------------------------------------------
def test_cfg_model_name_offline_names_weights_flag(tmp_path, monkeypatch, capsys, offline):
    monkeypatch.chdir(tmp_path)  # no local yolov5s.yaml or yolov5su.pt
    assert main(["prune", "--cfg", "yolov5s.yaml", "--out", str(tmp_path / "o")]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "yolov5su.pt" in err[0] and "pass --weights" in err[0]
    assert _files(tmp_path / "o") in ([], ["yolocomp-error.log"])


def test_cfg_model_name_with_local_weights_prunes_them(tmp_path, tiny_detector, capsys):
    out = tmp_path / "o"
    code = main(["prune", "--cfg", "yolov8n.yaml", "--weights", str(tiny_detector["pt"]), "--ratio", "0.2",
                 "--imgsz", "64", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["source"] == str(tiny_detector["pt"]) and report["params"]["after"] < report["params"]["before"]


# 2 -------------------------------------------------------------------------------------------------------------------
def test_gpu_request_without_cuda_is_one_line(tmp_path, monkeypatch, capsys, tiny_detector):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["prune", "--cfg", str(REPO / "configs" / "yolov8n.yaml"), "--weights", str(tiny_detector["pt"]),
                 "--device", "0", "--out", str(tmp_path / "o")])
    assert code == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "asks for a CUDA GPU but this machine has none; use --device cpu or auto" in err[0]


def test_shipped_recipes_default_to_auto_device(monkeypatch, capsys):
    import torch

    from yolocomp import recipe as rc
    from yolocomp.commands.common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("yolov5s", "yolov8n", "yolo11n"):
        assert rc.load(REPO / "configs" / f"{name}.yaml").device == "auto"
    assert resolve_device("auto") == "cpu"
    assert rc.validate({"model": "yolov8n.yaml"}).device == "auto"


# 3 -------------------------------------------------------------------------------------------------------------------
def test_run_overrides_model_imgsz_data_device(tmp_path, tiny_detector, synthetic_data):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "yolov8n.pt", "data": "coco.yaml", "imgsz": 640, "device": "0",
                                      "stages": {"export": {"format": "onnx"}, "eval": {"batch": 4},
                                                 "bench": {"batch_sizes": [1], "runs": 2, "warmup": 1,
                                                           "openvino": False}}}))
    out = tmp_path / "run"
    code = main(["run", str(recipe), "--model", str(tiny_detector["pt"]), "--imgsz", "64", "--data",
                 str(synthetic_data), "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["model"] == str(tiny_detector["pt"]) and report["settings"]["imgsz"] == 64
    assert report["settings"]["device"] == "cpu" and report["recipe"]["data"] == str(synthetic_data)
    assert [m["stage"] for m in report["models"]] == ["baseline/input", "export/onnx"]


# 4 -------------------------------------------------------------------------------------------------------------------
def test_pruning_random_weights_warns(tmp_path, capsys):
    code = main(["prune", "--model", "yolov8n.yaml", "--ratio", "0.2", "--imgsz", "64", "--device", "cpu",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    assert "warning: prune starts from random weights (yolov8n.yaml is a model yaml" in capsys.readouterr().out


def test_pruning_trained_weights_does_not_warn(tmp_path, capsys, tiny_detector):
    assert main(["prune", "--model", str(tiny_detector["pt"]), "--ratio", "0.2", "--imgsz", "64",
                 "--out", str(tmp_path / "o")]) == 0
    assert "random weights" not in capsys.readouterr().out


# 5 -------------------------------------------------------------------------------------------------------------------
def test_ctrl_c_in_a_command_is_one_line_exit_130(tmp_path, monkeypatch, capsys, tiny_detector):
    import yolocomp.commands as commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.STAGE_RUNNERS, "prune", interrupted)
    assert main(["prune", "--model", str(tiny_detector["pt"]), "--out", str(tmp_path / "o")]) == 130
    assert _lines(capsys.readouterr().err) == ["interrupted in stage prune; re-run the same command to resume"]


def test_ctrl_c_in_a_run_names_the_stage(tmp_path, monkeypatch, capsys, tiny_detector, synthetic_data):
    import yolocomp.commands as commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.STAGE_RUNNERS, "distill", interrupted)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny_detector["pt"]), "data": str(synthetic_data), "imgsz": 64,
                                      "stages": {"prune": {"method": "l1", "ratio": 0.2}, "distill": {}}}))
    out = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(out)]) == 130
    assert _lines(capsys.readouterr().err) == ["interrupted in stage distill; re-run the same command to resume"]
    assert (out / "01_prune" / "stage.json").exists()  # the finished stage is kept for the resumed run


# 6 -------------------------------------------------------------------------------------------------------------------
def test_exports_carry_class_names_and_deploy_labels_with_them(tmp_path, tiny_detector, synthetic_data):
    from yolocomp.export.onnx_metadata import read_metadata
    from yolocomp.integration import load_model

    out = tmp_path / "e"
    assert main(["export", "--model", str(tiny_detector["pt"]), "--imgsz", "128", "--out", str(out)]) == 0
    meta = read_metadata(out / "model.onnx")
    names = load_model(tiny_detector["pt"]).names
    assert yaml.safe_load(meta["names"]) == {int(k): v for k, v in names.items()}
    assert meta["stride"] == "32" and meta["imgsz"] == "[128, 128]" and meta["task"] == "detect"
    images = Path(yaml.safe_load(Path(synthetic_data).read_text())["path"]) / "images" / "val"
    proc = subprocess.run([sys.executable, str(REPO / "deploy" / "cpu" / "infer.py"), "--model", str(out / "model.onnx"),
                           "--source", str(images), "--conf", "0.05", "--out", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    per_class = json.loads((tmp_path / "d" / "summary.json").read_text())["per_class"]
    assert per_class and set(per_class) <= set(names.values())


# 7 -------------------------------------------------------------------------------------------------------------------
def test_failed_command_leaves_out_as_it_found_it(tmp_path, capsys, tiny_detector):
    data = tmp_path / "empty.yaml"
    (tmp_path / "imgs").mkdir()
    data.write_text(f"path: {tmp_path}\ntrain: imgs\nval: imgs\nnames: {{0: a, 1: b, 2: c}}\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("the user's file")
    code = main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(data), "--finetune-epochs", "1",
                 "--imgsz", "64", "--out", str(out)])
    assert code == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "yolocomp-eval-" not in err[0] and ".abs.yaml" not in err[0]
    assert _files(out) == ["mine.txt", "yolocomp-error.log"]
    assert (out / "mine.txt").read_text() == "the user's file"


def test_engine_export_without_tensorrt_writes_nothing(tmp_path, capsys, tiny_detector):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "o"
    assert main(["export", "--model", str(tiny_detector["pt"]), "--format", "engine", "--out", str(out)]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert not list(out.rglob("*.onnx"))


def test_eval_json_names_the_users_data(tmp_path, tiny_detector, synthetic_data):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--imgsz", "128",
                 "--images", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["data"] == str(synthetic_data)


def test_eval_empty_folder_error_names_the_users_yaml(tmp_path, capsys, tiny_detector):
    (tmp_path / "imgs").mkdir()
    data = tmp_path / "mine.yaml"
    data.write_text(f"path: {tmp_path}\nval: imgs\nnames: {{0: a, 1: b, 2: c}}\n")
    assert main(["eval", "--model", str(tiny_detector["pt"]), "--data", str(data)]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "mine.yaml" in err[0] and "yolocomp-eval-" not in err[0]


# 9 -------------------------------------------------------------------------------------------------------------------
def test_pareto_plots_file_size_and_names_every_point(tmp_path):
    from yolocomp.report import pareto_plot, pareto_points

    rows = [{"stage": "qat/qat", "ap": 0.17, "latency_ms": 70.0, "size_mb": 3.7, "params_m": 1.74},
            {"stage": "qat/model_int8", "ap": 0.17, "latency_ms": 9.0, "size_mb": 1.9, "params_m": 1.73}]
    points = pareto_points(rows)
    assert [x for _, x, _ in points["size_mb"]] == [3.7, 1.9]  # the file size, not the parameter count
    assert [x for _, x, _ in points["latency_ms"]] == [70.0, 9.0]
    assert pareto_plot(rows, tmp_path / "p.png").stat().st_size > 0


# 10 ------------------------------------------------------------------------------------------------------------------
def test_export_dynamic_batch_lets_bench_time_batch_n(tmp_path, tiny_detector):
    import onnx

    out = tmp_path / "e"
    assert main(["export", "--model", str(tiny_detector["pt"]), "--imgsz", "64", "--dynamic", "--out", str(out)]) == 0
    dim = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    from yolocomp.commands.measure import bench

    result = bench([str(out / "model.onnx")], imgsz=64, batch_sizes=[1, 2], runs=2, warmup=1)
    assert "latency_ms" in result["models"][0]["by_batch"]["2"]


def test_eval_takes_the_image_size_from_the_export(tmp_path, tiny_detector, synthetic_data):
    out = tmp_path / "e.json"  # the fixture's ONNX is a fixed 128 px export; no --imgsz given
    assert main(["eval", "--model", str(tiny_detector["onnx"]), "--data", str(synthetic_data), "--images", "2",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["imgsz"] == 128


# 8 -------------------------------------------------------------------------------------------------------------------
def test_corrupt_checkpoint_is_one_readable_line(tmp_path, capsys, synthetic_data):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 64)
    assert main(["eval", "--model", str(bad), "--data", str(synthetic_data)]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: cannot read checkpoint {bad}")
    assert "❌" not in err[0] and "TypeError" not in err[0]
