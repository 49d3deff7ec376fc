"""Distillation: GT masks, loss values and scaling, gradient flow, teacher checks, pickling, training end to end."""

from __future__ import annotations

import csv
import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from yolocomp.distill import FGD, FineGrainedImitation, HeadKD
from yolocomp.distill.fgd import fgd_terms
from yolocomp.distill.head_kd import head_kd_terms
from yolocomp.distill.masks import fgd_masks, fgfi_masks, prior_ious
from yolocomp.errors import UserError
from yolocomp.methods import Method

SIZES = [(16, 16), (8, 8), (4, 4)]  # P3/P4/P5 of a 128 px image


def make_batch(boxes: list[tuple[int, float, float, float, float]], n_img: int = 2, imgsz: int = 128) -> dict:
    """Batch dict like Ultralytics' (img, normalised xywh bboxes, batch_idx, cls)."""
    t = torch.tensor([b[1:] for b in boxes], dtype=torch.float32).reshape(-1, 4)
    return {
        "img": torch.rand(n_img, 3, imgsz, imgsz),
        "bboxes": t,
        "batch_idx": torch.tensor([float(b[0]) for b in boxes]),
        "cls": torch.zeros(len(boxes), 1),
    }


def xyxy_to_xywh(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


# --- masks ---------------------------------------------------------------------------------------------------------
def test_fgd_mask_covers_exactly_the_cells_of_each_box():
    boxes_xyxy = [(0, 0.10, 0.20, 0.45, 0.50), (0, 0.40, 0.40, 0.90, 0.95), (1, 0.52, 0.03, 0.56, 0.08)]
    batch = make_batch([(i, *xyxy_to_xywh(*b)) for i, *b in boxes_xyxy])
    for (h, w), (fg, bg) in zip(SIZES, fgd_masks(batch, SIZES, torch.device("cpu"))):
        expected = torch.zeros(2, h, w)
        for img, x1, y1, x2, y2 in boxes_xyxy:  # reference: cells whose area overlaps the box, weight 1/count
            cells = [(i, j) for i in range(h) for j in range(w) if x1 * w < j + 1 and x2 * w > j and y1 * h < i + 1 and y2 * h > i]
            assert cells, "every box covers at least one cell"
            for i, j in cells:
                expected[img, i, j] = max(expected[img, i, j].item(), 1.0 / len(cells))
        assert torch.allclose(fg, expected), f"level {h}x{w}"
        assert torch.equal(bg > 0, fg == 0)
        assert torch.allclose(bg.sum((1, 2)), torch.ones(2))


def test_no_boxes_gives_background_only():
    batch = make_batch([], n_img=3)
    for (h, w), (fg, bg) in zip(SIZES, fgd_masks(batch, SIZES, torch.device("cpu"))):
        assert fg.abs().sum() == 0
        assert torch.allclose(bg, torch.full((3, h, w), 1.0 / (h * w)))
    for mask in fgfi_masks(batch, SIZES, torch.device("cpu")):
        assert mask.sum() == 0


def test_fgfi_mask_matches_reference_iou_threshold():
    psi, k = 0.5, 4.0
    boxes_xyxy = [(0, 0.30, 0.30, 0.70, 0.60), (1, 0.05, 0.70, 0.12, 0.78)]
    batch = make_batch([(i, *xyxy_to_xywh(*b)) for i, *b in boxes_xyxy])
    masks = fgfi_masks(batch, SIZES, torch.device("cpu"), psi=psi, prior_scale=k)
    for (h, w), mask in zip(SIZES, masks):
        expected = torch.zeros(2, h, w)
        for img, x1, y1, x2, y2 in boxes_xyxy:
            gx1, gy1, gx2, gy2 = x1 * w, y1 * h, x2 * w, y2 * h
            ious = {}
            for i in range(h):
                for j in range(w):
                    px1, py1, px2, py2 = j + 0.5 - k / 2, i + 0.5 - k / 2, j + 0.5 + k / 2, i + 0.5 + k / 2
                    inter = max(0.0, min(gx2, px2) - max(gx1, px1)) * max(0.0, min(gy2, py2) - max(gy1, py1))
                    ious[i, j] = inter / ((gx2 - gx1) * (gy2 - gy1) + k * k - inter)
            best = max(ious.values())
            for (i, j), v in ious.items():
                if v > psi * best:
                    expected[img, i, j] = 1
            ci, cj = int((y1 + y2) / 2 * h), int((x1 + x2) / 2 * w)
            assert mask[img, ci, cj] == 1, "the cell at the box centre is always imitated"
        assert torch.equal(mask, expected), f"level {h}x{w}"
    assert torch.allclose(prior_ious(torch.tensor([[0.125, 0.125, 0.625, 0.625]]), 4, 4, 2.0).max(), torch.tensor(1.0))


# --- loss values -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    """Student yolov8n (nc=3) in train mode and a wider teacher yolov8s (nc=3)."""
    from yolocomp.integration import load_model

    torch.manual_seed(0)
    student = load_model("yolov8n.yaml", nc=3).train()
    teacher = load_model("yolov8s.yaml", nc=3).eval()
    return student, teacher


def _setup(method, student):
    method.setup(student, "cpu")
    return method


def test_identical_features_give_zero_feature_losses():
    torch.manual_seed(0)
    feats = [torch.randn(2, c, h, w) for c, (h, w) in zip((8, 16, 32), SIZES)]
    batch = make_batch([(0, 0.5, 0.5, 0.3, 0.3), (1, 0.2, 0.3, 0.1, 0.2)])
    from yolocomp.distill.adapters import ContextBlock

    for f, (fg, bg) in zip(feats, fgd_masks(batch, SIZES, torch.device("cpu"))):
        terms = fgd_terms(f, f.clone(), fg, bg, 0.5, ContextBlock(f.shape[1]), ContextBlock(f.shape[1]))
        for name, value in terms.items():
            assert value.abs().item() < 1e-6, name
    fgfi = FineGrainedImitation("unused.pt")
    masks = fgfi_masks(batch, SIZES, torch.device("cpu"))
    assert fgfi.imitation_loss(feats, [f.clone() for f in feats], masks).item() == 0
    assert fgfi.imitation_loss(feats, [f + 1 for f in feats], masks).item() > 0
    head = {"scores": torch.randn(2, 3, 50), "boxes": torch.randn(2, 64, 50)}
    kd = head_kd_terms(head, {k: v.clone() for k, v in head.items()}, 16, 2.0)
    assert kd["cls"].abs().item() < 1e-5 and kd["dfl"].abs().item() < 1e-5
    other = head_kd_terms(head, {k: v + 0.5 * torch.randn_like(v) for k, v in head.items()}, 16, 2.0)
    assert other["cls"].item() > 1e-3 and other["dfl"].item() > 1e-3
    # DFL distils per-side bin distributions (softmax over 16 bins): a constant logit shift leaves them unchanged
    shifted = head_kd_terms(head, {"scores": head["scores"], "boxes": head["boxes"] + 0.5}, 16, 2.0)
    assert shifted["dfl"].abs().item() < 1e-5


def test_losses_scale_with_their_weights(models):
    student, teacher = models
    batch = make_batch([(0, 0.5, 0.5, 0.3, 0.3), (1, 0.3, 0.6, 0.2, 0.4)])
    torch.manual_seed(1)
    t_feats = [torch.randn(2, c, h, w) for c, (h, w) in zip((128, 256, 512), SIZES)]
    s_feats = [torch.randn(2, c, h, w) for c, (h, w) in zip((64, 128, 256), SIZES)]

    fgd = _setup(FGD(teacher), student)  # one set of adapters / context blocks; only the weights change below

    def fgd_loss(**weights):
        for key in ("alpha", "beta", "gamma", "lam"):
            setattr(fgd, key, weights.get(key, 0.0))
        return fgd.losses(s_feats, t_feats, None, None, batch)["fgd_loss"].item()

    for key in ("alpha", "beta", "gamma", "lam"):
        one = fgd_loss(**{key: 1.0})
        three = fgd_loss(**{key: 3.0})
        assert one > 0, key
        assert three == pytest.approx(3 * one, rel=1e-5), key
    assert fgd_loss(alpha=1.0, beta=1.0) == pytest.approx(fgd_loss(alpha=1.0) + fgd_loss(beta=1.0), rel=1e-5)
    assert fgd_loss() == 0
    fgd.release()

    fgfi = _setup(FineGrainedImitation(teacher, weight=0.01), student)
    base = fgfi.losses(s_feats, t_feats, None, None, batch)["fgfi_loss"].item()
    fgfi.weight = 0.02
    assert base > 0
    assert fgfi.losses(s_feats, t_feats, None, None, batch)["fgfi_loss"].item() == pytest.approx(2 * base, rel=1e-5)
    fgfi.release()


def _extra_loss_backward(method, student, batch):
    trainer = SimpleNamespace(model=student, device=torch.device("cpu"), optimizer=None)
    student.zero_grad(set_to_none=True)
    preds = student(batch["img"])
    losses = method.extra_loss(trainer, batch, preds)
    sum(losses.values()).backward()
    return losses


@pytest.mark.parametrize("cls", [FineGrainedImitation, FGD, HeadKD])
def test_gradients_reach_student_and_adapters_never_teacher(models, cls):
    student, teacher = models
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = _setup(cls(teacher), student)
    batch = make_batch([(0, 0.5, 0.5, 0.4, 0.4), (1, 0.3, 0.3, 0.2, 0.3)], imgsz=64)
    losses = _extra_loss_backward(method, student, batch)
    assert all(torch.isfinite(v) and v.item() > 0 for v in losses.values()), losses
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "student gets gradients"
    if cls is not HeadKD:
        neck = student.model[method.student_tap.layers[0]]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in neck.parameters())
        adapters = list(method.aux["adapters"].parameters())
        assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters), "adapters train"
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters()), "teacher frozen"
    assert not method.teacher.training
    assert all(p.grad is None for p in teacher.parameters()), "the caller's teacher is untouched"
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(isinstance(m, type(method.teacher)) for m in student.modules() if m is not student)
    # training-only modules live on the student (Ultralytics' optimizer, AMP, DDP and EMA see them) until finalize
    from copy import deepcopy

    from yolocomp.methods import training_module

    if cls is not HeadKD:
        assert training_module(student, method.name) is method.aux
        student_params = {id(p) for p in student.parameters()}
        assert all(id(p) in student_params for p in method.aux.parameters())
    delivered = method.finalize(deepcopy(student))
    assert set(delivered.state_dict()) == set(type(student)("yolov8n.yaml", nc=3, verbose=False).state_dict())
    method.release()
    assert not any(m._forward_hooks for m in student.modules()), "taps removed"


def test_teacher_mismatches_are_refused(models, tmp_path):
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    from yolocomp.integration import load_model, save_model

    student, _ = models
    other_classes = save_model(load_model("yolov8n.yaml", nc=5), tmp_path / "nc5.pt")
    with pytest.raises(UserError, match="5 classes but the student 3"):
        FGD(str(other_classes)).check_compatible(student)
    cfg = yaml_model_load("yolov8n.yaml")
    cfg["head"][-1][0] = [15, 18]  # Detect on two levels only
    two_levels = DetectionModel(cfg, nc=3, verbose=False)
    for cls in (FGD, FineGrainedImitation, HeadKD):
        with pytest.raises(UserError, match="levels"):
            cls(two_levels).check_compatible(student)
    with pytest.raises(UserError, match="not found"):
        FGD(str(tmp_path / "missing.pt")).check_compatible(student)
    with pytest.raises(UserError, match="psi"):
        FineGrainedImitation("t.pt", psi=1.5)
    with pytest.raises(UserError, match="negative"):
        FGD("t.pt", alpha=-1)
    from yolocomp.commands.distill import make_method

    with pytest.raises(UserError, match="unknown distillation method"):
        make_method("mimic", "t.pt")
    with pytest.raises(UserError, match="does not take alpha"):
        make_method("fgfi", "t.pt", loss_weights={"alpha": 1})


def test_methods_pickle_before_and_after_setup(models):
    student, teacher = models
    for method in (FGD("teacher.pt", alpha=2e-3), FineGrainedImitation(teacher), HeadKD("teacher.pt", temperature=3)):
        clone = pickle.loads(pickle.dumps(method))
        assert type(clone) is type(method) and repr(clone) == repr(method)
    method = _setup(FGD(teacher), student)
    _extra_loss_backward(method, student, make_batch([(0, 0.5, 0.5, 0.4, 0.4)], imgsz=64))
    clone = pickle.loads(pickle.dumps(method))
    assert clone.teacher is None and clone.aux is None and clone.student_tap is None
    assert clone.alpha == method.alpha and isinstance(clone.teacher_source, torch.nn.Module)
    clone.setup(student, "cpu")  # rebuilds its runtime state (as a DDP worker would)
    assert clone.teacher is not None and len(clone.levels) == 3
    clone.release()
    method.release()
    import copy

    copy.deepcopy(student)  # no cached graph tensors left on the student (EMA deep-copies it)


# --- training end to end -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from yolocomp.demo.synthetic import make_dataset
    from yolocomp.integration import load_model, save_model

    root = tmp_path_factory.mktemp("distill")
    data = make_dataset(root / "data", train=16, val=8, size=64)
    torch.manual_seed(0)
    teacher = save_model(load_model("yolov8s.yaml", nc=3), root / "teacher.pt")
    return root, data, teacher


def _columns(results_csv):
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    return {k.strip(): v for k, v in rows[-1].items()}


@pytest.mark.slow
@pytest.mark.parametrize(("method", "columns"), [("fgd", ["fgd_loss"]), ("fgfi", ["fgfi_loss"]), ("logit", ["kdcls_loss", "kddfl_loss"])])
def test_one_epoch_distillation_writes_loss_columns_and_a_clean_student(tiny_setup, method, columns):
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    from yolocomp.commands.distill import distill

    root, data, teacher = tiny_setup
    out = root / f"out_{method}"
    report = distill("yolov8n.yaml", str(teacher), data, out, method=method, epochs=1, imgsz=64, batch=8, evaluate=method == "fgd")
    row = _columns(out / "train" / "results.csv")
    for col in columns:
        assert math.isfinite(float(row[f"train/{col}"])) and float(row[f"train/{col}"]) > 0, col
        assert col in report["losses"] and col in report["distill_columns"]
    assert (out / "report.json").exists() and report["settings"]["method"] == method
    if method == "fgd":
        assert 0 <= report["ap_before"]["ap"] <= 1 and 0 <= report["ap_after"]["ap"] <= 1
    ckpt = torch.load(out / "student.pt", weights_only=False)
    model = ckpt["ema"]
    fresh = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    assert set(model.state_dict()) == set(fresh.state_dict()), "no teacher / adapter weights in the student"
    assert not any(m._forward_hooks for m in model.modules()), "no feature taps saved"
    assert not any(type(m).__module__.startswith("yolocomp") for m in model.modules())
    yolo = YOLO(str(out / "student.pt"))
    assert yolo.model.model[-1].nc == 3
    yolo.predict(torch.rand(1, 3, 64, 64), imgsz=64, verbose=False)


@pytest.mark.slow
def test_attach_to_a_users_yolo_train(tiny_setup):
    from ultralytics import YOLO

    import yolocomp

    root, data, teacher = tiny_setup
    yolo = YOLO("yolov8n.yaml")
    hub = yolocomp.attach(yolo, FineGrainedImitation(str(teacher)))
    yolo.train(data=str(data), epochs=1, imgsz=64, batch=8, device="cpu", workers=0, plots=False,
               project=str(root / "user"), name="run", exist_ok=True, verbose=False)
    row = _columns(root / "user" / "run" / "results.csv")
    assert float(row["train/fgfi_loss"]) > 0
    assert hub.methods[0].teacher is None, "runtime state released at train end"
    ckpt = torch.load(root / "user" / "run" / "weights" / "last.pt", weights_only=False)
    saved = ckpt.get("ema") or ckpt["model"]  # final checkpoints are stripped to "model"
    assert not any("adapter" in k or "gc_" in k for k in saved.state_dict())
    assert not any(m._forward_hooks for m in saved.modules())


class _StopInSecondEpoch(Method):
    """Interrupts training at the end of epoch 2, after epoch 1's checkpoint was written."""

    name = "stop"

    def on_epoch_end(self, trainer):
        if trainer.epoch >= 1:
            raise KeyboardInterrupt("simulated kill")


class _AdapterSpy(Method):
    """Records the student's FGD modules when the (resumed) trainer is ready, before any step."""

    name = "spy"

    def __init__(self):
        self.state = None

    def attach(self, trainer):
        from yolocomp.integration import unwrap
        from yolocomp.methods import training_module

        self.state = {k: v.detach().clone() for k, v in training_module(unwrap(trainer.model), "fgd").state_dict().items()}


@pytest.mark.slow
def test_resume_keeps_the_trained_adapters(tiny_setup):
    from yolocomp.integration import load_model, resume_interrupted, train
    from yolocomp.methods import TRAINING_MODULES

    root, data, teacher = tiny_setup
    args = {"epochs": 2, "imgsz": 64, "batch": 8, "val": False, "warmup_epochs": 0}
    with pytest.raises(KeyboardInterrupt):
        train(load_model("yolov8n.yaml", nc=3), str(data), [FGD(str(teacher)), _StopInSecondEpoch()], root, "resume", **args)
    last = root / "resume" / "weights" / "last.pt"
    saved = torch.load(last, weights_only=False)["ema"]
    saved_aux = {k: v.float() for k, v in getattr(saved, TRAINING_MODULES)["fgd"].state_dict().items()}
    assert any("gc_student" in k for k in saved_aux), "the unfinished checkpoint holds the adapters"

    spy = _AdapterSpy()
    with resume_interrupted():
        result = train(load_model("yolov8n.yaml", nc=3), str(data), [FGD(str(teacher)), spy], root, "resume", **args)
    assert spy.state is not None and set(spy.state) == set(saved_aux)
    assert all(torch.equal(spy.state[k], v) for k, v in saved_aux.items()), "resumed from the trained adapters"
    finished = torch.load(result.last, weights_only=False)["model"]
    assert not hasattr(finished, TRAINING_MODULES), "a finished checkpoint loads without yolocomp"
    assert not hasattr(result.model, TRAINING_MODULES)
