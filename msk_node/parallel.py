"""Independent pieces of one pipeline stage on every core.

SciPy's ndimage, scikit-image and NumPy release the GIL in their inner loops, so
threads keep every core busy in post-processing and measurement without copying the
volumes to other processes.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_map(function: Callable[[Item], Result], items: Iterable[Item]) -> list[Result]:
    """``[function(item) for item in items]`` on up to one thread per core, results in order."""
    items = list(items)
    workers = min(usable_cores(), len(items))
    if workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="msk-node-stage") as pool:
        return list(pool.map(function, items))
