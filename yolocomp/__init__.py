"""yolocomp: compression for Ultralytics YOLO detectors (pruning, quantization, distillation, deployment)."""

__version__ = "0.1.0"

import os  # noqa: E402

#: as the user set it: importing Ultralytics sets OMP_NUM_THREADS=1 when unset (yolocomp.integration.threads)
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")

from yolocomp.errors import UserError  # noqa: E402
from yolocomp.methods import Method  # noqa: E402


def attach(yolo, *methods):  # noqa: ANN001, ANN201 - thin re-export keeps `import yolocomp` light
    """Attach compression methods to an ``ultralytics.YOLO`` object; see :func:`yolocomp.integration.attach`."""
    from yolocomp.integration.hooks import attach as _attach

    return _attach(yolo, *methods)


__all__ = ["Method", "UserError", "attach", "__version__"]
