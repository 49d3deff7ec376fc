"""``fit_class_branch``: fit a student's Detect class branch to the teacher's class logits on Detect inputs cached
once for many images.

A class branch that starts from scratch (the light head) needs far more images than block reconstruction fits on:
fitted inside the reconstruction it sees a few hundred images hundreds of times and learns them rather than the
teacher. Here student and teacher run once on each image (and its mirror); the student's Detect inputs (what the
branch will see, as in block reconstruction) and the teacher's class logits are kept in half precision up to a
memory cap, and the branch trains on random batches of that cache, which costs a fraction of a forward pass per
image. The loss is :func:`class_kd_loss`: the teacher's probabilities as soft targets, each anchor weighted by the
teacher's confidence. A box branch rebuilt with fewer DFL bins (``light_head(..., box_bins=)``) can be fitted in the
same pass (``box=True``), to the teacher's box distributions rebinned (:mod:`yolocomp.distill.box_bins`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from yolocomp.distill.box_bins import box_kd_loss, box_targets
from yolocomp.errors import UserError
from yolocomp.recon.engine import class_kd_loss

#: Default cap on the cached Detect inputs and logits (half precision).
CACHE_BYTES = 2 * 1024**3
#: Whose Detect inputs the branch learns on.
FIT_INPUTS = ("student", "teacher")


def _check_heads(student: nn.Module, teacher: nn.Module) -> tuple[nn.Module, nn.Module]:
    head, teacher_head = student.model[-1], teacher.model[-1]
    if not hasattr(head, "cv3") or not hasattr(teacher_head, "cv3"):
        raise UserError("fit_class_branch needs Detect heads with a class branch (cv3) in student and teacher")
    if head.nc != teacher_head.nc or len(head.cv3) != len(teacher_head.cv3):
        raise UserError(f"student head ({head.nc} classes, {len(head.cv3)} levels) and teacher head "
                        f"({teacher_head.nc} classes, {len(teacher_head.cv3)} levels) differ; use the student's own "
                        "uncompressed model as teacher")
    return head, teacher_head


@torch.no_grad()
def cache_head_inputs(teacher: nn.Module, batches: Iterable[torch.Tensor], flip: bool = True,
                      max_bytes: int = CACHE_BYTES, progress: bool = True,
                      student: nn.Module | None = None, box_bins: int | None = None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Detect inputs and the teacher's class logits per level (half precision), for each image and, with ``flip``,
    its mirror; stops adding images once ``max_bytes`` is reached. The inputs are the teacher's own, or with
    ``student`` that model's (its features as they are, targets still from the teacher). With ``box_bins`` each
    level's targets start with the teacher's box distributions on that many bins (probabilities, 4 sides), then the
    class logits."""
    models = {"teacher": teacher, **({"student": student} if student is not None else {})}
    captured: dict[str, list[torch.Tensor]] = {}

    def capture(key: str):
        return lambda _m, args: captured.__setitem__(key, list(args[0]))

    hooks = [m.model[-1].register_forward_pre_hook(capture(key)) for key, m in models.items()]
    head = teacher.model[-1]
    source = "student" if student is not None else "teacher"
    inputs: list[list[torch.Tensor]] = [[] for _ in head.cv3]
    logits: list[list[torch.Tensor]] = [[] for _ in head.cv3]
    used = 0
    modes = {key: m.training for key, m in models.items()}
    device = next(teacher.parameters()).device
    try:
        for m in models.values():
            m.eval()
        for batch in tqdm(batches, desc="cache head inputs", disable=not progress, leave=False):
            for view in (batch, batch.flip(-1)) if flip else (batch,):
                for m in models.values():
                    m(view.to(device).float())
                for level, x in enumerate(captured["teacher"]):
                    inputs[level].append(captured[source][level].half().cpu())
                    target = head.cv3[level](x)
                    if box_bins:
                        target = torch.cat([box_targets(head.cv2[level](x), box_bins), target], 1)
                    logits[level].append(target.half().cpu())
                    used += 2 * (inputs[level][-1].numel() + logits[level][-1].numel())
                if used >= max_bytes:
                    break
            if used >= max_bytes:
                break
    finally:
        for h in hooks:
            h.remove()
        for key, m in models.items():
            m.train(modes[key])
    if not inputs[0]:
        raise UserError("fit_class_branch got no images; pass --images DIR or --data with a train split")
    return [torch.cat(x) for x in inputs], [torch.cat(x) for x in logits]


def fit_class_branch(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], iters: int = 3000,
                     batch_size: int = 16, lr: float = 3e-3, flip: bool = True, max_bytes: int = CACHE_BYTES,
                     seed: int = 0, inputs: str = "student", box: bool = False, progress: bool = True) -> dict:
    """Train only ``student``'s Detect class branch (cv3) so that it gives the teacher's class probabilities;
    ``batches`` are image tensors (N, 3, H, W) in [0, 1]. ``inputs``: the branch learns on the student's own Detect
    inputs (``student``: what it will see, as block reconstruction does) or on the teacher's (``teacher``: the
    student's Detect must then take the teacher's widths). ``box``: train the box branch (cv2) too, to the teacher's
    box distributions on the student's bins, weighted by the teacher's confidence. BatchNorm trains on batch statistics
    and ends in eval mode with the running ones. Returns the report (images cached, loss at start and end, seconds)."""
    head, teacher_head = _check_heads(student, teacher)
    if inputs not in FIT_INPUTS:
        raise UserError(f"inputs '{inputs}' unknown; use one of {FIT_INPUTS}")
    widths = [branch[0][0].conv.in_channels if isinstance(branch[0], nn.Sequential) else branch[0].conv.in_channels
              for branch in head.cv3]
    teacher_widths = [branch[0].conv.in_channels for branch in teacher_head.cv2]
    if inputs == "teacher" and widths != teacher_widths:
        raise UserError(f"the student's class branch takes {widths} channels, the teacher's Detect inputs have "
                        f"{teacher_widths}; fit on the student's own inputs (inputs='student') or before pruning "
                        "Detect's inputs")
    if iters < 1 or batch_size < 1 or lr <= 0:
        raise UserError(f"iters={iters}, batch_size={batch_size} must be >= 1 and lr={lr} > 0")
    started = time.perf_counter()
    bins = int(head.reg_max) if box else None
    if box and (bins < 2 or bins > int(teacher_head.reg_max)):
        raise UserError(f"box=True fits DFL bins: the student's reg_max {bins} must be in 2..{teacher_head.reg_max} "
                        "(the teacher's)")
    features, targets = cache_head_inputs(teacher, batches, flip, max_bytes, progress,
                                          student if inputs == "student" else None, bins)
    generator = torch.Generator().manual_seed(seed)
    branches = [head.cv3, *([head.cv2] if box else [])]
    params = [p for branch in branches for p in branch.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    warmup = max(1, iters // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short warm-up, then cosine to zero
        optimizer, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iters - warmup))))
    momenta = {m: m.momentum for branch in branches for m in branch.modules() if isinstance(m, nn.BatchNorm2d)}
    for bn in momenta:
        bn.momentum = 0.03  # running statistics averaged over many batches, as Ultralytics trains them
    device = next(head.parameters()).device
    count, losses = len(features[0]), []
    for branch in branches:
        branch.train()
    try:
        for _ in tqdm(range(iters), desc="fit class and box branches" if box else "fit class branch",
                      disable=not progress, leave=False):
            pick = torch.randint(count, (min(batch_size, count),), generator=generator)
            loss = 0.0
            for level, (x, t) in enumerate(zip(features, targets)):
                x, t = x[pick].to(device).float(), t[pick].to(device).float()
                cls_target = t[:, -head.nc:]
                loss = loss + class_kd_loss(head.cv3[level](x), cls_target)
                if box:
                    weight = cls_target.sigmoid().amax(1).clamp_min(0.01)
                    loss = loss + box_kd_loss(head.cv2[level](x), t[:, : 4 * bins], weight, probabilities=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach().item())
    finally:
        for branch in branches:
            branch.eval()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    window = warmup  # the loss averaged over the first and last twentieth of the fit
    return {"views": count, "inputs": inputs, "branches": ["cls", *(["box"] if box else [])], "iters": iters, "batch": batch_size, "lr": lr,
            "loss_start": round(sum(losses[:window]) / window, 4), "loss_end": round(sum(losses[-window:]) / window, 4),
            "cache_mb": round(sum(2 * (x.numel() + t.numel()) for x, t in zip(features, targets)) / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1)}
