"""``measure_attention``: CAP's channel attention measured on a converged model with its weights frozen.

CAP's attention epoch trains the whole detector with its gates on labelled images. On a converged model and a few
hundred images, that training moves the weights away from the converged ones while the gates have barely left the
identity, so the mean attention ranks the channels of a model that no longer exists. Here only the gates learn, on
any images, labelled or not: the model itself without gates is the teacher, and the head-output distillation
(:func:`~yolocomp.distill.head_kd.head_kd_terms`, exactly 0 where the gates are the identity, as they start) holds
its outputs while a pressure on the mean attention pulls every gate down. The outputs then hold up the channels they
need, and a channel whose attention falls is one they can do without. Its importance is its mean attention over the
last half of the iterations. The model given, its weights and its BatchNorm statistics are not changed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from copy import deepcopy

import torch
from torch import nn
from tqdm import tqdm

from yolocomp.distill.head_kd import head_kd_terms, head_outputs
from yolocomp.errors import UserError
from yolocomp.prune.cap import AttentionGate, ChannelAttentionPruning


def measure_attention(
    model: nn.Module,
    images: torch.Tensor,
    *,
    attention: str = "se",
    iters: int = 300,
    sparsity: float = 1.0,
    lr: float = 0.01,
    batch: int = 16,
    ignore: Iterable[int] = (),
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], dict]:
    """``(mean attention per channel keyed by the gated conv's name, info)`` for the convs whose channels can be
    pruned; ``images`` (N, 3, H, W) in 0-1, drawn in random batches of ``batch``, every other one mirrored. The
    scores go to ``prune_model(importance=)`` like those of :class:`ChannelAttentionPruning`."""
    if len(images) == 0:
        raise UserError("measuring CAP's attention needs images: pass --images DIR or --data with a train split")
    if iters < 2:
        raise UserError(f"attention_iters={iters} is too few to measure attention; use a number such as 300")
    started = time.perf_counter()
    device = next(model.parameters()).device
    teacher = deepcopy(model).float().eval()
    gated = deepcopy(model).float().eval()  # BatchNorm keeps its running statistics: the gates alone change
    ChannelAttentionPruning(ratio=None, attention=attention, ignore=tuple(ignore)).prepare(gated)
    gates = {name: m for name, m in gated.named_modules() if isinstance(m, AttentionGate)}
    if not gates:
        raise UserError("the model has no prunable channels to measure attention on; check --ignore")
    for p in gated.parameters():
        p.requires_grad_(False)
    params = [p for g in gates.values() for p in g.attn.parameters()]
    for p in params:
        p.requires_grad_(True)
    seen: dict[str, torch.Tensor] = {}
    hooks = [g.attn.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
             for name, g in gates.items()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    reg_max = int(teacher.model[-1].reg_max)
    sums = {name: torch.zeros(g.attn_mean.shape, device=device) for name, g in gates.items()}
    averaged, kd_last = 0, 0.0
    try:
        for it in tqdm(range(iters), desc="measure attention", disable=not progress):
            x = images[torch.randint(0, len(images), (min(batch, len(images)),), generator=generator)]
            x = x.to(device).float()
            if it % 2:
                x = x.flip(3)
            with torch.no_grad():
                target = head_outputs(teacher(x))
            terms = head_kd_terms(head_outputs(gated(x)), target, reg_max, temperature=1.0)
            kd = terms["cls"] + terms["dfl"]
            pressure = torch.stack([a.mean() for a in seen.values()]).mean()
            optimizer.zero_grad(set_to_none=True)
            (kd + sparsity * pressure).backward()
            optimizer.step()
            kd_last = float(kd.detach())
            if it >= iters // 2:
                averaged += 1
                for name in gates:
                    sums[name] += seen[name].detach().float().mean(0)
    finally:
        for h in hooks:
            h.remove()
    scores = {name: (s / averaged).cpu() for name, s in sums.items()}
    every = torch.cat(list(scores.values()))
    info = {"iters": iters, "images": len(images), "attention": attention, "sparsity": sparsity,
            "head_kd_last": round(kd_last, 5), "attention_quantiles": [round(float(every.quantile(q)), 4)
                                                                     for q in (0.1, 0.5, 0.9)],
            "seconds": round(time.perf_counter() - started, 1)}
    return scores, info
