"""Model and data I/O: load and save Ultralytics-compatible checkpoints, check and mirror data yamls."""

from __future__ import annotations

import pickle
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError, first_line
from yolocomp.methods import strip_training_modules


def load_model(source: str | Path | nn.Module, nc: int | None = None) -> nn.Module:
    """Load a detection model from an Ultralytics ``.pt`` checkpoint or build it from a model yaml.

    Raises :class:`UserError` with one line naming the problem and the fix.
    """
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    if isinstance(source, nn.Module):
        model = source
    else:
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix in {".yaml", ".yml"}:
            if not path.exists():
                import ultralytics

                bundled = list((Path(ultralytics.__file__).parent / "cfg" / "models").rglob(path.name))
                if not bundled and not _stem_yaml_exists(path.name):
                    raise UserError(f"model yaml not found: {source} (give a path or a name like yolov8n.yaml)")
            try:
                model = DetectionModel(str(source), nc=nc, verbose=False)
            except Exception as e:  # Ultralytics raises many types for bad yamls
                raise UserError(f"cannot build a model from {source}: {first_line(e)} (check the yaml)") from e
            model.pt_path = str(source)
        elif suffix == ".pt":
            if not path.exists():
                path = _download_asset(path)
            try:
                model, _ = load_checkpoint(str(path))
            except Exception as e:
                raise UserError(f"cannot read checkpoint {source}: {_checkpoint_problem(e)}") from e
        else:
            raise UserError(f"unsupported model {source}: give an Ultralytics .pt checkpoint or a model .yaml")
    if not is_detection_model(model):
        raise UserError(
            f"{getattr(model, 'pt_path', type(model).__name__)} is not a detection model "
            f"(task={getattr(model, 'task', '?')}); yolocomp compresses YOLO detectors"
        )
    return model


def _checkpoint_problem(error: BaseException) -> str:
    """One readable clause for a failed checkpoint load (Ultralytics wraps unpickling errors in a multi-line TypeError)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    unreadable = (pickle.UnpicklingError, EOFError)
    if any(isinstance(e, unreadable) or "not a loadable checkpoint" in str(e) or "PytorchStreamReader" in str(e)
           for e in chain):
        return "not a PyTorch/Ultralytics checkpoint (file corrupt or truncated); give a .pt saved by Ultralytics or yolocomp"
    return f"{type(chain[0]).__name__}: {first_line(chain[0])} (not an Ultralytics detection checkpoint?)"


def _download_asset(path: Path) -> Path:
    """Bare Ultralytics asset names (yolov8n.pt) keep Ultralytics' real download path for online users."""
    if len(path.parts) > 1:
        raise UserError(f"weights not found: {path} (check the path)")
    try:
        from ultralytics.utils.downloads import attempt_download_asset

        found = Path(attempt_download_asset(str(path)))
        if found.exists():
            return found
    except Exception:
        pass
    raise UserError(f"weights not found: {path} (not a local file and it could not be downloaded; give a local .pt path)")


def _stem_yaml_exists(name: str) -> bool:
    # Ultralytics resolves scale-suffixed names (yolov8n.yaml -> yolov8.yaml with scale n).
    from ultralytics.nn.tasks import guess_model_scale  # noqa: F401  (import proves the API exists)
    from ultralytics.utils.checks import check_yaml

    try:
        import re

        check_yaml(re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name), hard=True)
        return True
    except Exception:
        return False


def is_detection_model(model: nn.Module) -> bool:
    from ultralytics.nn.modules import Detect
    from ultralytics.nn.tasks import DetectionModel

    if not isinstance(model, DetectionModel) or getattr(model, "task", "detect") != "detect":
        return False
    head = model.model[-1]
    return isinstance(head, Detect) and type(head).__name__ in {"Detect", "v10Detect"}


def save_model(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Save an Ultralytics-compatible checkpoint (``YOLO(path)`` loads it); never overwrites the file a model came from."""
    import datetime

    from ultralytics import __version__

    path = Path(path)
    source = getattr(model, "pt_path", None)
    if source and Path(source).exists() and path.exists() and path.resolve() == Path(source).resolve():
        raise UserError(f"refusing to overwrite the input checkpoint {path}; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot = strip_training_modules(deepcopy(model).float())  # adapters and the like never reach a deliverable
    if hasattr(snapshot, "criterion"):
        snapshot.criterion = None
    train_args = dict(getattr(model, "args", {}) or {}) if isinstance(getattr(model, "args", None), dict) else {}
    ckpt = {
        "epoch": -1,
        "best_fitness": None,
        "model": None,
        "ema": snapshot.half(),
        "updates": None,
        "optimizer": None,
        "train_args": train_args,
        "date": datetime.datetime.now().astimezone().isoformat(),
        "version": __version__,
        "yolocomp": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


#: Key of an absolute-path data copy naming the user's own yaml, so messages and reports name that file.
SOURCE_KEY = "yolocomp_source"


def data_label(data: str | Path) -> str:
    """The data yaml a user gave, also when ``data`` is yolocomp's absolute-path copy of it."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(data).read_text())
    except (OSError, yaml.YAMLError):
        return str(data)
    return str(cfg.get(SOURCE_KEY, data)) if isinstance(cfg, dict) else str(data)


def _entries(value: Any) -> list:
    """A split's image entries: Ultralytics takes a folder / .txt list, or a list of those."""
    if not value:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_data(data: str | Path, workdir: str | Path) -> Path:
    """Check a data yaml and write an absolute-path copy into ``workdir`` (Ultralytics resolves a relative ``path``
    against its own datasets dir, not against the yaml). A copy made earlier is returned as it is."""
    import yaml

    src = Path(data)
    if not src.exists():
        if len(src.parts) == 1 and src.suffix in {".yaml", ".yml"}:
            return _ultralytics_dataset(str(data), Path(workdir))
        raise UserError(f"data yaml not found: {data} (give the path to an Ultralytics data yaml)")
    try:
        cfg = yaml.safe_load(src.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"data yaml {data} is not valid YAML: {first_line(e)}") from e
    if isinstance(cfg, dict) and SOURCE_KEY in cfg and Path(str(cfg.get("path", ""))).is_absolute():
        return src  # already resolved (a command handing its copy to a library function)
    if not isinstance(cfg, dict) or "val" not in cfg or "names" not in cfg:
        raise UserError(f"data yaml {data} needs at least 'val' and 'names' keys (Ultralytics detection format)")
    root = Path(cfg.get("path") or ".")
    if not root.is_absolute():
        # relative to the yaml, to the working directory, or (a yaml kept inside its data set) the yaml's own folder
        candidates = [(src.parent / root), (Path.cwd() / root)]
        if (src.parent / str(_entries(cfg["val"])[0])).exists():
            candidates.append(src.parent)
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise UserError(f"data root '{cfg.get('path')}' of {data} not found next to the yaml or the current directory")
        root = found
    cfg["path"] = str(root.resolve())
    for split in ("train", "val"):
        for entry in _entries(cfg.get(split)):  # Ultralytics takes one entry or a list of them
            if not (root / str(entry)).exists() and not Path(str(entry)).exists():
                raise UserError(f"{split} images '{entry}' of {data} not found under {root}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg[SOURCE_KEY] = str(data)
    out = workdir / f"{src.stem}.abs.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def _ultralytics_dataset(name: str, workdir: Path) -> Path:
    """A dataset named like coco.yaml: Ultralytics resolves (and, online, downloads) it; we keep an absolute copy."""
    import yaml

    try:
        from ultralytics.data.utils import check_det_dataset

        cfg = check_det_dataset(name)
    except Exception as e:
        raise UserError(f"data yaml not found: {name} (not a local file and Ultralytics could not provide it: {type(e).__name__})") from e
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{Path(name).stem}.abs.yaml"
    keep = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.items() if k in {"path", "train", "val", "test", "names", "nc", "download"}}
    keep[SOURCE_KEY] = name
    out.write_text(yaml.safe_dump(keep, sort_keys=False))
    return out


def mirror_dataset(data: str | Path, workdir: str | Path) -> Path:
    """An absolute-path data yaml over a linked mirror of a read-only dataset (e.g. ``../shared/coco-real``).

    Ultralytics writes ``labels/<split>.cache`` beside the label folder it derives from each image path, following
    folder links. Real folders holding one link per file keep those derived paths, and so the caches, in ``workdir``.
    """
    import yaml

    resolved = resolve_data(data, workdir)  # validates and gives the absolute root
    cfg = yaml.safe_load(resolved.read_text())
    src = Path(cfg["path"])
    root = Path(workdir).resolve() / f"{Path(data).stem}-mirror"
    for kind in ("images", "labels"):
        if not (src / kind).is_dir():
            continue
        for split_dir in sorted(p for p in (src / kind).iterdir() if p.is_dir()):
            dest = root / kind / split_dir.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in split_dir.iterdir():
                if f.suffix != ".cache" and not (dest / f.name).exists():
                    (dest / f.name).symlink_to(f)
    for extra in ("annotations",):
        if (src / extra).exists() and not (root / extra).exists():
            (root / extra).symlink_to(src / extra, target_is_directory=True)
    cfg["path"] = str(root)
    out = root / Path(data).name
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def strip_finished_checkpoint(path: str | Path) -> bool:
    """Drop training-only modules from a finished run's checkpoint (its optimizer already stripped by Ultralytics), so
    it loads without yolocomp; an unfinished one keeps them for resume. Returns True when the file was rewritten."""
    from yolocomp.methods import TRAINING_MODULES

    path = Path(path)
    if not path.exists():
        return False
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("optimizer") is not None:
        return False
    models = [ckpt.get(k) for k in ("model", "ema")]
    if not any(isinstance(m, nn.Module) and hasattr(m, TRAINING_MODULES) for m in models):
        return False
    for m in models:
        if isinstance(m, nn.Module):
            strip_training_modules(m)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return True
