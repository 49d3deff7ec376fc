"""CAP's attention measured with the model's weights frozen (yolocomp.recon.attention)."""

from __future__ import annotations

import pytest
import torch

from yolocomp.errors import UserError
from yolocomp.prune.cap import AttentionGate, ChannelAttentionPruning
from yolocomp.recon import measure_attention

IMG = 64
DEAD = [1, 4, 9, 12]  # channels of layer 0 that nothing reads


@pytest.fixture(scope="module")
def detector():
    """A YOLOv8n whose outputs depend on its features (BN calibrated on the images, class prior lifted), with the
    channels DEAD of layer 0 disconnected: layer 1 reads them with zero weights."""
    from yolocomp.integration import load_model

    torch.manual_seed(0)
    model = load_model("yolov8n.yaml", nc=3)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, IMG, IMG))
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(-2.0)
        model.model[1].conv.weight[:, DEAD] = 0
    return model.eval(), torch.rand(32, 3, IMG, IMG)


def test_attention_is_measured_on_copies_for_every_prunable_conv(detector):
    model, images = detector
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores, info = measure_attention(model, images, attention="se", iters=6, progress=False)
    assert sorted(scores) == ChannelAttentionPruning(ratio=None).gate_targets(model)
    assert all(s.shape == (model.get_submodule(n).conv.out_channels,) for n, s in scores.items())
    assert all(bool(((s > 0) & (s < 2)).all()) for s in scores.values())  # 2 * sigmoid: 1 where nothing moved
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, AttentionGate) for m in model.modules()) and not model.training
    assert info["iters"] == 6 and info["images"] == 32


def test_channels_the_outputs_do_not_read_lose_their_attention(detector):
    model, images = detector
    scores, _ = measure_attention(model, images, attention="se", iters=60, progress=False)
    first = scores["model.0"]
    alive = [c for c in range(len(first)) if c not in DEAD]
    assert first[DEAD].max() < first[alive].min()  # the head-output distillation holds up only the channels it needs
    assert first[DEAD].max() < 0.9 < first[alive].min()


def test_without_the_pull_the_attention_stays_where_it_started(detector):
    model, images = detector
    # the gates start as the identity, where the distillation is exactly 0 and so is its gradient
    scores, info = measure_attention(model, images, attention="se", iters=10, sparsity=0.0, progress=False)
    assert info["head_kd_last"] == 0.0
    assert all(torch.allclose(s, torch.ones_like(s), atol=1e-6) for s in scores.values())


def test_bad_input_is_one_line(detector):
    model, images = detector
    with pytest.raises(UserError, match="needs images"):
        measure_attention(model, images[:0], progress=False)
    with pytest.raises(UserError, match="attention_iters=1"):
        measure_attention(model, images, iters=1, progress=False)
