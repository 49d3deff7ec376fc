"""Block-wise reconstruction (BRECQ-style): fit a compressed detector's blocks so each block's output matches the
uncompressed teacher's on a few calibration images. Generic over what changed the student (pruning now, post-training
quantization later): a block is one entry of the detector's ``model.model``. The same fitting to the teacher's
outputs measures CAP's attention on a converged model (``measure_attention``: only the gates learn).
"""

from yolocomp.recon.attention import measure_attention
from yolocomp.recon.blocks import Block, detector_blocks
from yolocomp.recon.class_branch import fit_class_branch
from yolocomp.recon.engine import reconstruct

__all__ = ["Block", "detector_blocks", "fit_class_branch", "measure_attention", "reconstruct"]
