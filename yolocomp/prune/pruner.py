"""``prune_model``: structural pruning of an in-memory Ultralytics DetectionModel in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from yolocomp.errors import UserError
from yolocomp.eval.info import count_params, gflops  # the one counter every report uses; re-exported by prune
from yolocomp.prune import importance as imp
from yolocomp.prune.graph import ChannelGraph, build_graph
from yolocomp.prune.plan import Plan, Planner, conv_costs
from yolocomp.prune.surgery import build_pruned, layer_keep


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def check_model(model: nn.Module) -> None:
    from yolocomp.integration.io import is_detection_model

    if not is_detection_model(model):
        raise UserError(f"{type(model).__name__} is not an Ultralytics detection model; the pruner needs a YOLO detector")
    if not isinstance(getattr(model, "yaml", None), dict):
        raise UserError("the model carries no model.yaml; load it with yolocomp.integration.load_model")


def layer_table(model: nn.Module, graph: ChannelGraph, plan: Plan) -> list[dict]:
    """Per layer: kept/total channels over its spaces (outputs and hidden), and whether it is backbone or neck."""
    n_backbone = len(model.yaml["backbone"])
    rows: dict[int, dict] = {}
    for s in graph.spaces:
        if s.layer >= graph.detect_index or s.name == "images":
            continue
        row = rows.setdefault(s.layer, {"layer": s.layer, "type": graph.layer_types[s.layer],
                                        "stage": "backbone" if s.layer < n_backbone else "neck",
                                        "kept": 0, "total": 0, "out_kept": None, "out_total": None, "pinned": True})
        row["kept"] += plan.counts[s.id]
        row["total"] += s.size
        row["pinned"] = row["pinned"] and s.pinned
        if s.is_layer_output:
            row["out_kept"], row["out_total"] = plan.counts[s.id], s.size
    return [rows[i] for i in sorted(rows)]


def stage_shares(rows: list[dict]) -> dict[str, float]:
    """Share of channels removed per stage (backbone / neck): shows whether one global threshold over-prunes one."""
    out = {}
    for stage in ("backbone", "neck"):
        sel = [r for r in rows if r["stage"] == stage and not r["pinned"]]
        total = sum(r["total"] for r in sel)
        out[stage] = round(1 - sum(r["kept"] for r in sel) / total, 4) if total else 0.0
    return out


def plan_pruning(
    model: nn.Module,
    ratio: float | None = None,
    flops_reduction: float | None = None,
    method: str = "bn",
    importance: str | Callable | Mapping[str, torch.Tensor] | None = None,
    min_channels: int = 8,
    round_to: int = 8,
    ignore: Iterable[int] = (),
    imgsz: int = 640,
    seed: int = 0,
    max_layer_ratio: float | None = None,
) -> tuple[ChannelGraph, Planner, Plan]:
    """Check the request, rank the channels and solve the global threshold: ``(graph, planner, plan)``
    (arguments as in :func:`prune_model`; the model is not modified)."""
    check_model(model)
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio} is outside (0, 1); pick e.g. 0.3")
    if flops_reduction is not None and not 0.0 < flops_reduction < 1.0:
        raise UserError(f"--flops-reduction {flops_reduction} is outside (0, 1); pick e.g. 0.4")
    ignore = tuple(int(i) for i in ignore)
    n_layers = len(model.model)
    bad = [i for i in ignore if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"ignore lists layer {bad[0]}, but the model has layers 0..{n_layers - 1}")
    if method == "bn" and importance is None and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise UserError("the model has no BatchNorm layers, so BN-γ pruning has nothing to rank; use --method l1")
    graph = build_graph(model, ignore)
    producers = sorted({p for s in graph.prunable_spaces() for p, _ in s.producers})
    if method == "random" and importance is None:
        scores = imp.random_scores(model, producers, seed=seed)
    else:
        scores = imp.compute(model, producers, importance if importance is not None else method)
    costs = conv_costs(model, imgsz)
    planner = Planner(graph, scores, costs, min_channels=min_channels, round_to=round_to,
                      max_layer_ratio=max_layer_ratio)
    plan = planner.solve(ratio=ratio, flops_reduction=flops_reduction)
    return graph, planner, plan


def prune_model(
    model: nn.Module,
    ratio: float | None = None,
    flops_reduction: float | None = None,
    method: str = "bn",
    importance: str | Callable | Mapping[str, torch.Tensor] | None = None,
    min_channels: int = 8,
    round_to: int = 8,
    ignore: Iterable[int] = (),
    imgsz: int = 640,
    seed: int = 0,
    compensate: bool = True,
    calib: torch.Tensor | None = None,
    max_layer_ratio: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove the least important channels of backbone and neck; returns ``(pruned model, summary)``.

    ``ratio`` is the share of prunable channels to remove, ``flops_reduction`` the share of FLOPs (give one).
    ``max_layer_ratio`` caps the share removed from any one width (e.g. 0.6). ``method`` names the importance
    (``bn`` |γ|, ``l1`` filter norm, ``random``); ``importance`` overrides it with a
    callable ``(model, conv_names) -> {name: scores}`` or ready scores per producing conv (CAP passes its attention).
    With ``compensate`` the mean contribution of removed channels is folded into the next BatchNorm (measured on
    ``calib`` images (N, 3, H, W, 0-1) when given, else estimated from the producers' BatchNorm).
    The original model is not modified. The result contains only stock Ultralytics modules and a matching
    ``model.yaml``, so ``YOLO(saved_path)`` loads and trains it without yolocomp.
    """
    ignore = tuple(int(i) for i in ignore)
    graph, planner, plan = plan_pruning(model, ratio, flops_reduction, method, importance, min_channels, round_to,
                                        ignore, imgsz, seed, max_layer_ratio)
    pruned = build_pruned(model, graph, plan)
    if compensate:
        from yolocomp.prune import compensate as comp

        means = comp.measured_means(model, graph, calib) if calib is not None else comp.analytic_means(model, graph)
        comp.compensate(model, pruned, graph, plan, means)
    rows = layer_table(model, graph, plan)
    summary = {
        "method": method,
        "target": {"ratio": ratio, "flops_reduction": flops_reduction},
        "achieved": {"ratio": round(plan.ratio, 4), "flops_reduction": round(plan.flops_reduction, 4)},
        "settings": {"min_channels": min_channels, "round_to": round_to, "ignore": list(ignore), "imgsz": imgsz,
                     "max_layer_ratio": max_layer_ratio,
                     "compensation": None if not compensate else "calibration images" if calib is not None else "bn"},
        "params": {"before": count_params(model), "after": count_params(pruned)},
        "gflops": {"before": round(gflops(model, imgsz), 4), "after": round(gflops(pruned, imgsz), 4)},
        "channels": {"before": conv_channels(model), "after": conv_channels(pruned)},
        "prunable_channels": {"before": planner.total, "after": sum(plan.counts[s.id] for s in graph.prunable_spaces())},
        "stage_pruned_share": stage_shares(rows),
        "layers": rows,
        "kept_channels": layer_keep(graph, plan),  #: layer index -> kept output channels (recon's channel_map)
    }
    return pruned, summary
