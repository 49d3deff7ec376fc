"""Per-layer sensitivity: quantize one conv at a time, measure how far the detector's output moves from float, and
suggest a mixed-precision plan that keeps the most sensitive layers at higher precision."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from yolocomp.quant.modules import quant_convs, quantizers


@torch.no_grad()
def _outputs(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    outs = []
    for x in batches:
        y = model(x)
        outs.append((y[0] if isinstance(y, (list, tuple)) else y).float())
    return outs


def _distance(ref: list[torch.Tensor], out: list[torch.Tensor], nbox: int = 4) -> float:
    """Output change: relative L2 error of class scores plus of boxes (each normalised by its float norm)."""
    err = 0.0
    for r, o in zip(ref, out):
        for sl in (slice(0, nbox), slice(nbox, None)):
            err += ((o[:, sl] - r[:, sl]).norm() / r[:, sl].norm().clamp_min(1e-12)).item()
    return err / len(ref)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: list[torch.Tensor], progress: bool = True) -> list[dict]:
    """For a calibrated quantized model: the output change when only one conv (its input and weight quantizers) is
    quantized. Sorted most sensitive first."""
    model.eval()
    qs = quantizers(model)
    state = {id(q): q.enabled for q in qs}
    for q in qs:
        q.enabled = False
    ref = _outputs(model, batches)
    rows = []
    try:
        for conv in tqdm(quant_convs(model), desc="sensitivity", disable=not progress, leave=False):
            conv.act_quant.enabled = conv.weight_quant.enabled = True
            rows.append({"layer": conv.name, "w_bits": conv.weight_quant.bits, "a_bits": conv.act_quant.bits,
                         "output_error": round(_distance(ref, _outputs(model, batches)), 6)})
            conv.act_quant.enabled = conv.weight_quant.enabled = False
        for q in qs:
            q.enabled = True
        rows_all = _distance(ref, _outputs(model, batches))
    finally:
        for q in qs:
            q.enabled = state[id(q)]
    rows.sort(key=lambda r: -r["output_error"])
    for r in rows:
        r["share"] = round(r["output_error"] / max(sum(x["output_error"] for x in rows), 1e-12), 4)
    return [{"layer": "<all>", "output_error": round(rows_all, 6)}, *rows]


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
