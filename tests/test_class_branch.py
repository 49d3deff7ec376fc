"""Fitting a fresh class branch to the teacher's class logits on cached Detect inputs (`fit_class_branch`)."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from test_prune import randomized

from yolocomp.errors import UserError
from yolocomp.prune import prune_model
from yolocomp.prune.light_head import light_head
from yolocomp.recon.class_branch import cache_head_inputs, fit_class_branch
from yolocomp.recon.engine import class_kd_loss

IMG = 64


@pytest.fixture(scope="module")
def pair():
    teacher = randomized().eval()
    with torch.no_grad():  # class scores that vary over anchors and classes (the prior bias alone gives ~0 everywhere)
        for branch in teacher.model[-1].cv3:
            branch[-1].bias.zero_()
            branch[-1].weight.mul_(4)
    student, _ = light_head(teacher, "bn", imgsz=IMG)
    return teacher, student.eval()


def _images(seed: int, n: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return list(torch.rand(n, 3, IMG, IMG).split(8))


@torch.no_grad()
def _class_loss(student, teacher, images) -> float:
    inputs, targets = cache_head_inputs(teacher, images, flip=False, progress=False, student=student)
    head = student.model[-1]  # the excess over the loss's minimum, the teacher itself
    return float(sum(class_kd_loss(branch(x.float()), t.float()) - class_kd_loss(t.float(), t.float())
                     for branch, x, t in zip(head.cv3, inputs, targets)))


def test_class_kd_loss_is_stationary_at_the_teacher_and_weights_confident_anchors():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 4, 4) * 3
    logits = teacher.clone().requires_grad_(True)
    class_kd_loss(logits, teacher).backward()
    assert logits.grad.abs().max() < 1e-6  # the soft targets' optimum is the teacher itself
    confident = teacher.clone()
    confident[:, 0, 0, 0] = 10.0  # one anchor the teacher is sure of
    logits = torch.zeros_like(confident, requires_grad=True)
    class_kd_loss(logits, confident).backward()
    grad = logits.grad.abs().sum(1)
    assert grad[:, 0, 0].min() > grad.flatten(1).median(1).values.max()


def test_fit_trains_only_the_class_branch_and_lowers_its_error_on_unseen_images(pair):
    teacher, fresh = pair
    student = deepcopy(fresh)
    held_out = _images(1, 16)
    before = _class_loss(student, teacher, held_out)
    report = fit_class_branch(student, teacher, _images(0, 32), iters=150, batch_size=8, lr=3e-3, progress=False)
    assert report["views"] == 64 and report["loss_end"] < report["loss_start"]
    assert _class_loss(student, teacher, held_out) < 0.7 * before
    old, new = fresh.state_dict(), student.state_dict()
    cv3 = f"model.{len(student.model) - 1}.cv3."
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all(k.startswith(cv3) for k in changed)  # backbone, neck and box branch untouched
    assert not student.model[-1].cv3.training  # ends in eval mode, with the running statistics it trained


def test_the_cache_stops_at_its_memory_cap(pair):
    teacher, _ = pair
    inputs, targets = cache_head_inputs(teacher, _images(0, 32), flip=True, progress=False)
    per_view = sum(2 * (x[0].numel() + t[0].numel()) for x, t in zip(inputs, targets))
    assert len(inputs[0]) == 64 and [len(t) for t in targets] == [64] * len(targets)
    assert all(x.dtype == torch.float16 for x in inputs + targets)
    capped, _ = cache_head_inputs(teacher, _images(0, 32), flip=True, max_bytes=20 * per_view, progress=False)
    assert 20 <= len(capped[0]) < 20 + 16  # whole batches (and their mirrors) up to the first one past the cap


def test_the_cache_takes_the_students_own_inputs_and_the_teachers_logits(pair):
    teacher, student = pair
    pruned, _ = prune_model(deepcopy(student), ratio=0.3, method="l1", imgsz=IMG)
    widths = [branch[0].conv.in_channels for branch in pruned.model[-1].cv2]
    assert widths != [branch[0].conv.in_channels for branch in teacher.model[-1].cv2]  # Detect's inputs were cut
    inputs, targets = cache_head_inputs(teacher, _images(0, 8), flip=False, progress=False, student=pruned)
    assert [x.shape[1] for x in inputs] == widths
    _, teacher_targets = cache_head_inputs(teacher, _images(0, 8), flip=False, progress=False)
    assert all(torch.equal(t, u) for t, u in zip(targets, teacher_targets))


def test_a_pruned_student_fits_on_its_own_inputs(pair):
    teacher, student = pair
    pruned, _ = prune_model(deepcopy(student), ratio=0.3, method="l1", imgsz=IMG)
    held_out = _images(1, 16)
    before = _class_loss(pruned, teacher, held_out)
    fit_class_branch(pruned, teacher, _images(0, 32), iters=150, batch_size=8, lr=3e-3, progress=False)
    assert _class_loss(pruned, teacher, held_out) < 0.7 * before


def test_teacher_inputs_with_pruned_detect_inputs_bad_inputs_or_no_images_are_refused(pair):
    teacher, student = pair
    pruned, _ = prune_model(deepcopy(student), ratio=0.3, method="l1", imgsz=IMG)
    with pytest.raises(UserError, match="inputs='student'"):
        fit_class_branch(pruned, teacher, _images(0, 8), iters=1, inputs="teacher", progress=False)
    with pytest.raises(UserError, match="inputs 'features' unknown"):
        fit_class_branch(deepcopy(student), teacher, _images(0, 8), iters=1, inputs="features", progress=False)
    with pytest.raises(UserError, match="no images"):
        fit_class_branch(deepcopy(student), teacher, [], iters=1, progress=False)
