"""Tissue volumes per label, in cm3."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from msk_node.biomarkers import Measurement, unavailable

__all__ = ["tissue_volumes"]


def tissue_volumes(
    label_volume: npt.ArrayLike,
    spacing: Sequence[float],
    label_values: Mapping[str, int],
    *,
    total_label: str = "total",
    whole_only: bool = False,
) -> list[Measurement]:
    """Volume of each label and of all of them together.

    Parameters
    ----------
    label_volume : array_like of int, shape (slices, rows, columns)
        Label map.
    spacing : sequence of 3 float
        ``(slice spacing, row spacing, column spacing)`` in mm. Use the spacing between
        slice centres: voxels tile the volume with it even when SliceThickness differs.
    label_values : mapping of str to int
        Label names and values.
    total_label : str
        Label of the summed measurement.
    whole_only : bool
        Report a volume only for a label whole in the field of view: a label with voxels on
        the first or last slice, row or column is NaN with reason ``"cut by field of view
        (...)"``; its visible volume stays in ``extra["visible_cm3"]`` and out of the total.

    Returns
    -------
    list of Measurement
        ``"volume"`` in cm3 per label in the order of ``label_values``, then the total of
        the available labels. An empty label gives NaN with reason ``"no <label> voxels"``;
        the total is NaN only when every label is empty.

    Raises
    ------
    ValueError
        If ``label_volume`` is not 3D, the spacing is not three positive numbers, a
        label value repeats, or ``total_label`` collides with a label name.

    Notes
    -----
    Method: voxel count x (slice spacing x row spacing x column spacing) / 1000.
    """
    labels = np.asarray(label_volume)
    if labels.ndim != 3:
        raise ValueError(f"label_volume must be 3D (slice, row, column), got shape {labels.shape}")
    try:
        sizes = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as error:
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}") from error
    if len(sizes) != 3 or not all(math.isfinite(v) and v > 0 for v in sizes):
        raise ValueError(f"spacing must be 3 positive numbers in mm, got {spacing!r}")
    values = list(label_values.values())
    if len(set(values)) != len(values):
        raise ValueError(f"label_values repeats a value: {dict(label_values)}")
    if total_label in label_values:
        raise ValueError(f"total_label {total_label!r} is also a label name")
    voxel_mm3 = sizes[0] * sizes[1] * sizes[2]
    method = f"voxel count x {sizes[0]:g} x {sizes[1]:g} x {sizes[2]:g} mm3 / 1000"
    found, counts = np.unique(labels, return_counts=True)
    count_of = dict(zip(found.tolist(), counts.tolist()))
    results = []
    total_voxels = 0
    for name, value in label_values.items():
        n = int(count_of.get(value, 0))
        if n == 0:
            results.append(unavailable("volume", name, "cm3", method, f"no {name} voxels"))
            continue
        cut = _cut_sides(labels == value) if whole_only else []
        if cut:
            results.append(unavailable("volume", name, "cm3", method, f"cut by field of view ({', '.join(cut)})",
                                       visible_cm3=n * voxel_mm3 / 1000.0))
            continue
        total_voxels += n
        results.append(Measurement("volume", name, n * voxel_mm3 / 1000.0, "cm3", method,
                                   extra={"n_voxels": n, "voxel_mm3": voxel_mm3}))
    if total_voxels == 0:
        results.append(unavailable("volume", total_label, "cm3", method, "no whole structure of any listed label"))
    else:
        missing = [m.label for m in results if not m.available]
        results.append(Measurement("volume", total_label, total_voxels * voxel_mm3 / 1000.0, "cm3", method,
                                   extra={"n_voxels": total_voxels, "voxel_mm3": voxel_mm3,
                                          "labels": [m.label for m in results if m.available],
                                          "missing_labels": missing}))
    return results


def _cut_sides(mask: np.ndarray) -> list[str]:
    """Faces of the volume (first/last slice, row, column) that ``mask`` touches."""
    sides = []
    for axis, name in enumerate(("slice", "row", "column")):
        for end, index in (("first", 0), ("last", -1)):
            if np.take(mask, index, axis=axis).any():
                sides.append(f"{end} {name}")
    return sides
