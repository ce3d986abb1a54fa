"""Before a stable study is queued: would the application select any of its series?

The application's series-selection rules (:mod:`msk_node.selection`) are applied to the
spooled instances' headers, pixel data unread, so a study with nothing to segment (a CT,
a brain MR) is closed at once instead of waiting in the queue and costing an
application run. A study whose headers cannot all be read is not judged: it runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from msk_node.dicom_input import NON_IMAGE_SOP_CLASSES, Series
from msk_node.selection import SeriesRule, select_series

#: Series named in a skip reason; the rest are counted.
_NAMED_SERIES = 5


@dataclass(frozen=True)
class Verdict:
    """What the rules make of a study.

    Attributes
    ----------
    selectable : bool or None
        True: at least one series is selected; False: none is; None: the rules could not
        be applied (the study is processed as usual).
    reason : str
        Why, for the job's reason and history.
    modalities : tuple of str
        Modality of each image series, for the audit line.
    """

    selectable: bool | None
    reason: str
    modalities: tuple[str, ...] = ()


def judge_study(files: list[Path], rules: list[SeriesRule]) -> Verdict:
    """Apply ``rules`` to the series of ``files`` (one study's instances), headers only."""
    if not files:
        return Verdict(None, "no instances on disk")
    by_series: dict[str, Series] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as error:
            return Verdict(None, f"header of {path.name} unreadable: {error}")
        # As the application reads a study: results and reports are not images; no series UID, no series.
        if str(ds.get("SOPClassUID", "")) in NON_IMAGE_SOP_CLASSES or "SeriesInstanceUID" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        series = by_series.setdefault(uid, Series(series_instance_uid=uid))
        series.datasets.append(ds)
        series.paths.append(path)
    try:
        selected, _ = select_series(list(by_series.values()), rules)
        modalities = tuple(series.modality or "?" for series in by_series.values())
        named = [f"{series.modality or '?'} {series.description!r}" for series in by_series.values()]
    except (ValueError, TypeError, AttributeError) as error:  # a malformed attribute the rules read
        return Verdict(None, f"series headers cannot be judged: {error}")
    if selected:
        return Verdict(True, f"{len(selected)} series match the MSK selection rules", modalities)
    more = len(named) - _NAMED_SERIES
    listed = ", ".join(named[:_NAMED_SERIES]) + (f" and {more} more" if more > 0 else "")
    detail = f" ({listed})" if named else ""
    return Verdict(False, f"no series matches the MSK selection rules: {len(named)} series{detail}", modalities)
