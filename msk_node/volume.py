"""Series to volume in patient space: slices sorted along their normal, geometry kept.

The volume's array is indexed ``[slice, row, column]`` like the source frames, and
``Volume.affine`` maps those indices to patient (LPS) millimetres, so every mask we
make can be written back onto the exact source instances.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from highdicom import Volume
from highdicom.spatial import get_series_volume_positions

GEOMETRY_ATTRIBUTES = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


@dataclass
class SeriesVolume:
    """A volume plus its source instances in volume order.

    ``slices[k]`` is the instance of slice ``k``, or None where the series has a gap
    (an instance that was missing or unreadable); such slices are blank in ``array``.
    """

    volume: Volume
    slices: list[pydicom.Dataset | None]

    @property
    def datasets(self) -> list[pydicom.Dataset]:
        """The instances that exist, in volume order."""
        return [ds for ds in self.slices if ds is not None]

    @property
    def present(self) -> np.ndarray:
        """Boolean per slice: True where a source instance exists."""
        return np.array([ds is not None for ds in self.slices])

    @property
    def missing(self) -> list[int]:
        return [k for k, ds in enumerate(self.slices) if ds is None]

    @property
    def array(self) -> np.ndarray:
        return self.volume.array

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        """Row spacing and column spacing in mm."""
        return self.volume.pixel_spacing

    @property
    def slice_spacing(self) -> float:
        return self.volume.spacing_between_slices


def series_to_volume(datasets: list[pydicom.Dataset]) -> SeriesVolume:
    """Stack single-frame images of one series into a volume in patient space.

    Parameters
    ----------
    datasets
        Decoded single-frame instances of one series, in any order.

    Returns
    -------
    SeriesVolume
        Slices in highdicom's right-handed volume order, pixel values as float32.
        Gaps of whole slices (a lost or corrupt instance) become blank slices.

    Raises
    ------
    ValueError
        If geometry attributes are missing, frames differ in size or orientation,
        or the slices do not lie on a regular grid along their normal.
    """
    if len(datasets) == 0:
        raise ValueError("datasets: no instances")
    for index, ds in enumerate(datasets):
        missing = [name for name in GEOMETRY_ATTRIBUTES if name not in ds]
        if missing:
            raise ValueError(f"datasets[{index}]: missing geometry attribute(s) {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1)) != 1:
            raise ValueError(f"datasets[{index}]: multi-frame images are not supported here")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise ValueError(f"datasets: frames have different sizes {sorted(shapes)}")
    orientations = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise ValueError("datasets: slices have different ImageOrientationPatient")

    if len(datasets) == 1:
        slices: list[pydicom.Dataset | None] = list(datasets)
        spacing = float(datasets[0].get("SpacingBetweenSlices", datasets[0].get("SliceThickness", 1.0)))
    else:
        spacing, indices = get_series_volume_positions(
            datasets, atol=0.01 * _nominal_spacing(datasets), allow_missing_positions=True
        )
        if spacing is None or indices is None:
            raise ValueError(
                "datasets: slices are not a regular volume (duplicate or non-parallel positions, or uneven spacing)"
            )
        slices = [None] * (max(indices) + 1)
        for index, ds in zip(indices, datasets):
            slices[index] = ds

    first = slices[0]
    rows, columns = int(first.Rows), int(first.Columns)
    array = np.stack([_stored_to_float(ds) if ds is not None else np.zeros((rows, columns), np.float32)
                      for ds in slices])
    volume = Volume.from_attributes(
        array=array,
        image_position=[float(v) for v in first.ImagePositionPatient],
        image_orientation=[float(v) for v in first.ImageOrientationPatient],
        pixel_spacing=[float(v) for v in first.PixelSpacing],
        spacing_between_slices=float(spacing),
        coordinate_system="PATIENT",
        frame_of_reference_uid=first.get("FrameOfReferenceUID"),
    )
    return SeriesVolume(volume=volume, slices=slices)


def _nominal_spacing(datasets: list[pydicom.Dataset]) -> float:
    """Smallest step between neighbouring slices, the grid a gap is measured against."""
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    positions = sorted(float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in datasets)
    steps = np.diff(positions)
    return float(np.min(steps)) if len(steps) else 1.0


def _stored_to_float(ds: pydicom.Dataset) -> np.ndarray:
    """Pixel values with the modality rescale applied, as float32."""
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim != 2:
        raise ValueError(f"instance {ds.get('SOPInstanceUID')}: expected a single grey-level frame")
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    return pixels * slope + intercept


def volume_to_sitk(volume: Volume, array: np.ndarray | None = None):
    """A SimpleITK image on ``volume``'s grid (index i = column, j = row, k = slice)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.array if array is None else array)
    affine = volume.affine
    # highdicom's affine maps (slice, row, column) indices; SimpleITK orders (column, row, slice).
    axes = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]
    spacing = [float(np.linalg.norm(a)) for a in axes]
    direction = np.stack([a / s for a, s in zip(axes, spacing)], axis=1)
    image.SetSpacing(spacing)
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def labels_on_volume_grid(label_path: Path | str, volume: Volume) -> np.ndarray:
    """Read a label image (NIfTI, NRRD, ...) and resample it, nearest neighbour, onto ``volume``'s grid.

    Resampling goes through patient coordinates, so a label file stored in another
    slice order or orientation still lands on the right voxels.
    """
    import SimpleITK as sitk

    labels = sitk.ReadImage(str(label_path))
    reference = volume_to_sitk(volume, np.zeros(volume.spatial_shape, dtype=np.uint8))
    resampled = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              labels.GetPixelID())
    return sitk.GetArrayFromImage(resampled)
