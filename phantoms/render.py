"""Sampling an anatomy model on a series grid."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from msk_node_phantoms.anatomy import AnatomyModel
from msk_node_phantoms.grid import SeriesGrid

#: 2x2 in-plane sub-samples (row, column offsets in pixels) that give partial volume.
SUBSAMPLES: tuple[tuple[float, float], ...] = ((-0.25, -0.25), (-0.25, 0.25), (0.25, -0.25), (0.25, 0.25))

#: Points evaluated per batch; bounds memory to a few hundred MB.
BATCH_POINTS = 1_400_000

PointField = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def render(
    model: AnatomyModel,
    grid: SeriesGrid,
    table: npt.NDArray[np.floating],
    centre_fields: Sequence[PointField] = (),
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], list[npt.NDArray[np.float32]]]:
    """Evaluate a model on every voxel of a grid.

    Parameters
    ----------
    model : AnatomyModel
        Continuous anatomy.
    grid : SeriesGrid
        Voxel grid.
    table : numpy.ndarray
        (n_structures, n_channels) value of each structure in each output channel.
    centre_fields : sequence of callable
        Smooth fields ``f(x, y, z)`` sampled at voxel centres (bias, texture).

    Returns
    -------
    labels : numpy.ndarray
        uint8 (slices, rows, columns) label value at each voxel centre.
    channels : numpy.ndarray
        float32 (n_channels, slices, rows, columns): ``table`` averaged over the 2x2
        in-plane sub-samples of each voxel (partial volume).
    fields : list of numpy.ndarray
        Each centre field on the grid, float32 (slices, rows, columns).
    """
    n, rows, cols = grid.size
    lut = model.label_lut()
    values = np.asarray(table, dtype=np.float32)
    labels = np.empty(grid.size, dtype=np.uint8)
    channels = np.empty((values.shape[1], *grid.size), dtype=np.float32)
    fields = [np.empty(grid.size, dtype=np.float32) for _ in centre_fields]
    per_batch = max(1, BATCH_POINTS // ((1 + len(SUBSAMPLES)) * rows * cols))
    for k0 in range(0, n, per_batch):
        ks = list(range(k0, min(n, k0 + per_batch)))
        x, y, z = grid.points(ks, ((0.0, 0.0), *SUBSAMPLES))
        ids = model.structure_ids(x, y, z)
        labels[ks[0] : ks[-1] + 1] = lut[ids[0]]
        channels[:, ks[0] : ks[-1] + 1] = np.moveaxis(values[ids[1:]].mean(axis=0), -1, 0)
        for out, field in zip(fields, centre_fields):
            out[ks[0] : ks[-1] + 1] = field(x[0], y[0], z[0])
    return labels, channels, fields
