"""Block-wise reconstruction: blocks and streaming cache, fitting a pruned student to its teacher, plain deliverable."""

from __future__ import annotations

import pytest
import torch
from test_prune import randomized

from yolocomp.integration import save_model
from yolocomp.prune import prune_model
from yolocomp.recon import detector_blocks, reconstruct
from yolocomp.recon.blocks import IMAGE, OutputCache
from yolocomp.recon.engine import head_error, relative_error

IMG = 64


@pytest.fixture(scope="module")
def pair():
    teacher = randomized()
    student, summary = prune_model(teacher, ratio=0.3, imgsz=IMG)
    return teacher, student, summary


def test_blocks_follow_the_model_and_the_cache_keeps_only_live_outputs(pair):
    teacher, _, _ = pair
    blocks = detector_blocks(teacher)
    assert [b.index for b in blocks] == list(range(len(teacher.model)))
    assert blocks[0].sources == [IMAGE] and blocks[-1].kind == "Detect" and blocks[-1].sources == teacher.model[-1].f
    assert not blocks[10].fittable and blocks[11].kind == "Concat" and blocks[2].fittable  # Upsample, Concat, C2f
    cache = OutputCache([torch.rand(2, 3, IMG, IMG)], blocks)
    peak = 0
    for b in blocks:
        out = cache.advance(b, torch.device("cpu"))
        peak = max(peak, len(cache.outputs))
    assert out[0].shape == (2, 4 * teacher.model[-1].reg_max + 3, sum((IMG // s) ** 2 for s in (8, 16, 32)))
    assert not cache.outputs  # everything released after Detect
    assert peak <= len(teacher.save) + 1  # the skip connections, not every layer
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():  # the raw head is what the model computes before decoding
        raw = teacher.eval()(x)[1]
    cache = OutputCache([x], blocks)
    for b in blocks:
        out = cache.advance(b, torch.device("cpu"))
    assert torch.allclose(out[0], torch.cat([raw["boxes"], raw["scores"]], 1), atol=1e-5)


def test_kept_channels_select_the_students_outputs_from_the_teachers(pair):
    teacher, student, summary = pair
    kept = summary["kept_channels"]
    x = torch.rand(2, 3, IMG, IMG)
    t_out = OutputCache([x], detector_blocks(teacher)).advance(detector_blocks(teacher)[0], torch.device("cpu"))[0]
    s_out = OutputCache([x], detector_blocks(student)).advance(detector_blocks(student)[0], torch.device("cpu"))[0]
    assert 0 in kept and torch.allclose(s_out, t_out[:, kept[0]], atol=1e-6)  # layer 0 sees the same images


def test_reconstruction_lowers_block_errors_on_unseen_images(pair):
    from copy import deepcopy

    teacher, pruned, summary = pair
    student = deepcopy(pruned)
    torch.manual_seed(1)
    fit, held, unseen = torch.rand(16, 3, IMG, IMG), torch.rand(8, 3, IMG, IMG), torch.rand(8, 3, IMG, IMG)
    report = reconstruct(student, teacher, fit, held_out=held, channel_map=summary["kept_channels"], iters=25,
                         lr=1e-3, batch_size=8)
    rows = {r["layer"]: r for r in report["blocks"]}
    assert rows[0]["error_before"] == pytest.approx(0.0, abs=1e-9)  # same input, kept slice: exact already
    changed = [r for r in report["blocks"] if r["fitted"] and r["error_before"] > 1e-3]
    assert len(changed) >= 5
    assert all(r["error_after"] <= r["error_before"] for r in report["blocks"] if r["fitted"])
    assert sum(r["error_after"] < 0.5 * r["error_before"] for r in changed) >= len(changed) // 2
    assert report["head_error"]["after"] < report["head_error"]["before"]
    # images used neither for fitting nor for the held-out checks
    assert head_error(student, teacher, unseen) < head_error(pruned, teacher, unseen)
    assert report["images"] == {"fit": 16, "held_out": 8}
    assert not student.training  # the caller's mode is restored


def test_reconstructed_model_is_plain_and_loads_with_ultralytics(pair, tmp_path):
    from copy import deepcopy

    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    teacher, pruned, summary = pair
    student = deepcopy(pruned)
    reconstruct(student, teacher, torch.rand(16, 3, IMG, IMG), channel_map=summary["kept_channels"], iters=2)
    rebuilt = DetectionModel(deepcopy(student.yaml), nc=3, verbose=False)
    assert student.state_dict().keys() == rebuilt.state_dict().keys()  # no teacher or mask tensors
    assert not any(type(m).__module__.startswith("yolocomp") for m in student.modules())
    yolo = YOLO(str(save_model(student, tmp_path / "recon.pt")))
    with torch.no_grad():
        ours = student.eval()(torch.zeros(1, 3, IMG, IMG))[0]
        theirs = yolo.model.float().eval()(torch.zeros(1, 3, IMG, IMG))[0]
    assert torch.allclose(ours, theirs, atol=0.05)  # saved in half precision


def test_relative_error_and_bad_requests(pair):
    t = [torch.randn(4, 3, 5, 5) + 10]
    assert relative_error(t, t) == 0.0
    assert relative_error([torch.full_like(t[0], 10.0)], t) == pytest.approx(1.0, abs=0.3)  # a constant: ~1
    teacher, student, _ = pair
    from yolocomp.errors import UserError

    with pytest.raises(UserError, match="held-out"):
        reconstruct(student, teacher, torch.rand(4, 3, IMG, IMG), batch_size=8)
    with pytest.raises(UserError, match="fit"):
        reconstruct(student, teacher, torch.rand(16, 3, IMG, IMG), fit="some")


def test_large_images_fit_on_a_few_images_of_each_batch_per_iteration(pair, monkeypatch):
    from copy import deepcopy

    from yolocomp.recon import engine
    from yolocomp.recon.engine import fit_images

    assert fit_images(8, 320 * 320) == 8 and fit_images(8, 640 * 640) == 2 and fit_images(8, 1280 * 1280) == 1
    assert fit_images(8, 640 * 640, fit_pixels=None) == 8 and fit_images(4, 64 * 64) == 4
    teacher, pruned, summary = pair
    student = deepcopy(pruned)
    seen: list[tuple[int, bool]] = []
    run_block = engine.run_block

    def counting(block, inputs):
        seen.append((inputs[0].shape[0], torch.is_grad_enabled()))
        return run_block(block, inputs)

    monkeypatch.setattr(engine, "run_block", counting)
    torch.manual_seed(1)
    fit, held = torch.rand(16, 3, IMG, IMG), torch.rand(8, 3, IMG, IMG)
    report = reconstruct(student, teacher, fit, held_out=held, channel_map=summary["kept_channels"], iters=25,
                         batch_size=8, fit_pixels=2 * IMG * IMG)
    assert report["settings"]["images_per_iteration"] == 2
    fitting = [n for n, grad in seen if grad]
    assert fitting and set(fitting) == {2}  # every fitting step: 2 of the cached batch's 8 images
    assert {n for n, grad in seen if not grad} == {8}  # checks run on whole batches
    assert report["head_error"]["after"] < report["head_error"]["before"]
