"""yolocomp: compression for Ultralytics YOLO detectors (pruning, quantization, distillation, deployment)."""

__version__ = "0.1.0"

from yolocomp.errors import UserError  # noqa: E402
from yolocomp.methods import Method  # noqa: E402


def attach(yolo, *methods):  # noqa: ANN001, ANN201 - thin re-export keeps `import yolocomp` light
    """Attach compression methods to an ``ultralytics.YOLO`` object; see :func:`yolocomp.integration.attach`."""
    from yolocomp.integration.hooks import attach as _attach

    return _attach(yolo, *methods)


__all__ = ["Method", "UserError", "attach", "__version__"]
