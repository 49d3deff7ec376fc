"""yolocomp.eval: COCO metrics on known detections, the letterbox round trip, backends agreeing, the JSON contract,
errors, model_info, and (real data) agreement with Ultralytics' own val()."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from yolocomp.errors import UserError
from yolocomp.eval import evaluate
from yolocomp.eval.coco import coco_metrics, from_coco_json, from_yolo_labels, load_ground_truth
from yolocomp.eval.dataset import load_valset
from yolocomp.eval.evaluate import detections_for_batch
from yolocomp.eval.preprocess import batches
from yolocomp.eval.runners import TENSORRT_MISSING, make_runner

CONTRACT = {"ap", "ap50", "ap75", "aps", "apm", "apl", "ar100", "backend", "images", "settings", "model", "data", "seconds"}


def gt_as_detections(gt, shift: float = 0.0) -> list[dict]:
    """Every non-crowd ground-truth box as a detection, moved right by ``shift`` x its width."""
    dets = []
    for ann in gt.coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x + shift * w, y, w, h],
                     "score": 0.9})
    return dets


# ------------------------------------------------------------------------------------------ metrics on known boxes
def test_ground_truth_as_detections_gives_ap_1(synthetic_data):
    valset = load_valset(synthetic_data)
    official = load_ground_truth(valset)
    derived = from_yolo_labels(valset)
    assert official.source.endswith("instances_val.json") and derived.source == "yolo-labels"
    # the YOLO labels and the synthetic COCO json describe the same boxes
    assert len(derived.coco.dataset["annotations"]) == len(official.coco.dataset["annotations"]) > 8
    for gt in (official, derived):
        m = coco_metrics(gt, gt_as_detections(gt))
        assert m["ap"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0) and m["ar100"] == pytest.approx(1.0)


def test_shifted_boxes_lower_ap_as_iou_predicts(synthetic_data):
    """A shift of s x width gives IoU (1-s)/(1+s); AP50-95 is the share of thresholds 0.50..0.95 that IoU passes."""
    gt = from_yolo_labels(load_valset(synthetic_data))
    thresholds = np.linspace(0.5, 0.95, 10)
    aps = []
    for s in (0.0, 0.05, 0.1, 0.2, 0.4):
        m = coco_metrics(gt, gt_as_detections(gt, s))
        iou = (1 - s) / (1 + s)
        assert m["ap"] == pytest.approx(float((thresholds <= iou + 1e-9).mean()), abs=1e-6)
        assert m["ap50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)
        aps.append(m["ap"])
    assert all(a > b for a, b in zip(aps, aps[1:])), aps


def test_no_detections_and_image_subset(synthetic_data):
    gt = from_yolo_labels(load_valset(synthetic_data))
    assert coco_metrics(gt, [])["ap"] == 0.0
    dets = [d for d in gt_as_detections(gt) if d["image_id"] < 4]
    assert coco_metrics(gt, dets, image_ids=[0, 1, 2, 3])["ap"] == pytest.approx(1.0)  # only those images count
    assert coco_metrics(gt, dets)["ar100"] < 1.0  # on all 8 images the other boxes are missed


@pytest.fixture(scope="module")
def rect_data(tmp_path_factory) -> Path:
    """Non-square images (so the letterbox pads) with YOLO labels and no COCO json."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rect")
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(96, 160), (160, 80), (50, 200), (128, 128), (75, 101)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / "val" / f"{i}.jpg")
        rows = []
        for _ in range(3):
            bw, bh = rng.uniform(0.1, 0.4, 2)
            cx, cy = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
            rows.append(f"{rng.integers(0, 2)} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
        (root / "labels" / "val" / f"{i}.txt").write_text("\n".join(rows) + "\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val", "names": {0: "a", 1: "b"}}))
    return data


def test_letterbox_round_trip_through_nms_gives_ap_1(rect_data):
    """Ground truth mapped into letterbox space as raw model outputs comes back through Ultralytics' NMS and the
    scale-back onto the original images exactly (AP 1.0); a wrong pad/gain would cost AP at the strict thresholds."""
    imgsz, nc = 128, 2
    valset = load_valset(rect_data)
    assert valset.coco_json is None
    gt = load_ground_truth(valset)
    assert gt.source == "yolo-labels"
    dets = []
    ids = iter(gt.image_ids)
    for b in batches(valset.images, imgsz, batch=2):
        image_ids = [next(ids) for _ in b.paths]
        preds = np.zeros((len(b.paths), 4 + nc, 20), np.float32)
        for k, (image_id, ((gain_h, gain_w), (pad_w, pad_h))) in enumerate(zip(image_ids, b.ratio_pads)):
            for a, ann in enumerate(gt.coco.imgToAnns[image_id]):
                x, y, w, h = ann["bbox"]
                preds[k, :4, a] = [(x + w / 2) * gain_w + pad_w, (y + h / 2) * gain_h + pad_h, w * gain_w, h * gain_h]
                preds[k, 4 + ann["category_id"], a] = 0.8
        dets += detections_for_batch(preds, b, gt, image_ids, imgsz, conf=0.001, iou=0.7, max_det=300)
    assert len(dets) == len(gt.coco.dataset["annotations"]) == 15
    m = coco_metrics(gt, dets)
    assert m["ap"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ backends and evaluate()
def test_onnxruntime_and_torch_give_the_same_detections(tiny_detector, synthetic_data):
    imgsz = tiny_detector["imgsz"]
    torch_runner = make_runner(tiny_detector["pt"])
    ort_runner = make_runner(tiny_detector["onnx"], threads=1)
    assert (torch_runner.backend, ort_runner.backend) == ("torch", "onnxruntime")
    assert ort_runner.fixed_batch == 1 and ort_runner.fixed_imgsz == imgsz
    valset = load_valset(synthetic_data)
    gt = load_ground_truth(valset)
    b = next(batches(valset.images, imgsz, batch=4))
    y_torch, y_ort = torch_runner(b.array), ort_runner(b.array)  # ORT runs the fixed-batch-1 graph 4 times
    assert y_torch.shape == y_ort.shape == (4, 4 + 3, (imgsz // 8) ** 2 + (imgsz // 16) ** 2 + (imgsz // 32) ** 2)
    np.testing.assert_allclose(y_ort[:, :4], y_torch[:, :4], atol=2e-2)  # pixels
    np.testing.assert_allclose(y_ort[:, 4:], y_torch[:, 4:], atol=1e-4)  # scores
    ids = gt.image_ids[:4]
    d_torch = detections_for_batch(y_torch, b, gt, ids, imgsz, 0.05, 0.7, 300)
    d_ort = detections_for_batch(y_ort, b, gt, ids, imgsz, 0.05, 0.7, 300)
    assert len(d_torch) > 20 and abs(len(d_torch) - len(d_ort)) <= 0.02 * len(d_torch)
    # every torch detection has an ORT twin (same image and class, box within 0.05 px, score within 1e-4); near-tied
    # scores may reorder, so match by content rather than by rank
    twins = 0
    for a in d_torch:
        twins += any(
            (a["image_id"], a["category_id"]) == (c["image_id"], c["category_id"])
            and np.abs(np.subtract(a["bbox"], c["bbox"])).max() < 0.05 and abs(a["score"] - c["score"]) < 1e-4
            for c in d_ort
        )
    assert twins >= 0.98 * len(d_torch)


def test_evaluate_json_contract_and_backends_agree(tiny_detector, synthetic_data, tmp_path):
    out = tmp_path / "eval.json"
    res = evaluate(tiny_detector["pt"], synthetic_data, imgsz=128, batch=4, json_out=out, progress=False)
    assert CONTRACT <= set(res)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert res["backend"] == "torch" and res["images"] == 8
    for k in ("ap", "ap50", "ap75", "ar100"):
        assert 0.0 <= res[k] <= 1.0
    s = res["settings"]
    assert (s["imgsz"], s["conf"], s["iou"], s["max_det"]) == (128, 0.001, 0.7, 300)
    assert s["annotations"].endswith("instances_val.json")
    onnx = evaluate(tiny_detector["onnx"], synthetic_data, imgsz=128, images=5, conf=0.01, iou=0.6, max_det=50, progress=False)
    assert onnx["backend"] == "onnxruntime" and onnx["images"] == 5
    assert (onnx["settings"]["conf"], onnx["settings"]["iou"], onnx["settings"]["max_det"]) == (0.01, 0.6, 50)
    torch5 = evaluate(tiny_detector["pt"], synthetic_data, imgsz=128, images=5, conf=0.01, iou=0.6, max_det=50, progress=False)
    assert abs(torch5["detections"] - onnx["detections"]) <= 0.02 * torch5["detections"]
    assert onnx["ap"] == pytest.approx(torch5["ap"], abs=5e-3)


def test_evaluate_in_memory_model_is_not_modified(synthetic_data):
    from yolocomp.integration import load_model

    model = load_model("yolov8n.yaml", nc=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads_before = torch.get_num_threads()
    res = evaluate(model, synthetic_data, imgsz=64, images=2, threads=1, progress=False)
    assert torch.get_num_threads() == threads_before and res["settings"]["threads"] == 1
    assert res["backend"] == "torch" and res["images"] == 2 and res["settings"]["fused"] is True
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(type(m).__name__ == "BatchNorm2d" for m in model.modules())  # the caller's model was not fused


def test_user_errors(tmp_path, synthetic_data, tiny_detector):
    with pytest.raises(UserError, match="model file not found") as e:
        evaluate(tmp_path / "missing.pt", synthetic_data)
    assert "\n" not in str(e.value) and str(tmp_path / "missing.pt") in str(e.value)  # one line naming the file
    with pytest.raises(UserError, match="model file not found"):
        make_runner(tmp_path / "missing.onnx")
    bad = tmp_path / "weights.h5"
    bad.write_text("x")
    with pytest.raises(UserError, match=r"unsupported model file .*weights\.h5"):
        evaluate(bad, synthetic_data)
    with pytest.raises(UserError, match="data yaml not found") as e:
        evaluate(tiny_detector["pt"], tmp_path / "nope.yaml")
    assert "\n" not in str(e.value) and "nope.yaml" in str(e.value)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(UserError) as e:
            make_runner(engine)
        assert str(e.value) == TENSORRT_MISSING
    with pytest.raises(UserError, match="takes 128px input; pass --imgsz 128"):
        evaluate(tiny_detector["onnx"], synthetic_data, imgsz=640)
    with pytest.raises(UserError, match="multiple of 32"):
        evaluate(tiny_detector["pt"], synthetic_data, imgsz=100)
    with pytest.raises(UserError, match="conf=1.5"):
        evaluate(tiny_detector["pt"], synthetic_data, conf=1.5)
    two_class = tmp_path / "two.yaml"
    cfg = yaml.safe_load(Path(synthetic_data).read_text())
    two_class.write_text(yaml.safe_dump({**cfg, "names": {0: "a", 1: "b"}, "coco_json": None}))
    with pytest.raises(UserError, match="predicts 3 classes"):
        evaluate(tiny_detector["pt"], two_class, imgsz=128)


def test_model_info_torch_and_onnx(tiny_detector):
    from yolocomp.eval.info import model_info
    from yolocomp.integration import load_model

    model = load_model(tiny_detector["pt"])
    info = model_info(tiny_detector["pt"], imgsz=128)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert len(info["layers"]) == len(model.model)
    assert sum(r["params"] for r in info["layers"]) == info["params"]
    assert info["layers"][0]["out_channels"] == 16 and info["layers"][0]["type"] == "Conv"
    assert info["layers"][-1]["type"] == "Detect" and info["layers"][-1]["out_channels"] == 4 + 3
    assert info["layers"][-1]["from"] == [15, 18, 21]
    assert info["size_mb"] == pytest.approx(tiny_detector["pt"].stat().st_size / 1e6, abs=1e-3)
    big = model_info(tiny_detector["pt"], imgsz=256)
    assert big["gflops"] == pytest.approx(4 * info["gflops"], rel=0.02)  # conv FLOPs scale with pixels
    onnx = model_info(tiny_detector["onnx"], imgsz=128)
    fused = sum(p.numel() for p in model.fuse().parameters())
    assert onnx["params"] == fused  # the export folds BN: conv weights + biases only
    assert onnx["gflops"] == pytest.approx(info["gflops"], rel=0.05)
    assert sum(r["type"] == "Conv" for r in onnx["layers"]) == sum(type(m).__name__ == "Conv2d" for m in model.modules())
    with pytest.raises(UserError, match="pass the .onnx it was built from"):
        model_info(tiny_detector["pt"].with_suffix(".engine"))
    with pytest.raises(UserError, match="model file not found"):
        model_info(tiny_detector["pt"].with_name("missing.pt"))


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.real
def test_official_coco_json_ground_truth_gives_ap_1(coco_real_data):
    valset = load_valset(coco_real_data)
    assert valset.coco_json is not None and valset.coco_json.name == "instances_val2017.json"
    gt = from_coco_json(valset.coco_json, valset.images, len(valset.names))
    assert len(valset.images) == 158 and gt.class_to_category[:3] == [1, 2, 3] and gt.class_to_category[-1] == 90
    m = coco_metrics(gt, gt_as_detections(gt))
    assert m["ap"] == pytest.approx(1.0) and m["ar100"] == pytest.approx(1.0)


def test_bench_quant_train_val_set_scores_both_splits_against_their_official_jsons(coco_real_data, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quant", Path(__file__).parents[1] / "tools" / "bench_quant.py")
    bench_quant = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_quant)
    valset = load_valset(bench_quant.train_val_data(Path(coco_real_data), tmp_path))
    assert len(valset.images) == 288 + 158 and valset.coco_json.parent == tmp_path
    gt = from_coco_json(valset.coco_json, valset.images, len(valset.names))
    m = coco_metrics(gt, gt_as_detections(gt))
    assert m["ap"] == pytest.approx(1.0) and m["ar100"] == pytest.approx(1.0)  # every image found in the merged json
    with pytest.raises(SystemExit):  # train images must not calibrate what they score
        bench_quant.parse_args(["--eval-splits", "train+val", "--rows", "ptq"])


#: the cross-check evaluates this many images (first N sorted) in both tools to stay fast; the README gives the
#: figures for all 158 images.
CROSS_CHECK_IMAGES = 48


@pytest.mark.real
def test_pt_ap_agrees_with_ultralytics_val(coco_real_data, real_weights, tmp_path):
    from ultralytics import YOLO

    valset = load_valset(coco_real_data, images=CROSS_CHECK_IMAGES)
    subset = tmp_path / "val_subset.txt"
    subset.write_text("\n".join(str(p) for p in valset.images) + "\n")
    cfg = yaml.safe_load(Path(coco_real_data).read_text())
    data = tmp_path / "subset.yaml"
    json_path = Path(cfg["path"]) / "annotations" / "instances_val2017.json"
    data.write_text(yaml.safe_dump({**cfg, "val": str(subset), "coco_json": str(json_path)}))

    t0 = time.perf_counter()
    ours = evaluate(real_weights, data, imgsz=640, batch=8, progress=False)
    t1 = time.perf_counter()
    theirs = YOLO(str(real_weights)).val(data=str(data), imgsz=640, batch=8, plots=False, device="cpu", workers=0,
                                         project=str(tmp_path / "ul"), verbose=False)
    t2 = time.perf_counter()
    print(f"yolocomp AP {ours['ap']:.4f} ({t1 - t0:.1f}s) vs Ultralytics val {theirs.box.map:.4f} ({t2 - t1:.1f}s)")
    assert ours["images"] == CROSS_CHECK_IMAGES and ours["settings"]["annotations"] == str(json_path)
    assert abs(ours["ap"] - theirs.box.map) <= 0.010
    assert ours["ap"] > 0.25  # the real model really detects (not a trivially equal pair of zeros)


def test_qdq_int8_onnx_runs_and_counts_like_fp32(tiny_detector, synthetic_data, tmp_path):
    """A Q/DQ INT8 graph (ONNX Runtime's own quantizer, independent of yolocomp's export) evaluates through the same
    runner; its weights are read through DequantizeLinear, so params and GFLOPs equal the FP32 graph's."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from yolocomp.eval.info import model_info

    valset = load_valset(synthetic_data)
    calib = [{"images": b.array} for b in batches(valset.images[:2], 128, batch=1)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    int8 = tmp_path / "tiny_int8.onnx"
    quantize_static(str(tiny_detector["onnx"]), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    fp32_info, int8_info = model_info(tiny_detector["onnx"], 128), model_info(int8, 128)
    assert int8_info["qdq"] and not fp32_info["qdq"]
    assert int8_info["params"] == fp32_info["params"] and int8_info["gflops"] == pytest.approx(fp32_info["gflops"])
    assert int8_info["size_mb"] < 0.4 * fp32_info["size_mb"]
    x = next(batches(valset.images, 128, batch=2)).array
    y32, y8 = make_runner(tiny_detector["onnx"])(x), make_runner(int8)(x)
    assert y8.shape == y32.shape
    # quantized, yet the boxes stay close (a naive whole-graph quantizer crushes the scores that share the output
    # tensor's scale with pixel boxes; that is the exporter's business, not the runner's)
    assert np.isfinite(y8).all() and not np.array_equal(y8, y32)
    assert np.median(np.abs(y8[:, :4] - y32[:, :4]) / (np.abs(y32[:, :4]) + 1)) < 0.1
    res = evaluate(int8, synthetic_data, imgsz=128, images=2, progress=False)
    assert res["backend"] == "onnxruntime" and res["images"] == 2


def test_one_image_lister_for_folders_lists_and_data_yamls(tmp_path, synthetic_data):
    from yolocomp.eval.images import dataset_images, list_images
    from yolocomp.export.calibration import find_calibration_images
    from yolocomp.prune.compensate import calibration_images as prune_calibration
    from yolocomp.quant.calibrate import calibration_images as quant_calibration

    val = load_valset(synthetic_data).images
    folder = val[0].parent
    assert list_images(folder) == val == dataset_images(synthetic_data, "val")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{val[1]}\n\n./{val[0].name}\nnot-an-image.json\n")
    (tmp_path / val[0].name).write_bytes(val[0].read_bytes())
    assert list_images(listing) == sorted([val[1], tmp_path / val[0].name])  # './x' is next to the list
    with pytest.raises(UserError, match="val images 'nope' of data.yaml not found under /r"):
        list_images("nope", "/r", what="val images", source="data.yaml")
    assert list_images(["nope", folder], tmp_path, missing_ok=True) == val
    train = dataset_images(synthetic_data)  # train split by default, as calibration wants
    assert train and train != val and all(p.suffix == val[0].suffix for p in train)
    assert find_calibration_images(synthetic_data, limit=None) == train
    assert set(quant_calibration(synthetic_data, images=3)) <= set(train)
    assert prune_calibration(str(synthetic_data), imgsz=64, n=2).shape == (2, 3, 64, 64)
