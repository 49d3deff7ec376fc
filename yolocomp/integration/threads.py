"""Torch's CPU thread count around Ultralytics.

Selecting the CPU makes Ultralytics call ``torch.set_num_threads(cpu_count - 1)`` (one thread on a 2-core machine,
where both run its training about 1.7x faster), and importing it sets ``OMP_NUM_THREADS=1`` unless the user set it.
yolocomp's commands use every core the process may run on unless the user set ``OMP_NUM_THREADS`` before
starting, and every Ultralytics call inside them leaves the caller's count as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from yolocomp.errors import UserError


def cpu_threads() -> int:
    """Threads for yolocomp's work: ``OMP_NUM_THREADS`` as it was when yolocomp was imported, else every usable core."""
    from yolocomp import USER_OMP_NUM_THREADS

    if USER_OMP_NUM_THREADS:
        if not USER_OMP_NUM_THREADS.strip().isdigit() or int(USER_OMP_NUM_THREADS) < 1:
            raise UserError(f"OMP_NUM_THREADS={USER_OMP_NUM_THREADS!r} is not a thread count; set it to a whole number "
                            "such as 2, or unset it to use every core")
        return int(USER_OMP_NUM_THREADS)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_cpu_threads() -> int:
    """Set torch's thread count to :func:`cpu_threads` (what the CLI and the benchmarks do first); returns it."""
    threads = cpu_threads()
    torch.set_num_threads(threads)
    return threads


@contextmanager
def keep_threads() -> Iterator[int]:
    """Restore torch's thread count on exit, whatever Ultralytics set inside; yields the caller's count."""
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
