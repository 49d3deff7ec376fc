"""`yolocomp prune --recover kd`: the cut model recovers by distillation from the uncompressed input model."""

import json
from pathlib import Path

import pytest
from ultralytics import YOLO

from yolocomp.cli import main
from yolocomp.commands.prune import UNTIL_TIME_LIMIT
from yolocomp.config import PruneConfig
from yolocomp.prune import count_params


def test_prune_recover_kd_writes_the_contract(tmp_path, tiny_detector, synthetic_data):
    out = tmp_path / "o"
    code = main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--method", "l1",
                 "--ratio", "0.3", "--recover", "kd", "--finetune-epochs", "1", "--batch", "8", "--imgsz", "64",
                 "--recon-images", "16", "--recon-iters", "10", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert {"before", "pruned", "reconstructed", "finetuned"} <= set(report["ap"])  # kd reconstructs first by default
    assert report["recovery"]["reconstruction"]["images"]["fit"] == 12
    assert all(0 <= report["ap"][k]["ap"] <= 1 for k in ("before", "pruned", "finetuned"))
    assert report["gflops"]["after"] < report["gflops"]["before"]
    assert report["recovery"]["method"] == "kd (block)" and report["recovery"]["seconds"] > 0
    finetuned = YOLO(str(out / "finetuned.pt")).model  # plain Ultralytics: no teacher, no adapters
    assert count_params(finetuned) == count_params(YOLO(str(out / "pruned.pt")).model)
    assert not any("teacher" in k or "adapter" in k for k in finetuned.state_dict())


def test_recover_minutes_bound_the_whole_recovery(tmp_path, tiny_detector, synthetic_data):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--method", "l1",
                 "--ratio", "0.3", "--recover", "kd", "--recover-minutes", "0.001", "--batch", "8", "--imgsz", "64",
                 "--recon-images", "16", "--recon-iters", "10", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    recovery = report["recovery"]
    # the reconstruction alone spent the 0.06 s budget: the note says so and the training stopped in its first epoch
    assert recovery["reconstruction_seconds"] > 0.06
    assert any("all of --recover-minutes 0.001" in note for note in report["notes"])
    assert len((out / "recover" / "results.csv").read_text().splitlines()) == 2
    assert recovery["total_seconds"] == pytest.approx(recovery["reconstruction_seconds"] + recovery["seconds"], abs=0.2)
    assert (out / "finetuned.pt").exists()


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--steps", "0"], "stages.prune.steps = 0 must be >= 1"),
    (["--steps", "2"], "need recover: kd"),
])
def test_bad_recovery_flags_are_one_line(tmp_path, capsys, tiny_detector, flags, fragment):
    assert main(["prune", "--model", str(tiny_detector["pt"]), *flags, "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0]


def _images(data_yaml) -> str:
    import yaml

    cfg = yaml.safe_load(open(data_yaml))
    return str(Path(cfg["path"]) / "images" / "train")


def test_label_free_recovery_trains_on_images_alone(tmp_path, tiny_detector, synthetic_data):
    out = tmp_path / "o"
    code = main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--images",
                 _images(synthetic_data), "--label-free", "--method", "l1", "--ratio", "0.3", "--recover", "kd",
                 "--no-reconstruct", "--recover-minutes", "0.02", "--batch", "8", "--imgsz", "64", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["label_free"] and report["recovery"]["labelled_images"] == 0
    assert report["recovery"]["epochs"] == UNTIL_TIME_LIMIT  # no epoch count: the time limit ends the recovery
    assert (out / "finetuned.pt").exists() and "reconstructed" not in report["ap"]
    assert report["recovery"]["unlabelled_images"] == 32
    losses = (out / "recover" / "results.csv").read_text().splitlines()
    header = [c.strip() for c in losses[0].split(",")]
    row = dict(zip(header, (float(v) for v in losses[1].split(","))))
    assert row["train/box_loss"] == row["train/cls_loss"] == row["train/dfl_loss"] == 0  # no labels, no detection loss
    assert row["train/kdcls_loss"] > 0 and row["train/kdfeat_loss"] > 0  # block KD: head and every layer
    assert 0 <= report["ap"]["finetuned"]["ap"] <= 1  # measured on the labelled val split


def test_empty_images_folder_is_one_line_before_any_work(tmp_path, capsys, tiny_detector):
    (tmp_path / "none").mkdir()
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_detector["pt"]), "--images", str(tmp_path / "none"), "--recover", "kd",
                 "--finetune-epochs", "1", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "no images found" in err[0]
    assert not (out / "pruned.pt").exists()


def test_progressive_recovery_reports_every_step(tmp_path, tiny_detector, synthetic_data):
    out = tmp_path / "o"
    code = main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--method", "l1",
                 "--ratio", "0.3", "--recover", "kd", "--steps", "2", "--step-epochs", "1", "--finetune-epochs", "1",
                 "--reconstruct", "--recon-images", "8", "--recon-iters", "10", "--batch", "8", "--imgsz", "64",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["ap"]["steps"]] == [0, 1, 2]
    gflops = [s["gflops"] for s in report["ap"]["steps"]]
    assert gflops[0] > gflops[1] > gflops[2] and abs(gflops[2] - report["gflops"]["after"]) < 1e-3
    assert all(0 <= s["ap"] <= 1 for s in report["ap"]["steps"])  # AP fraction after every step
    assert report["recovery"]["reconstruction"]["images"] and report["recovery"]["progressive_seconds"] > 0
    assert 0 <= report["ap"]["reconstructed"]["ap"] <= 1
    curve = report["ap_vs_gflops"]  # the plotted path: input, each step, then reconstruction and recovery
    assert [c["stage"] for c in curve] == ["before", "step 1", "step 2", "reconstructed", "finetuned"]
    assert [c["gflops"] for c in curve[:3]] == gflops and (out / "ap_vs_gflops.png").stat().st_size > 0
    pruned = YOLO(str(out / "pruned.pt")).model
    assert count_params(pruned) == report["params"]["after"]
    assert not any("ramp" in k or "gate" in k for k in pruned.state_dict())


def test_frozen_batchnorm_keeps_running_statistics_through_training(tmp_path, tiny_detector, synthetic_data):
    import torch

    from yolocomp.distill.frozen_bn import FrozenBatchNorm
    from yolocomp.integration import load_model, train

    model = load_model(tiny_detector["pt"])
    before = {n: b.clone() for n, b in model.state_dict().items() if "running_mean" in n}
    result = train(model, str(synthetic_data), [FrozenBatchNorm()], project=tmp_path, name="t", epochs=1, imgsz=64,
                   batch=8, val=False)
    after = {n: b for n, b in result.model.state_dict().items() if "running_mean" in n}
    assert all(torch.equal(before[n], after[n].to(before[n].dtype)) for n in before)  # statistics untouched
    weights = [n for n in before if n.endswith("running_mean")]
    assert weights  # the model has BatchNorm layers, so the check above checked something


def test_kd_recovery_reconstructs_first_unless_told_otherwise():
    assert PruneConfig(recover="kd").reconstruct_first() and not PruneConfig(recover="labels").reconstruct_first()
    assert not PruneConfig(recover="kd", reconstruct=False).reconstruct_first()
    assert PruneConfig(recover="labels", reconstruct=True).reconstruct_first()
    assert PruneConfig().kd_method == "block"
