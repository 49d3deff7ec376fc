"""Structural pruning of backbone and neck: BN-γ network slimming, CAP channel attention, L1 and random baselines.

``prune_model`` prunes an in-memory Ultralytics DetectionModel; ``BNSlimming``, ``ChannelAttentionPruning`` and
``ProgressivePruning`` (channels ramped to zero, then removed exactly; ``progressive_prune`` runs K such steps) are
training methods (``yolocomp.integration.attach`` / ``train``); ``yolocomp.commands.prune.prune`` is the CLI pipeline.
"""

from yolocomp.prune.cap import ChannelAttentionPruning
from yolocomp.prune.progressive import ProgressivePruning, progressive_prune
from yolocomp.prune.pruner import count_params, gflops, prune_model
from yolocomp.prune.ramp import remove_ramped_channels
from yolocomp.prune.slimming import BNSlimming

__all__ = ["BNSlimming", "ChannelAttentionPruning", "ProgressivePruning", "count_params", "gflops", "progressive_prune",
           "prune_model", "remove_ramped_channels"]
