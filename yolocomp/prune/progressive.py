"""Progressive pruning: reach a one-shot cut's target in K steps, each a training run that ramps channels to zero.

Every step re-measures importance (BN-γ, L1 or random) on the current, already partly pruned model, plans the cut
that brings the model to that step's share of the final target (global threshold, ``min_channels``, ``round_to`` and
the channel groups of :mod:`yolocomp.prune.graph`), then trains with :class:`ProgressivePruning` attached (usually next
to a distillation method from the uncompressed teacher): the chosen channels' BN outputs are scaled by a ramp from 1
to 0 over the first part of the run, the rest of the run recovers at zero, and the channels are then removed exactly
(:func:`~yolocomp.prune.ramp.remove_ramped_channels`). The ramp state lives in the model (:mod:`yolocomp.prune.ramp`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

from torch import nn

from yolocomp.errors import UserError
from yolocomp.methods import Method
from yolocomp.prune import ramp

SPACINGS = ("geometric", "linear")


class ProgressivePruning(Method):
    """Drive the channels of one pruning step to zero during training; ``finalize`` removes them.

    ``ratio`` / ``flops_reduction``: the share to remove from the model this method is prepared on (one step).
    The ramp lasts ``ramp_iters`` training batches, or ``ramp_fraction`` of the run when not given; ``shape`` is
    ``cosine`` (slow start and end) or ``linear``. Selection happens in ``prepare`` (deterministic, so every DDP rank
    picks the same channels); a resumed model already holds its gates and keeps them.
    """

    name = "progressive"

    def __init__(self, ratio: float | None = None, flops_reduction: float | None = None, method: str = "bn",
                 min_channels: int = 8, round_to: int = 8, ignore: Iterable[int] = (), imgsz: int = 640,
                 seed: int = 0, max_layer_ratio: float | None = None, shape: str = "cosine",
                 ramp_iters: int | None = None, ramp_fraction: float = 0.5):
        if (ratio is None) == (flops_reduction is None):
            raise UserError("give exactly one of ratio or flops_reduction for a progressive step")
        if shape not in ramp.SHAPES:
            raise UserError(f"ramp shape '{shape}' unknown; use one of {ramp.SHAPES}")
        if ramp_iters is None and not 0.0 < ramp_fraction <= 1.0:
            raise UserError(f"ramp_fraction={ramp_fraction} must be in (0, 1] (share of the run spent ramping)")
        self.ratio, self.flops_reduction, self.method = ratio, flops_reduction, method
        self.min_channels, self.round_to, self.ignore = min_channels, round_to, tuple(int(i) for i in ignore)
        self.imgsz, self.seed, self.max_layer_ratio = imgsz, seed, max_layer_ratio
        self.shape, self.ramp_iters, self.ramp_fraction = shape, ramp_iters, ramp_fraction
        self.summary: dict[str, Any] | None = None  #: of the last finalize (kept_channels, achieved)

    def prepare(self, model: nn.Module) -> bool:
        if ramp.gates(model):
            return False  # resumed: gates (and their schedule position) already there
        from yolocomp.prune.pruner import plan_pruning

        graph, _, plan = plan_pruning(model, self.ratio, self.flops_reduction, self.method, None, self.min_channels,
                                      self.round_to, self.ignore, self.imgsz, self.seed, self.max_layer_ratio)
        return ramp.insert_gates(model, graph, plan, self.shape) > 0

    def attach(self, trainer: Any) -> None:
        from yolocomp.integration import unwrap
        from yolocomp.integration.access import ema_model, planned_iterations

        model = unwrap(trainer.model)
        gates = ramp.gates(model)
        if gates and all(int(g.ramp_total) == 0 for g in gates.values()):  # a fresh run, not a resume
            total = self.ramp_iters or max(1, round(self.ramp_fraction * planned_iterations(trainer)))
            ramp.set_schedule(model, total)
        ema = ema_model(trainer)
        if ema is not None:
            ramp.copy_ramp_state(model, ema)

    def on_epoch_end(self, trainer: Any) -> None:
        # Before validation and the checkpoint: the EMA (what both use) must hold the model's schedule position.
        from yolocomp.integration import unwrap
        from yolocomp.integration.access import ema_model

        ema = ema_model(trainer)
        if ema is not None:
            ramp.copy_ramp_state(unwrap(trainer.model), ema)

    def finalize(self, model: nn.Module) -> nn.Module:
        if not ramp.gates(model):
            return model
        pruned, self.summary = ramp.remove_ramped_channels(model, self.imgsz)
        return pruned

    def __repr__(self) -> str:
        target = f"ratio={self.ratio}" if self.ratio is not None else f"flops_reduction={self.flops_reduction}"
        return f"ProgressivePruning({target}, method={self.method!r}, shape={self.shape!r})"


# --- step targets ---------------------------------------------------------------------------------------------------
def cumulative_targets(target: float, steps: int, spacing: str = "geometric") -> list[float]:
    """Share removed from the original model after each of ``steps`` steps, ending at ``target``.

    ``geometric``: every step removes the same share of what is left (later steps cut fewer channels of a model that
    has already lost some); ``linear``: the same share of the original each step.
    """
    if steps < 1:
        raise UserError(f"steps={steps} must be >= 1")
    if spacing not in SPACINGS:
        raise UserError(f"spacing '{spacing}' unknown; use one of {SPACINGS}")
    if spacing == "linear":
        return [target * s / steps for s in range(1, steps + 1)]
    return [1.0 - (1.0 - target) ** (s / steps) for s in range(1, steps + 1)]


def model_budget(model: nn.Module, ignore: Iterable[int] = (), imgsz: int = 640) -> tuple[int, float]:
    """(prunable channels, analytic conv MACs at ``imgsz``): what ratio and FLOPs targets are shares of."""
    from yolocomp.prune.graph import build_graph
    from yolocomp.prune.plan import Planner, conv_costs

    planner = Planner(build_graph(model, tuple(ignore)), {}, conv_costs(model, imgsz))
    return planner.total, planner.full_flops


def step_share(cumulative: float, base: float, current: float) -> float:
    """Share of the current model to remove so that ``cumulative`` of ``base`` is gone (channels or MACs)."""
    return 1.0 - (1.0 - cumulative) * base / current


def compose_channel_maps(previous: dict[int, list[int]], step: dict[int, list[int]]) -> dict[int, list[int]]:
    """Kept output channels relative to the original model after one more step (both maps: layer -> kept)."""
    out = dict(previous)
    for layer, kept in step.items():
        base = previous.get(layer)
        out[layer] = list(kept) if base is None else [base[j] for j in kept]
    return out


# --- the driver -----------------------------------------------------------------------------------------------------
def progressive_prune(
    model: nn.Module,
    *,
    data_yaml: str | Path,
    ratio: float | None = None,
    flops_reduction: float | None = None,
    method: str = "bn",
    steps: int = 3,
    epochs_per_step: int = 1,
    ramp_iters: int | None = None,
    ramp_fraction: float = 0.5,
    shape: str = "cosine",
    spacing: str = "geometric",
    teacher_methods: Callable[[int, dict[int, list[int]]], Sequence[Method]] | None = None,
    train_args: dict | None = None,
    evaluate: Callable[[nn.Module], dict | None] | None = None,
    project: str | Path = "runs/progressive",
    name: str = "progressive",
    imgsz: int = 640,
    min_channels: int = 8,
    round_to: int = 8,
    ignore: Iterable[int] = (),
    max_layer_ratio: float | None = None,
    seed: int = 0,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Prune ``model`` to ``ratio`` (share of prunable channels) or ``flops_reduction`` in ``steps`` training runs.

    Step ``s`` trains ``epochs_per_step`` epochs on ``data_yaml`` with :class:`ProgressivePruning` and the methods
    ``teacher_methods(s, kept)`` returns (e.g. KD from the uncompressed model; ``kept``: the channel map of the
    model the step starts from), with ``train_args`` passed to Ultralytics
    (``imgsz`` added unless given there, ``epochs`` set); it continues from the run's last checkpoint (not the best: the best is usually before the
    ramp), removes the zeroed channels and calls ``evaluate(model)``. ``model`` itself is not modified. Returns the plain pruned model and the history:
    one row per step (step 0 is the input) with ``step``, ``ratio`` and ``flops_reduction`` reached (analytic, vs the
    input), ``gflops``, ``ap`` (``evaluate``'s ``ap`` or None), ``metrics`` and ``kept_channels`` (layer -> kept
    output channel indices of the input model; :func:`yolocomp.recon.reconstruct`'s ``channel_map``).
    """
    from ultralytics.nn.tasks import load_checkpoint

    from yolocomp.eval.info import gflops
    from yolocomp.integration import CallbackHub, train

    if (ratio is None) == (flops_reduction is None):
        raise UserError("give exactly one of ratio (share of channels) or flops_reduction (share of FLOPs)")
    target = ratio if ratio is not None else flops_reduction
    if not 0.0 < target < 1.0:
        raise UserError(f"target {target} is outside (0, 1); pick e.g. 0.3")
    ignore = tuple(int(i) for i in ignore)
    base = model_budget(model, ignore, imgsz)
    which = 0 if ratio is not None else 1
    kept: dict[int, list[int]] = {}

    def record(step: int, current: nn.Module) -> dict[str, Any]:
        now = model_budget(current, ignore, imgsz)
        metrics = evaluate(current) if evaluate is not None else None
        return {"step": step, "ratio": round(1 - now[0] / base[0], 4), "flops_reduction": round(1 - now[1] / base[1], 4),
                "gflops": gflops(current, imgsz, digits=4), "ap": (metrics or {}).get("ap"), "metrics": metrics,
                "kept_channels": dict(kept)}

    history = [record(0, model)]
    model = deepcopy(model)  # training inserts the gates in place: the caller's model stays as it was
    for step, cumulative in enumerate(cumulative_targets(target, steps, spacing), start=1):
        share = step_share(cumulative, base[which], model_budget(model, ignore, imgsz)[which])
        if share < 1e-3:  # rounding already got there
            history.append({**history[-1], "step": step})
            continue
        pruning = ProgressivePruning(ratio=share if ratio is not None else None,
                                     flops_reduction=share if flops_reduction is not None else None, method=method,
                                     min_channels=min_channels, round_to=round_to, ignore=ignore, imgsz=imgsz,
                                     seed=seed + step, max_layer_ratio=max_layer_ratio, shape=shape,
                                     ramp_iters=ramp_iters, ramp_fraction=ramp_fraction)
        methods = [pruning, *(teacher_methods(step, dict(kept)) if teacher_methods is not None else ())]
        args = {"imgsz": imgsz, **(train_args or {}), "epochs": epochs_per_step}
        result = train(model, str(data_yaml), methods, project, f"{name}-step{step}", **args)
        trained, _ = load_checkpoint(result.last)
        model = CallbackHub(methods).finalize(trained)
        kept = compose_channel_maps(kept, pruning.summary["kept_channels"])
        history.append(record(step, model))
    return model, history

