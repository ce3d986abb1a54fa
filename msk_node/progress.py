"""Progress of long work for people: a bar with an ETA on a terminal, nothing in logs, services and tests."""
from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

Item = TypeVar("Item")


def progress(items: Iterable[Item], description: str, unit: str, total: int | None = None) -> Iterable[Item]:
    """``items``, shown as a progress bar on stderr when stderr is a terminal (tqdm's ``disable=None``)."""
    return tqdm(items, desc=description, unit=unit, total=total, disable=None, leave=False, dynamic_ncols=True)
