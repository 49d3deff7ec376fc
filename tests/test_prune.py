"""Structured pruning: dependency-correct surgery on YOLOv5u / YOLOv8 / YOLO11, BN-γ sparsity, CAP, the prune API."""

from __future__ import annotations

import pickle
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.integration import save_model
from yolocomp.prune import count_params, gflops, prune_model
from yolocomp.prune.graph import build_graph

ARCHS = ["yolov5n.yaml", "yolov8n.yaml", "yolo11n.yaml"]  # yolov5n.yaml resolves to the anchor-free YOLOv5u
IMG = 64


@pytest.fixture(scope="session")
def prune_data(tmp_path_factory) -> Path:
    from yolocomp.demo.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("prune_data"), train=16, val=8, size=IMG)


def randomized(yaml: str = "yolov8n.yaml", nc: int = 3, seed: int = 0) -> nn.Module:
    """A yaml-built model whose BN parameters and statistics differ per channel (so rankings are not trivial)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(yaml, nc=nc, verbose=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request) -> tuple[str, nn.Module]:
    return request.param, randomized(request.param)


def _layer_outputs_multiple_of_8(model: nn.Module) -> bool:
    from ultralytics.nn.modules import Conv

    return all(m.conv.out_channels % 8 == 0 for m in model.model[:-1] if type(m) is Conv)


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_pruned_model_forward_params_and_yaml(arch_model, ratio):
    from ultralytics.nn.tasks import DetectionModel

    yaml, model = arch_model
    before = count_params(model)
    pruned, summary = prune_model(model, ratio=ratio, imgsz=IMG)
    assert count_params(model) == before, "the original model must stay untouched"
    assert abs(summary["achieved"]["ratio"] - ratio) < 0.05
    assert summary["params"] == {"before": before, "after": count_params(pruned)}
    # Parameters fall roughly with the square of the kept share of channels (both conv sides shrink).
    kept = 1 - ratio
    assert kept**2 * 0.7 < summary["params"]["after"] / before < kept + 0.1
    assert summary["gflops"]["after"] < summary["gflops"]["before"]
    assert summary["channels"]["after"] < summary["channels"]["before"]
    assert all(0 < r["kept"] <= r["total"] for r in summary["layers"])
    assert _layer_outputs_multiple_of_8(pruned)
    x = torch.rand(2, 3, IMG, IMG)
    pruned.eval()
    y = pruned(x)[0]
    assert y.shape[:2] == (2, 4 + 3) and y.shape == model(x)[0].shape
    pruned.train()
    raw = pruned(x)  # Ultralytics 8.4 train mode: {"boxes", "scores", "feats"}
    assert len(raw["feats"]) == 3 and raw["scores"].shape[:2] == (2, 3)
    assert [f.shape[1] for f in raw["feats"]] == [b[0].conv.in_channels for b in pruned.model[-1].cv2]
    # The stored yaml rebuilds exactly the pruned architecture (what YOLO(path).train() relies on).
    rebuilt = DetectionModel(deepcopy(pruned.yaml), nc=3, verbose=False)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    assert "scales" not in pruned.yaml


def test_export_reload_and_train(arch_model, tmp_path, prune_data):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from ultralytics import YOLO

    yaml, model = arch_model
    pruned, summary = prune_model(model, ratio=0.3, imgsz=IMG)
    path = save_model(pruned, tmp_path / "pruned.pt")
    yolo = YOLO(str(path))
    assert count_params(yolo.model) == summary["params"]["after"]
    assert all(type(m).__module__.split(".")[0] in {"torch", "ultralytics"} for m in yolo.model.modules())

    assert len(yolo.predict(np.zeros((IMG, IMG, 3), np.uint8), imgsz=IMG, verbose=False)) == 1

    onnx_path = yolo.export(format="onnx", imgsz=IMG, simplify=False, verbose=False)
    graph = onnx.load(onnx_path).graph
    shapes = {tuple(init.dims) for init in graph.initializer}
    first = tuple(pruned.model[0].conv.weight.shape)
    assert first in shapes
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, IMG, IMG), dtype=np.float32)
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        y_torch = pruned.float().eval()(torch.from_numpy(x))[0].numpy()
    assert y_onnx.shape == y_torch.shape
    np.testing.assert_allclose(y_onnx, y_torch, rtol=1e-3, atol=1e-2)

    trainer_yolo = YOLO(str(path))
    trainer_yolo.train(data=str(prune_data), epochs=1, imgsz=IMG, batch=16, workers=0, device="cpu", plots=False,
                       val=False, project=str(tmp_path / "runs"), name="t", exist_ok=True, verbose=False)
    trained = trainer_yolo.trainer.model
    assert count_params(trained) == summary["params"]["after"]
    assert trained.model[0].conv.weight.shape == pruned.model[0].conv.weight.shape


def test_ratio_near_zero_leaves_outputs_identical(arch_model):
    _, model = arch_model
    x = torch.rand(2, 3, IMG, IMG)
    pruned, summary = prune_model(model, ratio=1e-9, imgsz=IMG)
    assert summary["params"]["after"] == summary["params"]["before"]
    assert torch.equal(pruned.eval()(x)[0], model(x)[0])


def _zero_gamma(model: nn.Module, beta: float) -> tuple[int, int]:
    """Set γ = 0 and β = ``beta`` on random channels of every prunable family, one rounding step (8) per family."""
    graph = build_graph(model)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(1)
    zeroed = total = 0
    for fam in graph.families:
        members = [(sid, f) for sid, f in fam.members if not graph.spaces[sid].pinned]
        total += sum(graph.spaces[sid].size for sid, _ in members)
        target = fam.base_size - 8  # one rounding step less, so the planner can land exactly on it
        if not members or target < max(8, fam.lo):
            continue
        for sid, f in members:
            space = graph.spaces[sid]
            drop = torch.randperm(space.size, generator=gen)[: space.size - int(target * f)]
            zeroed += len(drop)
            for name, off in space.producers:  # every producer of a residual-tied space
                modules[name].bn.weight.data[off + drop] = 0
                modules[name].bn.bias.data[off + drop] = beta
    return zeroed, total


def test_zeroed_gamma_channels_are_removed_without_changing_outputs(arch_model):
    """Channels with γ = β = 0 output exactly 0 (BN -> 0, SiLU(0) = 0): BN-γ pruning must remove those and only those."""
    _, model = arch_model
    model = deepcopy(model)
    zeroed, total = _zero_gamma(model, beta=0.0)
    assert zeroed > 0
    x = torch.rand(2, 3, IMG, IMG)
    ref = model(x)[0]
    pruned, summary = prune_model(model, ratio=zeroed / total, method="bn", imgsz=IMG)
    assert summary["prunable_channels"]["before"] - summary["prunable_channels"]["after"] == zeroed
    assert not any((m.weight == 0).any() for m in pruned.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(pruned.eval()(x)[0], ref, rtol=1e-4, atol=1e-3)


def test_mean_compensation_absorbs_constant_channels():
    """γ = 0, β != 0 channels output the constant SiLU(β); folding it into the next BN shrinks the pruning error."""
    model = randomized("yolov8n.yaml")
    zeroed, total = _zero_gamma(model, beta=0.5)
    x = torch.rand(2, 3, IMG, IMG)
    ref = model(x)[0]
    errors = {}
    for name, kwargs in {"none": {"compensate": False}, "bn": {}, "calib": {"calib": torch.rand(4, 3, IMG, IMG)}}.items():
        pruned, summary = prune_model(model, ratio=zeroed / total, imgsz=IMG, **kwargs)
        errors[name] = (pruned.eval()(x)[0] - ref).abs().mean().item()
    assert errors["bn"] < 0.6 * errors["none"] and errors["calib"] < 0.6 * errors["none"]


def test_prune_report_counts_like_model_info_and_bench():
    """One GFLOPs / params counter: the prune summary, model_info and bench agree on a pruned model."""
    from yolocomp.eval import bench, model_info

    pruned, summary = prune_model(randomized("yolov8n.yaml"), ratio=0.3, imgsz=IMG)
    info = model_info(pruned, imgsz=IMG)
    timed = bench([pruned], imgsz=IMG, batch_sizes=(1,), runs=1, warmup=0, progress=False)["models"][0]
    assert summary["params"]["after"] == info["params"] == timed["params"] == count_params(pruned)
    assert summary["gflops"]["after"] == info["gflops"] == timed["gflops"] == round(gflops(pruned, IMG), 4)


def test_flops_target_ignore_and_baselines():
    model = randomized("yolov8n.yaml")
    pruned, summary = prune_model(model, flops_reduction=0.4, imgsz=IMG, ignore=(0, 2))
    real = 1 - gflops(pruned, IMG) / gflops(model, IMG)
    assert abs(real - 0.4) < 0.05 and abs(summary["achieved"]["flops_reduction"] - real) < 1e-3
    assert pruned.model[0].conv.weight.shape == model.model[0].conv.weight.shape
    assert pruned.model[2].cv1.conv.weight.shape[0] == model.model[2].cv1.conv.weight.shape[0]
    assert pruned.model[2].cv2.conv.weight.shape[0] == model.model[2].cv2.conv.weight.shape[0]
    _, limited = prune_model(model, ratio=0.3, imgsz=IMG, max_layer_ratio=0.4)
    assert abs(limited["achieved"]["ratio"] - 0.3) < 0.05
    assert all(r["out_kept"] >= 0.6 * r["out_total"] for r in limited["layers"] if r["out_total"])
    for method in ("l1", "random"):
        p, s = prune_model(model, ratio=0.3, method=method, imgsz=IMG)
        assert s["method"] == method and abs(s["achieved"]["ratio"] - 0.3) < 0.05
        assert p.eval()(torch.rand(1, 3, IMG, IMG))[0].shape[1] == 7


def test_refuses_impossible_requests():
    model = randomized("yolov8n.yaml")
    for bad in (1.5, 0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="outside"):
            prune_model(model, ratio=bad, imgsz=IMG)
    with pytest.raises(UserError, match="remove every channel"):
        prune_model(model, ratio=0.99, min_channels=0, imgsz=IMG)
    with pytest.raises(UserError, match="cannot be reached"):
        prune_model(model, ratio=0.97, imgsz=IMG)
    with pytest.raises(UserError, match="not an Ultralytics detection model"):
        prune_model(nn.Sequential(nn.Conv2d(3, 8, 3)), ratio=0.3)
    fused = deepcopy(model).fuse(verbose=False)
    with pytest.raises(UserError, match="BatchNorm"):
        prune_model(fused, ratio=0.3, imgsz=IMG)
    with pytest.raises(UserError, match="ignore"):
        prune_model(model, ratio=0.3, ignore=(99,), imgsz=IMG)


@pytest.mark.parametrize("amp", [False, True])
def test_sparsity_penalty_adds_exactly_s_sign_gamma(amp):
    """Through the real optimizer-step hook: after AMP unscaling, γ.grad grows by exactly s·sign(γ)."""
    from ultralytics.nn.tasks import DetectionModel

    from yolocomp.integration import CallbackHub
    from yolocomp.prune.slimming import BNSlimming, prunable_bn_names

    torch.manual_seed(0)
    base = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    with torch.no_grad():  # mixed signs and zeros so sign() matters
        first_bn = base.model[1].bn.weight
        first_bn[::3] *= -1
        first_bn[1::7] = 0
    x = torch.rand(2, 3, IMG, IMG)
    s = 1e-3

    def grads(with_penalty: bool) -> dict[str, torch.Tensor]:
        model = deepcopy(base).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        trainer = SimpleNamespace(model=model, optimizer=opt, epoch=0, epochs=1, save_dir=".")
        if with_penalty:
            method = BNSlimming(s=s)
            hub = CallbackHub([method])
            hub.trainer = trainer
            method.attach(trainer)
            hub._register_step_hook(trainer)
        seen: dict[str, torch.Tensor] = {}

        def snapshot(optimizer, args, kwargs):  # registered last: sees the gradients optimizer.step will use
            seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

        opt.register_step_pre_hook(snapshot)
        raw = model(x)
        loss = raw["boxes"].float().pow(2).mean() + raw["scores"].float().pow(2).mean()
        if amp:
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return seen

    plain, penalised = grads(False), grads(True)
    names = set(prunable_bn_names(base))
    assert names
    params = dict(base.named_parameters())
    checked = 0
    for key, g in plain.items():
        owner = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and owner in names:
            expected = g + s * torch.sign(params[key].detach())
            assert torch.equal(penalised[key], expected), key
            checked += 1
        else:
            assert torch.equal(penalised[key], g), key
    assert checked == len(names)


def test_slimming_schedule_and_pickle():
    from yolocomp.prune.slimming import BNSlimming

    m = BNSlimming(s=1e-3, schedule="linear_decay")
    assert m.strength(SimpleNamespace(epoch=0, epochs=10)) == pytest.approx(1e-3)
    assert m.strength(SimpleNamespace(epoch=5, epochs=10)) == pytest.approx(5e-4)
    m._params = [torch.zeros(3, requires_grad=True)]
    assert pickle.loads(pickle.dumps(m))._params is None
    with pytest.raises(UserError, match="schedule"):
        BNSlimming(schedule="cosine")


def test_cap_gates_are_identity_then_prune_and_vanish():
    from yolocomp.prune.cap import AttentionGate, ChannelAttentionPruning

    model = randomized("yolo11n.yaml")
    x = torch.rand(2, 3, IMG, IMG)
    ref = model(x)[0]
    cap = ChannelAttentionPruning(ratio=0.3, imgsz=IMG)
    assert cap.prepare(model) and not cap.prepare(model)  # idempotent
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    assert gates
    torch.testing.assert_close(model.eval()(x)[0], ref)  # 2·sigmoid(0) = 1: the gates start as identity
    model.eval()(x)  # eval forwards leave no statistics
    assert all(float(g.attn_batches) == 0 for g in gates)
    model.train()  # statistics accumulate over training batches only, in the gates' buffers
    batch_means = []
    hook = gates[0].attn.register_forward_hook(lambda m, i, out: batch_means.append(out.detach().mean(0)))
    with torch.no_grad():
        for p in (p for g in gates for p in g.attn.parameters()):
            p.normal_(0, 0.5)  # attention away from 1 so the means differ per channel
        for _ in range(3):
            model(torch.rand(2, 3, IMG, IMG))
    hook.remove()
    assert all(float(g.attn_batches) == 3 for g in gates)
    torch.testing.assert_close(gates[0].attn_mean, torch.stack(batch_means).mean(0))
    scores = cap.scores(model)
    assert len(scores) == len(gates) and all(v.numel() > 0 for v in scores.values())
    assert {f"{n}.attn_mean" for n in scores} <= set(model.state_dict())  # checkpoints and the EMA carry them
    cap = pickle.loads(pickle.dumps(cap))
    pruned = cap.finalize(model)
    assert not any(isinstance(m, AttentionGate) for m in pruned.modules())
    assert all(type(m).__module__.split(".")[0] in {"torch", "ultralytics"} for m in pruned.modules())
    assert cap.summary["method"] == "cap" and abs(cap.summary["achieved"]["ratio"] - 0.3) < 0.05
    assert pruned.eval()(x)[0].shape == ref.shape


def test_prune_api_bn_with_sparsity_and_finetune(tmp_path, prune_data):
    import json

    from yolocomp.commands.prune import prune

    src = save_model(randomized("yolov8n.yaml"), tmp_path / "src.pt")
    out = tmp_path / "out"
    report = prune(str(src), out, data=str(prune_data), method="bn", ratio=0.3, sparsity_epochs=1, finetune_epochs=1,
                   s=1e-3, imgsz=IMG, batch=16, evaluate=True, latency=True, warmup_epochs=0)
    for name in ("pruned.pt", "finetuned.pt", "report.json", "report.md", "sparsity/bn_gamma_hist.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "report.json").read_text())
    for key in ("params", "gflops", "channels"):
        assert set(saved[key]) == {"before", "after"} and saved[key]["after"] < saved[key]["before"]
    assert {"before", "pruned", "finetuned"} <= set(saved["ap"]) and 0 <= saved["ap"]["pruned"]["ap"] <= 1
    assert saved["gamma_history"] and "below_0.01" in saved["gamma_history"][0]
    # latency is ONNX Runtime's, on each stage's own ONNX export, relative to the unpruned model
    assert [r["model"] for r in saved["models"]] == ["before", "pruned", "finetuned"]
    assert all(r["latency_ms_p50"] > 0 for r in saved["models"]) and saved["models"][0]["speedup"] == 1.0
    onnx_bytes = {k: (out / "work" / f"latency_{k}" / "latency.onnx").stat().st_size
                  for k in ("before", "pruned", "finetuned")}
    assert max(onnx_bytes["pruned"], onnx_bytes["finetuned"]) < 0.9 * onnx_bytes["before"]
    assert report["layers"] == saved["layers"]
    assert src.exists()


def test_prune_api_cap_and_bad_inputs(tmp_path, prune_data):
    from ultralytics import YOLO

    from yolocomp.commands.prune import prune

    src = save_model(randomized("yolov5n.yaml"), tmp_path / "src.pt")
    out = tmp_path / "cap"
    report = prune(str(src), out, data=str(prune_data), method="cap", ratio=0.3, imgsz=IMG, batch=16,
                   evaluate=False, latency=False, warmup_epochs=0)
    assert report["notes"] and report["params"]["after"] < report["params"]["before"]
    loaded = YOLO(str(out / "pruned.pt")).model
    assert count_params(loaded) == report["params"]["after"]
    with pytest.raises(UserError, match="method = 'magic' is not one of bn, cap, l1, random"):
        prune(str(src), tmp_path / "x", method="magic")
    with pytest.raises(UserError, match="need --data"):
        prune(str(src), tmp_path / "x", method="bn", sparsity_epochs=1)
    with pytest.raises(UserError, match="not found"):
        prune(str(tmp_path / "missing.pt"), tmp_path / "x")
