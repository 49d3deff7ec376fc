"""Shared fixtures: a small synthetic dataset, the ../shared folder, coco-real as a safe data yaml, a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """Data yaml of a synthetic 3-class shapes dataset (32 train, 8 val, 128 px, COCO json for val)."""
    from yolocomp.demo.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), train=32, val=8, size=128)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``shared`` folder beside the repo root (real COCO images and weights); skips the test when absent."""
    path = REPO.parent / "shared"
    if not path.is_dir():
        pytest.skip(f"real data not available: {path} is missing (clone the repo beside shared/)")
    return path


@pytest.fixture(scope="session")
def coco_real_data(shared_dir, tmp_path_factory) -> Path:
    """An absolute-path data yaml for ../shared/coco-real over a per-file linked mirror in a temp dir.

    Ultralytics writes ``labels/*.cache`` next to the labels; the symlinked layout keeps those writes in the temp dir
    so ``shared/`` stays untouched. The official jsons are reachable as ``annotations/instances_<split>.json``.
    """
    src = shared_dir / "coco-real"
    if not (src / "coco-real.yaml").exists():
        pytest.skip(f"real data not available: {src} is missing")
    from yolocomp.integration import mirror_dataset

    return mirror_dataset(src / "coco-real.yaml", tmp_path_factory.mktemp("coco-real"))


@pytest.fixture(scope="session")
def real_weights(shared_dir) -> Path:
    """The real YOLOv8n COCO checkpoint in ../shared/weights; skips when absent."""
    path = shared_dir / "weights" / "yolov8n-coco-dq.pt"
    if not path.exists():
        pytest.skip(f"real weights not available: {path} is missing")
    return path


@pytest.fixture(scope="session")
def tiny_detector(tmp_path_factory) -> dict:
    """A YOLOv8n (random weights, BN calibrated, 3 classes, scores spread) as ``.pt`` and as a fixed-shape
    (batch 1, 128 px) Ultralytics ONNX export: ``{"pt": Path, "onnx": Path, "imgsz": 128}``."""
    import torch
    from ultralytics import YOLO

    from yolocomp.demo.synthetic import CLASSES
    from yolocomp.integration import load_model, save_model

    root = tmp_path_factory.mktemp("tiny_detector")
    torch.manual_seed(0)
    model = load_model("yolov8n.yaml", nc=3)
    model.names = dict(enumerate(CLASSES))
    # Random weights with default BN statistics shrink the signal to ~0 by the head (every output the same). Give BN
    # the statistics of real inputs, then lift the class prior (~0.001) so NMS sees many distinct candidates.
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 128, 128))
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(-2.0)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = 0.03  # Ultralytics' value
    model.eval()
    pt = save_model(model, root / "tiny.pt")
    onnx = YOLO(str(pt)).export(format="onnx", imgsz=128, opset=17, simplify=False, dynamic=False, verbose=False)
    return {"pt": pt, "onnx": Path(onnx), "imgsz": 128}
