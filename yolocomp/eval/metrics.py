"""The AP figures every stage reports, picked from an ``evaluate()`` result in one place."""

from __future__ import annotations

from collections.abc import Iterable

AP_KEYS = ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar100")  #: COCO AP, AP50, AP75, APs/m/l and AR100, fractions


def ap_summary(result: dict | None, keys: Iterable[str] = AP_KEYS, extra: Iterable[str] = ()) -> dict | None:
    """``keys`` and then ``extra`` (e.g. ``("images",)``) of ``result``; None stays None (no data, no evaluation).

    A key the result lacks is None, so a summary always has the same keys.
    """
    if result is None:
        return None
    return {k: result.get(k) for k in (*keys, *extra)}
