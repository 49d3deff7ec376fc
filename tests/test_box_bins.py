"""`--box-bins`: a light head whose box branch has fewer DFL bins, started from the old branch and fitted to the
teacher's box distributions rebinned (conversion, fit, reconstruction, head KD, end to end)."""

from __future__ import annotations

import json
from copy import deepcopy

import pytest
import torch
from test_light_head import reconstruct_new_head
from test_prune import randomized

from yolocomp.distill.box_bins import box_kd_loss, box_targets, rebin
from yolocomp.errors import UserError
from yolocomp.eval.info import gflops
from yolocomp.prune.light_head import has_light_head, light_head
from yolocomp.recon.class_branch import fit_class_branch

IMG = 64


@pytest.fixture(scope="module")
def pair():
    teacher = randomized().eval()
    with torch.no_grad():  # box distributions and class scores that vary over anchors (random init is near uniform)
        head = teacher.model[-1]
        for branch in (*head.cv2, *head.cv3):
            branch[-1].bias.zero_()
            branch[-1].weight.mul_(4)
    student, info = light_head(teacher, "bn", imgsz=IMG, box_bins=8)
    return teacher, student.eval(), info


def _images(seed: int, n: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return list(torch.rand(n, 3, IMG, IMG).split(8))


def test_rebinning_keeps_the_reachable_distances_and_clips_the_rest_to_the_last_bin():
    torch.manual_seed(0)
    probs = torch.randn(5, 16).softmax(1)
    eight = rebin(probs, 8, 1)
    assert eight.shape == (5, 8) and torch.allclose(eight.sum(1), torch.ones(5))
    assert torch.equal(eight[:, :7], probs[:, :7]) and torch.allclose(eight[:, 7], probs[:, 7:].sum(1))
    near = torch.zeros(1, 16)
    near[0, 2], near[0, 3] = 0.25, 0.75  # a distance of 2.75 strides: within reach, kept exactly
    far = torch.zeros(1, 16)
    far[0, 12] = 1.0  # 12 strides: beyond 7, clipped to it
    bins = torch.arange(8.0)
    assert float((rebin(near, 8, 1) * bins).sum()) == pytest.approx(2.75)
    assert float((rebin(far, 8, 1) * bins).sum()) == pytest.approx(7.0)
    logits = torch.randn(2, 4 * 16, 3, 3)
    targets = box_targets(logits, 8)
    assert targets.shape == (2, 32, 3, 3) and torch.allclose(targets.view(2, 4, 8, 3, 3).sum(2), torch.ones(2, 4, 3, 3))
    with pytest.raises(UserError, match="cannot target 32"):
        rebin(probs, 32, 1)


def test_box_kd_loss_is_stationary_at_the_rebinned_teacher_and_weights_confident_positions():
    torch.manual_seed(0)
    teacher = torch.randn(2, 64, 5) * 3
    at_target = box_targets(teacher, 8).clamp_min(1e-12).log().requires_grad_(True)
    box_kd_loss(at_target, teacher).backward()
    assert at_target.grad.abs().max() < 1e-6
    assert box_kd_loss(torch.zeros(2, 32, 5), teacher) > box_kd_loss(at_target.detach(), teacher)
    weight = torch.full((2, 5), 0.01)
    weight[:, 0] = 1.0
    logits = torch.zeros(2, 32, 5, requires_grad=True)
    box_kd_loss(logits, teacher, weight).backward()
    grad = logits.grad.abs().sum(1)
    assert grad[:, 0].min() > grad[:, 1:].max()


def test_the_narrow_box_branch_starts_from_the_kept_slice_and_stock_ultralytics_rebuilds_it(pair, tmp_path):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from yolocomp.integration import save_model

    teacher, student, info = pair
    old, new = teacher.model[-1], student.model[-1]
    assert (old.reg_max, new.reg_max) == (16, 8) and student.yaml["reg_max"] == 8 and has_light_head(student)
    c_first = old.cv2[0][0].conv.in_channels  # Ultralytics sizes every level's box branch from the first input
    for level, (branch, target) in enumerate(zip(old.cv2, new.cv2)):
        assert target[0].conv.out_channels == max(16, c_first // 4, 4 * 8) < branch[0].conv.out_channels
        keep = old.cv2[level][1].bn.weight.abs().argsort(descending=True)[: target[1].conv.out_channels].sort().values
        rows = torch.tensor([side * 16 + k for side in range(4) for k in range(8)])
        assert torch.equal(target[2].weight, branch[2].weight[rows][:, keep])  # every side's first 8 bins
        assert torch.equal(target[1].bn.running_mean, branch[1].bn.running_mean[keep])
    assert info["box_branch"]["reg_max"] == {"before": 16, "after": 8}
    narrow_only, _ = light_head(teacher, "bn", imgsz=IMG)
    assert gflops(student, IMG) < gflops(narrow_only, IMG) < gflops(teacher, IMG)
    rebuilt = DetectionModel(deepcopy(student.yaml), nc=3, verbose=False)  # what YOLO(path).train() does
    rebuilt.load_state_dict(student.state_dict(), strict=True)
    loaded = YOLO(str(save_model(student, tmp_path / "narrow.pt"))).model
    assert loaded.model[-1].reg_max == 8
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(loaded.float().eval()(x)[0], student.eval()(x)[0], rtol=2e-3, atol=1e-3)
    with pytest.raises(UserError, match="from 2 to the head's reg_max 16"):
        light_head(teacher, imgsz=IMG, box_bins=17)


@torch.no_grad()
def _box_excess(student, teacher, images) -> float:
    """The student's box KD loss over its minimum (the rebinned teacher), on the student's own Detect inputs."""
    from yolocomp.recon.class_branch import cache_head_inputs

    inputs, targets = cache_head_inputs(teacher, images, flip=False, progress=False, student=student, box_bins=8)
    head = student.model[-1]
    excess = 0.0
    for branch, x, t in zip(head.cv2, inputs, targets):
        target = t[:, :32].float()
        excess += float(box_kd_loss(branch(x.float()), target, probabilities=True)
                        - box_kd_loss(target.clamp_min(1e-12).log(), target, probabilities=True))
    return excess


def test_fit_trains_both_branches_and_lowers_the_box_error_on_unseen_images(pair):
    teacher, fresh, _ = pair
    student = deepcopy(fresh)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    report = fit_class_branch(student, teacher, _images(0, 32), iters=150, batch_size=8, lr=3e-3, box=True,
                              progress=False)
    assert report["branches"] == ["cls", "box"] and report["loss_end"] < report["loss_start"]
    changed = {k.split(".")[2] for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"cv2", "cv3"}  # only Detect's two branches learned
    unseen = _images(1, 16)
    assert _box_excess(student, teacher, unseen) < 0.7 * _box_excess(fresh, teacher, unseen)
    with pytest.raises(UserError, match="reg_max 16 must be in 2..8"):  # a student with more bins than its teacher
        fit_class_branch(deepcopy(teacher), fresh, _images(0, 8), iters=1, box=True, progress=False)


def test_head_kd_rebins_the_teachers_box_distributions():
    from yolocomp.distill.head_kd import head_kd_terms

    torch.manual_seed(0)
    t_box, scores = torch.randn(2, 64, 7) * 2, torch.randn(2, 3, 7)
    T = 2.0
    at_target = (T * box_targets(t_box, 8, temperature=T).clamp_min(1e-12).log()).requires_grad_(True)
    terms = head_kd_terms({"boxes": at_target, "scores": scores}, {"boxes": t_box, "scores": scores}, 16, T)
    terms["dfl"].backward()
    assert float(terms["dfl"]) == pytest.approx(0.0, abs=1e-4) and at_target.grad.abs().max() < 1e-6
    off = head_kd_terms({"boxes": torch.zeros(2, 32, 7), "scores": scores}, {"boxes": t_box, "scores": scores}, 16, T)
    assert float(off["dfl"]) > 0.1
    with pytest.raises(UserError, match="student head outputs"):
        head_kd_terms({"boxes": torch.zeros(2, 128, 7), "scores": scores}, {"boxes": t_box, "scores": scores}, 16, T)


def test_reconstruction_fits_the_narrow_head_to_the_teacher(pair):
    teacher, fresh, _ = pair
    _, head = reconstruct_new_head(fresh, teacher, head_iters=80, img=IMG)
    assert head["error_after"] < head["error_before"]


def test_prune_with_fewer_box_bins_loads_in_plain_ultralytics(tmp_path, tiny_detector, synthetic_data):
    from ultralytics import YOLO

    from yolocomp.cli import main

    out = tmp_path / "o"
    code = main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--method", "l1",
                 "--flops-reduction", "0.4", "--head", "light", "--box-bins", "8", "--recover", "kd",
                 "--finetune-epochs", "1", "--batch", "8", "--imgsz", "64", "--recon-images", "16", "--recon-iters", "5",
                 "--recon-head-iters", "20", "--head-fit-iters", "20", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["light_head"]["box_branch"]["reg_max"] == {"before": 16, "after": 8}
    assert report["recovery"]["class_branch_fit"]["branches"] == ["cls", "box"]
    assert report["achieved"]["flops_reduction"] == pytest.approx(0.4, abs=0.03)
    assert "kddfl_loss" in (out / "recover" / "results.csv").read_text()  # the head KD ran against 16-bin targets
    for name in ("pruned.pt", "finetuned.pt"):
        model = YOLO(str(out / name)).model
        assert model.model[-1].reg_max == 8 and model.yaml["reg_max"] == 8
        assert gflops(model, 64) == pytest.approx(report["gflops"]["after"], rel=1e-3)


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--box-bins", "8", "--head", "keep", "--recover", "kd"], "box_bins narrows the light head's box branch"),
    (["--box-bins", "8", "--recover", "kd", "--steps", "2"], "box_bins narrows the light head's box branch"),
    (["--box-bins", "1"], "box_bins = 1 must be >= 2"),
])
def test_bad_box_bins_flags_are_one_line(tmp_path, capsys, tiny_detector, flags, fragment):
    from yolocomp.cli import main

    assert main(["prune", "--model", str(tiny_detector["pt"]), *flags, "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0]


def test_auto_box_bins_where_seven_strides_reach_half_the_image_and_only_within_the_target():
    from yolocomp.commands.prune import _light_head_start
    from yolocomp.config.prune import PruneConfig
    from yolocomp.prune.light_head import auto_box_bins

    model = randomized()  # strides 8, 16, 32 and 16 bins
    assert auto_box_bins(model, 320, 8) == auto_box_bins(model, 448, 8) == 8
    assert auto_box_bins(model, 480, 8) is None and auto_box_bins(model, 640, 8) is None  # 7 x 32 px < half the image
    kept, info = light_head(model, imgsz=IMG, box_bins=16)  # the model's own bins: the box branch as it was
    assert kept.model[-1].reg_max == 16 and "box_branch" not in info
    assert auto_box_bins(light_head(model, imgsz=IMG, box_bins=8)[0], 320, 8) is None  # nothing left to narrow

    def start(reduction: float, **options) -> dict:
        cfg = PruneConfig(recover="kd", flops_reduction=reduction, **options)
        recovery: dict = {}
        _light_head_start(model, cfg, "bn", cfg.target(), IMG, (), recovery)
        return recovery["light_head"]

    both, light_only = light_head(model, imgsz=IMG, box_bins=8)[1], light_head(model, imgsz=IMG)[1]
    share = 1 - both["gflops"]["after"] / both["gflops"]["before"]
    assert start(share + 0.05)["box_branch"]["reg_max"]["after"] == 8
    assert "box_branch" not in start(share - 0.05)  # narrowing too would overshoot: the class branch alone
    assert start(share - 0.05)["gflops"]["after"] == light_only["gflops"]["after"]
    with pytest.raises(UserError, match="more than --flops-reduction"):  # bins the user set are never dropped
        start(share - 0.05, head="light", box_bins=8)
