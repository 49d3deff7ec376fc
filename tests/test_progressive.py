"""Progressive pruning: ramp gates drive channels to exactly zero, removal is exact, the schedule lives in the model."""

from __future__ import annotations

import pickle

import pytest
import torch
from test_prune import randomized
from torch import nn

from yolocomp.integration import load_model, resume_interrupted, save_model, train
from yolocomp.methods import Method
from yolocomp.prune import prune_model, ramp
from yolocomp.prune.progressive import (
    ProgressivePruning,
    compose_channel_maps,
    cumulative_targets,
    model_budget,
    progressive_prune,
)

IMG = 64
TRAIN_ARGS = {"batch": 8, "val": False, "warmup_epochs": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from yolocomp.demo.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("progressive_data"), train=16, val=4, size=IMG)


def test_ramp_goes_from_one_to_exactly_zero():
    assert ramp.ramp_value(0, 10, "cosine") == 1.0 and ramp.ramp_value(0, 10, "linear") == 1.0
    assert ramp.ramp_value(5, 10, "linear") == pytest.approx(0.5) and ramp.ramp_value(5, 10, "cosine") == pytest.approx(0.5)
    assert ramp.ramp_value(2, 10, "cosine") > ramp.ramp_value(2, 10, "linear")  # cosine starts slower
    assert ramp.ramp_value(10, 10, "cosine") == 0.0 and ramp.ramp_value(11, 10, "linear") == 0.0
    assert ramp.ramp_value(3, 0, "cosine") == 1.0  # schedule not set: no effect
    gate = ramp.RampGate(randomized().model[0], torch.zeros(16, dtype=torch.bool), "cosine")
    for step, total in ((0, 0), (0, 8), (3, 8), (8, 8), (9, 8)):  # the forward's tensor form agrees
        gate.ramp_step.fill_(step)
        gate.ramp_total.fill_(total)
        assert float(gate.multiplier()) == pytest.approx(gate.value(), abs=1e-6)
    assert float(gate.multiplier()) == 0.0


def test_step_removes_exactly_the_zeroed_channels_and_outputs_match():
    model = randomized()
    method = ProgressivePruning(ratio=0.3, imgsz=IMG)
    assert method.prepare(model) and not method.prepare(model)  # idempotent: a resumed model keeps its gates
    gates = ramp.gates(model)
    assert gates and all(g.drop.any() for g in gates.values())
    x = torch.rand(2, 3, IMG, IMG)
    model.eval()
    with torch.no_grad():
        before_ramp = model(x)[0]
    ramp.set_schedule(model, 4)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, IMG, IMG))  # training forwards advance the ramp
    assert all(int(g.ramp_step) == 2 and 0.0 < g.value() < 1.0 for g in gates.values())
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(2, 3, IMG, IMG))
    assert all(g.value() == 0.0 for g in gates.values())
    model.eval()
    with torch.no_grad():
        zeroed = model(x)[0]
    assert not torch.allclose(zeroed, before_ramp, atol=1e-3)  # the ramp really changed the model
    pruned = method.finalize(model)
    assert not ramp.gates(pruned) and method.summary["achieved"]["ratio"] == pytest.approx(0.3, abs=0.03)
    for name, gate in gates.items():  # exactly the dropped channels are gone, the rest kept as they were
        kept = ~gate.drop
        bn = pruned.get_submodule(name).bn
        assert bn.num_features == int(kept.sum())
        assert torch.equal(bn.weight.data, gate.block.bn.weight.data[kept])
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x)[0], zeroed, atol=1e-4, rtol=1e-5)
    widths = pruned_layer_widths(pruned, x)  # the map recon needs matches the widths
    assert all(widths[i] == len(k) for i, k in method.summary["kept_channels"].items())


def pruned_layer_widths(model: nn.Module, x: torch.Tensor) -> dict[int, int]:
    widths = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: widths.__setitem__(k, o.shape[1]))
             for k, m in enumerate(model.model[:-1])]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return widths


def test_ramp_state_is_in_buffers_and_survives_a_checkpoint(tmp_path):
    model = randomized()
    method = ProgressivePruning(ratio=0.2, imgsz=IMG)
    method.prepare(model)
    ramp.set_schedule(model, 10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 3, IMG, IMG))
    path = save_model(model, tmp_path / "unfinished.pt")
    loaded = torch.load(path, map_location="cpu", weights_only=False)["ema"]
    original = ramp.gates(model)
    restored = ramp.gates(loaded)
    assert restored.keys() == original.keys()
    for name, g in restored.items():
        assert int(g.ramp_step) == 3 and int(g.ramp_total) == 10 and torch.equal(g.drop, original[name].drop)
    assert pickle.loads(pickle.dumps(method)).ratio == 0.2  # DDP pickles the method


class StopAfterFirstEpoch(Method):
    def on_epoch_end(self, trainer):
        if trainer.epoch >= 1:
            raise KeyboardInterrupt("simulated kill")


def test_schedule_reaches_ema_checkpoint_and_resumes(data, tmp_path):
    args = {**TRAIN_ARGS, "epochs": 3, "imgsz": IMG}  # 16 images / batch 8: 2 iterations per epoch
    with pytest.raises(KeyboardInterrupt):
        train(randomized(), str(data), [ProgressivePruning(ratio=0.2, imgsz=IMG, ramp_fraction=0.5),
                                        StopAfterFirstEpoch()], tmp_path, "run", **args)
    last = load_model(tmp_path / "run" / "weights" / "last.pt")  # the EMA, written after epoch 1
    gates = ramp.gates(last)
    assert gates and all(int(g.ramp_step) == 2 and int(g.ramp_total) == 3 for g in gates.values())
    method = ProgressivePruning(ratio=0.2, imgsz=IMG, ramp_fraction=0.5)
    with resume_interrupted():
        result = train(randomized(), str(data), [method], tmp_path, "run", **args)
    final = load_model(result.last)
    assert all(int(g.ramp_step) == 6 and g.value() == 0.0 for g in ramp.gates(final).values())
    assert {n: g.drop for n, g in ramp.gates(final).items()}.keys() == gates.keys()
    assert not ramp.gates(result.model)  # finalize removed the channels


def test_cumulative_targets_and_channel_map_composition():
    assert cumulative_targets(0.3, 3, "linear") == pytest.approx([0.1, 0.2, 0.3])
    geo = cumulative_targets(0.3, 3)
    assert geo[-1] == pytest.approx(0.3) and geo[0] > 0.1 and all(a < b for a, b in zip(geo, geo[1:]))
    assert compose_channel_maps({2: [0, 2, 4, 6]}, {2: [1, 3], 5: [0]}) == {2: [2, 6], 5: [0]}


def test_progressive_prune_reaches_the_one_shot_target(data, tmp_path):
    model = randomized()
    _, one_shot = prune_model(model, ratio=0.3, imgsz=IMG)
    seen = []
    pruned, history = progressive_prune(
        model, data_yaml=data, ratio=0.3, steps=2, epochs_per_step=1, imgsz=IMG, train_args=TRAIN_ARGS,
        evaluate=lambda m: seen.append(m) or {"ap": 0.5}, project=tmp_path, name="prog")
    assert [row["step"] for row in history] == [0, 1, 2] and len(seen) == 3
    assert history[-1]["ratio"] == pytest.approx(one_shot["achieved"]["ratio"], abs=0.03)
    assert history[0]["gflops"] > history[1]["gflops"] > history[2]["gflops"] and history[-1]["ap"] == 0.5
    base, now = model_budget(model, imgsz=IMG)[0], model_budget(pruned, imgsz=IMG)[0]
    assert 1 - now / base == pytest.approx(history[-1]["ratio"], abs=1e-3)
    assert not any(type(m).__module__.startswith("yolocomp") for m in pruned.modules())
    widths = pruned_layer_widths(pruned, torch.rand(1, 3, IMG, IMG))
    assert all(widths[i] == len(k) for i, k in history[-1]["kept_channels"].items())
