"""What every command shares: the stage result record, output folders, the recipe's data and model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    """Output folder: --out, else the recipe's, else runs/yolocomp/<command>/<model stem> (not created here)."""
    return Path(out or recipe.out or Path("runs") / "yolocomp" / command / Path(recipe.model).stem)


def work_dir(out: Path) -> Path:
    """The one folder of a command's working files (data copies, latency exports) inside its output folder."""
    return Path(out) / "work"


def recipe_data(recipe: Recipe, workdir: Path) -> Path | None:
    """The recipe's data as an absolute-path yaml inside ``workdir`` (generating the synthetic set if asked);
    ``workdir`` is a command's :func:`work_dir`."""
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


# --- devices ----------------------------------------------------------------------------------------------------------
_said_device: set[str] = set()


def resolve_device(device: str | int | None) -> str:
    """``auto`` is the first CUDA device when there is one, else the CPU (said once); an explicit GPU request on a
    machine without one is a UserError instead of Ultralytics' traceback."""
    import torch

    value = str(device if device is not None else "auto").strip().lower()
    if value == "auto":
        chosen = "0" if torch.cuda.is_available() else "cpu"
        if chosen not in _said_device:
            _said_device.add(chosen)
            print(f"device: auto -> {'cuda:0' if chosen == '0' else 'cpu (no CUDA device found)'}", flush=True)
        return chosen
    if value in {"cpu", "mps"}:
        return value
    indices = value.removeprefix("cuda").lstrip(":").split(",") if value != "cuda" else ["0"]
    if not all(i.strip().isdigit() for i in indices):
        raise UserError(f"device {device!r} is not understood; use auto, cpu, 0, 0,1 or cuda:0")
    if not torch.cuda.is_available():
        raise UserError(f"device {device} asks for a CUDA GPU but this machine has none; use --device cpu or auto")
    missing = [i for i in indices if int(i) >= torch.cuda.device_count()]
    if missing:
        raise UserError(f"device {device}: CUDA device {missing[0]} does not exist ({torch.cuda.device_count()} found); "
                        "use --device 0 or auto")
    return ",".join(i.strip() for i in indices)


# --- input models -------------------------------------------------------------------------------------------------------
def warn_if_untrained(model: Any, stage: str) -> None:
    """Compressing a model built from a yaml compresses random weights: allowed (tests, demos) but said."""
    if isinstance(model, (str, Path)) and str(model).endswith((".yaml", ".yml")):
        print(f"warning: {stage} starts from random weights ({model} is a model yaml, not trained weights); pass "
              f"--weights path/to/weights.pt to compress a trained model", flush=True)


def ensure_weights(model: str, flag: str = "--weights") -> None:
    """A bare weights name (yolov5su.pt) that is not here is downloaded by Ultralytics when online; offline, one
    line naming the flag that points at local weights."""
    path = Path(model)
    if path.suffix != ".pt" or path.exists() or len(path.parts) > 1:
        return
    from yolocomp.errors import first_line

    try:
        from ultralytics.utils.downloads import attempt_download_asset

        if Path(attempt_download_asset(str(path))).exists():
            return
        problem = "the download did not produce the file"
    except Exception as e:  # offline: Ultralytics raises ConnectionError with a multi-line message
        problem = first_line(e)
    raise UserError(f"{model} is not here and could not be downloaded ({problem}); pass {flag} path/to/weights.pt")


# --- output folders -------------------------------------------------------------------------------------------------------
ERROR_LOG = "yolocomp-error.log"


@contextlib.contextmanager
def restore_on_error(out: Path, keep: Callable[[Path], bool] | None = None) -> Iterator[None]:
    """A command that fails on bad input leaves ``out`` as it found it, apart from :data:`ERROR_LOG`: everything it
    created there is removed (except what ``keep`` accepts, e.g. finished stages of a run). Interrupts and crashes keep
    their files so the same command resumes."""
    out = Path(out)
    before = set(out.rglob("*")) if out.exists() else set()
    try:
        yield
    except UserError as e:
        if out.exists():
            created = sorted((p for p in out.rglob("*") if p not in before), key=lambda p: len(p.parts), reverse=True)
            for path in created:
                if keep is not None and keep(path):
                    continue
                if path.is_dir() and not path.is_symlink():
                    if not any(path.iterdir()):
                        path.rmdir()
                else:
                    path.unlink()
            out.mkdir(parents=True, exist_ok=True)
            (out / ERROR_LOG).write_text(f"{e}\n")
        raise


def run_stage_command(stage: str, recipe: Recipe, out: str | None, weights_flag: str = "--model") -> tuple[Path, StageResult]:
    """One stage as its own command (``yolocomp prune`` ...): device, weights and data resolved, ``--out`` restored
    on bad input, an interrupted training resumed when the same command runs again."""
    from yolocomp.commands import STAGE_RUNNERS
    from yolocomp.integration import resume_interrupted

    recipe = replace(recipe, device=resolve_device(recipe.device))
    folder = out_dir(recipe, stage, out)
    with restore_on_error(folder):
        ensure_weights(str(recipe.model), weights_flag)
        folder.mkdir(parents=True, exist_ok=True)
        data = recipe_data(recipe, work_dir(folder))
        with resume_interrupted():
            result = STAGE_RUNNERS[stage](recipe, str(recipe.model), folder, data, None)
    return folder, result


# --- teacher-driven training data -------------------------------------------------------------------------------------
#: Pseudo-label confidence for unlabelled images trained beside labelled ones, unless set: without labels of their
#: own, the detection loss would teach those images' objects as background.
MIXED_PSEUDO_CONF = 0.4


def kd_training_data(cfg: Any, data: str | None, teacher: Any, work: Path, imgsz: int, device: str,
                     record: dict) -> tuple[str, dict]:
    """The data a teacher-driven stage trains on (labelled data, unlabelled images or both) and the trainer overrides
    it needs (label-free: no detection loss, last weights kept)."""
    from yolocomp.data import label_free_overrides, training_data

    if not cfg.images:
        return data, {}
    labelled = None if cfg.label_free else data
    conf = cfg.pseudo_conf if cfg.pseudo_conf is not None or labelled is None else MIXED_PSEUDO_CONF
    found = training_data(cfg.images, labelled, work / "train_data", teacher=teacher, pseudo_conf=conf, imgsz=imgsz,
                          device=device)
    record.update(images=str(cfg.images), labelled_images=found.labelled, unlabelled_images=found.unlabelled,
                  pseudo_labelled_images=found.pseudo_labelled, pseudo_conf=conf, label_free=found.label_free)
    return str(found.yaml), (label_free_overrides() if found.label_free else {})
