"""Unlabelled images as training data: image checks, mirrored training data, pseudo-labels, label-free training,
teacher-confidence weighting and teacher-box masks."""

from __future__ import annotations

import csv
import shutil
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml

from yolocomp.data import check_images, label_free_overrides, training_data
from yolocomp.distill import FGD, FineGrainedImitation, HeadKD
from yolocomp.distill.head_kd import anchor_weights, head_kd_terms
from yolocomp.distill.masks import fgd_masks, fgfi_masks, images_without_boxes, with_teacher_boxes
from yolocomp.errors import UserError

IMGSZ = 64


def confident_teacher(nc: int = 3) -> torch.nn.Module:
    """A random-weight YOLOv8n whose BN saw real-looking inputs and whose class prior is 0.5, so it detects boxes."""
    from yolocomp.demo.synthetic import CLASSES
    from yolocomp.integration import load_model

    torch.manual_seed(0)
    model = load_model("yolov8n.yaml", nc=nc)
    model.names = dict(enumerate(CLASSES)) if nc == 3 else {i: f"class{i}" for i in range(nc)}
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: BN statistics of the calibration inputs
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(4, 3, IMGSZ, IMGSZ))
        for branch in model.model[-1].cv3:
            branch[-1].bias.zero_()  # class probabilities around 0.5: plenty of detections above 0.25
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = 0.03
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from yolocomp.demo.synthetic import make_dataset
    from yolocomp.integration import save_model

    root = tmp_path_factory.mktemp("unlabelled")
    data = make_dataset(root / "data", train=8, val=4, size=IMGSZ)
    photos = root / "photos"  # the user's folder: images only, no labels anywhere near
    photos.mkdir()
    for image in sorted((root / "data" / "images" / "train").iterdir()):
        shutil.copy(image, photos / image.name)
    teacher = confident_teacher()
    return {"root": root, "data": data, "photos": photos, "teacher": teacher, "teacher_pt": save_model(teacher, root / "teacher.pt")}


def _last_row(results_csv: Path) -> dict[str, float]:
    with open(results_csv) as f:
        row = list(csv.DictReader(f))[-1]
    return {k.strip(): float(v) for k, v in row.items()}


def _label_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*.txt")}


# --- check_images ------------------------------------------------------------------------------------------------------
def test_check_images_lists_a_folder_and_a_list(setup, tmp_path):
    photos = setup["photos"]
    found = check_images(photos)
    assert found == sorted(photos.iterdir()) and len(found) == 8
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in found[:3]))
    assert check_images(listing) == found[:3]


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable_list", "list_names_missing_files"])
def test_check_images_errors_are_one_line(setup, tmp_path, case):
    if case == "missing":
        source = tmp_path / "nowhere"
    elif case == "empty":
        source = tmp_path / "empty"
        source.mkdir()
        (source / "notes.md").write_text("no images here")
    elif case == "unreadable_list":
        source = tmp_path / "list.txt"
        source.write_bytes(b"\xff\xfe\x00\x81 not utf-8 \xc3\x28")
    else:
        source = tmp_path / "list.txt"
        source.write_text(f"{setup['photos'] / 'im_gone.png'}\n{next(setup['photos'].iterdir())}\n")
    with pytest.raises(UserError) as info:
        check_images(source)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--images {source}:"), message
    if case == "list_names_missing_files":
        assert "im_gone.png" in message


def test_teacher_with_other_classes_than_the_data_is_refused(setup, tmp_path):
    other = confident_teacher(nc=5)
    with pytest.raises(UserError) as info:
        training_data(setup["photos"], setup["data"], tmp_path / "work", teacher=other)
    assert "\n" not in str(info.value) and "5 classes" in str(info.value) and "3" in str(info.value)


def test_images_need_a_teacher_without_data(setup, tmp_path):
    with pytest.raises(UserError, match="needs a teacher"):
        training_data(setup["photos"], None, tmp_path / "work")


# --- training data -----------------------------------------------------------------------------------------------------
def test_label_free_data_mirrors_images_and_takes_the_teachers_names(setup, tmp_path):
    before = sorted(p.name for p in setup["photos"].iterdir())
    td = training_data(setup["photos"], None, tmp_path / "work", teacher=setup["teacher_pt"])
    assert (td.labelled, td.unlabelled, td.pseudo_labelled, td.label_free) == (0, 8, 0, True)
    cfg = yaml.safe_load(td.yaml.read_text())
    assert td.yaml.is_absolute() and td.yaml.parent == (tmp_path / "work").resolve()
    assert cfg["names"] == {0: "square", 1: "circle", 2: "triangle"}
    links = sorted(Path(cfg["train"]).iterdir())
    assert [p.name for p in links] == before and all(p.is_symlink() for p in links)
    assert [Path(ln) for ln in Path(cfg["val"]).read_text().split()] == links  # val exists: the same images
    labels = sorted((tmp_path / "work" / "unlabelled" / "labels").glob("*.txt"))
    assert [p.stem for p in labels] == [p.stem for p in links] and all(p.read_text() == "" for p in labels)
    assert sorted(p.name for p in setup["photos"].iterdir()) == before, "the source folder is never written"


def test_pseudo_labels_are_written_for_the_mirrored_images_only(setup, tmp_path):
    data_root = Path(yaml.safe_load(Path(setup["data"]).read_text())["path"])
    source_labels = {p: p.read_text() for p in _label_files(data_root)}
    images = data_root / "images" / "train"  # a folder that has labels beside it: they must not be read or touched
    td = training_data(images, setup["data"], tmp_path / "work", teacher=setup["teacher_pt"], pseudo_conf=0.3, imgsz=IMGSZ)
    assert {p: p.read_text() for p in _label_files(data_root)} == source_labels
    assert (td.labelled, td.unlabelled, td.label_free) == (8, 8, False) and td.pseudo_labelled > 0
    mirror = tmp_path / "work" / "unlabelled"
    links = sorted((mirror / "images").iterdir())
    labels = sorted((mirror / "labels").glob("*.txt"))
    assert [p.stem for p in labels] == [p.stem for p in links]
    assert _label_files(tmp_path / "work") == set(labels)
    boxes = 0
    for label in labels:
        for line in label.read_text().splitlines():
            cls, *xywh = line.split()
            assert int(cls) in range(3) and len(xywh) == 4
            assert all(0 <= float(v) <= 1 for v in xywh) and float(xywh[2]) > 0 and float(xywh[3]) > 0
            boxes += 1
    assert boxes >= td.pseudo_labelled
    cfg = yaml.safe_load(td.yaml.read_text())
    assert cfg["train"][0] == str(mirror / "images") and len(cfg["train"]) == 2
    assert cfg["names"] == yaml.safe_load(Path(setup["data"]).read_text())["names"]
    assert all(Path(v).exists() for v in cfg["val"])


# --- losses ------------------------------------------------------------------------------------------------------------
def test_confidence_weighting_favours_confident_anchors():
    scores = torch.full((2, 3, 10), -6.0)  # background everywhere ...
    scores[0, 1, 4] = 4.0  # ... but one confident anchor
    weights = anchor_weights(scores)
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    assert weights[0, 4] > 10 * weights[0, 3] and weights[0, 4] > 10 * weights[1, 0]
    uniform = anchor_weights(scores, confidence_weighting=False)
    assert torch.allclose(uniform, torch.full((2, 10), 1 / 20))
    # a student wrong only on background: weighted, the error nearly vanishes; unweighted it does not
    teacher = {"scores": scores, "boxes": torch.zeros(2, 64, 10)}
    student = {"scores": scores.clone(), "boxes": torch.zeros(2, 64, 10)}
    student["scores"][1] = 2.0
    weighted = head_kd_terms(student, teacher, 16, 2.0)["cls"]
    plain = head_kd_terms(student, teacher, 16, 2.0, confidence_weighting=False)["cls"]
    assert weighted < 0.1 * plain
    assert not HeadKD("t.pt", confidence_weighting=False).confidence_weighting and HeadKD("t.pt").confidence_weighting


def _unlabelled_batch(n: int = 2) -> dict:
    torch.manual_seed(1)
    return {"img": torch.rand(n, 3, IMGSZ, IMGSZ), "bboxes": torch.zeros(0, 4), "batch_idx": torch.zeros(0),
            "cls": torch.zeros(0, 1)}


def test_teacher_boxes_fill_the_masks_of_images_without_labels(setup):
    teacher = setup["teacher"]
    batch = _unlabelled_batch()
    batch["bboxes"], batch["batch_idx"] = torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([1.0])  # image 1 labelled
    assert images_without_boxes(batch).tolist() == [True, False]
    with torch.no_grad():
        out = teacher(batch["img"])
    mask_batch = with_teacher_boxes(batch, out, conf=0.25)
    idx = mask_batch["batch_idx"]
    assert (idx == 0).sum() > 0, "image 0 gets the teacher's boxes"
    assert (idx == 1).sum() == 1 and torch.equal(mask_batch["bboxes"][idx == 1], batch["bboxes"]), "GT boxes kept as they are"
    sizes = [(8, 8), (4, 4), (2, 2)]
    assert fgd_masks(mask_batch, sizes, torch.device("cpu"))[0][0][0].sum() > 0
    assert fgd_masks(batch, sizes, torch.device("cpu"))[0][0][0].sum() == 0
    assert fgfi_masks(mask_batch, sizes, torch.device("cpu"))[0][0].sum() > 0


@pytest.mark.parametrize("make", [HeadKD, FGD, FineGrainedImitation], ids=["head_kd", "fgd", "fgfi"])
def test_distilling_a_model_into_itself_costs_nothing_without_labels(setup, make):
    student = deepcopy(setup["teacher"]).eval()  # same weights, eval-mode BN
    method = make(setup["teacher"])
    method.setup(student, "cpu")
    batch = _unlabelled_batch()
    if method.uses_features:
        assert method.needs_teacher_head_for(batch), "unlabelled images need the teacher's boxes"
        masks = fgd_masks(method.mask_batch(batch, setup["teacher"](batch["img"])), [(8, 8)], torch.device("cpu"))
        assert masks[0][0].sum() > 0, "the masks are built from teacher boxes"
    with torch.no_grad():
        losses = method.extra_loss(None, batch, student(batch["img"]))
        other = confident_teacher()  # 2 % weight noise: the same losses are clearly positive
        for p in other.parameters():
            p.mul_(1 + 0.02 * torch.randn_like(p))
        method.setup(other, "cpu")
        different = sum(v.item() for v in method.extra_loss(None, batch, other(batch["img"])).values())
    same = sum(abs(v.item()) for v in losses.values())
    # teacher and student run the same ops (the teacher is not BN-folded); FGD / FGFI adapters start near identity
    assert losses and same < 1e-4 and same < 1e-3 * different, (losses, different)


# --- training ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("make", "columns"), [(HeadKD, ["kdcls_loss", "kddfl_loss"]), (FGD, ["fgd_loss"])], ids=["head_kd", "fgd"])
def test_label_free_training_has_no_detection_loss_and_keeps_the_last_weights(setup, tmp_path, make, columns):
    from ultralytics.nn.tasks import load_checkpoint

    from yolocomp.integration import load_model, train

    td = training_data(setup["photos"], None, tmp_path / "work", teacher=setup["teacher_pt"])
    assert td.label_free
    torch.manual_seed(0)
    student = load_model("yolov8n.yaml", nc=3)
    result = train(student, str(td.yaml), [make(setup["teacher_pt"])], project=tmp_path, name="lf", epochs=2,
                   imgsz=IMGSZ, batch=4, **label_free_overrides())
    row = _last_row(result.save_dir / "results.csv")
    assert row["train/box_loss"] == row["train/cls_loss"] == row["train/dfl_loss"] == 0
    assert all(row[f"train/{c}"] > 0 for c in columns), row
    last, _ = load_checkpoint(result.last)
    trained = result.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in last.state_dict().items()), "the last epoch's weights"


def test_label_free_self_distillation_with_the_recovery_settings_never_moves_the_model(setup, tmp_path):
    # the sanity check of a recovery recipe (nbs = batch, as prune passes it): a student equal to its teacher gets
    # exactly zero losses and gradients, and with no weight decay nothing else moves it (with decay 5e-4 it moves)
    from yolocomp.config.prune import KD_RECOVERY_TRAIN_DEFAULTS
    from yolocomp.distill.block_kd import BlockKD
    from yolocomp.distill.frozen_bn import FrozenBatchNorm
    from yolocomp.integration import load_model, train

    td = training_data(setup["photos"], None, tmp_path / "work", teacher=setup["teacher_pt"])
    student = load_model(setup["teacher_pt"])
    result = train(student, str(td.yaml), [BlockKD(setup["teacher_pt"]), FrozenBatchNorm()], project=tmp_path,
                   name="self", epochs=2, imgsz=IMGSZ, batch=4,
                   **{**label_free_overrides(), **KD_RECOVERY_TRAIN_DEFAULTS, "warmup_epochs": 0, "nbs": 4})
    with open(result.save_dir / "results.csv") as f:
        rows = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert len(rows) == 2
    assert all(row[f"train/{c}"] == 0 for row in rows for c in ("kdcls_loss", "kddfl_loss", "kdfeat_loss")), rows
    teacher = load_model(setup["teacher_pt"]).state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in result.model.state_dict().items() if k in teacher)


def test_labelled_and_unlabelled_images_train_together(setup, tmp_path):
    from yolocomp.integration import load_model, train

    td = training_data(setup["photos"], setup["data"], tmp_path / "work", teacher=setup["teacher_pt"])
    assert (td.labelled, td.unlabelled, td.label_free) == (8, 8, False)
    torch.manual_seed(0)
    result = train(load_model("yolov8n.yaml", nc=3), str(td.yaml), [HeadKD(setup["teacher_pt"])], project=tmp_path,
                   name="mixed", epochs=1, imgsz=IMGSZ, batch=8)
    row = _last_row(result.save_dir / "results.csv")
    assert row["train/box_loss"] > 0 and row["train/cls_loss"] > 0 and row["train/kdcls_loss"] > 0
    assert (tmp_path / "work" / "unlabelled" / "labels.cache").exists(), "the label cache stays in the work folder"
