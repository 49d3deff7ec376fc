"""Structural pruning of backbone and neck: BN-γ network slimming, CAP channel attention, L1 and random baselines.

``prune_model`` prunes an in-memory Ultralytics DetectionModel; ``BNSlimming`` and ``ChannelAttentionPruning`` are
training methods (``yolocomp.integration.attach`` / ``train``); ``yolocomp.commands.prune.prune`` is the CLI pipeline.
"""

from yolocomp.prune.cap import ChannelAttentionPruning
from yolocomp.prune.pruner import count_params, gflops, prune_model
from yolocomp.prune.slimming import BNSlimming

__all__ = ["BNSlimming", "ChannelAttentionPruning", "count_params", "gflops", "prune_model"]
