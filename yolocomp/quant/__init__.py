"""Full-detector quantization: LSQ quantizers, BN-folded quantized convs, calibration, QAT as a Method, PTQ.

Typical use in a user's own training::

    from ultralytics import YOLO
    from yolocomp.integration import attach
    from yolocomp.quant import QuantizationAwareTraining

    model = YOLO("yolov8n.pt")
    hub = attach(model, QuantizationAwareTraining(bits=8, freeze_bn_epoch=2))
    model.train(data="coco.yaml", epochs=10, lr0=0.001, warmup_epochs=0)

The trained checkpoint holds yolocomp's quantizer modules (``yolocomp`` must be importable to load it); export it with
``yolocomp.export.onnx_qdq.export_onnx``.
"""

from yolocomp.quant.calibrate import calibrate, calibration_images, image_batches
from yolocomp.quant.convert import quantize_model
from yolocomp.quant.modules import QBottleneck, QConv, quant_convs, quantizers, set_quant_state
from yolocomp.quant.qat import QuantizationAwareTraining, freeze_bn
from yolocomp.quant.quantizer import Quantizer

__all__ = [
    "QBottleneck",
    "QConv",
    "QuantizationAwareTraining",
    "Quantizer",
    "calibrate",
    "calibration_images",
    "freeze_bn",
    "image_batches",
    "quant_convs",
    "quantize_model",
    "quantizers",
    "set_quant_state",
]
