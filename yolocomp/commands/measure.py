"""``yolocomp eval``, ``yolocomp bench`` and ``yolocomp info``: measuring a model file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from yolocomp.config import BenchConfig, EvalConfig
from yolocomp.config.options import settings
from yolocomp.errors import UserError
from yolocomp.recipe import stage_config


def export_imgsz(model: Any, default: int = 640) -> int:
    """The input size an exported model was built for (its ONNX metadata, engine JSON or OpenVINO metadata.yaml),
    else ``default``."""
    import ast

    path = Path(str(model))
    try:
        if path.suffix == ".onnx" and path.exists():
            from yolocomp.export.onnx_metadata import read_metadata

            size = ast.literal_eval(read_metadata(path).get("imgsz", "None"))
        elif path.suffix == ".engine" and path.exists():
            from yolocomp.eval.runners.engine_metadata import read_engine_metadata

            size = read_engine_metadata(path).get("imgsz")
        elif (path.suffix == ".xml" and path.exists()) or path.is_dir():
            from yolocomp.eval.runners.openvino import read_openvino_metadata

            size = read_openvino_metadata(path).get("imgsz")
        else:
            size = None
    except (ValueError, SyntaxError, UserError, OSError):  # unreadable metadata: the caller's default
        size = None
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return int(size) if isinstance(size, int) else default


def evaluate(model: str, data: str, imgsz: int = 640, device: str = "cpu", json_out: str | None = None,
             config: EvalConfig | None = None, **options: Any) -> dict:
    """COCO AP of ``model`` on ``data``'s val split; ``options`` are :class:`~yolocomp.config.EvalConfig`'s.
    Messages and the JSON name the user's data yaml, not the scratch absolute-path copy evaluation reads."""
    from yolocomp.eval import evaluate as coco_eval
    from yolocomp.integration import resolve_data
    from yolocomp.report import write_json

    cfg = config or stage_config("eval", options)
    with tempfile.TemporaryDirectory(prefix="yolocomp-eval-") as work:  # the absolute-path data copy is scratch
        data_yaml = resolve_data(data, work)
        try:
            result = coco_eval(model, str(data_yaml), imgsz=imgsz, device=device, **settings(cfg))
        except UserError as e:
            raise UserError(str(e).replace(str(data_yaml), str(data))) from None
    result["data"] = str(data)
    if json_out:
        write_json(json_out, result)
    return result


def bench(models: list[str], imgsz: int = 640, device: str = "cpu", json_out: str | None = None,
          config: BenchConfig | None = None, **options: Any) -> dict:
    """Latency of ``models``, timed interleaved in one process; ``options`` are :class:`~yolocomp.config.BenchConfig`'s."""
    from yolocomp.eval.bench import bench as time_models

    cfg = config or stage_config("bench", options)
    values = settings(cfg)
    values.pop("openvino")  # which runtimes `yolocomp run` measures, not a timing setting
    values["batch_sizes"] = tuple(values["batch_sizes"])
    result = time_models(models, imgsz=imgsz, device=device, **values)
    if json_out:
        from yolocomp.report import write_json

        write_json(json_out, result)
    return result


def info(model: str, imgsz: int = 640) -> dict:
    from yolocomp.eval.info import model_info

    return model_info(model, imgsz=imgsz)


def bench_rows(result: dict) -> list[dict]:
    """One table row per model and batch size of a bench result."""
    rows = []
    for model, ratio in zip(result["models"], result["ratios"]):
        for bs, t in model["by_batch"].items():
            if "latency_ms" not in t:
                continue
            lat = t["latency_ms"]
            rows.append({"model": model["name"], "backend": model["backend"], "batch": int(bs),
                         "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"], "fps": t["fps"],
                         "speedup": ratio["speedup"].get(bs), "params": model["params"], "gflops": model["gflops"],
                         "size_mb": model["size_mb"]})
    return rows
