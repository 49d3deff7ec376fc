"""``yolocomp prune``: optional sparsity / attention training, pruning, optional fine-tune, evaluation, report."""

from __future__ import annotations

import json
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from yolocomp.commands.common import StageResult, kd_training_data, size_mb, warn_if_untrained, work_dir
from yolocomp.config import PruneConfig
from yolocomp.config.options import settings
from yolocomp.config.prune import AUTO_BOX_BINS, KD_RECOVERY_TRAIN_DEFAULTS, LIGHT_HEAD_LAYER_CAP
from yolocomp.distill.frozen_bn import FrozenBatchNorm
from yolocomp.errors import UserError
from yolocomp.prune.light_head import light_head
from yolocomp.prune.pruner import conv_channels, count_params, gflops, prune_model
from yolocomp.recipe import Recipe, stage_config

#: epochs of a recovery bounded only by --recover-minutes (Ultralytics re-plans epochs to fit its time limit)
UNTIL_TIME_LIMIT = 10000
#: the recovery's parts before its training, whose wall times count against --recover-minutes with the training's
#: (``recovery["seconds"]``); the evaluations in between are not recovery
PRE_TRAINING_PHASES = ("class_branch_fit_seconds", "progressive_seconds", "reconstruction_seconds")


def export_onnx(model: nn.Module, imgsz: int, workdir: Path) -> str:
    """Ultralytics ONNX export (static batch 1, not simplified) of an in-memory model; returns the .onnx path."""
    import copy

    from ultralytics import YOLO

    from yolocomp.integration import save_model
    from yolocomp.integration.threads import keep_threads

    workdir.mkdir(parents=True, exist_ok=True)
    pt = save_model(copy.deepcopy(model), workdir / "latency.pt")
    with keep_threads():
        return YOLO(str(pt)).export(format="onnx", imgsz=imgsz, simplify=False, dynamic=False, verbose=False)


def _evaluate(model: Any, data: str | None, imgsz: int, device: str, batch: int) -> dict | None:
    if data is None:
        return None
    from yolocomp.eval import evaluate
    from yolocomp.eval.metrics import ap_summary

    started = time.perf_counter()
    summary = ap_summary(evaluate(model, data, imgsz=imgsz, device=device, batch=batch, progress=False),
                         extra=("images",))
    return {**summary, "seconds": round(time.perf_counter() - started, 1)}


def prune(
    model: str | Path | nn.Module,
    out: str | Path,
    data: str | Path | None = None,
    *,
    imgsz: int = 640,
    device: str = "cpu",
    evaluate: bool = True,
    latency: bool = True,
    config: PruneConfig | None = None,
    **options: Any,
) -> dict:
    """Run the pruning pipeline and write ``out/pruned.pt`` (+ ``finetuned.pt``), ``report.json``, ``report.md``;
    ``options`` are :class:`~yolocomp.config.PruneConfig`'s."""
    from yolocomp.integration import load_model, resolve_data, save_model, train
    from yolocomp.prune.cap import ChannelAttentionPruning
    from yolocomp.prune.compensate import calibration_images
    from yolocomp.prune.slimming import BNSlimming

    cfg = config or stage_config("prune", options)
    method, target = cfg.method, cfg.target()
    sparsity_epochs, finetune_epochs, batch = cfg.sparsity_epochs, cfg.finetune_epochs, cfg.batch
    if cfg.recover_minutes and not finetune_epochs:
        finetune_epochs = UNTIL_TIME_LIMIT
    ignore = tuple(cfg.ignore)
    notes: list[str] = []
    original = load_model(model)
    cap_trains = method == "cap" and not _plans_light_head(original, cfg, ignore)
    if method == "cap" and not cap_trains and sparsity_epochs:
        notes.append("--sparsity-epochs ignored for cap with the light head (its attention is measured with the weights "
                     "frozen: set --attention-iters)")
        sparsity_epochs = 0
    if cap_trains and sparsity_epochs < 1:
        sparsity_epochs = 1
        notes.append("cap needs attention training: ran 1 attention epoch (set --sparsity-epochs for more)")
    if method in {"l1", "random"} and sparsity_epochs:
        notes.append(f"--sparsity-epochs ignored for {method} (no sparsity term)")
        sparsity_epochs = 0
    if sparsity_epochs and data is None:
        raise UserError("BN sparsity and CAP attention training need --data (an Ultralytics data yaml with labels)")
    if finetune_epochs and data is None and not (cfg.recover == "kd" and cfg.images):
        raise UserError("fine-tuning needs --data (an Ultralytics data yaml), or --recover kd --images DIR")
    if cfg.images:
        from yolocomp.data import check_images

        check_images(cfg.images)  # before any work: a bad folder is a one-line error, not a failure after the cut
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = work_dir(out)
    data_abs = str(resolve_data(data, work)) if data is not None else None
    eval_data = data_abs if evaluate else None
    source = str(model) if not isinstance(model, nn.Module) else getattr(model, "pt_path", "<in-memory>")
    train_args = {"imgsz": imgsz, "device": device, **cfg.trainer_overrides()}
    t0 = time.perf_counter()

    calib = calibration_images(data_abs, imgsz) if data_abs is not None else None
    recovery: dict[str, Any] = {}
    ap: dict[str, dict | None] = {"before": _evaluate(original, eval_data, imgsz, device, batch)}
    trained = original
    history = None
    if method == "bn" and sparsity_epochs:
        slim = BNSlimming(s=cfg.s, schedule=cfg.s_schedule, ignore=ignore, imgsz=imgsz)
        res = train(deepcopy(original), data_abs, [slim], project=out, name="sparsity", epochs=sparsity_epochs, **train_args)
        trained, history = res.model, slim.history
        ap["after_sparsity"] = _evaluate(trained, eval_data, imgsz, device, batch)
    steps: list[dict] | None = None
    light = _light_head_start(trained, cfg, method, target, imgsz, ignore, recovery) if cfg.steps == 1 else None
    if method == "cap" and light is None:
        if data_abs is None:  # the light head was planned but its conversion overshot the target
            raise UserError("cap without the light head trains attention on labels: pass --data")
        cap = ChannelAttentionPruning(**target, attention=cfg.attention, min_channels=cfg.min_channels,
                                      round_to=cfg.round_to, ignore=ignore, imgsz=imgsz, calib=calib,
                                      max_layer_ratio=cfg.max_layer_ratio)
        res = train(deepcopy(original), data_abs, [cap], project=out, name="attention", epochs=max(sparsity_epochs, 1),
                    **train_args)
        pruned, summary = res.model, cap.summary
    elif cfg.steps > 1:
        started = time.perf_counter()
        pruned, summary, steps = _progressive(trained, original, cfg, target, data_abs, out, work, train_args,
                                              lambda m: _evaluate(m, eval_data, imgsz, device, batch))
        recovery["progressive_seconds"] = round(time.perf_counter() - started, 1)
    else:
        base = trained
        if light is not None:
            base, target = light
            if cfg.head_fit_iters:  # before the cut, on the converted model's own Detect inputs and many images
                started = time.perf_counter()
                recovery["class_branch_fit"] = _fit_class_branch(base, original, cfg, data_abs, imgsz)
                recovery["class_branch_fit_seconds"] = round(time.perf_counter() - started, 1)
                ap["light_head"] = _evaluate(base, eval_data, imgsz, device, batch)
        importance = None
        if method == "cap":  # the light head's model, weights frozen: only the attention gates learn, on copies
            from yolocomp.recon import measure_attention

            importance, recovery["attention"] = measure_attention(
                base, torch.cat(_recon_images(cfg, data_abs, imgsz)), attention=cfg.attention, iters=cfg.attention_iters,
                sparsity=cfg.attention_sparsity, batch=batch, ignore=ignore)
        pruned, summary = _cut(base, target, cfg, ignore, imgsz, calib, light is not None, notes, importance)
        if light is not None:  # the report compares with the input model, not with the converted one
            summary["gflops"]["before"] = recovery["light_head"]["gflops"]["before"]
            summary["params"]["before"] = count_params(trained)
            summary["channels"]["before"] = conv_channels(trained)
            summary["target"] = cfg.target()
            summary["achieved"]["flops_reduction"] = round(1 - summary["gflops"]["after"] / summary["gflops"]["before"], 4)
    recovery.setdefault("head", "keep")
    pruned_path = save_model(pruned, out / "pruned.pt", extra={"prune": {k: summary[k] for k in ("method", "target", "achieved")}})
    ap["pruned"] = _evaluate(pruned, eval_data, imgsz, device, batch)
    channel_map = steps[-1]["kept_channels"] if steps else summary.get("kept_channels")  # vs the input model
    if cfg.reconstruct_first():  # the warm start of the recovery: pruned.pt above stays the model right after the cut
        started = time.perf_counter()
        recovery["reconstruction"] = _reconstruct(pruned, original, cfg, channel_map, data_abs, imgsz,
                                                  recovery.get("light_head"))
        recovery["reconstruction_seconds"] = round(time.perf_counter() - started, 1)
        ap["reconstructed"] = _evaluate(pruned, eval_data, imgsz, device, batch)

    if steps:
        ap["steps"] = [{k: r.get(k) for k in ("step", "ratio", "flops_reduction", "gflops", "ap")} for r in steps]
    models = {"before": (original, None), "pruned": (pruned, pruned_path)}
    spent = sum(recovery.get(phase, 0.0) for phase in PRE_TRAINING_PHASES)
    if finetune_epochs:
        started = time.perf_counter()
        timing = {}
        if cfg.recover_minutes:  # the budget covers the whole recovery: the training gets what the phases before left
            timing["deadline"] = time.time() + cfg.recover_minutes * 60 - spent
            timing["validation_estimate"] = max((a.get("seconds", 0.0) for a in ap.values() if isinstance(a, dict)),
                                                default=0.0)
            if spent >= cfg.recover_minutes * 60:
                notes.append(f"the recovery's work before training took {spent / 60:.1f} min, all of --recover-minutes "
                             f"{cfg.recover_minutes:g}: the training stopped after one batch (raise --recover-minutes)")
        finetuned = _recover(pruned, original, cfg, data_abs, out, {**train_args, "epochs": finetune_epochs}, recovery,
                             work, channel_map, **timing)
        recovery["seconds"] = round(time.perf_counter() - started, 1)
        ft_path = save_model(finetuned, out / "finetuned.pt", extra={"prune": {"finetune_epochs": finetune_epochs,
                                                                              "recover": cfg.recover}})
        ap["finetuned"] = _evaluate(finetuned, eval_data, imgsz, device, batch)
        models["finetuned"] = (finetuned, ft_path)
    if spent or finetune_epochs:
        recovery["total_seconds"] = round(spent + recovery.get("seconds", 0.0), 1)

    # every stage's ONNX export timed interleaved in one go (see time_onnx), so the speedups compare like with like
    lat: dict[str, float] = {}
    if latency:
        from yolocomp.eval.timing import time_onnx

        lat = time_onnx({k: export_onnx(m, imgsz, work / f"latency_{k}") for k, (m, _) in models.items()}, imgsz)
    rows = []
    for stage, (m, path) in models.items():
        row = {"model": stage, "params": count_params(m), "gflops": round(gflops(m, imgsz), 3),
               "size_mb": size_mb(path) if path else None}
        if latency:
            row["latency_ms_p50"] = lat[stage]
        a = ap.get(stage)
        row.update({k: (round(a[k], 4) if a else None) for k in ("ap", "ap50", "ap75")})
        rows.append(row)
    if latency and rows[0].get("latency_ms_p50"):
        for r in rows:
            r["speedup"] = round(rows[0]["latency_ms_p50"] / r["latency_ms_p50"], 3)

    curve = ap_vs_gflops(ap, steps, summary["gflops"], recovery.get("light_head"))
    report = {
        "source": source,
        "method": method,
        "target": summary["target"],
        "achieved": summary["achieved"],
        "params": summary["params"],
        "gflops": summary["gflops"],
        "channels": summary["channels"],
        "prunable_channels": summary["prunable_channels"],
        "stage_pruned_share": summary["stage_pruned_share"],
        "ap": ap,
        "recovery": recovery,
        "ap_vs_gflops": [{"stage": label, "gflops": g, "ap": a} for label, g, a in curve],
        "models": rows,
        "layers": summary["layers"],
        "gamma_history": history,
        "files": {k: str(p) for k, (_, p) in models.items() if p},
        "notes": notes,
        "settings": {**settings(cfg), "data": str(data) if data else None, "imgsz": imgsz, "device": device,
                     "sparsity_epochs": sparsity_epochs, **summary["settings"]},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if len(curve) > 1:
        from yolocomp.report import path_plot

        report["files"]["plot"] = str(path_plot([(label, g, 100 * a) for label, g, a in curve], out / "ap_vs_gflops.png",
                                                f"GFLOPs at {imgsz} px", f"yolocomp prune ({method})"))
    write_report(out, report)
    return report


def _plans_light_head(model: nn.Module, cfg: PruneConfig, ignore: tuple[int, ...]) -> bool:
    """Whether the cut will start with the light head (its conversion may still give way if it overshoots the
    target): asked for, or auto where the model has the 3x3 class branch and a C2f to convert."""
    from yolocomp.prune.light_head import convertible_layers, has_light_head

    wanted = cfg.wants_light_head()
    if wanted is not None:
        return wanted
    return not has_light_head(model) and bool(set(convertible_layers(model)) - set(ignore))


def _light_head_start(model: nn.Module, cfg: PruneConfig, method: str, target: dict, imgsz: int,
                      ignore: tuple[int, ...], recovery: dict) -> tuple[nn.Module, dict] | None:
    """``(converted model, cut still to make)`` when the cut starts with the light head, else None; ``recovery["head"]``
    records the choice."""
    from yolocomp.prune.light_head import auto_box_bins

    if _plans_light_head(model, cfg, ignore):  # auto: where the model has the 3x3 branch; the swap alone must fit
        bins = cfg.box_bins if cfg.box_bins is not None else auto_box_bins(model, imgsz, AUTO_BOX_BINS)
        # an automatic narrow box branch that alone overshoots the target gives way to the class branch alone
        tries = [bins, None] if bins is not None and cfg.box_bins is None else [bins]
        for k, box_bins in enumerate(tries):
            # CAP's attention needs the converted model, so BN-γ picks the bottleneck and box channels it keeps
            converted, info = light_head(model, "bn" if method == "cap" else method, imgsz=imgsz, ignore=ignore,
                                         box_bins=box_bins)
            try:
                cut = target_after_light_head(target, info["gflops"])
            except UserError:
                if cfg.head == "light" and k == len(tries) - 1:
                    raise
            else:
                recovery.update(head="light", light_head=info)
                return converted, cut
    if cfg.box_bins is not None:
        raise UserError("--box-bins narrows the light head's box branch, but this cut keeps Detect as it is (the light "
                        "head needs a one-shot --flops-reduction cut with --recover kd and a C2f to convert); drop "
                        "--box-bins")
    recovery["head"] = "keep"
    return None


def _cut(model: nn.Module, target: dict, cfg: PruneConfig, ignore: tuple[int, ...], imgsz: int, calib: Any,
         light: bool, notes: list[str], importance: dict | None = None) -> tuple[nn.Module, dict]:
    """The one-shot cut, by ``importance`` (ready scores, e.g. CAP's attention) or ``cfg.method``'s. After the light
    head, unless ``--max-layer-ratio`` is set, each layer loses at most :data:`LIGHT_HEAD_LAYER_CAP` of its channels;
    a target that cap cannot reach is cut without it."""
    cap = cfg.max_layer_ratio if cfg.max_layer_ratio is not None or not light else LIGHT_HEAD_LAYER_CAP
    args = {**target, "method": cfg.method, "importance": importance, "min_channels": cfg.min_channels,
            "round_to": cfg.round_to, "ignore": ignore, "imgsz": imgsz, "calib": calib}
    try:
        return prune_model(model, **args, max_layer_ratio=cap)
    except UserError:
        if cap == cfg.max_layer_ratio:
            raise
    notes.append(f"the default per-layer cap {cap} after the light head cannot reach the target: cut without a cap")
    return prune_model(model, **args, max_layer_ratio=None)


def target_after_light_head(target: dict, gflops_: dict) -> dict:
    """The cut still to make once the light head has removed its share: a FLOPs target stays relative to the input
    model (a channel ratio applies to the backbone and neck as it is)."""
    if target.get("flops_reduction") is None:
        return target
    left = 1.0 - (1.0 - target["flops_reduction"]) * gflops_["before"] / gflops_["after"]
    if left <= 0.005:
        raise UserError(f"--head light alone removes {1 - gflops_['after'] / gflops_['before']:.0%} of the GFLOPs, "
                        f"more than --flops-reduction {target['flops_reduction']}; raise the target or use --head keep")
    return {"ratio": None, "flops_reduction": round(left, 4)}


def ap_vs_gflops(ap: dict, steps: list[dict] | None, gflops_: dict,
                 light_head_info: dict | None = None) -> list[tuple[str, float, float]]:
    """(stage, GFLOPs, AP fraction) along the run: the input, the fitted light head or every progressive step, then
    the final size's stages."""
    points = [("before", gflops_["before"], (ap.get("before") or {}).get("ap"))]
    if light_head_info:
        points.append(("light head", light_head_info["gflops"]["after"], (ap.get("light_head") or {}).get("ap")))
    points += [(f"step {r['step']}", r["gflops"], r["ap"]) for r in (steps or [])[1:]]
    points += [(stage, gflops_["after"], (ap.get(stage) or {}).get("ap")) for stage in ("pruned", "reconstructed", "finetuned")
               if stage in ap and not (steps and stage == "pruned")]  # after steps, "pruned" is the last step
    return [(label, float(g), float(a)) for label, g, a in points if a is not None and g is not None]


def _progressive(model: nn.Module, teacher: nn.Module, cfg: PruneConfig, target: dict, data: str | None, out: Path,
                 work: Path, train_args: dict, evaluate: Any) -> tuple[nn.Module, dict, list[dict]]:
    """The cut in ``cfg.steps`` steps, each ramping its channels to zero while the uncompressed model is distilled
    into the student, then removing them exactly; AP after every step."""
    from yolocomp.commands.distill import make_method
    from yolocomp.prune import progressive_prune

    frozen = deepcopy(teacher).float().eval()
    record: dict = {}
    images, overrides = kd_training_data(cfg, data, frozen, work, train_args["imgsz"], train_args["device"], record)
    args = {**KD_RECOVERY_TRAIN_DEFAULTS, "nbs": cfg.batch, **train_args, **overrides}
    args.pop("time", None)  # the ramp is planned in epochs; a time limit would cut it short
    pruned, history = progressive_prune(
        model, data_yaml=images, **target, method=cfg.method, steps=cfg.steps, epochs_per_step=cfg.step_epochs,
        teacher_methods=lambda step, kept: [make_method(cfg.kd_method, frozen, loss_weights=kd_weights(cfg, kept)),
                                      *([FrozenBatchNorm()] if cfg.freeze_bn else [])], train_args=args,
        evaluate=evaluate, project=out, name="progressive", imgsz=train_args["imgsz"], min_channels=cfg.min_channels,
        round_to=cfg.round_to, ignore=tuple(cfg.ignore), max_layer_ratio=cfg.max_layer_ratio)
    summary = prune_summary(teacher, pruned, cfg, history, train_args["imgsz"])
    return pruned, summary, history


def prune_summary(original: nn.Module, pruned: nn.Module, cfg: PruneConfig, history: list[dict], imgsz: int) -> dict:
    """The report fields of a one-shot cut for a model pruned in steps (layer table from the final widths)."""
    from yolocomp.prune.pruner import conv_channels

    before, after = count_params(original), count_params(pruned)
    g0, g1 = gflops(original, imgsz), gflops(pruned, imgsz)
    last = history[-1]
    return {"method": cfg.method, "target": cfg.target(), "achieved": {"ratio": last.get("ratio"),
                                                                      "flops_reduction": last.get("flops_reduction")},
            "params": {"before": before, "after": after}, "gflops": {"before": round(g0, 4), "after": round(g1, 4)},
            "channels": {"before": conv_channels(original), "after": conv_channels(pruned)},
            "prunable_channels": {"before": None, "after": None}, "stage_pruned_share": {}, "layers": [],
            "settings": {"steps": cfg.steps, "step_epochs": cfg.step_epochs}}


def _fit_class_branch(model: nn.Module, teacher: nn.Module, cfg: PruneConfig, data: str | None, imgsz: int) -> dict:
    """Prepare the light head before the cut: reconstruct the block the conversion changed (its halved bottleneck),
    then fit the fresh class branch to the teacher's class logits on every image at hand (``--images`` and, unless
    label-free, the train split's images without their labels)."""
    from yolocomp.data import check_images
    from yolocomp.eval.images import dataset_images
    from yolocomp.eval.preprocess import batches
    from yolocomp.recon import reconstruct
    from yolocomp.recon.class_branch import fit_class_branch

    paths = list(check_images(cfg.images)) if cfg.images else []
    if data is not None and not cfg.label_free:
        paths += list(dataset_images(data, "train", missing_ok=True))
    if not paths:
        raise UserError("the light head's class branch needs images: pass --images DIR or --data with a train split")
    frozen = deepcopy(teacher).float().eval()
    fit, held_out = _recon_images(cfg, data, imgsz)
    rebuilt = reconstruct(model, frozen, fit, held_out=held_out, fit="changed", iters=cfg.recon_iters, head_iters=0)
    converted = [{k: r[k] for k in ("layer", "type", "error_before", "error_after")} for r in rebuilt["blocks"]
                 if r["fitted"]]
    images = (torch.from_numpy(b.array) for b in batches(paths, imgsz, 16))
    report = fit_class_branch(model, frozen, images, iters=cfg.head_fit_iters, box=narrowed_box_branch(model, frozen))
    return {"images": len(paths), "converted_blocks": converted, **report,
            "seconds": round(rebuilt["seconds"] + report["seconds"], 1)}


def narrowed_box_branch(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the student's Detect has fewer DFL bins than the teacher's (``--box-bins``): its box branch is new."""
    return int(student.model[-1].reg_max) < int(teacher.model[-1].reg_max)


def _recon_images(cfg: PruneConfig, data: str | None, imgsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``cfg.recon_images`` images spread over ``--images`` (else the train split), as (fit, held out): a
    quarter is held out, where a block whose error grows is reverted."""
    from yolocomp.data import check_images
    from yolocomp.eval.images import dataset_images
    from yolocomp.eval.preprocess import batches

    paths = check_images(cfg.images) if cfg.images else dataset_images(data, "train", missing_ok=True)
    if not paths:
        raise UserError("reconstruction needs images: pass --images DIR or --data with a train split")
    step = max(1, len(paths) // cfg.recon_images)  # spread over the folder, not its first files
    chosen = paths[::step][: cfg.recon_images]
    images = torch.cat([torch.from_numpy(b.array) for b in batches(chosen, imgsz, 8)])
    split = len(images) - max(1, len(images) // 4)
    return images[:split], images[split:]


def _reconstruct(pruned: nn.Module, teacher: nn.Module, cfg: PruneConfig, channel_map: dict | None, data: str | None,
                 imgsz: int, light_head_info: dict | None = None) -> dict:
    """Fit each pruned block to the uncompressed model's output of that block (inputs from the already fitted
    student), on unlabelled images when given, else the train split."""
    from yolocomp.recon import reconstruct

    fit, held_out = _recon_images(cfg, data, imgsz)
    light = bool(light_head_info)  # a class branch that starts from scratch: its own loss and more iterations
    report = reconstruct(pruned, deepcopy(teacher).float().eval(), fit, held_out=held_out,
                         channel_map=channel_map, iters=cfg.recon_iters, progress=True,
                         head_loss="kd" if light else "mse", head_iters=cfg.recon_head_iters if light else None)
    if light:
        from yolocomp.prune.light_head import settle_batchnorm

        d = len(pruned.model) - 1
        branches = ("cv3", "cv2") if narrowed_box_branch(pruned, teacher) else ("cv3",)
        settle_batchnorm(pruned, tuple(f"model.{d}.{branch}." for branch in branches), torch.cat([fit, held_out]))
    return {k: report[k] for k in ("head_error", "images", "seconds") if k in report}


def kd_weights(cfg: PruneConfig, channel_map: dict | None) -> dict:
    """Settings of the recovery's distillation method: the temperature of the head terms, the kept channels of the
    block-output terms."""
    if cfg.kd_method == "block":
        return {"temperature": cfg.temperature, "channel_map": channel_map, "feature_weight": cfg.feature_weight}
    return {"temperature": cfg.temperature} if cfg.kd_method == "logit" else {}


def _recover(pruned: nn.Module, teacher: nn.Module, cfg: PruneConfig, data: str | None, out: Path,
             train_args: dict, record: dict, work: Path, channel_map: dict | None = None, **timing: float) -> nn.Module:
    """Bring the cut model's AP back: a label fine-tune, or distillation from the uncompressed model (``kd``) on the
    labelled data and/or unlabelled images; ``timing`` is :func:`~yolocomp.integration.train`'s deadline."""
    from yolocomp.integration import train

    if cfg.recover == "labels":
        record.update(method="labels", epochs=train_args["epochs"])
        return train(pruned, data, [], project=out, name="finetune", **timing, **train_args).model
    from yolocomp.commands.distill import make_method

    frozen = deepcopy(teacher).float().eval()
    kd = make_method(cfg.kd_method, frozen, loss_weights=kd_weights(cfg, channel_map))
    images, overrides = kd_training_data(cfg, data, frozen, work, train_args["imgsz"], train_args["device"], record)
    args = {**KD_RECOVERY_TRAIN_DEFAULTS, "nbs": cfg.batch, **train_args, **overrides}
    record.update(method=f"kd ({cfg.kd_method})", epochs=args["epochs"], teacher="the uncompressed input model",
                  train_settings={k: args[k] for k in ("optimizer", "lr0", "warmup_epochs", "nbs")})
    methods = [kd, *([FrozenBatchNorm()] if cfg.freeze_bn else [])]
    return train(pruned, images, methods, project=out, name="recover", **timing, **args).model


def write_report(out: Path, report: dict) -> None:
    """report.json (everything) and report.md (model table, stage shares, per-layer kept/total)."""
    from yolocomp.report import markdown_table, print_table

    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    layer_rows = [{"layer": r["layer"], "type": r["type"], "stage": r["stage"], "kept/total": f"{r['kept']}/{r['total']}",
                   "out kept/total": f"{r['out_kept']}/{r['out_total']}" if r["out_total"] else "-",
                   "pinned": r["pinned"]} for r in report["layers"]]
    md = [f"# Pruning report ({report['method']})\n", f"source: `{report['source']}`\n",
          f"target {report['target']}, achieved {report['achieved']}\n", markdown_table(report["models"]),
          "\n## Share of channels removed per stage\n", markdown_table([report["stage_pruned_share"]]),
          "\n## Per layer\n", markdown_table(layer_rows)]
    if report["notes"]:
        md += ["\n## Notes\n", *[f"- {n}" for n in report["notes"]]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print_table(report["models"], f"yolocomp prune ({report['method']})")


def run_stage(recipe: Recipe, model: str, out: Path, data: Path | None, reference: str | None,
              evaluate: bool = True) -> StageResult:
    cfg = recipe.stage("prune")
    warn_if_untrained(model, "prune")
    # cap with the light head measures attention on unlabelled images; prune() says so when the model decides otherwise
    cap_trains = cfg.method == "cap" and cfg.wants_light_head() is False
    needs_labels = cfg.sparsity_epochs > 0 or cap_trains or (cfg.finetune_epochs > 0 and not cfg.images)
    if needs_labels and data is None:
        raise UserError("pruning with sparsity/attention training or fine-tuning needs data: pass --data (or "
                        "--recover kd --images DIR to recover from unlabelled images)")
    # inside `yolocomp run` the run measures every stage's model itself
    report = prune(model, out, str(data) if data else None, imgsz=recipe.imgsz, device=recipe.device,
                   evaluate=evaluate, latency=evaluate, config=cfg)
    artifacts = {"pruned": str(out / "pruned.pt")}
    if (out / "finetuned.pt").exists():
        artifacts["finetuned"] = str(out / "finetuned.pt")
    return StageResult("prune", list(artifacts.values())[-1], artifacts, report)
