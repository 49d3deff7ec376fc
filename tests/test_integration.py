"""The training-loop integration: extra loss columns, optimizer-step hook, structural changes, pickling, model I/O."""

import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.integration import (
    CallbackHub,
    attach,
    is_resumable,
    load_model,
    resolve_data,
    resume_interrupted,
    save_model,
    train,
    unwrap,
)
from yolocomp.integration.hooks import _StepPreHook
from yolocomp.methods import Method

TRAIN_ARGS = {"epochs": 1, "imgsz": 64, "batch": 8, "val": False, "warmup_epochs": 0}


class CountingMethod(Method):
    """Adds a loss that depends on a model parameter, counts optimizer steps and epochs."""

    name = "count"

    def __init__(self, weight: float = 0.25):
        self.weight = weight
        self.steps = 0
        self.epochs = 0
        self.grad_seen: list[float] = []

    def extra_loss(self, trainer, batch, preds):
        first = next(p for p in trainer.model.parameters() if p.requires_grad)
        return {"count_loss": self.weight * first.float().pow(2).mean()}

    def before_step(self, trainer):
        self.steps += 1

    def on_epoch_end(self, trainer):
        self.epochs += 1


class AddScale(Method):
    """A structural change: a learnable scalar attached to the model (like an inserted attention module)."""

    name = "scale"

    def prepare(self, model):
        if hasattr(model, "yolocomp_scale"):
            return False
        model.yolocomp_scale = nn.Parameter(torch.ones(1))
        return True

    def extra_loss(self, trainer, batch, preds):
        return {"scale_loss": (unwrap(trainer.model).yolocomp_scale - 2.0).pow(2).sum()}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from yolocomp.demo.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), train=16, val=4, size=64)


def test_extra_loss_columns_and_step_hook(tiny_data, tmp_path):
    method = CountingMethod()
    result = train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [method], tmp_path, "run", **TRAIN_ARGS)
    header = (result.save_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert "train/count_loss" in header and "train/box_loss" in header
    row = dict(zip(header, (result.save_dir / "results.csv").read_text().splitlines()[1].split(",")))
    assert float(row["train/count_loss"]) > 0
    # 16 images / batch 8 = 2 batches; nbs 64 -> accumulate capped at 2 batches -> exactly one optimizer step
    assert method.steps == 1
    assert method.epochs == 1
    assert Path(result.best).exists() and Path(result.last).exists()


def test_train_keeps_the_last_checkpoint_unless_best_is_asked(tiny_data, tmp_path, monkeypatch):
    from ultralytics.nn.tasks import load_checkpoint

    from yolocomp.integration.trainer import CompressionTrainer

    validate = CompressionTrainer.validate

    def falling_fitness(self):  # epoch 0 scores best, so best.pt and last.pt hold different weights
        metrics, _ = validate(self)
        self.best_fitness = 1.0
        return metrics, 1.0 / (self.epoch + 1)

    monkeypatch.setattr(CompressionTrainer, "validate", falling_fitness)
    args = {**TRAIN_ARGS, "epochs": 2, "val": True, "lr0": 0.1}
    kept = {}
    for keep in ("last", "best"):
        torch.manual_seed(0)
        result = train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [], tmp_path, keep, keep=keep, **args)
        kept[keep] = result.model.state_dict()
        on_disk = load_checkpoint(result.last if keep == "last" else result.best)[0].state_dict()
        assert all(torch.equal(kept[keep][k].float(), v.float()) for k, v in on_disk.items())
        if keep == "last":  # the metrics are the last epoch's, not those final_eval measures on best.pt
            lines = (result.save_dir / "results.csv").read_text().splitlines()
            row = dict(zip(lines[0].split(","), lines[-1].split(",")))
            key = "val/box_loss"  # changes from epoch to epoch, unlike the mAP of a random model
            assert result.metrics[key] == pytest.approx(float(row[key]), abs=1e-5)
    assert not all(torch.equal(kept["last"][k], v) for k, v in kept["best"].items())
    with pytest.raises(UserError, match="keep='last' or keep='best'"):
        train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [], tmp_path, "bad", keep="first", **TRAIN_ARGS)


def test_deadline_keeps_room_for_the_closing_validations(tiny_data, tmp_path):
    from types import SimpleNamespace

    from yolocomp.integration.trainer import stop_before

    check, trainer = stop_before(time.time() + 30, validation_estimate=10), SimpleNamespace(stop=False)
    check(trainer)
    assert not trainer.stop  # 30 s left hold the two 10 s validations
    trainer.validation_seconds = 20  # a timed validation replaces the estimate
    check(trainer)
    assert trainer.stop
    # 2 minutes would allow 3 epochs here, but not 2 validations of 100 s after them: stop after the first batch
    method = CountingMethod()
    result = train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [method], tmp_path, "timed",
                   deadline=time.time() + 120, validation_estimate=100,
                   **{**TRAIN_ARGS, "epochs": 3, "batch": 4, "nbs": 4})
    assert method.steps == 1 and method.epochs == 1
    assert len((result.save_dir / "results.csv").read_text().splitlines()) == 2  # header and the one epoch


def test_training_runs_on_the_callers_thread_count_and_leaves_it(tiny_data, tmp_path):
    class ThreadSpy(Method):
        name = "threads"

        def __init__(self):
            self.seen: list[int] = []

        def before_step(self, trainer):
            self.seen.append(torch.get_num_threads())

    wanted = (os.cpu_count() or 1) + 1  # never Ultralytics' choice (cpu_count - 1, at most 8)
    spy, before = ThreadSpy(), torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [spy], tmp_path, "threads", **{**TRAIN_ARGS, "val": True})
        after = torch.get_num_threads()  # the final validation selected the device again
    finally:
        torch.set_num_threads(before)
    assert spy.seen and set(spy.seen) == {wanted} and after == wanted


def test_commands_use_every_core_unless_omp_num_threads_says_otherwise(monkeypatch, tmp_path, capsys):
    import yolocomp
    from yolocomp.cli import main
    from yolocomp.integration.threads import cpu_threads

    monkeypatch.setattr(yolocomp, "USER_OMP_NUM_THREADS", None)
    assert cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(yolocomp, "USER_OMP_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setattr(yolocomp, "USER_OMP_NUM_THREADS", "four")
    assert main(["prune", "--model", str(tmp_path / "any.pt"), "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "OMP_NUM_THREADS='four' is not a thread count" in err[0]
    assert not (tmp_path / "o").exists()


def test_structural_change_reaches_optimizer_and_ema(tiny_data, tmp_path):
    from ultralytics import YOLO

    ckpt = save_model(load_model("yolov8n.yaml", nc=3), tmp_path / "start.pt")
    yolo = YOLO(str(ckpt))
    hub = attach(yolo, AddScale(), CountingMethod())
    seen = {}

    def spy(trainer):
        model = trainer.model
        seen["in_optimizer"] = any(p is model.yolocomp_scale for g in trainer.optimizer.param_groups for p in g["params"])
        seen["in_ema"] = hasattr(trainer.ema.ema, "yolocomp_scale")

    yolo.add_callback("on_train_start", spy)
    yolo.train(data=str(tiny_data), project=str(tmp_path), name="cb", exist_ok=True, device="cpu", workers=0, plots=False, lr0=0.1, **TRAIN_ARGS)
    assert seen == {"in_optimizer": True, "in_ema": True}
    trained = hub.trainer.model
    assert float(trained.yolocomp_scale.detach()) != 1.0  # the new parameter was trained by Ultralytics' optimizer
    assert hub.methods[1].steps >= 1


def test_step_hook_sees_unscaled_gradients():
    layer = nn.Linear(3, 1, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    seen = []

    class Grab(Method):
        def before_step(self, trainer):
            seen.append(layer.weight.grad.clone())

    optimizer.register_step_pre_hook(_StepPreHook(CallbackHub([]), [Grab()]))
    x = torch.ones(1, 3)
    scaler.scale(layer(x).sum()).backward()
    assert torch.allclose(layer.weight.grad, torch.full((1, 3), 1024.0))  # scaled before unscale
    scaler.step(optimizer)
    assert torch.allclose(seen[0], torch.ones(1, 3))  # the hook ran after unscaling


def test_hub_and_methods_pickle_without_runtime_state(tiny_data, tmp_path):
    method = CountingMethod()
    hub = CallbackHub([method])
    hub.trainer = object()  # runtime-only, not picklable on purpose
    restored = pickle.loads(pickle.dumps(hub.callbacks()))
    assert restored["on_train_start"].__self__.trainer is None
    assert isinstance(restored["on_train_start"].__self__.methods[0], CountingMethod)


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="weights not found"):
        load_model(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint .*corrupt or truncated") as err:
        load_model(corrupt)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unsupported model"):
        load_model(tmp_path / "model.h5")
    from ultralytics.nn.tasks import ClassificationModel

    with pytest.raises(UserError, match="is not a detection model"):
        load_model(ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False))


def test_save_model_loads_in_ultralytics_and_never_overwrites_input(tmp_path):
    from ultralytics import YOLO

    model = load_model("yolov8n.yaml", nc=3)
    path = save_model(model, tmp_path / "m.pt")
    loaded = YOLO(str(path)).model
    x = torch.rand(1, 3, 64, 64)
    model.eval()
    loaded.float().eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], loaded(x)[0], atol=5e-2, rtol=1e-2)  # fp16 storage
    reloaded = load_model(path)
    before = path.read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite the input checkpoint"):
        save_model(reloaded, path)
    assert path.read_bytes() == before


def test_resolve_data_writes_absolute_copy(tmp_path):
    import yaml

    (tmp_path / "ds" / "images" / "val").mkdir(parents=True)
    src = tmp_path / "ds.yaml"
    src.write_text("path: ds\nval: images/val\nnames: {0: a}\n")
    out = resolve_data(src, tmp_path / "work")
    cfg = yaml.safe_load(out.read_text())
    assert Path(cfg["path"]).is_absolute() and Path(cfg["path"]) == (tmp_path / "ds").resolve()
    assert src.read_text().startswith("path: ds")  # the user's file is untouched
    with pytest.raises(UserError, match="data yaml not found"):
        resolve_data(tmp_path / "nope" / "x.yaml", tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("path: ds\n")
    with pytest.raises(UserError, match="needs at least 'val' and 'names'"):
        resolve_data(bad, tmp_path)
    (tmp_path / "ds" / "images" / "train").mkdir()
    listed = tmp_path / "listed.yaml"  # Ultralytics also takes a list of folders per split
    listed.write_text("path: ds\nval: [images/val, images/train]\nnames: {0: a}\n")
    assert yaml.safe_load(resolve_data(listed, tmp_path / "work2").read_text())["val"] == ["images/val", "images/train"]
    listed.write_text("path: ds\nval: [images/val, images/missing]\nnames: {0: a}\n")
    with pytest.raises(UserError, match="val images 'images/missing' of .* not found under"):
        resolve_data(listed, tmp_path / "work3")


class StopAfterFirstEpoch(Method):
    """Interrupts training in the second epoch, after the first epoch's checkpoint was written."""

    def on_epoch_end(self, trainer):
        if trainer.epoch >= 1:
            raise KeyboardInterrupt("simulated kill")


def test_interrupted_training_resumes_inside_resume_block(tiny_data, tmp_path):
    args = {**TRAIN_ARGS, "epochs": 3}
    with pytest.raises(KeyboardInterrupt):
        train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [StopAfterFirstEpoch()], tmp_path, "run", **args)
    last = tmp_path / "run" / "weights" / "last.pt"
    assert is_resumable(last)
    rows_before = (tmp_path / "run" / "results.csv").read_text().splitlines()[1:]
    assert len(rows_before) == 1

    method = CountingMethod()
    with resume_interrupted():
        result = train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [method], tmp_path, "run", **args)
    rows_after = (result.save_dir / "results.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows_after] == [1, 2, 3]
    assert rows_after[0] == rows_before[0]  # the finished epoch was kept, not retrained
    assert method.epochs == 2  # only the two remaining epochs ran
    assert not is_resumable(result.last)  # a finished run is not resumed again


def test_unreadable_checkpoint_is_refused_not_overwritten(tiny_data, tmp_path):
    last = tmp_path / "run" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"half-written checkpoint")
    with resume_interrupted(), pytest.raises(UserError, match="cannot resume from .*last.pt.*delete it") as err:
        train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [], tmp_path, "run", **TRAIN_ARGS)
    assert "\n" not in str(err.value)
    assert last.read_bytes() == b"half-written checkpoint"  # the user's file is untouched
    assert not (tmp_path / "run" / "results.csv").exists()  # and no training started over it


def test_corrupt_checkpoint_gives_one_readable_line(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage bytes, not a checkpoint\xff" * 4)
    with pytest.raises(UserError) as err:
        load_model(corrupt)
    assert str(err.value) == (f"cannot read checkpoint {corrupt}: not a PyTorch/Ultralytics checkpoint (file corrupt or "
                              "truncated); give a .pt saved by Ultralytics or yolocomp")


class TrainingStateSpy(Method):
    """Records, after the first epoch's optimizer step, what Ultralytics' optimizer and EMA hold."""

    name = "spy"

    def __init__(self):
        self.seen: dict = {}

    def on_epoch_end(self, trainer):
        model = unwrap(trainer.model)
        in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        args = trainer.args
        uncapped = max(round(args.nbs / trainer.batch_size), 1)  # Ultralytics' formula, before capping accumulate
        self.seen = {
            "trainable_missing": [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer],
            "ema_keys_equal": set(trainer.ema.ema.state_dict()) == set(model.state_dict()),
            "weight_decay": {g["weight_decay"] for g in trainer.optimizer.param_groups if g.get("param_group") == "weight"},
            "expected_decay": args.weight_decay * trainer.batch_size * uncapped / args.nbs,
            "accumulate": trainer.accumulate,
        }


@pytest.mark.parametrize("kind", ["cap_cli", "qat_attach"])
def test_prepare_runs_before_optimizer_ema_and_weight_decay(tiny_data, tmp_path, kind):
    from yolocomp.prune.cap import AttentionGate, ChannelAttentionPruning
    from yolocomp.quant.modules import quant_convs
    from yolocomp.quant.qat import QuantizationAwareTraining

    spy = TrainingStateSpy()
    if kind == "cap_cli":
        method = ChannelAttentionPruning(ratio=None)
        result = train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [method, spy], tmp_path, "run", **TRAIN_ARGS)
        trained = load_model(result.last)
        assert any(isinstance(m, AttentionGate) for m in trained.modules())
    else:
        from ultralytics import YOLO

        yolo = YOLO(str(save_model(load_model("yolov8n.yaml", nc=3), tmp_path / "start.pt")))
        hub = attach(yolo, QuantizationAwareTraining(calib_images=8), spy)
        yolo.train(data=str(tiny_data), project=str(tmp_path), name="qat", exist_ok=True, device="cpu", workers=0,
                   plots=False, **TRAIN_ARGS)
        assert quant_convs(unwrap(hub.trainer.model))
    seen = spy.seen
    assert seen["trainable_missing"] == []
    assert seen["ema_keys_equal"]
    assert seen["accumulate"] == 2  # capped: 2 batches in the whole run ...
    (decay,) = seen["weight_decay"]
    assert decay == pytest.approx(seen["expected_decay"])  # ... but the decay uses the uncapped 8
    assert seen["expected_decay"] == pytest.approx(5e-4)


def test_cap_statistics_survive_resume(tiny_data, tmp_path):
    from yolocomp.prune.cap import ChannelAttentionPruning

    args = {**TRAIN_ARGS, "epochs": 3}
    with pytest.raises(KeyboardInterrupt):
        train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [ChannelAttentionPruning(ratio=None), StopAfterFirstEpoch()],
              tmp_path, "run", **args)
    cap = ChannelAttentionPruning(ratio=None)
    assert cap.finalize(load_model(tmp_path / "run" / "weights" / "last.pt")) is not None and cap.batches == 2  # epoch 1
    with resume_interrupted():
        train(load_model("yolov8n.yaml", nc=3), str(tiny_data), [cap], tmp_path, "run", **args)
    assert cap.batches == 6, "2 batches per epoch, 3 epochs: the resumed run continued the averages"
    assert cap.scores() and all(torch.isfinite(v).all() for v in cap.scores().values())


def test_users_yolo_resume_keeps_cap_gates_and_statistics(tiny_data, tmp_path):
    from ultralytics import YOLO

    from yolocomp.prune.cap import AttentionGate, ChannelAttentionPruning

    args = {**TRAIN_ARGS, "epochs": 3}
    common = {"data": str(tiny_data), "project": str(tmp_path), "name": "user", "exist_ok": True, "device": "cpu",
              "workers": 0, "plots": False}
    yolo = YOLO(str(save_model(load_model("yolov8n.yaml", nc=3), tmp_path / "start.pt")))
    attach(yolo, ChannelAttentionPruning(ratio=None), StopAfterFirstEpoch())
    with pytest.raises(KeyboardInterrupt):
        yolo.train(**common, **args)
    last = tmp_path / "user" / "weights" / "last.pt"
    def gate_state(model):
        return {n: torch.cat([m.attn_mean, m.attn_batches.reshape(1)]).float().clone() for n, m in model.named_modules()
                if isinstance(m, AttentionGate)}

    gates_before = gate_state(load_model(last))
    assert gates_before and all(float(v[-1]) == 2 for v in gates_before.values()), "epoch 1's statistics were saved"

    resumed = YOLO(str(last))
    cap = ChannelAttentionPruning(ratio=None)
    hub = attach(resumed, cap)
    seen = {}
    resumed.add_callback("on_pretrain_routine_end", lambda trainer: seen.update(gate_state(unwrap(trainer.model))))
    resumed.train(resume=True)
    assert set(seen) == set(gates_before) and all(torch.equal(seen[n], w) for n, w in gates_before.items()), \
        "resume trains the checkpoint's gates, not a fresh yaml rebuild"
    assert cap.finalize(unwrap(hub.trainer.ema.ema)) is not None and cap.batches == 6


def test_callbacks_without_prepare_refuse_structural_changes():
    """Callbacks added by hand (no attach, no with_prepare trainer) cannot change the model after the optimizer exists."""
    from types import SimpleNamespace

    model = load_model("yolov8n.yaml", nc=3)
    trainer = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    with pytest.raises(UserError, match="changed the model after Ultralytics built its optimizer.*with_prepare"):
        CallbackHub([AddScale()]).on_pretrain_routine_end(trainer)
    CallbackHub([CountingMethod()]).on_pretrain_routine_end(trainer)  # no structural change: fine
