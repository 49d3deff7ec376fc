"""What every command shares: the stage result record, output folders, the recipe's data and model."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yolocomp.errors import UserError
from yolocomp.recipe import Recipe


@dataclass
class StageResult:
    stage: str
    next_model: str  #: what the following stage consumes
    artifacts: dict[str, str] = field(default_factory=dict)  #: label -> path of every model to evaluate
    report: dict = field(default_factory=dict)


def out_dir(recipe: Recipe, command: str, out: str | None) -> Path:
    """Output folder: --out, else the recipe's, else runs/yolocomp/<command>/<model stem>."""
    path = Path(out or recipe.out or Path("runs") / "yolocomp" / command / Path(recipe.model).stem)
    path.mkdir(parents=True, exist_ok=True)
    return path


def recipe_data(recipe: Recipe, workdir: Path) -> Path | None:
    """The recipe's data as an absolute-path yaml inside ``workdir`` (generating the synthetic set if asked)."""
    from yolocomp.integration import resolve_data

    if recipe.data is None:
        return None
    if recipe.data == "synthetic":
        from yolocomp.demo.synthetic import make_dataset

        s = recipe.synthetic_config()
        return make_dataset(workdir / "data", train=s.train, val=s.val, size=s.size, max_objects=s.max_objects, seed=s.seed)
    return resolve_data(recipe.data, workdir)


def require_data(data: Path | None, what: str) -> Path:
    if data is None:
        raise UserError(f"{what} needs data: pass --data path/to/data.yaml (or set data: in the recipe)")
    return data


def with_model(recipe: Recipe, model: str) -> Recipe:
    return replace(recipe, model=model)


def load_recipe_model(recipe: Recipe, data_yaml: Path | None):  # noqa: ANN201 - returns an Ultralytics DetectionModel
    """Load/build the recipe's model; a yaml model takes its class count from the data when not given."""
    from yolocomp.integration import load_model

    nc = recipe.nc
    if nc is None and data_yaml is not None and str(recipe.model).endswith((".yaml", ".yml")):
        nc = data_classes(data_yaml)
    return load_model(recipe.model, nc=nc)


def data_classes(data_yaml: str | Path) -> int:
    import yaml

    names = yaml.safe_load(Path(data_yaml).read_text()).get("names")
    return len(names) if names is not None else 0


def model_name(model: Any) -> str:
    """How a report names its input model: the path, or the checkpoint an in-memory model came from."""
    if isinstance(model, (str, Path)):
        return str(model)
    return str(getattr(model, "pt_path", None) or "<in-memory model>")


def size_mb(path: str | Path) -> float | None:
    p = Path(path)
    return round(p.stat().st_size / 1e6, 3) if p.exists() else None
