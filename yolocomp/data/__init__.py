"""Training data for compression: labelled data sets, folders of unlabelled images, or both.

* :func:`~yolocomp.data.images.check_images`: the images of ``--images`` (a folder or a ``.txt`` list), one-line errors;
* :func:`~yolocomp.data.training_data.training_data`: one Ultralytics data yaml over labelled data and/or unlabelled
  images (linked into a work folder, optionally pseudo-labelled by the teacher), with counts of what it holds;
* :func:`~yolocomp.data.label_free.label_free_overrides`: trainer settings when no image has a label (teacher-only
  training: no detection loss, no "best" epoch chosen by a meaningless validation).
"""

from yolocomp.data.classes import check_classes
from yolocomp.data.images import check_images
from yolocomp.data.label_free import label_free_overrides
from yolocomp.data.training_data import TrainingData, training_data

__all__ = ["TrainingData", "check_classes", "check_images", "label_free_overrides", "training_data"]
