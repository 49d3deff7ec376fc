"""Class names of a model or a data set, and the check that a teacher predicts the data set's classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from yolocomp.errors import UserError


def class_names(names: Mapping[int, str] | Sequence[str] | None) -> list[str]:
    """Names ordered by class index, from Ultralytics' ``{index: name}`` dict or a list."""
    if names is None:
        return []
    if isinstance(names, Mapping):
        return [str(names[k]) for k in sorted(names, key=int)]
    return [str(n) for n in names]


def _preview(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def check_classes(teacher_names: Mapping | Sequence | None, data_names: Mapping | Sequence, teacher: str = "teacher",
                  data: str = "data") -> None:
    """One-line UserError when the teacher's classes are not the data set's (count, order and names)."""
    t, d = class_names(teacher_names), class_names(data_names)
    if t != d:
        raise UserError(f"{teacher} predicts {len(t)} classes ({_preview(t)}) but {data} names {len(d)} ({_preview(d)}); "
                        "use a teacher trained on the data set's classes")
