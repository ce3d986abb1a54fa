"""PNG overlays of a label volume on its source slices, every Nth slice, for a human check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from msk_node.labels import LabelMap


Box = tuple[float, float, float, float]


def render_overlays(normalised: np.ndarray, label_volume: np.ndarray, label_map: LabelMap, out_dir: Path,
                    every: int = 10, boxes: dict[int, list[Box]] | None = None) -> list[Path]:
    """Write ``slice-NNN.png`` for every ``every``-th slice that has labels: outlines in label colours.

    ``boxes`` (slice index -> xyxy boxes) are drawn in white when given.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    labelled = [k for k in range(len(label_volume)) if label_volume[k].any()]
    for k in labelled[::max(1, every)]:
        rgb = np.repeat(normalised[k][:, :, None], 3, axis=2).astype(np.uint8)
        for value in np.unique(label_volume[k]):
            if value == 0:
                continue
            edge = find_boundaries(label_volume[k] == value, mode="inner")
            rgb[edge] = label_map.by_value(int(value)).colour
        for x0, y0, x1, y1 in (boxes or {}).get(k, []):
            r0, r1 = int(max(0, y0)), int(min(rgb.shape[0] - 1, y1))
            c0, c1 = int(max(0, x0)), int(min(rgb.shape[1] - 1, x1))
            rgb[r0:r1 + 1, [c0, c1]] = 255
            rgb[[r0, r1], c0:c1 + 1] = 255
        path = out_dir / f"slice-{k:03d}.png"
        Image.fromarray(rgb).save(path)
        written.append(path)
    return written
