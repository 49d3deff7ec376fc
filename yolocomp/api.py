"""One function per CLI subcommand. Each takes plain values, does the work and returns a JSON-able report.

The compression methods live in their own packages (prune / distill / quant / export / eval); this module only
resolves recipes and data, calls them, and shapes the summary. A method package that is not built raises
:class:`NotBuiltError`, which the CLI reports plainly with a non-zero exit.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from yolocomp.errors import NotBuiltError, UserError
from yolocomp.recipe import Recipe


def require(module: str, what: str) -> ModuleType:
    """Import a method package or say plainly that it is not built in this version."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            raise NotBuiltError(f"{what} is not built yet in this version of yolocomp ({module} is missing)") from e
        raise


def resolve_data(recipe: Recipe, workdir: Path) -> Path | None:
    """The recipe's data as an absolute-path yaml inside ``workdir`` (generating the synthetic set if asked)."""
    from yolocomp.integration import resolve_data as _resolve

    if recipe.data is None:
        return None
    if recipe.data == "synthetic":
        from yolocomp.demo.synthetic import make_dataset

        s = recipe.synthetic
        return make_dataset(workdir / "data", train=s["train"], val=s["val"], size=s["size"], max_objects=s["max_objects"], seed=s["seed"])
    return _resolve(recipe.data, workdir)


def need_data(recipe: Recipe, command: str) -> None:
    if recipe.data is None:
        raise UserError(f"yolocomp {command} needs a dataset: pass --data path/to/data.yaml (or set data: in the recipe)")


def out_dir(recipe: Recipe, command: str, out: str | None) -> Path:
    """Output folder: --out, else the recipe's, else runs/yolocomp/<command>/<model stem>."""
    path = Path(out or recipe.out or Path("runs") / "yolocomp" / command / Path(recipe.model).stem)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_model(recipe: Recipe, data_yaml: Path | None):  # noqa: ANN201 - returns an Ultralytics DetectionModel
    """Load/build the recipe's model; a yaml model takes its class count from the data when not given."""
    from yolocomp.integration import load_model as _load

    nc = recipe.nc
    if nc is None and data_yaml is not None and str(recipe.model).endswith((".yaml", ".yml")):
        import yaml

        names = yaml.safe_load(Path(data_yaml).read_text())["names"]
        nc = len(names)
    return _load(recipe.model, nc=nc)


# --- measuring ------------------------------------------------------------------------------------------------------
def evaluate(model: str, data: str, imgsz: int = 640, device: str = "cpu", json_out: str | None = None, **settings: Any) -> dict:
    ev = require("yolocomp.eval", "evaluation")
    import tempfile

    from yolocomp.integration import resolve_data as _resolve

    with tempfile.TemporaryDirectory(prefix="yolocomp-eval-") as work:  # the absolute-path data copy is scratch
        data_yaml = _resolve(data, work)
        return ev.evaluate(model, str(data_yaml), imgsz=imgsz, device=device, json_out=json_out, **settings)


def bench(models: list[str], imgsz: int = 640, device: str = "cpu", json_out: str | None = None, **settings: Any) -> dict:
    bench_mod = require("yolocomp.eval.bench", "benchmarking")
    result = bench_mod.bench(models, imgsz=imgsz, device=device, **settings)
    if json_out:
        from yolocomp.report import write_json

        write_json(json_out, result)
    return result


def info(model: str, imgsz: int = 640) -> dict:
    info_mod = require("yolocomp.eval.info", "model info")
    return info_mod.model_info(model, imgsz=imgsz)
