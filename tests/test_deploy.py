"""deploy/: numpy pre/post-processing against Ultralytics and torchvision, the ONNX Runtime scripts on FP32 and INT8
Q/DQ models (agreeing with yolocomp.eval's runner and preprocessing), the bench JSON schema, build_engine.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
sys.path.insert(0, str(DEPLOY))

from common import detect  # noqa: E402
from common.benchmark import MODEL_KEYS  # noqa: E402

IMGSZ = 128


def run_script(*args, check=True):
    env = {**os.environ, "PYTHONPATH": ""}  # the scripts must work without yolocomp on the path
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A synthetic val folder, a tiny YOLOv8n (random weights, 3 classes) as FP32 ONNX and as INT8 Q/DQ ONNX.

    The Q/DQ model is made with ONNX Runtime's quantize_static (QDQ format, per-channel int8 weights, uint8
    activations, convolutions only) calibrated on the val images: independent of yolocomp's own Q/DQ export, which has its own tests.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from ultralytics import YOLO

    from yolocomp.demo.synthetic import CLASSES, make_dataset
    from yolocomp.integration import load_model, save_model

    root = tmp_path_factory.mktemp("deploy")
    data = make_dataset(root / "data", train=2, val=12, size=IMGSZ)
    val = data.parent / "images" / "val"
    torch.manual_seed(0)
    model = load_model("yolov8n.yaml", nc=3)
    model.names = dict(enumerate(CLASSES))
    # Random weights make activations vanish layer by layer, so every box gets the same score. BN statistics from
    # one batch of the images (momentum 1) and a lifted class prior give scores that differ from box to box.
    import cv2

    batch = np.concatenate([detect.to_blob([detect.letterbox(cv2.imread(str(f)), IMGSZ).image]) for f in sorted(val.iterdir())])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(batch))
        for branch in model.model[-1].cv3:
            branch[-1].bias.fill_(-2.0)
    model.eval()
    save_model(model, root / "tiny.pt")
    fp32 = Path(YOLO(str(root / "tiny.pt")).export(format="onnx", imgsz=IMGSZ, simplify=False, verbose=False))

    files = sorted(val.iterdir())[:8]

    class Reader(CalibrationDataReader):
        def __init__(self):
            import cv2

            self.batches = iter([{"images": detect.to_blob([detect.letterbox(cv2.imread(str(f)), IMGSZ).image])}
                                 for f in files])

        def get_next(self):
            return next(self.batches, None)

    int8 = root / "tiny_int8.onnx"
    # Q/DQ around convolutions only, as for TensorRT: the decoded output (boxes in pixels next to scores in [0, 1])
    # would share one 8-bit scale if quantized, which rounds every score to zero.
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
    return {"val": val, "fp32": fp32, "int8": int8, "root": root, "names": dict(enumerate(CLASSES))}


# ------------------------------------------------------------------------------------------ numpy pieces
@pytest.mark.parametrize("shape", [(128, 128), (97, 131), (480, 640), (640, 300), (33, 512)])
def test_letterbox_matches_yolocomp_eval(shape):
    from yolocomp.eval.preprocess import letterbox as eval_letterbox

    img = np.random.default_rng(sum(shape)).integers(0, 255, (*shape, 3), dtype=np.uint8)
    lb = detect.letterbox(img, IMGSZ)
    chw, ((gain_h, gain_w), (pad_w, pad_h)) = eval_letterbox(img, IMGSZ)
    np.testing.assert_array_equal(detect.to_blob([lb.image])[0], chw)
    assert lb.pad == (pad_w, pad_h)
    assert lb.gain == pytest.approx((gain_w, gain_h))


def test_scale_boxes_matches_ultralytics():
    from ultralytics.utils import ops

    img = np.zeros((97, 131, 3), np.uint8)
    lb = detect.letterbox(img, IMGSZ)
    det = np.array([[10, 20, 60, 90, 0.9, 1], [0, 0, 128, 128, 0.5, 0], [-5, 30, 40, 140, 0.3, 2]], np.float32)
    ours = detect.scale_boxes(det, lb)
    ref = ops.scale_boxes((IMGSZ, IMGSZ), torch.from_numpy(det[:, :4].copy()), (97, 131))
    np.testing.assert_allclose(ours[:, :4], ref.numpy(), atol=1e-4)
    np.testing.assert_array_equal(ours[:, 4:], det[:, 4:])


def test_nms_matches_torchvision():
    import torchvision

    rng = np.random.default_rng(0)
    for iou in (0.3, 0.5, 0.7):
        xy = rng.uniform(0, 100, (300, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (300, 2)).astype(np.float32)], 1)
        scores = rng.uniform(0, 1, 300).astype(np.float32)
        ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), iou).numpy()
        np.testing.assert_array_equal(detect.nms(boxes, scores, iou), ref)
    assert detect.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)


def test_postprocess_matches_ultralytics_nms():
    from ultralytics.utils.nms import non_max_suppression

    rng = np.random.default_rng(1)
    n, nc = 2, 5
    xy = rng.uniform(0, 128, (n, 2, 600))
    wh = rng.uniform(4, 50, (n, 2, 600))
    scores = rng.uniform(0, 1, (n, nc, 600)) ** 4
    pred = np.concatenate([xy, wh, scores], 1).astype(np.float32)
    ours = detect.postprocess(pred, conf=0.05, iou=0.6, max_det=100)
    ref = non_max_suppression(torch.from_numpy(pred), 0.05, 0.6, multi_label=False, max_det=100)
    for o, r in zip(ours, ref):
        assert len(o) == len(r) > 10
        np.testing.assert_allclose(o, r.numpy(), atol=1e-4)


def test_parse_names():
    assert detect.parse_names("{0: 'a', 1: 'b'}") == {0: "a", 1: "b"}
    assert detect.parse_names({"0": "a"}) == {0: "a"}
    assert detect.parse_names(["a", "b"]) == {0: "a", 1: "b"}


# ------------------------------------------------------------------------------------------ deploy/cpu
def reference_detections(onnx_path, images, conf, iou, max_det=300, imgsz=IMGSZ):
    """yolocomp.eval's ONNX runner and preprocessing, Ultralytics' NMS in predict mode (best class per box)."""
    from ultralytics.utils.nms import non_max_suppression

    from yolocomp.eval.preprocess import batches, scale_to_original
    from yolocomp.eval.runners import make_runner

    runner = make_runner(str(onnx_path))
    out = {}
    for b in batches(images, imgsz, 1):
        det = non_max_suppression(torch.from_numpy(runner(b.array)), conf, iou, multi_label=False, max_det=max_det)[0]
        det[:, :4] = scale_to_original(det[:, :4], imgsz, b.orig_shapes[0], b.ratio_pads[0])
        out[b.paths[0].name] = det.numpy()
    return out


def assert_same_detections(results, reference):
    assert set(results) == set(reference)
    total = matched = 0
    for name, dets in results.items():
        ref = reference[name]
        ours = np.array([[*d["box"], d["score"], d["class"]] for d in dets], np.float32).reshape(-1, 6)
        assert abs(len(ours) - len(ref)) <= max(1, len(ref) // 50), name
        for d in ours:
            total += 1
            same = (ref[:, 5] == d[5]) & (np.abs(ref[:, 4] - d[4]) < 1e-3) & (np.abs(ref[:, :4] - d[:4]).max(1) < 0.05)
            matched += bool(same.any())
    assert total > 0 and matched / total >= 0.98, f"{matched}/{total} detections agree"


@pytest.mark.parametrize(("which", "precision"), [("fp32", "fp32"), ("int8", "int8")])
def test_cpu_infer_folder(models, tmp_path, which, precision):
    conf, iou = 0.1, 0.7
    proc = run_script(DEPLOY / "cpu" / "infer.py", "--model", models[which], "--source", models["val"],
                      "--conf", conf, "--iou", iou, "--out", tmp_path, "--save")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert json.loads(proc.stdout)["frames"] == summary["frames"] == 12
    assert summary["backend"] == "onnxruntime" and summary["precision"] == precision
    assert summary["imgsz"] == [IMGSZ, IMGSZ] and summary["settings"]["conf"] == conf
    assert set(summary["speed_ms"]) == {"preprocess", "inference", "postprocess"} and summary["fps"] > 0
    assert summary["detections_total"] == sum(len(r["detections"]) for r in summary["results"]) > 0
    assert set(summary["per_class"]) <= set(models["names"].values())
    assert sum(summary["per_class"].values()) == summary["detections_total"]
    first = summary["results"][0]["detections"][0]
    assert set(first) == {"box", "score", "class", "name"} and first["name"] == models["names"][first["class"]]
    assert len(list(tmp_path.glob("*.jpg"))) == 12  # --save draws every image
    images = sorted(models["val"].iterdir())
    results = {r["image"]: r["detections"] for r in summary["results"]}
    assert_same_detections(results, reference_detections(models[which], images, conf, iou, 300))


def test_cpu_infer_single_image_and_video(models, tmp_path):
    import cv2

    image = sorted(models["val"].iterdir())[0]
    run_script(DEPLOY / "cpu" / "infer.py", "--model", models["int8"], "--source", image, "--out", tmp_path / "one",
               "--conf", 0.1)
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["results"][0]["image"] == image.name
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for f in sorted(models["val"].iterdir())[:5]:
        writer.write(cv2.resize(cv2.imread(str(f)), (160, 120)))
    writer.release()
    run_script(DEPLOY / "cpu" / "infer.py", "--model", models["fp32"], "--source", video, "--out", tmp_path / "vid",
               "--save", "--limit", 4)
    summary = json.loads((tmp_path / "vid" / "summary.json").read_text())
    assert summary["frames"] == 4 and summary["results"][3]["image"] == "clip_000003"
    assert (tmp_path / "vid" / "annotated.mp4").stat().st_size > 0


def test_cpu_infer_errors(models, tmp_path):
    proc = run_script(DEPLOY / "cpu" / "infer.py", "--model", tmp_path / "no.onnx", "--source", models["val"],
                      check=False)
    assert proc.returncode != 0 and "model not found" in proc.stderr
    proc = run_script(DEPLOY / "cpu" / "infer.py", "--model", models["fp32"], "--source", tmp_path / "none",
                      "--out", tmp_path, check=False)
    assert proc.returncode != 0 and "source not found" in proc.stderr
    proc = run_script(DEPLOY / "cpu" / "infer.py", "--model", models["fp32"], "--source", models["val"], "--conf", 2,
                      "--out", tmp_path, check=False)
    assert proc.returncode != 0 and "--conf 2.0 is outside [0, 1)" in proc.stderr
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx graph")
    proc = run_script(DEPLOY / "cpu" / "infer.py", "--model", corrupt, "--source", models["val"], "--out", tmp_path,
                      check=False)
    assert proc.returncode != 0 and "cannot load" in proc.stderr and "re-export the model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, not ONNX Runtime's multi-line dump


def test_cpu_bench_schema(models, tmp_path):
    out = tmp_path / "bench.json"
    run_script(DEPLOY / "cpu" / "bench.py", "--model", models["fp32"], models["int8"], "--runs", 5, "--warmup", 1,
               "--batch-sizes", 1, 2, "--threads", 1, "--json", out)
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "host", "models", "ratios"}
    assert result["settings"]["device"] == "cpu" and result["settings"]["imgsz"] == IMGSZ
    assert result["settings"]["batch_sizes"] == [1, 2] and result["settings"]["threads"] == 1
    fp32, int8 = result["models"]
    for e, path, precision in ((fp32, models["fp32"], "fp32"), (int8, models["int8"], "int8")):
        assert set(MODEL_KEYS) <= set(e) and e["model"] == str(path) and e["name"] == path.name
        lat = e["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
        assert e["fps"] == pytest.approx(1000 / lat["p50"], rel=1e-3) and e["batch"] == 1
        assert e["by_batch"]["1"]["latency_ms"] == lat
        assert "fixed batch of 1" in e["by_batch"]["2"]["skipped"] and e["notes"]  # Ultralytics ONNX: static batch
        assert e["gflops"] is None and e["precision"] == precision
    # the deployed graph's weights: BN folded into convs, same count in both; INT8 weights take a quarter the bytes
    n_params = sum(p.numel() for p in torch.load(models["root"] / "tiny.pt", weights_only=False)["ema"].fuse().parameters())
    assert fp32["params"] == int8["params"] == n_params
    assert int8["size_mb"] < 0.4 * fp32["size_mb"]
    ratio = result["ratios"][1]
    assert ratio["vs"] == fp32["name"] and ratio["params"] == 1.0 and ratio["size_mb"] < 0.4
    assert ratio["speedup"]["1"] == pytest.approx(fp32["latency_ms"]["p50"] / int8["latency_ms"]["p50"], rel=1e-3)


def test_bench_schema_matches_yolocomp_bench(models, tmp_path):
    """Same keys at every level as `yolocomp bench` on the same models, and the same parameter counts."""
    from yolocomp.eval.bench import bench

    paths = [str(models["fp32"]), str(models["int8"])]
    theirs = bench(paths, imgsz=IMGSZ, batch_sizes=(1,), runs=2, warmup=1, progress=False)
    run_script(DEPLOY / "cpu" / "bench.py", "--model", *paths, "--runs", 2, "--warmup", 1, "--json", tmp_path / "b.json")
    ours = json.loads((tmp_path / "b.json").read_text())
    assert set(ours) == set(theirs)
    assert set(ours["settings"]) == set(theirs["settings"])
    for mine, ref in zip(ours["models"], theirs["models"]):
        assert set(mine) >= set(ref), f"missing {set(ref) - set(mine)}"
        assert set(mine["latency_ms"]) == set(ref["latency_ms"]) and set(mine["by_batch"]) == set(ref["by_batch"])
        assert (mine["name"], mine["params"]) == (ref["name"], ref["params"])
    assert [set(r) for r in ours["ratios"]] == [set(r) for r in theirs["ratios"]]


# ------------------------------------------------------------------------------------------ deploy/jetson (no GPU here)
def test_build_engine_script(models, tmp_path):
    script = DEPLOY / "jetson" / "build_engine.sh"
    help_ = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--precision" in help_.stdout and "--dla" in help_.stdout

    def dry(*args):
        proc = subprocess.run(["bash", str(script), "--dry-run", "--engine", str(tmp_path / "m.engine"), *map(str, args)],
                              capture_output=True, text=True)
        return proc.returncode, proc.stdout + proc.stderr

    rc, out = dry("--onnx", models["int8"], "--trt-version", "10.3.0")
    assert rc == 0 and "--int8 --fp16" in out and "--calib" not in out
    rc, out = dry("--onnx", models["int8"], "--trt-version", "11.0.0", "--timing-cache", tmp_path / "t.cache")
    assert rc == 0 and "--int8" not in out and "--fp16" not in out and "--timingCacheFile=" in out
    rc, out = dry("--onnx", models["fp32"], "--trt-version", "8.6.1", "--dla", 0, "--batch", 4, "--imgsz", 640)
    assert rc == 0 and "--fp16" in out and "--useDLACore=0 --allowGPUFallback" in out
    assert "--maxShapes=images:4x3x640x640" in out
    rc, out = dry("--onnx", models["fp32"], "--trt-version", "11.0.0", "--precision", "int8")
    assert rc == 2 and "INT8 only from Q/DQ ONNX" in out
    rc, out = dry("--onnx", models["fp32"], "--trt-version", "10.3.0", "--precision", "int8")
    assert rc == 2 and "needs --calib CACHE" in out
    rc, out = dry("--onnx", models["int8"], "--trt-version", "10.3.0", "--precision", "fp16")
    assert rc == 2 and "always builds INT8" in out
    rc, out = dry("--onnx", tmp_path / "missing.onnx", "--trt-version", "10.3.0")
    assert rc == 2 and "ONNX not found" in out


@pytest.mark.parametrize("script", ["infer.py", "bench.py"])
def test_jetson_scripts_start_without_tensorrt(script):
    proc = run_script(DEPLOY / "jetson" / script, "--help")
    assert "--model" in proc.stdout


def test_deploy_scripts_do_not_import_yolocomp():
    import ast

    for path in DEPLOY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] in {"yolocomp", "ultralytics"} for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in {"yolocomp", "ultralytics"}, path


SHARED = REPO.parent / "shared"


@pytest.mark.real
def test_cpu_infer_real_yolov8n(tmp_path):
    """The real YOLOv8n at 640 on real COCO images: same boxes as yolocomp.eval's pipeline, and sensible ones."""
    weights, images = SHARED / "weights" / "yolov8n-coco-dq.pt", SHARED / "coco-real" / "images" / "val2017"
    if not weights.is_file() or not images.is_dir():
        pytest.skip(f"needs {weights} and {images}")
    from ultralytics import YOLO

    local = tmp_path / "yolov8n.pt"
    local.write_bytes(weights.read_bytes())  # Ultralytics writes the ONNX beside the weights: keep shared/ untouched
    onnx_path = Path(YOLO(str(local)).export(format="onnx", imgsz=640, simplify=False, verbose=False))
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(images.iterdir())[:6]:
        (folder / f.name).symlink_to(f)
    run_script(DEPLOY / "cpu" / "infer.py", "--model", onnx_path, "--source", folder, "--out", tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["frames"] == 6 and summary["detections_total"] >= 6 and "person" in summary["per_class"]
    results = {r["image"]: r["detections"] for r in summary["results"]}
    assert_same_detections(results, reference_detections(onnx_path, sorted(folder.iterdir()), 0.25, 0.7, imgsz=640))


def test_cpu_infer_on_yolocomp_int8_exports(models, tmp_path):
    """The deploy script runs on yolocomp's own INT8 artifacts (TensorRT-style Q/DQ and the ORT integer flavour) and
    finds the same detections as yolocomp.eval's pipeline on them."""
    from yolocomp.commands.ptq import ptq

    data = models["val"].parents[1] / "data.yaml"
    out = tmp_path / "ptq"
    ptq(models["root"] / "tiny.pt", str(data), str(out), calibrator="minmax", calib_images=8, imgsz=IMGSZ, ort=True,
        eval_images=2)
    images = sorted(models["val"].iterdir())
    for name in ("model_int8.onnx", "model_int8_ort.onnx"):
        onnx_path = out / name
        run_script(DEPLOY / "cpu" / "infer.py", "--model", onnx_path, "--source", models["val"], "--conf", 0.1,
                   "--out", tmp_path / name)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["frames"] == 12 and summary["precision"] == "int8"
        assert summary["detections_total"] > 0
        results = {r["image"]: r["detections"] for r in summary["results"]}
        assert_same_detections(results, reference_detections(onnx_path, images, 0.1, 0.7, 300))
