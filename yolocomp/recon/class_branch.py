"""``fit_class_branch``: fit a student's Detect class branch to the teacher's class logits on the teacher's own Detect
inputs, cached once for many images.

A class branch that starts from scratch (the light head) needs far more images than block reconstruction fits on:
fitted inside the reconstruction it sees a few hundred images hundreds of times and learns them rather than the
teacher. Here only the teacher runs on each image (and its mirror), once; its Detect inputs and class logits are
kept in half precision up to a memory cap, and the branch trains on random batches of that cache, which costs a
fraction of a forward pass per image. The loss is :func:`class_kd_loss`: the teacher's probabilities as soft
targets, each anchor weighted by the teacher's confidence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from yolocomp.errors import UserError
from yolocomp.recon.engine import class_kd_loss

#: Default cap on the cached Detect inputs and logits (half precision).
CACHE_BYTES = 2 * 1024**3


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
                      max_bytes: int = CACHE_BYTES, progress: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's Detect inputs and class logits per level (half precision), for each image and, with ``flip``,
    its mirror; stops adding images once ``max_bytes`` is reached."""
    head = teacher.model[-1]
    captured: dict[str, list[torch.Tensor]] = {}
    hook = head.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", list(args[0])))
    inputs: list[list[torch.Tensor]] = [[] for _ in head.cv3]
    logits: list[list[torch.Tensor]] = [[] for _ in head.cv3]
    used = 0
    was = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    try:
        for batch in tqdm(batches, desc="cache head inputs", disable=not progress, leave=False):
            for view in (batch, batch.flip(-1)) if flip else (batch,):
                teacher(view.to(device).float())
                for level, x in enumerate(captured["x"]):
                    inputs[level].append(x.half().cpu())
                    logits[level].append(head.cv3[level](x).half().cpu())
                    used += 2 * (inputs[level][-1].numel() + logits[level][-1].numel())
                if used >= max_bytes:
                    break
            if used >= max_bytes:
                break
    finally:
        hook.remove()
        teacher.train(was)
    if not inputs[0]:
        raise UserError("fit_class_branch got no images; pass --images DIR or --data with a train split")
    return [torch.cat(x) for x in inputs], [torch.cat(x) for x in logits]


def fit_class_branch(student: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], iters: int = 3000,
                     batch_size: int = 16, lr: float = 3e-3, flip: bool = True, max_bytes: int = CACHE_BYTES,
                     seed: int = 0, progress: bool = True) -> dict:
    """Train only ``student``'s Detect class branch (cv3) so that, on the teacher's Detect inputs, it gives the
    teacher's class probabilities; ``batches`` are image tensors (N, 3, H, W) in [0, 1]. The student's Detect must
    take the teacher's input widths (fit before pruning its inputs). BatchNorm trains on batch statistics and ends
    in eval mode with the running ones. Returns the report (images cached, loss at start and end, seconds)."""
    head, teacher_head = _check_heads(student, teacher)
    widths = [branch[0][0].conv.in_channels if isinstance(branch[0], nn.Sequential) else branch[0].conv.in_channels
              for branch in head.cv3]
    teacher_widths = [branch[0].conv.in_channels for branch in teacher_head.cv2]
    if widths != teacher_widths:
        raise UserError(f"the student's class branch takes {widths} channels, the teacher's Detect inputs have "
                        f"{teacher_widths}; fit the class branch before pruning Detect's inputs")
    if iters < 1 or batch_size < 1 or lr <= 0:
        raise UserError(f"iters={iters}, batch_size={batch_size} must be >= 1 and lr={lr} > 0")
    started = time.perf_counter()
    inputs, targets = cache_head_inputs(teacher, batches, flip, max_bytes, progress)
    generator = torch.Generator().manual_seed(seed)
    params = list(head.cv3.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    warmup = max(1, iters // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # short warm-up, then cosine to zero
        optimizer, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iters - warmup))))
    momenta = {m: m.momentum for m in head.cv3.modules() if isinstance(m, nn.BatchNorm2d)}
    for bn in momenta:
        bn.momentum = 0.03  # running statistics averaged over many batches, as Ultralytics trains them
    device = next(head.parameters()).device
    count, losses = len(inputs[0]), []
    head.cv3.train()
    try:
        for _ in tqdm(range(iters), desc="fit class branch", disable=not progress, leave=False):
            pick = torch.randint(count, (min(batch_size, count),), generator=generator)
            loss = sum(class_kd_loss(branch(x[pick].to(device).float()), t[pick].to(device).float())
                       for branch, x, t in zip(head.cv3, inputs, targets))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach().item())
    finally:
        head.cv3.eval()
        for bn, momentum in momenta.items():
            bn.momentum = momentum
    window = warmup  # the loss averaged over the first and last twentieth of the fit
    return {"views": count, "iters": iters, "batch": batch_size, "lr": lr,
            "loss_start": round(sum(losses[:window]) / window, 4), "loss_end": round(sum(losses[-window:]) / window, 4),
            "cache_mb": round(sum(2 * (x.numel() + t.numel()) for x, t in zip(inputs, targets)) / 2**20, 1),
            "seconds": round(time.perf_counter() - started, 1)}
