"""Detection knowledge distillation: fine-grained feature imitation, FGD, head-level KD (teacher, taps, adapters).

Use from the CLI (``yolocomp distill``, :func:`yolocomp.commands.distill.distill`) or in your own training::

    from ultralytics import YOLO
    import yolocomp
    from yolocomp.distill import FGD

    model = YOLO("yolov8n.pt")
    yolocomp.attach(model, FGD("yolov8s.pt"))
    model.train(data="coco.yaml", epochs=10)
"""

from yolocomp.distill.base import TeacherDistiller
from yolocomp.distill.fgd import FGD
from yolocomp.distill.fgfi import FineGrainedImitation
from yolocomp.distill.head_kd import HeadKD

__all__ = ["FGD", "FineGrainedImitation", "HeadKD", "TeacherDistiller"]
