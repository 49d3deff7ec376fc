"""Real two-process DDP (gloo, CPU) through yolocomp's hooks, compared with one process on the same total data.

Ultralytics' own DDP launcher needs CUDA, so each worker drives the real integration objects directly in the order
Ultralytics' ``_setup_train`` / ``_do_train`` uses them: ``PrepareBeforeOptimizer.set_model_attributes`` (finds the
hub through the trainer's callbacks and runs ``prepare``), DDP wrap with Ultralytics' settings, optimizer, EMA,
``on_pretrain_routine_end``, ``on_train_start`` (criterion wrapper), forward = loss through DDP, backward with
Ultralytics' ``loss * world_size``, ``optimizer.step`` (step pre-hook), ``on_train_epoch_end``.
"""

from __future__ import annotations

import os
import socket
from copy import deepcopy
from pathlib import Path

import pytest
import torch

IMGSZ, GLOBAL_BATCH, STEPS = 64, 8, 2
CONFIGS = ("bn_fgfi", "cap_headkd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(step: int) -> dict:
    """The same 8 labelled images on every rank; each rank (or micro-batch) takes its slice."""
    g = torch.Generator().manual_seed(100 + step)
    n = GLOBAL_BATCH
    xy = 0.3 + 0.4 * torch.rand(n, 2, generator=g)
    wh = 0.2 + 0.2 * torch.rand(n, 2, generator=g)
    return {"img": torch.rand(n, 3, IMGSZ, IMGSZ, generator=g), "cls": torch.randint(0, 3, (n, 1), generator=g).float(),
            "bboxes": torch.cat([xy, wh], 1)}


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {"img": batch["img"][lo:hi], "cls": batch["cls"][lo:hi], "bboxes": batch["bboxes"][lo:hi],
            "batch_idx": torch.arange(hi - lo).float()}  # one box per image


class _BareTrainer:
    """Stands in for Ultralytics' trainer base: only what the hooks read."""

    def set_model_attributes(self) -> None:
        pass


def _run(config: str, rank: int, world: int, save_dir: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import TORCH_2_13, ModelEMA

    from yolocomp.distill import FineGrainedImitation, HeadKD
    from yolocomp.integration import CallbackHub, unwrap, with_prepare
    from yolocomp.methods import TRAINING_MODULES
    from yolocomp.prune.cap import AttentionGate, ChannelAttentionPruning
    from yolocomp.prune.slimming import BNSlimming

    torch.manual_seed(0)
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    student.args = get_cfg()  # loss gains, as Ultralytics' set_model_attributes attaches them
    if config == "bn_fgfi":  # a wider teacher: FGFI trains 1x1 adapters on the student
        methods = [BNSlimming(s=1e-2), FineGrainedImitation(DetectionModel("yolov8s.yaml", nc=3, verbose=False))]
    else:
        methods = [ChannelAttentionPruning(ratio=0.3, imgsz=IMGSZ), HeadKD(DetectionModel("yolov8n.yaml", nc=3, verbose=False))]
    hub = CallbackHub(methods)
    trainer = with_prepare(_BareTrainer)()
    trainer.__dict__.update(model=student, device=torch.device("cpu"), epoch=0, epochs=1, save_dir=str(save_dir),
                            args=student.args, callbacks={e: [fn] for e, fn in hub.callbacks().items()})
    trainer.set_model_attributes()  # prepare: gates / adapters exist before optimizer, EMA and DDP
    for name, p in student.named_parameters():
        p.requires_grad = ".dfl" not in name  # Ultralytics always freezes the DFL conv
    sync = {"forward_sync_buffers" if TORCH_2_13 else "broadcast_buffers": False}  # Ultralytics' DDP settings
    trainer.model = DistributedDataParallel(student, find_unused_parameters=True, **sync)
    trainer.optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    trainer.ema = ModelEMA(trainer.model)
    hub.on_pretrain_routine_end(trainer)
    hub.on_train_start(trainer)

    grads: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in student.named_parameters()}

    def snapshot(optimizer, args, kwargs):  # registered after the hub's hook: the gradients the step uses
        grads.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(snapshot)
    per_rank = GLOBAL_BATCH // 2
    slices = [(rank * per_rank, (rank + 1) * per_rank)] if world == 2 else [(0, per_rank), (per_rank, GLOBAL_BATCH)]
    columns = None
    for step in range(STEPS):
        trainer.model.train()
        batch = _global_batch(step)
        for lo, hi in slices:  # one process: the two ranks' halves as accumulated micro-batches
            loss, items = trainer.model(_slice(batch, lo, hi))
            (loss.sum() * world).backward()
            columns = sorted(items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        trainer.ema.update(trainer.model)
    hub.on_train_epoch_end(trainer)

    result = {"grads": grads, "columns": columns,
              "params": {n: p.detach().clone() for n, p in student.named_parameters()}}
    if config == "cap_headkd":
        cap = methods[0]
        result["scores"] = cap.scores(student)
        result["ema_scores"] = cap.scores(trainer.ema.ema)
        result["batches"] = sorted({float(m.attn_batches) for m in student.modules() if isinstance(m, AttentionGate)})
    else:
        result["adapters"] = {n: p.detach().clone() for n, p in student.named_parameters() if TRAINING_MODULES in n}
        result["bn_history"] = methods[0].history
    if rank == 0:
        hub.on_train_end(trainer)  # Ultralytics runs it on rank 0 only
        delivered = hub.finalize(deepcopy(unwrap(trainer.model)))
        result["delivered_keys"] = sorted(delivered.state_dict())
        result["summary"] = getattr(methods[0], "summary", None)
    return result


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for config in CONFIGS:
            torch.save(_run(config, rank, world, Path(out)), Path(out) / f"{config}_w{world}_r{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    for world in (2, 1):
        mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return {(c, w, r): torch.load(out / f"{c}_w{w}_r{r}.pt", weights_only=False)
            for c in CONFIGS for w, r in ((2, 0), (2, 1), (1, 0))}


def _close(a: dict, b: dict, **tol) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


LOOSE = {"rtol": 1e-3, "atol": 1e-5}  # DDP sums the ranks' gradients in another order than one process


@pytest.mark.parametrize("config", CONFIGS)
def test_gradients_after_the_step_hook_agree_across_ranks_and_with_one_process(runs, config):
    r0, r1, single = runs[config, 2, 0], runs[config, 2, 1], runs[config, 1, 0]
    assert len(r0["grads"]) == len(single["grads"]) == STEPS
    for g0, g1, gs in zip(r0["grads"], r1["grads"], single["grads"]):
        _close(g0, g1, rtol=0, atol=0)  # all-reduced, then the same before_step edits on every rank
        _close(g0, gs, **LOOSE)
    _close(r0["params"], r1["params"], rtol=0, atol=0)
    _close(r0["params"], single["params"], **LOOSE)
    kd_column = "fgfi_loss" if config == "bn_fgfi" else "kdcls_loss"
    assert kd_column in r0["columns"], "the KD loss went through the criterion wrapper inside the DDP forward"


def test_bn_sparsity_and_adapters_train_through_ddp(runs):
    from yolocomp.methods import TRAINING_MODULES

    r0, r1, single = (runs["bn_fgfi", w, r] for w, r in ((2, 0), (2, 1), (1, 0)))
    assert r0["adapters"], "FGFI's adapters are parameters of the DDP-wrapped student"
    assert all(r0["grads"][0][n].abs().sum() > 0 for n in r0["adapters"]), "adapters get gradients via DDP"
    _close(r0["adapters"], r1["adapters"], rtol=0, atol=0)
    _close(r0["adapters"], single["adapters"], **LOOSE)
    assert r0["bn_history"] and r0["bn_history"][-1]["n"] > 0
    assert not any(TRAINING_MODULES in k for k in r0["delivered_keys"]), "finalize strips the adapters"


def test_cap_statistics_are_merged_over_ranks_and_reach_finalize(runs):
    r0, r1, single = (runs["cap_headkd", w, r] for w, r in ((2, 0), (2, 1), (1, 0)))
    assert r0["scores"] and all(v.numel() > 0 for v in r0["scores"].values())
    _close(r0["scores"], r1["scores"], rtol=0, atol=0)  # merged: both ranks hold the statistics of all 4 batches
    _close(r0["scores"], single["scores"], **LOOSE)  # ... equal to one process seeing the same 4 batches
    _close(r0["ema_scores"], r0["scores"], rtol=0, atol=0)  # the EMA (what checkpoints save) holds them verbatim
    assert r0["batches"] == [STEPS * 2 / 2] and single["batches"] == [STEPS * 2]  # 4 batches, shared by 2 ranks
    assert r0["summary"]["method"] == "cap" and abs(r0["summary"]["achieved"]["ratio"] - 0.3) < 0.05
