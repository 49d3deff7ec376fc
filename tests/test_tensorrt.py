"""TensorRT export without TensorRT: argument checks, version rules, the import error, calibration cache, metadata."""

from __future__ import annotations

import struct
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from yolocomp.errors import UserError
from yolocomp.eval.runners.tensorrt import TensorRTRunner, cuda_index
from yolocomp.export import tensorrt as trtx
from yolocomp.export.calibration import (
    CalibrationCache,
    calibration_batches,
    check_cache_version,
    find_calibration_images,
    read_calibration_cache,
    trt_version_code,
    write_calibration_cache,
)
from yolocomp.export.tensorrt import rules as trt_rules

NAMES = {0: "square", 1: "circle", 2: "triangle"}


def make_onnx(path, qdq=False, shape=(1, 3, 128, 128), fp16=False, names=NAMES):
    """A one-conv graph with Ultralytics-style metadata; with ``qdq`` the conv's input and weight go through Q/DQ."""
    dtype = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    w = numpy_helper.from_array(np.ones((7, 3, 1, 1), np.float16 if fp16 else np.float32), "w")
    inits, nodes, conv_in, conv_w = [w], [], "images", "w"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.02, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
                  helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
                  helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wdq"])]
        conv_in, conv_w = "dq", "wdq"
    nodes.append(helper.make_node("Conv", [conv_in, conv_w], ["c"]))
    nodes.append(helper.make_node("Flatten", ["c"], ["output0"], axis=2))
    dims = [d if d is not None else "dyn" + str(i) for i, d in enumerate(shape)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", dtype, dims)],
                              [helper.make_tensor_value_info("output0", dtype, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {"stride": "32", "task": "detect", "names": str(names), "imgsz": str(list(shape[2:]))}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_pair(tmp_path):
    return make_onnx(tmp_path / "float.onnx"), make_onnx(tmp_path / "qdq.onnx", qdq=True)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even on a machine that has it, and report no installed version."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_rules, "installed_tensorrt_version", lambda: None)


def images_dir(tmp_path, n=4, size=(96, 128)):
    import cv2

    d = tmp_path / "calib"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(d / f"{i}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    return d


# ------------------------------------------------------------------------------------------ the import check
def test_missing_tensorrt_gives_install_hint(no_tensorrt, onnx_pair, tmp_path):
    with pytest.raises(UserError) as e:
        trtx.import_tensorrt()
    assert str(e.value) == "TensorRT is not installed: pip install 'yolocomp[tensorrt]' on a machine with an NVIDIA GPU"
    with pytest.raises(UserError, match="TensorRT is not installed"):
        TensorRTRunner(tmp_path / "m.engine")
    with pytest.raises(UserError, match="TensorRT is not installed"):
        trtx.build_engine(onnx_pair[0], tmp_path / "m.engine")
    # valid arguments: every check passes, then the import check is what stops the build
    with pytest.raises(UserError, match="TensorRT is not installed"):
        trtx.export_engine(onnx_pair[1], tmp_path, precision="int8")
    with pytest.raises(UserError, match="TensorRT is not installed"):
        trtx.export_engine(onnx_pair[0], tmp_path / "f.engine", precision="fp16", trt_version="10.3.0")
    assert not list(tmp_path.glob("*.engine*")), "nothing may be written when the build cannot run"


# ------------------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize(
    ("which", "kwargs", "message"),
    [
        ("float", {"precision": "int4"}, "not one of auto, fp32, fp16, int8"),
        ("qdq", {"precision": "fp16"}, "is quantized .Q/DQ nodes. and always builds INT8"),
        ("qdq", {"precision": "fp32"}, "always builds INT8"),
        ("float", {"precision": "int8", "trt_version": "11.0.0"}, "builds INT8 only from Q/DQ ONNX.*yolocomp ptq"),
        ("float", {"precision": "fp16", "trt_version": "11.1.0"}, "no FP16 builder flag.*modelopt"),
        ("float", {"precision": "int8", "trt_version": "10.3.0"}, "needs calibration images"),
        ("float", {"precision": "fp32", "dla_core": 0}, "DLA runs only FP16 or INT8"),
        ("qdq", {"dla_core": 0, "trt_version": "11.0.0"}, "does not support DLA"),
        ("qdq", {"dla_core": -1}, "DLA core -1 must be 0 or 1"),
        ("float", {"imgsz": 640}, "was exported at imgsz 128, not 640"),
        ("float", {"batch": 4}, "static batch of 1"),
        ("float", {"batch": 0}, "batch 0 must be >= 1"),
        ("float", {"workspace_gb": 0}, "workspace 0 GB must be > 0"),
        ("qdq", {"calibration_data": "calib"}, "calibration data is only used for INT8 from a float ONNX"),
        ("float", {"precision": "int8", "calibration_data": "missing"}, "calibration data not found"),
        ("float", {"calibration_cache": "c.cache"}, "calibration cache is only used for INT8 from a float ONNX"),
    ],
)
def test_export_engine_rejects_bad_requests(no_tensorrt, onnx_pair, tmp_path, which, kwargs, message):
    model = onnx_pair[0] if which == "float" else onnx_pair[1]
    kwargs = dict(kwargs)
    if kwargs.get("calibration_data") == "calib":
        kwargs["calibration_data"] = images_dir(tmp_path)
    elif kwargs.get("calibration_data") == "missing":
        kwargs["calibration_data"] = tmp_path / "nope"
    with pytest.raises(UserError, match=message):
        trtx.export_engine(model, tmp_path / "out.engine", **kwargs)
    assert not (tmp_path / "out.engine").exists()


def test_export_engine_rejects_bad_files(no_tensorrt, onnx_pair, tmp_path):
    with pytest.raises(UserError, match="is not an ONNX file; export it first"):
        trtx.export_engine(tmp_path / "model.pt", tmp_path)
    with pytest.raises(UserError, match="ONNX model not found"):
        trtx.export_engine(tmp_path / "missing.onnx", tmp_path)
    (tmp_path / "broken.onnx").write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(UserError, match="cannot read ONNX model .*broken.onnx"):
        trtx.export_engine(tmp_path / "broken.onnx", tmp_path)
    existing = tmp_path / "float.engine"
    existing.write_bytes(b"user's engine")
    with pytest.raises(UserError, match="already exists"):
        trtx.export_engine(onnx_pair[0], tmp_path)  # a folder: <stem>.engine inside it, which exists
    assert existing.read_bytes() == b"user's engine"
    with pytest.raises(UserError, match=r"should end in \.engine"):
        trtx.plan_build(onnx_pair[0], tmp_path / "x.trt")
    make_onnx(tmp_path / "dyn.onnx", shape=(None, 3, None, None))
    with pytest.raises(UserError, match="dynamic input size; give imgsz"):
        trtx.plan_build(tmp_path / "dyn.onnx", tmp_path / "d.engine", imgsz=None)
    with pytest.raises(UserError, match="multiple of the model stride 32"):
        trtx.plan_build(tmp_path / "dyn.onnx", tmp_path / "d.engine", imgsz=100)


def test_calibration_cache_checks(no_tensorrt, onnx_pair, tmp_path):
    cache = write_calibration_cache(tmp_path / "c.cache", CalibrationCache(8601, scales={"images": 0.0078}))
    with pytest.raises(UserError, match="written by TensorRT code 8601, this is TensorRT 10.3.0"):
        trtx.export_engine(onnx_pair[0], tmp_path, precision="int8", calibration_cache=cache, trt_version="10.3.0")
    (tmp_path / "bad.cache").write_text("images: 3c010a14\n")
    with pytest.raises(UserError, match="is not a TensorRT calibration cache"):
        trtx.export_engine(onnx_pair[0], tmp_path, precision="int8", calibration_cache=tmp_path / "bad.cache")
    # a cache of the right version replaces calibration images: validation passes, the import check stops it
    with pytest.raises(UserError, match="TensorRT is not installed"):
        trtx.export_engine(onnx_pair[0], tmp_path, precision="int8", calibration_cache=cache, trt_version="8.6.1")


# ------------------------------------------------------------------------------------------ version rules
@pytest.mark.parametrize(
    ("which", "precision", "version", "resolved", "mode"),
    [
        ("float", "auto", "8.6.1", "fp16", "fp16-flag"),
        ("float", "auto", "10.3.0", "fp16", "fp16-flag"),
        ("float", "auto", "11.0.0", "fp32", "fp32"),
        ("float", "fp32", "10.3.0", "fp32", "fp32"),
        ("float16", "fp16", "11.0.0", "fp16", "typed"),
        ("qdq", "auto", "8.6.1", "int8", "explicit-qdq"),
        ("qdq", "int8", "10.3.0", "int8", "explicit-qdq"),
        ("qdq", "auto", "11.0.0", "int8", "explicit-qdq"),
        ("float", "int8", "10.3.0", "int8", "implicit-int8"),
    ],
)
def test_plan_resolves_precision_per_tensorrt_version(tmp_path, which, precision, version, resolved, mode):
    model = make_onnx(tmp_path / "m.onnx", qdq=which == "qdq", fp16=which == "float16")
    images = sorted(images_dir(tmp_path).iterdir()) if mode == "implicit-int8" else None
    plan = trtx.plan_build(model, tmp_path / "m.engine", precision, calibration_images=images, imgsz=128,
                           trt_version=version)
    assert (plan.precision, plan.mode) == (resolved, mode)
    assert plan.imgsz == 128 and plan.batch == 1
    assert len(plan.calibration_images) == (4 if images else 0)


def test_dynamic_onnx_takes_batch_and_imgsz(tmp_path):
    make_onnx(tmp_path / "dyn.onnx", shape=(None, 3, None, None))
    plan = trtx.plan_build(tmp_path / "dyn.onnx", tmp_path / "d.engine", "fp16", imgsz=320, batch=8, dla_core=1,
                           trt_version="10.3.0")
    assert (plan.imgsz, plan.batch, plan.dla_core, plan.mode) == (320, 8, 1, "fp16-flag")


def test_cuda_index():
    assert [cuda_index(d) for d in (0, 1, "0", "cuda", "cuda:2", None)] == [0, 1, 0, 0, 2, 0]
    with pytest.raises(UserError, match="run on an NVIDIA GPU"):
        cuda_index("cpu")


# ------------------------------------------------------------------------------------------ calibration cache format
def test_trt_version_code():
    assert trt_version_code("7.1.3") == 7103
    assert trt_version_code("8.6.1.6") == 8601
    assert trt_version_code("10.3.0") == 100300
    assert trt_version_code("10.14.1") == 101401


def test_calibration_cache_round_trip(tmp_path):
    scales = {"images": 1 / 127, "/model.0/conv/Conv_output_0": 0.0421, "/model.22/Concat_3:0": 3.5e-3, "zero": 0.0}
    path = write_calibration_cache(tmp_path / "calib.cache", CalibrationCache(trt_version_code("8.6.1"), scales=scales))
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    # TensorRT's text: the float32's bits as hex, big-endian order of digits, unpadded ("0" for zero)
    assert lines[1] == "images: " + struct.pack(">f", 1 / 127).hex().lstrip("0")
    assert lines[-1] == "zero: 0"
    back = read_calibration_cache(path)
    assert back.version == 8601 and back.algorithm == "EntropyCalibration2"
    assert list(back.scales) == list(scales)
    assert back.scales == {k: float(np.float32(v)) for k, v in scales.items()}
    assert back.to_bytes() == path.read_bytes()


def test_calibration_cache_reads_tensorrt_text():
    text = b"TRT-100300-EntropyCalibration2\nimages: 3c010204\n/model.22/dfl/Softmax_output_0: 3c010a14\nx: 0\n"
    cache = CalibrationCache.from_bytes(text)
    assert cache.version == 100300
    assert cache.scales["images"] == pytest.approx(1 / 127, rel=1e-6)
    assert cache.scales["/model.22/dfl/Softmax_output_0"] == pytest.approx(1.0081200599670410 / 128, rel=1e-7)  # 0x3c010a14: 2^-7 * (1 + 0x010a14 / 2^23)
    assert cache.scales["x"] == 0.0
    check_cache_version(cache, "10.3.0")
    with pytest.raises(UserError, match="delete the cache"):
        check_cache_version(cache, "10.4.0")
    with pytest.raises(UserError, match="bad line 'images 3c010204'"):
        CalibrationCache.from_bytes(b"TRT-8601-EntropyCalibration2\nimages 3c010204\n")
    with pytest.raises(UserError, match="not found"):
        read_calibration_cache("/nonexistent/calib.cache")


def test_calibration_images_and_batches(tmp_path):
    from yolocomp.demo.synthetic import make_dataset
    from yolocomp.eval.preprocess import letterbox, read_image

    data = make_dataset(tmp_path / "data", train=5, val=2, size=96)
    images = find_calibration_images(data, limit=4)  # a data yaml calibrates on its train split
    assert len(images) == 4 and all("/images/train/" in str(p) for p in images)
    assert find_calibration_images(tmp_path / "data" / "images", limit=None) == sorted(
        (tmp_path / "data" / "images").rglob("*.png"))
    batches = list(calibration_batches(images + images[:1], imgsz=128, batch=2))
    assert len(batches) == 2  # 5 images, batch 2: the incomplete last batch is dropped
    assert batches[0].shape == (2, 3, 128, 128) and batches[0].dtype == np.float32
    np.testing.assert_array_equal(batches[1][1], letterbox(read_image(images[3]), 128)[0])
    with pytest.raises(UserError, match="no images"):
        find_calibration_images((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(UserError, match="calibration image not found"):
        find_calibration_images([tmp_path / "x.png"])


# ------------------------------------------------------------------------------------------ metadata
def test_engine_metadata_round_trip(tmp_path):
    model = make_onnx(tmp_path / "m.onnx", qdq=True)
    plan = trtx.plan_build(model, tmp_path / "m.engine", "auto", imgsz=128, trt_version="10.3.0")
    meta = trtx.engine_metadata(plan, "10.3.0", extra={"params": 3011433})
    path = trtx.write_engine_metadata(tmp_path / "m.engine", meta)
    assert path == tmp_path / "m.engine.json" == trtx.metadata_path(tmp_path / "m.engine")
    back = trtx.read_engine_metadata(tmp_path / "m.engine")
    assert back["names"] == NAMES  # int keys again after JSON
    assert back["imgsz"] == [128, 128] and back["stride"] == 32 and back["batch"] == 1
    assert (back["precision"], back["build_mode"], back["tensorrt"]) == ("int8", "explicit-qdq", "10.3.0")
    assert back["source_onnx"] == str(model.resolve()) and back["params"] == 3011433
    from yolocomp import __version__

    assert back["yolocomp"] == __version__
    plain = trtx.engine_metadata(plan, "10.3.0")
    assert plain["params"] == 7 * 3 and plain["gflops"] == pytest.approx(2 * 21 * 128 * 128 / 1e9, abs=1e-4)
    with pytest.raises(UserError, match="engine metadata not found"):
        trtx.read_engine_metadata(tmp_path / "other.engine")
    (tmp_path / "bad.engine.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        trtx.read_engine_metadata(tmp_path / "bad.engine")


# ------------------------------------------------------------------------------------------ build control flow
class RecordingTensorRT:
    """The part of TensorRT's Python API that the builder uses, as documented for the given major version; it records
    calls. Names that TensorRT 11 removed (BuilderFlag.FP16/INT8, int8_calibrator) are absent for 11, so touching them
    fails here as it would there. It proves the control flow per version, not TensorRT's own behaviour."""

    def __init__(self, version, dla_cores=0, parse_ok=True, input_shape=(1, 3, 128, 128)):
        self.__version__, self.calls = version, []
        major = int(version.split(".")[0])
        rec = self

        def ns(**kw):
            return type("NS", (), kw)

        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level: None})
        self.MemoryPoolType = ns(WORKSPACE="WORKSPACE")
        self.DeviceType = ns(DLA="DLA", GPU="GPU")
        self.NetworkDefinitionCreationFlag = ns(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
        flags = {"GPU_FALLBACK": "GPU_FALLBACK"} | ({} if major >= 11 else {"FP16": "FP16", "INT8": "INT8"})
        self.BuilderFlag = ns(**flags)

        class Config:
            def __setattr__(self, name, value):
                if name == "int8_calibrator" and major >= 11:
                    raise AttributeError("int8_calibrator was removed in TensorRT 11")
                rec.calls.append(("config." + name, value))
                object.__setattr__(self, name, value)

            def set_memory_pool_limit(self, pool, size):
                rec.calls.append(("workspace", pool, size))

            def set_flag(self, flag):
                rec.calls.append(("flag", flag))

            def create_timing_cache(self, data):
                rec.calls.append(("timing_cache_in", bytes(data)))
                return "cache"

            def set_timing_cache(self, cache, ignore_mismatch):
                rec.calls.append(("set_timing_cache", cache, ignore_mismatch))

            def get_timing_cache(self):
                return ns(serialize=lambda s: b"timing-v2")()

            def add_optimization_profile(self, profile):
                rec.calls.append(("profile", profile.shapes))

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                self.shapes = (name, lo, opt, hi)

        class Builder:
            num_DLA_cores = dla_cores

            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.calls.append(("create_network", flags))
                return ns(get_input=lambda s, i: ns(name="images", shape=input_shape)())()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"ENGINE" + version.encode()

        class OnnxParser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                rec.calls.append(("parse", path))
                return parse_ok

            def get_error(self, i):
                return "In node 3 (Conv): unsupported"

        self.Builder, self.OnnxParser = Builder, OnnxParser

    def flags(self):
        return [c[1] for c in self.calls if c[0] == "flag"]


def fake_trt(monkeypatch, version, **kwargs):
    trt = RecordingTensorRT(version, **kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(trt_rules, "installed_tensorrt_version", lambda: version)
    return trt


@pytest.mark.parametrize(
    ("version", "which", "precision", "flags", "network_flags"),
    [
        ("8.6.1", "float", "fp16", ["FP16"], 1),  # explicit-batch flag before TensorRT 10
        ("10.3.0", "float", "auto", ["FP16"], 0),
        ("10.3.0", "qdq", "auto", ["FP16", "INT8"], 0),
        ("10.3.0", "float", "fp32", [], 0),
        ("11.0.0", "qdq", "int8", [], 0),  # strongly typed: the Q/DQ graph alone decides
        ("11.0.0", "float", "auto", [], 0),
    ],
)
def test_build_sets_flags_per_version(monkeypatch, onnx_pair, tmp_path, version, which, precision, flags, network_flags):
    trt = fake_trt(monkeypatch, version)
    model = onnx_pair[0] if which == "float" else onnx_pair[1]
    summary = trtx.export_engine(model, tmp_path / "out", precision=precision, timing_cache=tmp_path / "t.cache",
                                 workspace_gb=2)
    engine = tmp_path / "out" / f"{model.stem}.engine"
    assert summary["engine"] == str(engine) and engine.read_bytes() == b"ENGINE" + version.encode()
    assert trt.flags() == flags
    assert ("create_network", network_flags) in trt.calls and ("workspace", "WORKSPACE", 2 << 30) in trt.calls
    assert ("timing_cache_in", b"") in trt.calls and (tmp_path / "t.cache").read_bytes() == b"timing-v2"
    meta = trtx.read_engine_metadata(engine)
    assert meta["tensorrt"] == version and meta["precision"] == summary["precision"] and meta["names"] == NAMES
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_build_dla_dynamic_and_errors(monkeypatch, onnx_pair, tmp_path):
    make_onnx(tmp_path / "dyn.onnx", qdq=True, shape=(None, 3, None, None))
    trt = fake_trt(monkeypatch, "10.3.0", dla_cores=2, input_shape=(-1, 3, -1, -1))
    trtx.build_engine(tmp_path / "dyn.onnx", tmp_path / "d.engine", imgsz=256, batch=4, dla_core=1)
    assert ("config.default_device_type", "DLA") in trt.calls and ("config.DLA_core", 1) in trt.calls
    assert "GPU_FALLBACK" in trt.flags()
    assert ("profile", ("images", (1, 3, 256, 256), (4, 3, 256, 256), (4, 3, 256, 256))) in trt.calls
    assert trtx.read_engine_metadata(tmp_path / "d.engine")["batch"] == 4

    fake_trt(monkeypatch, "10.3.0", dla_cores=0)
    with pytest.raises(UserError, match="no DLA cores"):
        trtx.build_engine(onnx_pair[1], tmp_path / "x.engine", dla_core=0)
    fake_trt(monkeypatch, "10.3.0", parse_ok=False)
    with pytest.raises(UserError, match="cannot parse float.onnx: In node 3"):
        trtx.build_engine(onnx_pair[0], tmp_path / "y.engine")
    fake_trt(monkeypatch, "11.0.0")  # version rules are checked again against the TensorRT actually imported
    with pytest.raises(UserError, match="INT8 only from Q/DQ"):
        trtx.build_engine(onnx_pair[0], tmp_path / "z.engine", precision="int8", calibration_images=[onnx_pair[0]])
    assert not list(tmp_path.glob("[xyz].engine*"))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on machines without CUDA")
def test_implicit_int8_needs_cuda_for_calibration(monkeypatch, onnx_pair, tmp_path):
    fake_trt(monkeypatch, "10.3.0")
    with pytest.raises(UserError, match="INT8 calibration needs a CUDA build of torch"):
        trtx.export_engine(onnx_pair[0], tmp_path, precision="int8", calibration_data=images_dir(tmp_path),
                           calibration_cache=tmp_path / "new.cache")
    assert not (tmp_path / "float.engine").exists() and not (tmp_path / "new.cache").exists()
