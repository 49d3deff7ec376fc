"""Recipes: one YAML file naming the model, the data, the image size and the stages to run with their settings.

Everything is validated before any work starts; each problem is one line naming the key and the fix. The options of
each stage are defined once, in :mod:`yolocomp.config`. ``--cfg`` also accepts a plain Ultralytics model yaml (a
default recipe is built around it).
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yolocomp.config import STAGE_CONFIGS
from yolocomp.config.options import (
    build,
    check_values,
    gather_trainer_args,
    non_negative,
    option,
    positive,
    problems,
    valid_image_size,
)
from yolocomp.errors import UserError, first_line

#: Stages that produce a new model, in the order `yolocomp run` chains them whatever the order in the file.
#: PTQ is a branch: it quantizes the float model handed to it, and the chain goes on with that float model.
MODEL_STAGES = ("train", "prune", "distill", "ptq", "qat", "export")
BRANCH_STAGES = ("ptq",)
STAGES = STAGE_CONFIGS


@dataclass
class SyntheticConfig:
    """The built-in synthetic shapes data set (``data: synthetic``)."""

    train: int = option(128, "train images", hint="use a number of images such as 128", check=positive)
    val: int = option(32, "val images", hint="use a number of images such as 32", check=positive)
    size: int = option(128, "image size", hint="use an image size such as 128", check=valid_image_size)
    max_objects: int = option(3, "objects per image, at most", hint="use a number such as 3", check=positive)
    seed: int = option(0, "random seed", hint="use a whole number", check=non_negative)


@dataclass
class Recipe:
    model: str = option(None, "Ultralytics model yaml (yolov8n.yaml) or a .pt checkpoint",
                        hint="name an Ultralytics model yaml (yolov8n.yaml) or a .pt checkpoint")
    data: str | None = option(None, "Ultralytics data yaml ('synthetic' = built-in demo set)",
                              hint="give a data yaml path, or 'synthetic' for the built-in demo set")
    imgsz: int = option(640, "image size", hint="use a size such as 640", check=valid_image_size)
    device: str = option("auto", "auto (a CUDA GPU if there is one, else the CPU), cpu, 0 or cuda:0",
                         hint="use auto, cpu, 0 or cuda:0")
    out: str | None = option(None, "output folder", hint="give an output folder")
    nc: int | None = option(None, "class count when building from a yaml", hint="give the class count when building from a yaml",
                            check=positive)
    synthetic: dict = option({}, "the synthetic data set", cli=False,
                             hint="use a mapping such as {train: 128, val: 32, size: 128}")
    stages: dict = option({}, "stage name -> settings", cli=False,
                          hint="use a mapping of stage name to settings, e.g. {prune: {ratio: 0.3}}")
    source: str = field(default="<defaults>", metadata={"internal": True})

    def stage(self, name: str) -> Any:
        """The config of one stage, defaults filled in (also for stages the recipe does not list)."""
        return STAGE_CONFIGS[name](**self.stages.get(name, {}))

    def synthetic_config(self) -> SyntheticConfig:
        return SyntheticConfig(**self.synthetic)

    def to_dict(self) -> dict:
        return {k: deepcopy(getattr(self, k)) for k in TOP}


#: Top-level recipe keys (everything but the internal ``source``).
TOP = tuple(f for f in Recipe.__dataclass_fields__ if not Recipe.__dataclass_fields__[f].metadata.get("internal"))


def validate(raw: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; raise one UserError listing every problem, one line each."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a mapping with at least a 'model' key")
    top = {k: v for k, v in raw.items() if k != "source"}
    errors = check_values(Recipe, top, "", source)
    stages = raw.get("stages") or {}
    if isinstance(stages, dict):
        stages = dict(stages)
        for name, settings in stages.items():
            if name not in STAGE_CONFIGS:
                errors.append(f"{source}: unknown stage stages.{name}; use one of {', '.join(STAGE_CONFIGS)}")
                continue
            if settings is None:
                stages[name] = settings = {}
            if not isinstance(settings, dict):
                errors.append(f"{source}: stages.{name} should be a mapping of settings (or empty)")
                continue
            stages[name] = settings = gather_trainer_args(STAGE_CONFIGS[name], settings)
            found = check_values(STAGE_CONFIGS[name], settings, f"stages.{name}.", source)
            errors += found or problems(STAGE_CONFIGS[name], settings, f"stages.{name}.", source)
    synthetic = raw.get("synthetic") or {}
    if isinstance(synthetic, dict):
        errors += check_values(SyntheticConfig, synthetic, "synthetic.", source)
    if not raw.get("model"):
        errors.append(f"{source}: missing key model; {Recipe.__dataclass_fields__['model'].metadata['hint']}")
    if not errors:
        errors += _check_files(raw, source)
    if errors:
        raise UserError("\n".join(errors))
    return Recipe(
        model=raw["model"],
        data=raw.get("data"),
        imgsz=raw.get("imgsz", 640),
        device=str(raw.get("device", "auto")),
        out=raw.get("out"),
        nc=raw.get("nc"),
        synthetic=dict(synthetic),
        stages=stages if isinstance(stages, dict) else {},
        source=source,
    )


def stage_config(name: str, values: dict, source: str = "arguments") -> Any:
    """A stage's config from keyword arguments (the API), validated like a recipe's ``stages.<name>``."""
    return build(STAGE_CONFIGS[name], values, f"stages.{name}.", source)


def _is_asset_name(value: str) -> bool:
    """A bare Ultralytics asset name (yolov8n.pt, coco.yaml) that Ultralytics resolves or downloads when online."""
    return "/" not in value and "\\" not in value


def _check_files(raw: dict, source: str) -> list[str]:
    errors = []
    model = str(raw["model"])
    if model.endswith((".pt", ".yaml", ".yml")) and not _is_asset_name(model) and not Path(model).exists():
        errors.append(f"{source}: model = {model} not found; give an existing .pt or a model yaml such as yolov8n.yaml")
    data = raw.get("data")
    if data and data != "synthetic" and not _is_asset_name(str(data)) and not Path(str(data)).exists():
        errors.append(f"{source}: data = {data} not found; give an existing data yaml or 'synthetic'")
    for stage in ("distill", "qat"):
        teacher = ((raw.get("stages") or {}).get(stage) or {}).get("teacher")
        if teacher and teacher != "self" and not _is_asset_name(str(teacher)) and not Path(str(teacher)).exists():
            errors.append(f"{source}: stages.{stage}.teacher = {teacher} not found; give an existing .pt")
    return errors


def default_weights(model_yaml: str) -> str | None:
    """The pretrained weights Ultralytics publishes for a model yaml it ships (yolov8n.yaml -> yolov8n.pt,
    yolov5s.yaml -> yolov5su.pt, the anchor-free 'u' build of YOLOv3/v5), or None when it ships no such yaml."""
    import re

    name = Path(model_yaml).name
    if Path(name).suffix not in {".yaml", ".yml"}:
        return None
    from ultralytics.utils.checks import check_yaml

    unified = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", Path(name).stem) + ".yaml"  # yolov8n -> yolov8 (scale n)
    try:
        check_yaml(unified, hard=True)
    except Exception:  # Ultralytics raises FileNotFoundError and others for unknown names
        return None
    stem = Path(name).stem
    return f"{stem}u.pt" if re.match(r"yolov[35]", stem) and not stem.endswith("u") else f"{stem}.pt"


def is_model_yaml(raw: Any) -> bool:
    """A plain Ultralytics model yaml (has backbone/head) rather than a recipe."""
    return isinstance(raw, dict) and "backbone" in raw and "head" in raw


def load(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Load a recipe file (or a plain Ultralytics model yaml) and apply ``overrides`` (CLI flags) before validating.

    ``overrides`` keys are top-level keys or ``stage.key`` pairs, e.g. ``{"data": "my.yaml", "prune.ratio": 0.4}``;
    ``None`` values are ignored (flags not given).
    """
    path = Path(path)
    if not path.exists():
        weights = default_weights(str(path)) if _is_asset_name(str(path)) else None
        if weights is None:
            raise UserError(f"recipe not found: {path} (give a recipe such as configs/yolov8n.yaml, or an Ultralytics "
                            "model name such as yolov8n.yaml)")
        # an Ultralytics model name: a default recipe around that family's pretrained weights
        return validate(apply_overrides({"model": weights, "data": None, "stages": {}}, overrides or {}), source=str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {first_line(e)}") from e
    if is_model_yaml(raw):
        raw = {"model": str(path), "data": None, "stages": {}}
    return validate(apply_overrides(raw or {}, overrides or {}), source=str(path))


def apply_overrides(raw: dict, overrides: dict) -> dict:
    raw = deepcopy(raw)
    for key, value in overrides.items():
        if value is None:
            continue
        if "." in key:
            stage, name = key.split(".", 1)
            stages = raw.setdefault("stages", {}) or {}
            raw["stages"] = stages
            settings = stages.get(stage) or {}
            stages[stage] = settings
            if stage == "prune" and name == "flops_reduction":
                settings.pop("ratio", None)  # the flag replaces the recipe's ratio target
            if stage == "prune" and name == "ratio":
                settings.pop("flops_reduction", None)
            settings[name] = value
        else:
            raw[key] = value
    return raw


def from_model(model: str, **top: Any) -> Recipe:
    """A default recipe around a model path (for ``--model`` without ``--cfg``)."""
    return validate({"model": model, **{k: v for k, v in top.items() if v is not None}}, source="--model")
