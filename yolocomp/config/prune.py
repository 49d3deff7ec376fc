"""Options of the ``prune`` stage: importance criterion, target, sparsity / attention training, fine-tune."""

from __future__ import annotations

from dataclasses import dataclass

from yolocomp.config.options import at_least, non_negative, option, positive, valid_ratio
from yolocomp.config.train import TrainingOptions

PRUNE_METHODS = ("bn", "cap", "l1", "random")
#: labels: fine-tune on the data's labels; kd: distil from the uncompressed input model (labels optional)
RECOVERY = ("labels", "kd")
KD_METHODS = ("block", "logit", "fgd", "fgfi")
#: Trainer settings of ``recover: kd`` unless given: a few hundred images at Ultralytics' default lr (AdamW ~1e-3 for
#: short runs) take even the unpruned model far from its AP in one epoch, and Adam's first steps move every weight by
#: about lr whatever its gradient, so the distillation warms up from lr 0 (bias lr included) and steps once per batch.
#: No weight decay: the target is the teacher, and at the teacher decay is the only force left, whose tiny restoring
#: gradients Adam turns into lr-sized steps (measurements in tools/README.md).
KD_RECOVERY_TRAIN_DEFAULTS = {"optimizer": "AdamW", "lr0": 3e-4, "warmup_epochs": 1, "warmup_bias_lr": 0.0,
                              "weight_decay": 0.0}
#: keep: Detect as it is; light: YOLO11's depthwise class branch (yolocomp.prune.light_head), fitted to the teacher;
#: auto: light where it applies (PruneConfig.wants_light_head), else keep
HEADS = ("auto", "keep", "light")
#: Per-layer cap of the cut that follows the light head (unless --max-layer-ratio is set): the few channels left to
#: remove, spread over many layers, reconstruct far better than the same FLOPs taken deep out of the cheapest layers
#: (tools/README.md, "Recovery defaults").
LIGHT_HEAD_LAYER_CAP = 0.3
#: DFL bins of the light head's box branch unless --box-bins is set, where the model has more and 7 strides of its
#: coarsest level reach half the image (every box can then be drawn from its centre anchor: up to 448 px at stride
#: 32): Detect's box branch narrows with them, so the cut left for backbone and neck is far smaller (tools/README.md,
#: "Recovery defaults").
AUTO_BOX_BINS = 8
ATTENTIONS = ("eca", "se")
SPARSITY_SCHEDULES = ("constant", "linear_decay")


@dataclass
class PruneConfig(TrainingOptions):
    method: str = option("bn", "channel importance: BN-γ, CAP attention, L1 filter norm or random",
                         hint="use bn, cap, l1 or random", choices=PRUNE_METHODS)
    ratio: float = option(0.3, "share of prunable channels to remove, in (0, 1)", hint="use a share of channels such as 0.3",
                          check=valid_ratio)
    flops_reduction: float | None = option(None, "share of GFLOPs to remove, in (0, 1) (replaces ratio)",
                                           hint="use a share of GFLOPs such as 0.35", check=valid_ratio)
    sparsity_epochs: int = option(0, "BN-γ sparsity / CAP attention training epochs (0 = skip)",
                                  hint="use 0 to skip sparsity training", check=non_negative)
    finetune_epochs: int = option(0, "fine-tune epochs after pruning (0 = skip)", hint="use 0 to skip fine-tuning",
                                  check=non_negative)
    recover_minutes: float | None = option(None, "wall-clock limit of the whole recovery in minutes: the light head's "
                                           "fit, progressive steps and reconstruction, then training for the time "
                                           "left (epochs then only bound it; without --finetune-epochs it trains "
                                           "until the limit)",
                                           hint="use a number of minutes such as 60", check=positive)
    s: float = option(1e-4, "L1 sparsity strength on BN γ", hint="use a sparsity strength such as 1e-4", check=positive)
    s_schedule: str = option("constant", "sparsity strength over the epochs", hint="use constant or linear_decay",
                             choices=SPARSITY_SCHEDULES)
    attention: str = option("se", "CAP's attention gate: se learns each channel's own gate, eca shares one small "
                            "kernel across channels", hint="use se or eca", choices=ATTENTIONS)
    attention_iters: int = option(300, "iterations measuring CAP's attention after the light head: only the gates "
                                  "learn, the model's weights frozen, on the reconstruction's images",
                                  hint="use a number such as 300", check=at_least(2))
    attention_sparsity: float = option(1.0, "pull on the mean attention while the head-output distillation holds the "
                                       "outputs: a channel whose attention falls is one they can do without",
                                       hint="use a strength such as 1.0", check=positive)
    min_channels: int = option(8, "fewest channels a layer keeps", hint="use a channel floor such as 8", check=positive)
    round_to: int = option(8, "kept channels are a multiple of this", hint="use a channel multiple such as 8", check=positive)
    max_layer_ratio: float | None = option(None, "largest share of one layer's channels to remove (unset: no cap, or "
                                           f"{LIGHT_HEAD_LAYER_CAP} for the cut after the light head)",
                                           hint="use a per-layer cap such as 0.6", check=valid_ratio)
    ignore: list[int] = option([], "layer indices never pruned", hint="use a list of layer indices such as [9, 10]",
                               metavar="LAYER")
    recover: str = option("labels", "recovery after the cut: fine-tune on labels, or distil from the uncompressed model",
                          hint="use labels or kd", choices=RECOVERY)
    steps: int = option(1, "reach the target in this many progressive cuts, each recovered before the next (1 = one shot)",
                        hint="use a number of steps such as 3", check=at_least(1))
    images: str | None = option(None, "unlabelled images (folder or .txt list) for --recover kd, alone or beside --data",
                                hint="give a folder of images or a .txt list of image paths")
    label_free: bool = option(False, "train on --images alone: no labels at all (the data yaml only measures AP)",
                              hint="use true with images")
    freeze_bn: bool = option(True, "--recover kd keeps BatchNorm in eval mode: the converged model's running statistics, "
                             "not those of each augmented batch", hint="use true or false")
    kd_method: str = option("block", "distillation used by --recover kd: block (every layer's kept channels + head "
                            "outputs), logit (head outputs), fgd or fgfi", hint="use block, logit, fgd or fgfi",
                            choices=KD_METHODS)
    feature_weight: float = option(30.0, "weight of the block-output term of --kd-method block (BlockKD's default)",
                                   hint="use a weight such as 30", check=positive)
    temperature: float = option(2.0, "head-output KD temperature", hint="use a temperature such as 2", check=positive)
    pseudo_conf: float | None = option(None, "teacher detections above this confidence become labels of the unlabelled "
                                       "images (unset: no pseudo-labels)", hint="use a confidence such as 0.5",
                                       check=valid_ratio)
    step_epochs: int = option(1, "distillation epochs of each progressive step (the channels ramp to zero in its first "
                              "half)", hint="use a number of epochs such as 1", check=at_least(1))
    recon_images: int = option(384, "images the block reconstruction fits on (a quarter held out)",
                               hint="use a number of images such as 384", check=at_least(4))
    recon_iters: int = option(1000, "reconstruction iterations per block", hint="use a number such as 1000",
                              check=positive)
    head: str = option("auto", "Detect's class branch: keep it, or light (YOLO11's depthwise branch, fitted to the "
                       "teacher; one C2f becomes a C3k2 so stock Ultralytics rebuilds it); auto: light for a one-shot "
                       "--flops-reduction cut with --recover kd where the model has the 3x3 branch",
                       hint="use auto, keep or light", choices=HEADS)
    head_fit_iters: int = option(3000, "iterations fitting the light class branch to the teacher's class scores on every "
                                 "image at hand (cached Detect inputs) before the cut, after the converted C3k2 is "
                                 "reconstructed; 0 skips both and leaves the branch to the reconstruction after the cut "
                                 "(then raise recon_head_iters, e.g. to 4000)",
                                 hint="use a number such as 3000, or 0", check=non_negative)
    box_bins: int | None = option(None, "DFL bins per box side of the light head; fewer than the model's reg_max (16) "
                                  "narrow Detect's box branch to max(16, c/4, 4 x bins) channels, fitted to the teacher's "
                                  "box distributions with the class branch, but a side then reaches only bins - 1 "
                                  f"strides. Unset: {AUTO_BOX_BINS} where {AUTO_BOX_BINS - 1} strides of the coarsest "
                                  "level reach half the image (imgsz <= 448 at stride 32), else the model's own; the "
                                  "model's reg_max keeps the box branch",
                                  hint="use a number of bins such as 8", check=at_least(2))
    recon_head_iters: int = option(1000, "reconstruction iterations of the light head after the cut",
                                   hint="use a number such as 1000", check=positive)
    reconstruct: bool | None = option(None, "fit each pruned block to the teacher's block output before recovery "
                                      "(unset: on with --recover kd)", hint="use true or false")

    @classmethod
    def problems(cls, values: dict) -> list[str]:
        found = []
        if values.get("flops_reduction") is not None and values.get("ratio") is not None:
            found.append("sets both ratio and flops_reduction; keep one of them")
        if values.get("recover", "labels") == "labels" and (values.get("images") or (values.get("steps") or 1) > 1):
            found.append("images and steps > 1 need recover: kd (distillation from the uncompressed model)")
        if values.get("head", "keep") == "light":
            if values.get("recover", "labels") != "kd" or values.get("reconstruct") is False:
                found.append("head: light needs recover: kd with reconstruction (the new class branch is fitted to the "
                             "teacher)")
            if (values.get("steps") or 1) > 1:
                found.append("head: light works with a one-shot cut (steps: 1)")
        if values.get("box_bins") is not None:
            head = values.get("head", "auto")
            one_shot_kd = values.get("recover", "labels") == "kd" and (values.get("steps") or 1) == 1
            if head == "keep" or not one_shot_kd or (head == "auto" and values.get("flops_reduction") is None):
                found.append("box_bins narrows the light head's box branch, which needs head: light (or auto with "
                             "flops_reduction) and a one-shot cut with recover: kd; drop box_bins "
                             "otherwise")
        if values.get("label_free") and not values.get("images"):
            found.append("label_free needs images (the unlabelled images to train on)")
        return found

    def reconstruct_first(self) -> bool:
        """Whether the cut model is reconstructed before recovery: as set, else with ``recover: kd``."""
        return self.reconstruct if self.reconstruct is not None else self.recover == "kd"

    def wants_light_head(self) -> bool | None:
        """True: light head asked for; None: auto and the settings allow it (the model decides); False: keep."""
        if self.head != "auto":
            return self.head == "light"
        allowed = (self.recover == "kd" and self.reconstruct_first() and self.steps == 1
                   and self.flops_reduction is not None)
        return None if allowed else False

    def target(self) -> dict:
        """The pruning target as prune_model takes it: a FLOPs reduction when set, else the channel ratio."""
        if self.flops_reduction is not None:
            return {"ratio": None, "flops_reduction": self.flops_reduction}
        return {"ratio": self.ratio, "flops_reduction": None}
