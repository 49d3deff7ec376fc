"""Per-layer sensitivity: quantize one conv at a time, measure how far the detector's output moves from float, and
suggest a mixed-precision plan that keeps the most sensitive layers at higher precision."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from yolocomp.config.ptq import SENSITIVITY_METRICS
from yolocomp.quant.modules import quant_convs, quantizers


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> list:
    return [model(x) for x in batches]


def _decoded(y: Any) -> torch.Tensor:
    return (y[0] if isinstance(y, (list, tuple)) else y).float()


def _distance(ref: list, out: list, nbox: int = 4) -> float:
    """Output change: relative L2 error of the decoded class scores plus of the decoded boxes (each normalised by
    its float norm)."""
    err = 0.0
    for r, o in zip(ref, out):
        r, o = _decoded(r), _decoded(o)
        for sl in (slice(0, nbox), slice(nbox, None)):
            err += ((o[:, sl] - r[:, sl]).norm() / r[:, sl].norm().clamp_min(1e-12)).item()
    return err / len(ref)


def _head_kd_distance(ref: list, out: list, reg_max: int) -> float:
    """Output change as head KD measures it (T 1): class KL plus box-distribution KL per anchor, weighted by the
    float model's confidence. Decoded boxes are pixel positions, so their relative error hides a shift of a few
    pixels; the box-bin distributions do not depend on where the box is."""
    from yolocomp.distill.head_kd import head_kd_terms, head_outputs

    err = 0.0
    for r, o in zip(ref, out):
        terms = head_kd_terms(head_outputs(o), head_outputs(r), reg_max, 1.0)
        err += float(terms["cls"] + terms["dfl"])
    return err / len(ref)


def _significant(value: float) -> float:
    return float(f"{value:.6g}")  # the KL divergence of a small change can fall below 1e-6: keep digits, not places


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list[torch.Tensor], progress: bool = True,
                      part: str = "both", metric: str = "head_kd") -> list[dict]:
    """For a calibrated quantized model: the output change when only one conv is quantized: its input and weight
    quantizers (``part="both"``), or only its weight (``"weight"``). ``metric``: ``output`` (relative error of
    the decoded outputs) or ``head_kd`` (the head-KD divergence of the raw outputs). Sorted most sensitive first."""
    if metric == "head_kd":
        reg_max = getattr(model.model[-1], "reg_max", 16)

        def distance(ref: list, out: list) -> float:
            return _head_kd_distance(ref, out, reg_max)
    elif metric == "output":
        distance = _distance
    else:
        raise ValueError(f"unknown sensitivity metric {metric!r}; use {' or '.join(SENSITIVITY_METRICS)}")
    model.eval()
    qs = quantizers(model)
    state = {id(q): q.enabled for q in qs}
    for q in qs:
        q.enabled = False
    ref = _outputs(model, batches)
    rows = []
    try:
        for conv in tqdm(quant_convs(model), desc="sensitivity", disable=not progress, leave=False):
            conv.weight_quant.enabled = True
            conv.act_quant.enabled = part == "both"
            rows.append({"layer": conv.name, "w_bits": conv.weight_quant.bits, "a_bits": conv.act_quant.bits,
                         "output_error": _significant(distance(ref, _outputs(model, batches)))})
            conv.act_quant.enabled = conv.weight_quant.enabled = False
        for q in qs:
            q.enabled = True
        rows_all = distance(ref, _outputs(model, batches))
    finally:
        for q in qs:
            q.enabled = state[id(q)]
    rows.sort(key=lambda r: -r["output_error"])
    for r in rows:
        r["share"] = round(r["output_error"] / max(sum(x["output_error"] for x in rows), 1e-12), 4)
    return [{"layer": "<all>", "output_error": _significant(rows_all)}, *rows]


def mixed_precision_plan(rows: list[dict], bits: int, keep: float = 0.1) -> dict:
    """Keep the most sensitive layers (the top ``keep`` fraction, at least one) at higher precision: 8 bits when the
    target is 4, float (excluded) when the target is 8."""
    layers = [r for r in rows if r["layer"] != "<all>"]
    n = max(1, round(len(layers) * keep))
    top = [r["layer"] for r in layers[:n]]
    if bits < 8:
        return {"default_bits": bits, "layer_bits": {name: 8 for name in top},
                "note": f"{n} most sensitive convs at 8 bits, the rest at {bits}"}
    return {"default_bits": bits, "exclude": top, "note": f"{n} most sensitive convs kept in float"}


def weight_bytes(conv: nn.Module, bits: int) -> float:
    """Bytes of a conv's weight at ``bits`` (4-bit weights pack two per byte)."""
    return conv.conv.weight.numel() * bits / 8


def model_weight_mb(model: nn.Module, bits: int, exclude: Iterable[str | int] = ()) -> float:
    """Megabytes of the conv weights ``quantize_model`` would quantize (``exclude`` kept out), stored at ``bits``."""
    from copy import deepcopy

    from yolocomp.quant.convert import quantize_model

    probe = deepcopy(model)
    quantize_model(probe, bits, 8, exclude=exclude, share=False)
    return sum(weight_bytes(c, bits) for c in quant_convs(probe)) / 1e6


def weight_bit_plan(model: nn.Module, rows: list[dict], budget_bytes: float, low: int = 4, high: int = 8) -> dict:
    """Choose ``high`` or ``low`` weight bits per conv under ``budget_bytes`` of weight storage.

    ``rows``: :func:`layer_sensitivity` at ``low`` weight bits (``part="weight"``). Greedy knapsack: start with every
    conv at ``low`` bits and raise the convs with the most output error per added byte while the budget allows.
    Raises ValueError when the budget is below the all-``low`` size."""
    convs = {c.name: c for c in quant_convs(model)}
    error = {r["layer"]: r["output_error"] for r in rows if r["layer"] in convs}
    low_total = sum(weight_bytes(c, low) for c in convs.values())
    high_total = sum(weight_bytes(c, high) for c in convs.values())
    if budget_bytes < low_total:
        raise ValueError(f"budget {budget_bytes / 1e6:.3f} MB is below the all-{low}-bit weights "
                         f"({low_total / 1e6:.3f} MB)")
    bits = {name: low for name in convs}
    used = low_total
    gain = {n: error.get(n, 0.0) / max(weight_bytes(c, high) - weight_bytes(c, low), 1.0) for n, c in convs.items()}
    for name in sorted(convs, key=lambda n: -gain[n]):
        extra = weight_bytes(convs[name], high) - weight_bytes(convs[name], low)
        if used + extra <= budget_bytes:
            bits[name] = high
            used += extra
    table = [{"layer": n, "weight_bits": b, "weight_kb": round(weight_bytes(convs[n], b) / 1e3, 2),
              "output_error_at_low": _significant(error.get(n, 0.0))} for n, b in bits.items()]
    return {"weight_bits": bits, "weight_mb": round(used / 1e6, 4), "budget_mb": round(budget_bytes / 1e6, 4),
            f"all_{low}bit_mb": round(low_total / 1e6, 4), f"all_{high}bit_mb": round(high_total / 1e6, 4),
            "layers_high": sum(b == high for b in bits.values()), "layers": len(bits), "table": table}
