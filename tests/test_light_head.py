"""`--head light`: YOLO11's depthwise class branch on a YOLOv8 detector, rebuilt by stock Ultralytics and fitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_prune import randomized
from torch import nn

from yolocomp.config.prune import LIGHT_HEAD_LAYER_CAP
from yolocomp.errors import UserError
from yolocomp.eval.info import gflops
from yolocomp.prune import prune_model
from yolocomp.prune.light_head import convertible_layers, has_light_head, light_head
from yolocomp.prune.pruner import conv_channels
from yolocomp.recon import reconstruct
from yolocomp.recon.engine import head_error

IMG = 64


@pytest.fixture(scope="module")
def converted():
    model = randomized()
    light, info = light_head(model, "bn", imgsz=IMG)
    return model, light, info


def test_one_c2f_becomes_a_c3k2_keeping_the_more_important_half_and_the_class_branch_is_depthwise(converted):
    from ultralytics.nn.modules import C2f, C3k2

    model, light, info = converted
    layer = info["c3k2_layer"]
    assert layer in convertible_layers(model) and type(light.model[layer]) is C3k2
    assert [type(m) for i, m in enumerate(light.model) if i != layer] == \
           [type(m) for i, m in enumerate(model.model) if i != layer]
    assert type(model.model[layer]) is C2f and not has_light_head(model) and has_light_head(light)
    old, new = model.model[layer], light.model[layer]
    for b_old, b_new in zip(old.m, new.m):
        gamma = b_old.cv1.bn.weight.detach().abs()
        kept = gamma.argsort(descending=True)[: len(gamma) // 2].sort().values
        assert b_new.cv1.conv.out_channels == len(gamma) // 2
        assert torch.equal(b_new.cv1.conv.weight, b_old.cv1.conv.weight[kept])
        assert torch.equal(b_new.cv2.conv.weight, b_old.cv2.conv.weight[:, kept])
    # every other tensor is copied, the class branch is new
    old_state, new_state = model.state_dict(), light.state_dict()
    head = f"model.{len(model.model) - 1}"
    for key, value in new_state.items():
        if key.startswith(f"{head}.cv3.") or key.startswith(f"model.{layer}.m."):
            continue
        assert torch.equal(value, old_state[key]), key
    new_weights = [k for k in new_state if k.startswith(f"{head}.cv3.") and k.endswith("conv.weight")]
    assert len(new_weights) == 4 * 3  # two depthwise + pointwise pairs per level
    assert not any(k in old_state and old_state[k].shape == new_state[k].shape and torch.equal(old_state[k], new_state[k])
                   for k in new_weights)
    assert info["gflops"]["after"] < 0.9 * info["gflops"]["before"] == pytest.approx(0.9 * gflops(model, IMG), rel=1e-3)
    # layers before the converted block compute exactly what they did
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, out, key=(k, i): outputs.__setitem__(key, out))
             for k, net in enumerate((model, light)) for i, m in enumerate(net.model[:layer])]
    x = torch.rand(2, 3, IMG, IMG)
    with torch.no_grad():
        model.eval()(x), light.eval()(x)
    for h in hooks:
        h.remove()
    assert layer > 0 and all(torch.equal(outputs[0, i], outputs[1, i]) for i in range(layer))


def test_the_fresh_class_branch_starts_the_same_every_run_and_leaves_the_random_state_alone(converted):
    model, light, _ = converted
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    again, _ = light_head(model, "bn", imgsz=IMG)
    assert torch.equal(torch.rand(4), expected)  # the seeded rebuild draws from its own generator state
    fresh = [k for k in light.state_dict() if ".cv3." in k and k.endswith("conv.weight")]
    assert fresh and all(torch.equal(light.state_dict()[k], again.state_dict()[k]) for k in light.state_dict())


def test_stock_ultralytics_rebuilds_the_light_head_from_the_yaml_and_loads_every_tensor(converted, tmp_path):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from yolocomp.integration import save_model

    _, light, _ = converted
    rebuilt = DetectionModel(light.yaml, nc=3, verbose=False)  # what YOLO(path).train() does
    assert has_light_head(rebuilt)
    rebuilt.load_state_dict(light.state_dict(), strict=True)
    assert not has_light_head(DetectionModel("yolov8n.yaml", nc=3, verbose=False))  # nothing process-wide leaks
    loaded = YOLO(str(save_model(light, tmp_path / "light.pt"))).model
    x = torch.rand(1, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(loaded.float().eval()(x)[0], light.eval()(x)[0], rtol=2e-3, atol=1e-3)  # saved as fp16


def test_pruning_a_converted_model_keeps_the_light_head(converted):
    _, light, _ = converted
    pruned, summary = prune_model(light, flops_reduction=0.2, imgsz=IMG)
    assert has_light_head(pruned)
    assert summary["achieved"]["flops_reduction"] == pytest.approx(0.2, abs=0.03)


def reconstruct_new_head(start: nn.Module, teacher: nn.Module, head_iters: int, img: int = IMG) -> tuple[dict, dict]:
    """Reconstruct a copy of ``start`` (its head rebuilt) to ``teacher`` on random images; returns the report and the
    head's row, after checking that the head was fitted and beats ``start`` on images it was not fitted on."""
    from copy import deepcopy

    student = deepcopy(start)
    torch.manual_seed(1)
    fit, held, unseen = torch.rand(16, 3, img, img), torch.rand(8, 3, img, img), torch.rand(8, 3, img, img)
    report = reconstruct(student, teacher, fit, held_out=held, iters=5, head_iters=head_iters, head_loss="kd",
                         batch_size=8)
    head = {r["layer"]: r for r in report["blocks"]}[len(teacher.model) - 1]
    assert head["changed"] and head["fitted"] and not head["reverted"]
    assert head_error(student, teacher, unseen) < head_error(start, teacher, unseen)
    return report, head


def test_reconstruction_fits_the_new_class_branch_to_the_legacy_teacher(converted):
    teacher, light, _ = converted
    report, head = reconstruct_new_head(light, teacher, head_iters=60)
    assert head["error_after"] < 0.5 * head["error_before"]
    assert report["settings"]["head_iters"] == 60 and report["settings"]["head_loss"] == "kd"


def test_bad_requests_are_one_line_errors():
    with pytest.raises(UserError, match="already has YOLO11's depthwise class branch"):
        light_head(randomized("yolo11n.yaml"), imgsz=IMG)
    with pytest.raises(UserError, match="needs a C2f block"):
        light_head(randomized("yolov5nu.yaml"), imgsz=IMG)
    with pytest.raises(UserError, match="not a C2f of Bottlenecks"):
        light_head(randomized(), layer=0, imgsz=IMG)
    with pytest.raises(UserError, match="head_loss 'l2' unknown"):
        reconstruct(randomized(), randomized(), torch.rand(8, 3, IMG, IMG), head_loss="l2")


def test_head_kd_loss_is_zero_only_at_the_teacher():
    from yolocomp.recon.engine import head_kd_loss

    torch.manual_seed(0)
    target = torch.randn(2, 64 + 3, 10) * 3
    exact = head_kd_loss(target.clone(), target, nc=3)
    entropy = nn.functional.binary_cross_entropy_with_logits(target[:, 64:], target[:, 64:].sigmoid(), reduction="none")
    weight = target[:, 64:].sigmoid().amax(1, keepdim=True).clamp_min(0.01)
    assert exact == pytest.approx(float((entropy * weight).sum() / weight.sum()), rel=1e-5)  # the targets' own entropy
    assert head_kd_loss(target + 0.5, target, nc=3) > exact


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--head", "light"], "head: light needs recover: kd"),
    (["--head", "light", "--recover", "kd", "--steps", "2"], "head: light works with a one-shot cut"),
])
def test_bad_head_flags_are_one_line(tmp_path, capsys, tiny_detector, flags, fragment):
    from yolocomp.cli import main

    assert main(["prune", "--model", str(tiny_detector["pt"]), *flags, "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and fragment in err[0]


def test_prune_with_the_light_head_meets_the_target_against_the_input_model(tmp_path, tiny_detector, synthetic_data):
    from ultralytics import YOLO

    from yolocomp.cli import main

    out = tmp_path / "o"
    code = main(["prune", "--model", str(tiny_detector["pt"]), "--data", str(synthetic_data), "--method", "l1",
                 "--flops-reduction", "0.3", "--head", "light", "--recover", "kd", "--finetune-epochs", "1",
                 "--batch", "8", "--imgsz", "64", "--recon-images", "16", "--recon-iters", "5",
                 "--recon-head-iters", "20", "--head-fit-iters", "20", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    fit = report["recovery"]["class_branch_fit"]
    assert fit["iters"] == 20 and fit["views"] == 2 * fit["images"] > 0  # every train image and its mirror
    assert fit["inputs"] == "student"  # the converted model's own Detect inputs
    # at 64 px 7 strides reach past half the image, so the box branch narrows to 8 bins by default
    assert report["recovery"]["light_head"]["box_branch"]["reg_max"] == {"before": 16, "after": 8}
    assert fit["branches"] == ["cls", "box"]
    converted = fit["converted_blocks"]  # the C3k2 was reconstructed first, and only it
    assert [b["layer"] for b in converted] == [report["recovery"]["light_head"]["c3k2_layer"]]
    assert converted[0]["type"] == "C3k2" and converted[0]["error_after"] <= converted[0]["error_before"]
    assert report["ap_vs_gflops"][1]["stage"] == "light head"
    original = YOLO(str(tiny_detector["pt"])).model
    assert report["gflops"]["before"] == pytest.approx(gflops(original, 64), rel=1e-3)
    assert report["channels"]["before"] == conv_channels(original)  # the input model's, not the converted one's
    assert report["achieved"]["flops_reduction"] == pytest.approx(0.3, abs=0.03)
    assert report["target"]["flops_reduction"] == 0.3
    assert report["recovery"]["light_head"]["gflops"]["after"] < report["gflops"]["before"]
    assert report["settings"]["max_layer_ratio"] == LIGHT_HEAD_LAYER_CAP  # the cut after the light head is spread
    assert all(r["out_kept"] >= (1 - LIGHT_HEAD_LAYER_CAP) * r["out_total"] for r in report["layers"])
    for name in ("pruned.pt", "finetuned.pt"):
        model = YOLO(str(out / name)).model
        assert has_light_head(model) and any(type(m).__name__ == "C3k2" for m in model.model)
        assert model.model[-1].reg_max == 8
        assert gflops(model, 64) == pytest.approx(report["gflops"]["after"], rel=1e-3)


def test_prune_cap_measures_attention_on_the_light_head_model_without_labels_and_cuts_by_it(tmp_path, tiny_detector,
                                                                                            synthetic_data):
    import yaml
    from ultralytics import YOLO

    from yolocomp.commands.prune import prune

    out = tmp_path / "o"
    images = str(Path(yaml.safe_load(open(synthetic_data))["path"]) / "images" / "train")
    report = prune(str(tiny_detector["pt"]), out, data=None, images=images, method="cap", flops_reduction=0.3,
                   recover="kd", imgsz=64, batch=8, recon_images=16, recon_iters=5, recon_head_iters=5,
                   head_fit_iters=5, attention_iters=4, sparsity_epochs=2, evaluate=False, latency=False)
    assert report["recovery"]["head"] == "light" and report["method"] == "cap"
    attention = report["recovery"]["attention"]  # measured on copies with the weights frozen: no training run
    assert attention["iters"] == 4 and attention["images"] == 16 and not (out / "attention").exists()
    assert any("--sparsity-epochs ignored for cap" in n for n in report["notes"])
    assert report["achieved"]["flops_reduction"] == pytest.approx(0.3, abs=0.03)
    assert report["gflops"]["before"] == pytest.approx(gflops(YOLO(str(tiny_detector["pt"])).model, 64), rel=1e-3)
    pruned = YOLO(str(out / "pruned.pt")).model
    assert has_light_head(pruned) and not any("AttentionGate" in type(m).__name__ for m in pruned.modules())


def test_the_cut_follows_the_importance_it_is_given():
    from yolocomp.commands.prune import _cut
    from yolocomp.prune import importance as imp
    from yolocomp.prune.cap import ChannelAttentionPruning
    from yolocomp.recipe import stage_config

    light, _ = light_head(randomized(), "l1", imgsz=IMG)
    target = {"ratio": None, "flops_reduction": 0.15}
    l1 = imp.compute(light, ChannelAttentionPruning(ratio=None).gate_targets(light), "l1")

    def kept(method: str, scores: dict | None) -> dict:
        cfg = stage_config("prune", {"recover": "kd", "method": method, "flops_reduction": 0.3})
        return _cut(light, target, cfg, (), IMG, None, True, [], scores)[1]["kept_channels"]

    by_l1 = kept("l1", None)
    assert kept("cap", l1) == by_l1  # CAP's scores take the place of the method's own
    assert kept("cap", {name: -score for name, score in l1.items()}) != by_l1


def test_settled_batchnorm_keeps_the_outputs_and_matches_the_statistics_of_the_images(converted):
    from copy import deepcopy

    from yolocomp.prune.light_head import settle_batchnorm

    _, light, _ = converted
    model = deepcopy(light).eval()
    prefix = f"model.{len(model.model) - 1}.cv3."
    torch.manual_seed(2)
    images = torch.rand(16, 3, IMG, IMG)
    with torch.no_grad():
        before = model(images)[0]
    assert settle_batchnorm(model, prefix, images) == 4 * 3
    with torch.no_grad():
        assert torch.allclose(model(images)[0], before, rtol=1e-4, atol=1e-4)  # the same function
        bns = [m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.BatchNorm2d)]
        assert not any(torch.allclose(bn.running_var, torch.ones_like(bn.running_var)) for bn in bns)
        for bn in bns:  # one batch of all images in train mode normalises with exactly these statistics
            bn.train()
            bn.momentum = 1.0
        trained = model(images)[0]
    assert torch.allclose(trained, before, rtol=1e-3, atol=1e-3)


def test_auto_head_takes_the_light_branch_only_where_it_applies():
    from yolocomp.commands.prune import _light_head_start
    from yolocomp.recipe import stage_config

    def cfg(**values):
        return stage_config("prune", {"recover": "kd", "flops_reduction": 0.3, **values})

    assert cfg().wants_light_head() is None  # the default: up to the model
    assert cfg(head="light").wants_light_head() is True and cfg(head="keep").wants_light_head() is False
    assert cfg(method="cap").wants_light_head() is None  # CAP's attention is measured on the converted model
    for values in ({"steps": 2}, {"recover": "labels"}, {"reconstruct": False}, {"flops_reduction": None, "ratio": 0.3}):
        assert cfg(**values).wants_light_head() is False, values
    v8, v11 = randomized(), randomized("yolo11n.yaml")
    record: dict = {}
    converted, cut = _light_head_start(v8, cfg(), "bn", {"ratio": None, "flops_reduction": 0.3}, IMG, (), record)
    assert record["head"] == "light" and has_light_head(converted)
    share = 1 - record["light_head"]["gflops"]["after"] / record["light_head"]["gflops"]["before"]
    assert 0 < cut["flops_reduction"] < 0.3
    assert (1 - share) * (1 - cut["flops_reduction"]) == pytest.approx(0.7, abs=1e-3)  # the target stays the input's
    for model, target in ((v8, share / 2), (v11, 0.3)):  # the swap alone would overshoot; already light
        record = {}
        assert _light_head_start(model, cfg(), "bn", {"ratio": None, "flops_reduction": target}, IMG, (), record) is None
        assert record["head"] == "keep"
    with pytest.raises(UserError, match="more than --flops-reduction"):
        _light_head_start(v8, cfg(head="light"), "bn", {"ratio": None, "flops_reduction": share / 2}, IMG, (), {})
    every_c2f = tuple(convertible_layers(v8))
    assert _light_head_start(v8, cfg(), "bn", {"ratio": None, "flops_reduction": 0.3}, IMG, every_c2f, {}) is None


def test_the_cut_after_the_light_head_is_capped_per_layer_unless_the_cap_cannot_reach_the_target():
    from yolocomp.commands.prune import _cut
    from yolocomp.recipe import stage_config

    light, _ = light_head(randomized(), "l1", imgsz=IMG)
    cfg = stage_config("prune", {"recover": "kd", "method": "l1", "flops_reduction": 0.3})
    notes: list[str] = []
    _, capped = _cut(light, {"ratio": None, "flops_reduction": 0.15}, cfg, (), IMG, None, True, notes)
    _, free = _cut(light, {"ratio": None, "flops_reduction": 0.15}, cfg, (), IMG, None, False, notes)
    assert capped["settings"]["max_layer_ratio"] == LIGHT_HEAD_LAYER_CAP and free["settings"]["max_layer_ratio"] is None
    assert not notes and all(r["out_kept"] >= 0.7 * r["out_total"] for r in capped["layers"])
    assert min(r["out_kept"] / r["out_total"] for r in free["layers"]) < 0.7  # unconstrained, the cut goes deeper
    _, fallback = _cut(light, {"ratio": None, "flops_reduction": 0.6}, cfg, (), IMG, None, True, notes)
    assert fallback["settings"]["max_layer_ratio"] is None and "cannot reach the target" in notes[0]
    user = stage_config("prune", {"recover": "kd", "method": "l1", "flops_reduction": 0.3, "max_layer_ratio": 0.3})
    with pytest.raises(UserError, match="cannot be reached"):  # a cap the user set is never dropped
        _cut(light, {"ratio": None, "flops_reduction": 0.6}, user, (), IMG, None, True, [])
