"""Image grid of a DICOM series: voxel centres in patient coordinates."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

#: Decimals kept for positions, so DICOM, NIfTI and the rendered grid agree exactly.
POSITION_DECIMALS = 6


@dataclass(frozen=True)
class SeriesGrid:
    """Geometry of a stack of parallel, equally spaced slices.

    Attributes
    ----------
    size : tuple of int
        (slices, rows, columns).
    orientation : tuple of float
        ImageOrientationPatient: row direction (along a row, increasing column
        index) followed by column direction (increasing row index).
    pixel_spacing : tuple of float
        PixelSpacing: (row spacing, column spacing) in mm.
    slice_spacing : float
        Distance between slice centres along the normal, mm.
    slice_thickness : float
        Nominal slice thickness, mm.
    origin : tuple of float
        ImagePositionPatient of the first slice (centre of its first voxel).
    """

    size: tuple[int, int, int]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slice_thickness: float
    origin: tuple[float, float, float]

    @classmethod
    def centred(
        cls,
        centre: Sequence[float],
        size: tuple[int, int, int],
        orientation: Sequence[float],
        pixel_spacing: tuple[float, float],
        slice_spacing: float,
        slice_thickness: float | None = None,
    ) -> SeriesGrid:
        """Grid whose central voxel position is ``centre`` (patient coordinates, mm)."""
        grid = cls(size, tuple(float(v) for v in orientation), pixel_spacing, slice_spacing,
                   slice_thickness or slice_spacing, (0.0, 0.0, 0.0))
        origin = np.round(np.asarray(centre, dtype=float) - grid.centre, POSITION_DECIMALS)
        return replace(grid, origin=tuple(float(v) for v in origin))

    @property
    def row_dir(self) -> npt.NDArray[np.float64]:
        """Unit vector along a row (increasing column index)."""
        return np.asarray(self.orientation[:3], dtype=float)

    @property
    def col_dir(self) -> npt.NDArray[np.float64]:
        """Unit vector along a column (increasing row index)."""
        return np.asarray(self.orientation[3:], dtype=float)

    @property
    def normal(self) -> npt.NDArray[np.float64]:
        """Slice normal, row direction x column direction; slices advance along it."""
        return np.cross(self.row_dir, self.col_dir)

    @property
    def centre(self) -> npt.NDArray[np.float64]:
        """Patient position of the grid centre (the central voxel position)."""
        n, rows, cols = self.size
        return (
            np.asarray(self.origin)
            + (cols - 1) / 2 * self.pixel_spacing[1] * self.row_dir
            + (rows - 1) / 2 * self.pixel_spacing[0] * self.col_dir
            + (n - 1) / 2 * self.slice_spacing * self.normal
        )

    def slice_position(self, k: int) -> npt.NDArray[np.float64]:
        """ImagePositionPatient of slice ``k``, rounded like the stored value."""
        return np.round(np.asarray(self.origin) + k * self.slice_spacing * self.normal, POSITION_DECIMALS)

    def points(
        self, slices: Sequence[int], offsets: Sequence[tuple[float, float]]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Patient coordinates of voxel points.

        Parameters
        ----------
        slices : sequence of int
            Slice indices.
        offsets : sequence of (float, float)
            Sub-voxel offsets (row, column) in pixels; (0, 0) is the voxel centre.

        Returns
        -------
        x, y, z : numpy.ndarray
            float32 arrays of shape (len(offsets), len(slices), rows, columns).
        """
        _, rows, cols = self.size
        off = np.asarray(offsets, dtype=float)
        jj = (np.arange(rows)[None, :] + off[:, :1]) * self.pixel_spacing[0]  # (n_off, rows)
        ii = (np.arange(cols)[None, :] + off[:, 1:]) * self.pixel_spacing[1]  # (n_off, cols)
        base = np.stack([self.slice_position(k) for k in slices])  # (n_slices, 3)
        coords = []
        for axis in range(3):
            value = (
                base[None, :, None, None, axis]
                + jj[:, None, :, None] * self.col_dir[axis]
                + ii[:, None, None, :] * self.row_dir[axis]
            )
            coords.append(value.astype(np.float32))
        return coords[0], coords[1], coords[2]

    @property
    def sitk_spacing(self) -> tuple[float, float, float]:
        """Voxel spacing in SimpleITK (column, row, slice) order."""
        return (self.pixel_spacing[1], self.pixel_spacing[0], self.slice_spacing)

    @property
    def sitk_direction(self) -> tuple[float, ...]:
        """Row-major direction matrix whose columns are row, column and normal directions."""
        return tuple(float(v) for v in np.column_stack([self.row_dir, self.col_dir, self.normal]).ravel())
