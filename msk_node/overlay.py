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


def render_seg_overlays(seg_path: Path, series_dir: Path, label_map_path: Path, out_dir: Path,
                        every: int | None = None, count: int = 6) -> list[Path]:
    """Draw a SEG's outlines on its source slices, read from ``series_dir`` (any folder holding the source series).

    ``every``: draw every Nth labelled slice; None spreads ``count`` slices over the labelled ones.
    """
    import highdicom as hd

    from msk_node.dicom_input import read_study_folder
    from msk_node.intensity import normalise_volume
    from msk_node.labels import load_label_map
    from msk_node.seg_writer import label_volume_from_seg
    from msk_node.volume import series_to_volume

    seg = hd.seg.segread(seg_path)
    referenced = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
    matches = [s for s in read_study_folder(series_dir).series if s.series_instance_uid == referenced]
    if not matches:
        raise FileNotFoundError(f"no series {referenced} (the SEG's source) under {series_dir}")
    volume = series_to_volume(matches[0].datasets)
    label_map = load_label_map(label_map_path)
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[volume.present] = label_volume_from_seg(seg, [ds.SOPInstanceUID for ds in volume.datasets], label_map)
    if every is None:
        labelled = int(np.count_nonzero(labels.reshape(len(labels), -1).any(axis=1)))
        every = max(1, -(-labelled // count))
    return render_overlays(normalise_volume(volume.array), labels, label_map, out_dir, every=every)
