"""Where an engine's JSON metadata lives and how it is read (the builder in :mod:`yolocomp.export.tensorrt` writes it).

It lives beside the runtime so that evaluation can read an engine without importing the export package.
"""

from __future__ import annotations

import json
from pathlib import Path

from yolocomp.errors import UserError


def metadata_path(engine_path: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def read_engine_metadata(engine_path: str | Path) -> dict:
    """The JSON stored beside an engine, with class-name keys back to ints; UserError if it is missing or broken."""
    path = metadata_path(engine_path)
    if not path.is_file():
        raise UserError(f"engine metadata not found: {path} (build engines with yolocomp export or "
                        "deploy/jetson/build_engine.sh, which write it)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"engine metadata {path} is not valid JSON ({e.msg}); rebuild the engine") from e
    meta["names"] = {int(k): v for k, v in (meta.get("names") or {}).items()}
    return meta
