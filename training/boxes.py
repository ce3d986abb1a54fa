"""Boxes from masks: one box per label and 2D connected component, as both papers prompt."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


Box = tuple[int, int, int, int]


def instance_boxes(label_slice: np.ndarray, values: list[int], min_pixels: int = 10) -> list[tuple[int, Box]]:
    """(label value, (x0, y0, x1, y1)) for every component of ``values`` with at least ``min_pixels`` pixels.

    Box corners are pixel indices of the extreme foreground pixels (inclusive).
    """
    boxes = []
    for value in values:
        components, count = ndimage.label(label_slice == value, structure=np.ones((3, 3)))
        for index, found in enumerate(ndimage.find_objects(components), start=1):
            if found is None or (components[found] == index).sum() < min_pixels:
                continue
            rows, cols = found
            boxes.append((value, (cols.start, rows.start, cols.stop - 1, rows.stop - 1)))
    return boxes
