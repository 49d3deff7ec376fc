"""The AP figures an ``evaluate()`` result holds, picked out the same way everywhere."""

from __future__ import annotations

AP_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar100")


def ap_summary(result: dict | None, keys: tuple[str, ...] = AP_KEYS, extra: tuple[str, ...] = ()) -> dict | None:
    """The AP keys (and ``extra`` ones) of an evaluation result; None stays None."""
    if result is None:
        return None
    return {k: result.get(k) for k in (*keys, *extra)}
