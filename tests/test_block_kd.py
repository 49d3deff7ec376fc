"""Block-output distillation: kept channels of every layer compared with the teacher's, plus the head terms."""

from __future__ import annotations

import pytest
import torch
from test_prune import randomized

from yolocomp.distill.block_kd import BlockKD, feature_layers, ramped_channels
from yolocomp.errors import UserError
from yolocomp.prune.pruner import prune_model


def _losses(method: BlockKD, student: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    method.setup(student, "cpu")
    student.train()
    for m in student.modules():  # eval-mode BN: student and teacher normalise alike (as FrozenBatchNorm does)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    try:
        preds = student(images)
        return method.extra_loss(None, {"img": images}, preds)
    finally:
        method.release()


def test_identical_student_has_zero_block_loss_and_a_pruned_one_does_not():
    teacher = randomized()
    images = torch.rand(2, 3, 64, 64)
    same = _losses(BlockKD(teacher), randomized(), images)
    assert same["kdfeat_loss"].item() < 1e-8
    assert abs(same["kdcls_loss"].item()) < 1e-5 and abs(same["kddfl_loss"].item()) < 1e-5

    pruned, summary = prune_model(teacher, ratio=0.3, method="bn", imgsz=64)
    channel_map = summary["kept_channels"]
    assert set(channel_map) & set(feature_layers(teacher))  # layers with parameters changed width
    cut = _losses(BlockKD(teacher, channel_map=channel_map), pruned, images)
    assert cut["kdfeat_loss"].item() > 1e-3
    # on the channels they share, the cut model's first layer equals the teacher's (the cut starts there)
    first = min(channel_map)
    with torch.no_grad():
        x = images
        for i in range(first + 1):
            x = pruned.model[i](x)
        t = images
        for i in range(first + 1):
            t = teacher.model[i](t)
    assert torch.allclose(x, t[:, channel_map[first]], atol=1e-5)


def test_identical_student_gets_exactly_zero_gradients():
    # Adam turns any residue (~1e-10) into lr-sized steps: a model distilled into itself must not move at all
    teacher = randomized()
    student = randomized()
    losses = _losses(BlockKD(teacher), student, torch.rand(2, 3, 64, 64))
    sum(losses.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_head_kd_gradient_is_the_analytic_kl_gradient():
    import torch.nn.functional as F

    from yolocomp.distill.head_kd import anchor_weights, head_kd_terms

    torch.manual_seed(0)
    b, nc, anchors, reg_max, T = 2, 5, 7, 16, 2.0
    s_cls = torch.randn(b, nc, anchors, requires_grad=True)
    s_box = torch.randn(b, 4 * reg_max, anchors, requires_grad=True)
    t_cls, t_box = torch.randn(b, nc, anchors), torch.randn(b, 4 * reg_max, anchors)
    terms = head_kd_terms({"scores": s_cls, "boxes": s_box}, {"scores": t_cls, "boxes": t_box}, reg_max, T)
    fast = torch.autograd.grad(terms["cls"] + terms["dfl"], [s_cls, s_box])
    # the same KL, differentiated by autograd
    w, p_t = anchor_weights(t_cls), (t_cls / T).sigmoid()
    cls_kl = F.binary_cross_entropy_with_logits(s_cls / T, p_t, reduction="none") - F.binary_cross_entropy_with_logits(
        t_cls / T, p_t, reduction="none")
    log_s = (s_box.view(b, 4, reg_max, anchors) / T).log_softmax(2)
    log_t = (t_box.view(b, 4, reg_max, anchors) / T).log_softmax(2)
    cls_ref = (cls_kl.sum(1) * w).sum() * T * T
    dfl_ref = ((log_t.exp() * (log_t - log_s)).sum((1, 2)) * w).sum() * T * T
    slow = torch.autograd.grad(cls_ref + dfl_ref, [s_cls, s_box])
    assert terms["cls"].item() == pytest.approx(cls_ref.item(), rel=1e-5)
    assert terms["dfl"].item() == pytest.approx(dfl_ref.item(), rel=1e-5)
    for a, r in zip(fast, slow):
        assert torch.allclose(a, r, atol=1e-6, rtol=1e-4) and r.abs().max() > 1e-3


def test_gradient_of_block_loss_reaches_the_student_only():
    teacher = randomized()
    pruned, summary = prune_model(teacher, ratio=0.3, method="bn", imgsz=64)
    method = BlockKD(teacher, cls_weight=0.0, dfl_weight=0.0, channel_map=summary["kept_channels"])
    loss = _losses(method, pruned, torch.rand(2, 3, 64, 64))["kdfeat_loss"]
    loss.backward()
    grads = [p.grad for p in pruned.model[0].parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())


def test_block_kd_refuses_other_widths_without_a_channel_map():
    teacher = randomized()
    pruned, _ = prune_model(teacher, ratio=0.3, method="bn", imgsz=64)
    with pytest.raises(UserError, match="no channel map"):
        BlockKD(teacher).setup(pruned, "cpu")
    with pytest.raises(UserError, match="feature_weight"):
        BlockKD(teacher, feature_weight=-1)


def test_channels_a_progressive_step_ramps_out_are_left_out_of_the_block_loss():
    from yolocomp.prune import ramp
    from yolocomp.prune.pruner import plan_pruning

    teacher = randomized()
    student = randomized()  # same weights as the teacher
    graph, _, plan = plan_pruning(student, ratio=0.3, method="bn", imgsz=64)
    assert ramp.insert_gates(student, graph, plan) > 0
    ramp.set_schedule(student, 10)
    ramp.finish_ramps(student)  # dropped channels are exactly zero, the kept ones still the teacher's
    first = min(i for i in feature_layers(student) if ramped_channels(student.model[i]) is not None)
    images = torch.rand(2, 3, 64, 64)
    held = _losses(BlockKD(teacher, cls_weight=0.0, dfl_weight=0.0, layers=[first]), student, images)
    assert held["kdfeat_loss"].item() < 1e-10  # only kept channels compared: they equal the teacher's
    with torch.no_grad():  # every channel of that layer compared: the ramped-out ones differ from the teacher's
        s, t = _layer_output(student, images, first), _layer_output(teacher, images, first)
    drop = ramped_channels(student.model[first])
    assert drop.any() and not drop.all()
    assert torch.allclose(s[:, ~drop], t[:, ~drop], atol=1e-5) and s[:, drop].abs().max() == 0
    assert t[:, drop].abs().max() > 1e-3


def _layer_output(model: torch.nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    model.eval()
    outputs = []
    for layer in model.model[: index + 1]:
        if layer.f != -1:
            x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
        x = layer(x)
        outputs.append(x)
    return x
