"""Recipes: one YAML file naming the model, the data, the image size and the stages to run with their settings.

Everything is validated before any work starts; each problem is one line naming the key and the fix. ``--cfg`` also
accepts a plain Ultralytics model yaml (a default recipe is built around it).
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from yolocomp.errors import UserError, first_line

# A field spec: (accepted python types, default, check returning an error fragment or None, hint for the fix).
Check = Callable[[Any], "str | None"]


def _ratio(v: Any) -> str | None:
    return None if 0 < v < 1 else f"{v} is outside (0, 1)"


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"{v} must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"{v} must be >= 0"


def _bits(v: Any) -> str | None:
    return None if v in (4, 8) else f"{v} is not 4 or 8"


def _imgsz(v: Any) -> str | None:
    return None if v >= 32 and v % 32 == 0 else f"{v} must be a multiple of 32 and >= 32"


def _fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else f"{v} is outside (0, 1]"


def _one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"'{v}' is not one of {', '.join(choices)}"

    return check


NUM = (int, float)
OPT_STR = (str, type(None))

#: Settings shared by every training stage.
_TRAIN = {
    "epochs": (int, 1, _non_negative, "use a whole number of epochs such as 3"),
    "batch": (int, 16, _positive, "use a batch size such as 16"),
    "fraction": (NUM, 1.0, _fraction, "use a share of the train set such as 0.25"),
    "lr0": (NUM, None, _positive, "use a learning rate such as 0.001"),
    "workers": (int, 0, _non_negative, "use a worker count such as 2"),
    "optimizer": (str, None, None, "use an Ultralytics optimizer name such as SGD"),  # unset: the stage decides
}

STAGES: dict[str, dict[str, tuple]] = {
    "train": {**_TRAIN, "epochs": (int, 10, _positive, "use a whole number of epochs such as 10")},
    "prune": {
        "method": (str, "bn", _one_of("bn", "cap", "l1", "random"), "use bn, cap, l1 or random"),
        "ratio": (NUM, 0.3, _ratio, "use a share of channels such as 0.3"),
        "flops_reduction": (NUM, None, _ratio, "use a share of GFLOPs such as 0.35"),
        "sparsity_epochs": (int, 0, _non_negative, "use 0 to skip sparsity training"),
        "finetune_epochs": (int, 0, _non_negative, "use 0 to skip fine-tuning"),
        "s": (NUM, 1e-4, _positive, "use a sparsity strength such as 1e-4"),
        "s_schedule": (str, "constant", _one_of("constant", "linear_decay"), "use constant or linear_decay"),
        "min_channels": (int, 8, _positive, "use a channel floor such as 8"),
        "round_to": (int, 8, _positive, "use a channel multiple such as 8"),
        "ignore": (list, [], None, "use a list of layer indices such as [9, 10]"),
        **{k: v for k, v in _TRAIN.items() if k != "epochs"},
    },
    "distill": {
        "teacher": (OPT_STR, None, None, "give a teacher checkpoint path (null = the previous stage's input model)"),
        "method": (str, "fgd", _one_of("fgd", "fgfi", "logit"), "use fgd, fgfi or logit"),
        "layers": ((list, type(None)), None, None, "use a list of layer indices such as [15, 18, 21]"),
        **_TRAIN,
    },
    "qat": {
        "bits": (int, 8, _bits, "use 8 or 4"),
        "export": (bool, True, None, "use true or false"),
        "exclude": (list, [], None, "use a list of layer names or indices"),
        **_TRAIN,
    },
    "ptq": {
        "calibrator": (str, "percentile", _one_of("minmax", "percentile", "entropy", "mse"), "use minmax, percentile, entropy or mse"),
        "images": (int, 256, _positive, "use a number of calibration images such as 256"),
        "bits": (int, 8, _bits, "use 8 or 4"),
        "sensitivity": (bool, False, None, "use true or false"),
        "ort": (bool, False, None, "use true to also write the ONNX Runtime integer flavour (fast on CPU, not for TensorRT)"),
    },
    "export": {
        "format": (str, "onnx", _one_of("onnx", "engine"), "use onnx or engine"),
        "check": (bool, False, None, "use true to lint Q/DQ placement for TensorRT"),
        "precision": (str, "auto", _one_of("auto", "fp32", "fp16", "int8"), "use auto, fp32, fp16 or int8"),
        "dla_core": ((int, type(None)), None, _non_negative, "use a DLA core index such as 0 (Jetson) or null"),
        "calibration_data": (OPT_STR, None, None, "give a folder of images for implicit INT8 calibration (TensorRT <= 10)"),
        "calibration_cache": (OPT_STR, None, None, "give a calibration cache path to reuse or write"),
    },
    "eval": {
        "conf": (NUM, 0.001, _fraction, "use a confidence threshold such as 0.001"),
        "iou": (NUM, 0.7, _fraction, "use an IoU threshold such as 0.7"),
        "max_det": (int, 300, _positive, "use a detection limit such as 300"),
        "images": ((int, type(None)), None, _positive, "use a number of images or null for all"),
        "batch": (int, 8, _positive, "use a batch size such as 8"),
    },
    "bench": {
        "batch_sizes": (list, [1], None, "use a list such as [1, 8]"),
        "runs": (int, 30, _positive, "use a number of timed runs such as 50"),
        "warmup": (int, 5, _non_negative, "use a number of warm-up runs such as 10"),
        "threads": ((int, type(None)), None, _positive, "use a CPU thread count or null"),
    },
}

#: Stages that produce a new model, in the order `yolocomp run` chains them whatever the order in the file.
#: PTQ is a branch: it quantizes the float model handed to it, and the chain goes on with that float model.
MODEL_STAGES = ("train", "prune", "distill", "ptq", "qat", "export")
BRANCH_STAGES = ("ptq",)

TOP: dict[str, tuple] = {
    "model": (str, None, None, "name an Ultralytics model yaml (yolov8n.yaml) or a .pt checkpoint"),
    "data": (OPT_STR, None, None, "give a data yaml path, or 'synthetic' for the built-in demo set"),
    "imgsz": (int, 640, _imgsz, "use a size such as 640"),
    "device": (str, "cpu", None, "use cpu, 0 or cuda:0"),
    "out": (OPT_STR, None, None, "give an output folder"),
    "nc": ((int, type(None)), None, _positive, "give the class count when building from a yaml"),
    "synthetic": (dict, {}, None, "use a mapping such as {train: 128, val: 32, size: 128}"),
    "stages": (dict, {}, None, "use a mapping of stage name to settings, e.g. {prune: {ratio: 0.3}}"),
}

_SYNTHETIC = {
    "train": (int, 128, _positive, "use a number of images such as 128"),
    "val": (int, 32, _positive, "use a number of images such as 32"),
    "size": (int, 128, _imgsz, "use an image size such as 128"),
    "max_objects": (int, 3, _positive, "use a number such as 3"),
    "seed": (int, 0, _non_negative, "use a whole number"),
}


@dataclass
class Recipe:
    model: str
    data: str | None
    imgsz: int = 640
    device: str = "cpu"
    out: str | None = None
    nc: int | None = None
    synthetic: dict = field(default_factory=dict)
    stages: dict[str, dict] = field(default_factory=dict)
    source: str = "<defaults>"

    def stage(self, name: str) -> dict:
        """Settings of one stage, defaults filled in (also for stages the recipe does not list)."""
        return {**_defaults(STAGES[name]), **self.stages.get(name, {})}

    def to_dict(self) -> dict:
        return {k: deepcopy(getattr(self, k)) for k in ("model", "data", "imgsz", "device", "out", "nc", "synthetic", "stages")}


def _defaults(spec: dict[str, tuple]) -> dict:
    return {k: deepcopy(v[1]) for k, v in spec.items()}


def _check_fields(values: dict, spec: dict[str, tuple], where: str, source: str) -> dict:
    errors = []
    for key, value in values.items():
        if key not in spec:
            close = [k for k in spec if k.startswith(key[:3])]
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(spec)}"
            errors.append(f"{source}: unknown key {where}{key}; {hint}")
            continue
        types, _, check, hint = spec[key]
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types:  # bool is an int subclass: refuse True for an int field
            ok = False
        else:
            ok = isinstance(value, types) or (float in types and isinstance(value, int))
        if not ok:
            names = "/".join("null" if t is type(None) else t.__name__ for t in types)
            errors.append(f"{source}: {where}{key} = {value!r} should be {names}; {hint}")
        elif check is not None and value is not None and (problem := check(value)):
            errors.append(f"{source}: {where}{key} = {problem}; {hint}")
    return {"errors": errors}


def validate(raw: dict, source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping; raise one UserError listing every problem, one line each."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a recipe must be a mapping with at least a 'model' key")
    errors = _check_fields(raw, TOP, "", source)["errors"]
    stages = raw.get("stages") or {}
    if isinstance(stages, dict):
        for name, settings in stages.items():
            if name not in STAGES:
                errors.append(f"{source}: unknown stage stages.{name}; use one of {', '.join(STAGES)}")
                continue
            if settings is None:
                stages[name] = settings = {}
            if not isinstance(settings, dict):
                errors.append(f"{source}: stages.{name} should be a mapping of settings (or empty)")
                continue
            errors += _check_fields(settings, STAGES[name], f"stages.{name}.", source)["errors"]
        prune = stages.get("prune") or {}
        if isinstance(prune, dict) and prune.get("flops_reduction") is not None and "ratio" in prune:
            errors.append(f"{source}: stages.prune sets both ratio and flops_reduction; keep one of them")
    synthetic = raw.get("synthetic") or {}
    if isinstance(synthetic, dict):
        errors += _check_fields(synthetic, _SYNTHETIC, "synthetic.", source)["errors"]
    if not raw.get("model"):
        errors.append(f"{source}: missing key model; {TOP['model'][3]}")
    if not errors:
        errors += _check_files(raw, source)
    if errors:
        raise UserError("\n".join(errors))
    recipe = Recipe(
        model=raw["model"],
        data=raw.get("data"),
        imgsz=raw.get("imgsz", 640),
        device=str(raw.get("device", "cpu")),
        out=raw.get("out"),
        nc=raw.get("nc"),
        synthetic={**_defaults(_SYNTHETIC), **synthetic},
        stages=dict(stages),
        source=source,
    )
    return recipe


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
    teacher = ((raw.get("stages") or {}).get("distill") or {}).get("teacher")
    if teacher and not _is_asset_name(str(teacher)) and not Path(str(teacher)).exists():
        errors.append(f"{source}: stages.distill.teacher = {teacher} not found; give an existing .pt")
    return errors


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
        raise UserError(f"recipe not found: {path} (see configs/ for examples)")
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
