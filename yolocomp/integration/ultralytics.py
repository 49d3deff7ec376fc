"""The only module that knows Ultralytics' trainer internals.

It connects :class:`yolocomp.methods.Method` objects to Ultralytics training in two ways:

* :func:`attach` registers callbacks on a user's ``YOLO`` object (``YOLO(...).train(...)`` keeps working as usual);
* :func:`train` runs a :class:`CompressionTrainer` for the CLI, on an in-memory model whose shapes may differ from
  its yaml (pruned) or whose modules are not stock Ultralytics ones (quantized).

Where each hook runs and why:

* ``prepare`` at ``on_pretrain_routine_end``: the first event that sees the final model on every DDP rank. When a
  method changes the structure, the optimizer, scheduler and EMA that Ultralytics already built are rebuilt around
  the new parameters (and DDP re-wrapped), so nothing trains stale tensors.
* ``extra_loss`` inside the criterion (:class:`ExtraLossCriterion`): its terms join the loss vector that Ultralytics
  scales by batch size, sums, AMP-scales and accumulates, so they behave exactly like box/cls/dfl and appear as
  their own columns in the progress bar and results.csv.
* ``before_step`` as an optimizer step pre-hook: it runs inside ``scaler.step(optimizer)``, i.e. after AMP unscaling,
  after all accumulated micro-batches and DDP gradient averaging, once per real optimizer step, and not at all when
  AMP skips a step for inf/NaN gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError, first_line
from yolocomp.methods import Method

_EVENTS = (
    "on_pretrain_routine_end",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_train_end",
)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside DDP / torch.compile wrappers."""
    from ultralytics.utils.torch_utils import unwrap_model

    return unwrap_model(model)


class ExtraLossCriterion:
    """Wraps Ultralytics' detection criterion and appends every method's extra loss terms.

    Ultralytics' criterion returns ``(loss_vector * batch_size, {name: detached item})``; the trainer sums the
    vector. Appending ``term * batch_size`` keeps the same scaling for the extra terms.
    """

    def __init__(self, base: Any, hub: CallbackHub):
        self.base = base
        self.hub = hub

    def __call__(self, preds: Any, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, items = self.base(preds, batch)
        trainer = self.hub.trainer
        if trainer is None or not unwrap(trainer.model).training:
            return loss, items
        extras: dict[str, torch.Tensor] = {}
        for method in self.hub.methods:
            extras.update(method.extra_loss(trainer, batch, preds))
        if not extras:
            return loss, items
        batch_size = batch["img"].shape[0]
        terms = torch.stack([v.reshape(()).to(loss.dtype) for v in extras.values()]) * batch_size
        items = {**items, **{k: v.detach().reshape(()) for k, v in extras.items()}}
        return torch.cat([loss.reshape(-1), terms]), items

    def update(self) -> None:
        """Forward Ultralytics' per-epoch criterion update (e.g. loss schedules)."""
        if hasattr(self.base, "update"):
            self.base.update()

    def __getattr__(self, name: str) -> Any:
        if name in {"base", "hub"}:  # not yet set (during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.base, name)


class CallbackHub:
    """Holds the methods of one training run and exposes them as Ultralytics callbacks (picklable)."""

    def __init__(self, methods: Iterable[Method]):
        self.methods: list[Method] = list(methods)
        self.trainer: Any = None
        self._step_hook: Any = None

    # --- pickling: DDP pickles callbacks; the trainer and hook handles are rebuilt in the worker ---------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["trainer"] = None
        state["_step_hook"] = None
        return state

    def callbacks(self) -> dict[str, Any]:
        return {event: getattr(self, event) for event in _EVENTS}

    # --- Ultralytics events -------------------------------------------------------------------------------------------
    def on_pretrain_routine_end(self, trainer: Any) -> None:
        self.trainer = trainer
        inner = unwrap(trainer.model)
        changed = [m.prepare(inner) for m in self.methods]  # every method, no short-circuit
        if any(changed):
            _rebuild_training_state(trainer)
        for method in self.methods:
            method.attach(trainer)
        self._register_step_hook(trainer)

    def on_train_start(self, trainer: Any) -> None:
        self.trainer = trainer
        self._wrap_criterion(trainer)

    def on_train_epoch_start(self, trainer: Any) -> None:
        # Resume and NaN-recovery re-create the criterion; re-wrapping is idempotent.
        self._wrap_criterion(trainer)

    def on_train_epoch_end(self, trainer: Any) -> None:
        for method in self.methods:
            method.on_epoch_end(trainer)

    def on_train_end(self, trainer: Any) -> None:
        for method in self.methods:
            method.on_train_end(trainer)
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    # --- helpers ------------------------------------------------------------------------------------------------------
    def _wrap_criterion(self, trainer: Any) -> None:
        model = unwrap(trainer.model)
        criterion = getattr(model, "criterion", None)
        if isinstance(criterion, ExtraLossCriterion):
            return
        model.criterion = ExtraLossCriterion(criterion or model.init_criterion(), self)

    def _register_step_hook(self, trainer: Any) -> None:
        if self._step_hook is not None:
            self._step_hook.remove()
        stepping = [m for m in self.methods if type(m).before_step is not Method.before_step]
        if stepping:
            self._step_hook = trainer.optimizer.register_step_pre_hook(_StepPreHook(self, stepping))

    def finalize(self, model: nn.Module) -> nn.Module:
        """Apply every method's ``finalize`` in order (e.g. strip attention then prune)."""
        for method in self.methods:
            model = method.finalize(model)
        return model


class _StepPreHook:
    """Optimizer step pre-hook calling ``before_step`` (an object, not a lambda, so it pickles)."""

    def __init__(self, hub: CallbackHub, methods: Sequence[Method]):
        self.hub = hub
        self.methods = list(methods)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for method in self.methods:
            method.before_step(self.hub.trainer)


def _rebuild_training_state(trainer: Any) -> None:
    """Rebuild optimizer, scheduler and EMA (and DDP) after a method changed the model's parameters."""
    from ultralytics.utils.torch_utils import ModelEMA

    inner = unwrap(trainer.model).to(trainer.device)
    frozen = getattr(trainer, "freeze_layer_names", [".dfl"])
    for name, param in inner.named_parameters():
        param.requires_grad = param.dtype.is_floating_point and not any(f in name for f in frozen)
    if isinstance(trainer.model, nn.parallel.DistributedDataParallel):
        trainer.model = nn.parallel.DistributedDataParallel(
            inner, device_ids=[trainer.device.index], find_unused_parameters=True
        )
    else:
        trainer.model = inner
    args = trainer.args
    weight_decay = args.weight_decay * trainer.batch_size * trainer.accumulate / args.nbs
    iterations = math.ceil(len(trainer.train_loader.dataset) / max(trainer.batch_size, args.nbs)) * trainer.epochs
    trainer.optimizer = trainer.build_optimizer(
        model=trainer.model,
        name=args.optimizer,
        lr=args.lr0,
        momentum=args.momentum,
        decay=weight_decay,
        iterations=iterations,
    )
    trainer._setup_scheduler()
    trainer.scheduler.last_epoch = trainer.start_epoch - 1
    trainer.ema = ModelEMA(trainer.model)


def attach(yolo: Any, *methods: Method) -> CallbackHub:
    """Attach compression methods to a user's ``ultralytics.YOLO`` object before ``.train()``.

    Returns the hub; after training call ``hub.finalize(model)`` to get the deliverable model.
    """
    if not methods:
        raise UserError("attach() needs at least one method, e.g. attach(model, BNSlimming(s=1e-4))")
    hub = CallbackHub(methods)
    for event, fn in hub.callbacks().items():
        yolo.add_callback(event, fn)
    return hub


# --- the CLI's trainer -----------------------------------------------------------------------------------------------
def _detection_trainer_cls() -> type:
    from ultralytics.models.yolo.detect import DetectionTrainer

    return DetectionTrainer


class CompressionTrainer(_detection_trainer_cls()):
    """DetectionTrainer that trains the model it is given (or resumes) as-is.

    Stock Ultralytics rebuilds the model from its yaml and copies matching weights, which would silently drop pruned
    shapes and quantizer modules. Here a module passed as weights (a checkpoint's EMA on resume) is used directly.
    """

    def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
        if isinstance(weights, nn.Module):
            model = weights.float()
            for param in model.parameters():
                param.requires_grad = param.dtype.is_floating_point
            return model
        return super().get_model(cfg=cfg, weights=weights, verbose=verbose)


_RESUME_INTERRUPTED: contextvars.ContextVar[bool] = contextvars.ContextVar("yolocomp_resume_interrupted", default=False)


@contextlib.contextmanager
def resume_interrupted() -> Iterator[None]:
    """Within this block, :func:`train` resumes a run whose folder holds an unfinished checkpoint instead of starting
    over (used by ``yolocomp run`` so an interrupted stage continues from its last epoch)."""
    token = _RESUME_INTERRUPTED.set(True)
    try:
        yield
    finally:
        _RESUME_INTERRUPTED.reset(token)


def is_resumable(checkpoint: str | Path) -> bool:
    """An Ultralytics checkpoint of an unfinished run (finished runs have their optimizer stripped).

    An unreadable file is an error, not "start over": restarting would overwrite the run the user wants resumed."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"cannot resume from {checkpoint}: unreadable checkpoint ({first_line(e)}); restore it, or delete "
                        f"it to restart that training from scratch") from None
    return isinstance(ckpt, dict) and ckpt.get("optimizer") is not None and ckpt.get("epoch", -1) >= 0


def _drop_rows_after_checkpoint(last: Path) -> None:
    """A kill between Ultralytics writing an epoch's results.csv row and its checkpoint leaves a row the resumed run
    writes again; keep only the rows up to the checkpoint's epoch so every epoch appears once."""
    epoch = torch.load(last, map_location="cpu", weights_only=False)["epoch"]  # 0-based, last finished epoch
    csv = last.parent.parent / "results.csv"
    if not csv.exists():
        return
    header, *rows = csv.read_text().splitlines()
    kept = [r for r in rows if r and float(r.split(",", 1)[0]) <= epoch + 1]
    if len(kept) != len(rows):
        csv.write_text("\n".join([header, *kept]) + "\n")


@dataclass
class TrainResult:
    model: nn.Module  #: best checkpoint's model after every method's ``finalize``
    save_dir: Path
    best: Path
    last: Path
    metrics: dict


def train(
    model: nn.Module | None,
    data: str,
    methods: Sequence[Method],
    project: str | Path,
    name: str,
    resume: str | Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``model`` (or resume ``resume``) with ``methods`` attached, then finalize the best checkpoint."""
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils import callbacks as ul_callbacks

    if resume is None and _RESUME_INTERRUPTED.get():
        last = Path(project) / name / "weights" / "last.pt"
        if last.exists() and is_resumable(last):
            resume = last
            _drop_rows_after_checkpoint(last)
    hub = CallbackHub(methods)
    cbs = ul_callbacks.get_default_callbacks()
    for event, fn in hub.callbacks().items():
        cbs[event].append(fn)
    args = {
        "data": data,
        "project": str(Path(project).resolve()),
        "name": name,
        "exist_ok": True,
        "device": "cpu",
        "workers": 0,
        "plots": False,
        "verbose": False,
        **overrides,
    }
    if resume is not None:
        args = {"resume": str(resume), "model": str(resume), **{k: v for k, v in args.items() if k == "device"}}
        trainer = CompressionTrainer(overrides=args, _callbacks=cbs)
    else:
        if model is None:
            raise UserError("train() needs a model or a checkpoint to resume")
        args.setdefault("model", getattr(model, "pt_path", None) or "yolocomp.pt")
        trainer = CompressionTrainer(overrides=args, _callbacks=cbs)
        trainer.model = model
    trainer.train()
    best = trainer.best if trainer.best.exists() else trainer.last
    trained, _ = load_checkpoint(best)
    return TrainResult(
        model=hub.finalize(trained),
        save_dir=Path(trainer.save_dir),
        best=Path(trainer.best),
        last=Path(trainer.last),
        metrics=dict(getattr(trainer, "metrics", {}) or {}),
    )


# --- model and data I/O ----------------------------------------------------------------------------------------------
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
                raise UserError(f"cannot read checkpoint {source}: {type(e).__name__}: {first_line(e)} (file corrupt or not "
                                f"an Ultralytics checkpoint)") from e
        else:
            raise UserError(f"unsupported model {source}: give an Ultralytics .pt checkpoint or a model .yaml")
    if not is_detection_model(model):
        raise UserError(
            f"{getattr(model, 'pt_path', type(model).__name__)} is not a detection model "
            f"(task={getattr(model, 'task', '?')}); yolocomp compresses YOLO detectors"
        )
    return model


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
    snapshot = deepcopy(model).float()
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


def resolve_data(data: str | Path, workdir: str | Path) -> Path:
    """Check a data yaml and write an absolute-path copy into ``workdir`` (Ultralytics resolves a relative ``path``
    against its own datasets dir, not against the yaml)."""
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
    if not isinstance(cfg, dict) or "val" not in cfg or "names" not in cfg:
        raise UserError(f"data yaml {data} needs at least 'val' and 'names' keys (Ultralytics detection format)")
    root = Path(cfg.get("path") or ".")
    if not root.is_absolute():
        # relative to the yaml, to the working directory, or (a yaml kept inside its data set) the yaml's own folder
        candidates = [(src.parent / root), (Path.cwd() / root)]
        if (src.parent / str(cfg["val"])).exists():
            candidates.append(src.parent)
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise UserError(f"data root '{cfg.get('path')}' of {data} not found next to the yaml or the current directory")
        root = found
    cfg["path"] = str(root.resolve())
    for split in ("train", "val"):
        if split in cfg and cfg[split] and not (root / str(cfg[split])).exists() and not Path(str(cfg[split])).exists():
            raise UserError(f"{split} images '{cfg[split]}' of {data} not found under {root}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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
