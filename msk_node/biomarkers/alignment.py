"""Rigid alignment of a relaxation series to the morphology series the cartilage was segmented on.

Masks always travel between grids through patient coordinates (``mask_on_grid``), which
is exact when the knee did not move between the two acquisitions. When it did, the
morphology is registered rigidly (SimpleITK, Mattes mutual information) to the map's
first echo, and the result is kept only when mutual information says the series were
misaligned: the registration must improve the metric clearly and move the anatomy by
more than a fraction of a map voxel. Both images are shrunk to about 1.5 mm voxels and
sparsely sampled, so a check costs seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from highdicom import Volume

from msk_node.volume import volume_to_sitk

__all__ = ["Alignment", "align_to_map", "moved_volume"]

#: Relative improvement of the mutual-information metric that counts as "misaligned".
MIN_METRIC_GAIN = 0.05
#: Smallest displacement (in map voxels along their largest spacing) worth correcting.
MIN_SHIFT_VOXELS = 0.5
#: Images are shrunk to about this voxel size (mm) before registering: cartilage-scale shifts stay visible.
WORKING_SPACING_MM = 1.5


@dataclass(frozen=True)
class Alignment:
    """Patient-to-patient rigid transform from morphology to map space, and why it was kept or not."""

    matrix: np.ndarray
    registered: bool
    metric_before: float
    metric_after: float
    shift_mm: float


def align_to_map(morphology: Volume, map_image: Volume, *, seed: int = 0) -> Alignment:
    """Register ``morphology`` to ``map_image`` when mutual information says they are misaligned.

    Parameters
    ----------
    morphology : highdicom.Volume
        The segmented series (its array and patient geometry).
    map_image : highdicom.Volume
        An image of the relaxation acquisition, e.g. its first echo, on the map grid.
    seed : int
        Seed of the metric's random sampling (repeatable results).

    Returns
    -------
    Alignment
        ``matrix`` maps morphology patient mm to map patient mm; identity (with
        ``registered`` False) when the registration gains too little or moves too little.
    """
    import SimpleITK as sitk

    fixed = _prepared(volume_to_sitk(map_image, map_image.array.astype(np.float32)))
    moving = _prepared(volume_to_sitk(morphology, morphology.array.astype(np.float32)))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=0.05, numberOfIterations=60)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(sitk.Euler3DTransform(), inPlace=False)
    before = method.MetricEvaluate(fixed, moving)
    transform = method.Execute(fixed, moving)
    method.SetInitialTransform(transform, inPlace=False)
    after = method.MetricEvaluate(fixed, moving)
    # The transform maps map (fixed) points to morphology (moving) points; the mask needs the inverse.
    to_morphology = _matrix(transform)
    matrix = np.linalg.inv(to_morphology)
    shift = _largest_shift(matrix, map_image)
    gain = (before - after) / abs(before) if before else 0.0
    registered = gain > MIN_METRIC_GAIN and shift > MIN_SHIFT_VOXELS * max(map_image.spacing)
    return Alignment(matrix if registered else np.eye(4), registered, float(before), float(after), shift)


def moved_volume(volume: Volume, matrix: np.ndarray) -> Volume:
    """``volume`` with its grid moved by a patient-to-patient matrix (the array is untouched)."""
    return Volume(volume.array, np.asarray(matrix) @ volume.affine, "PATIENT",
                  frame_of_reference_uid=volume.frame_of_reference_uid)


def _prepared(image):
    """Shrunk to about WORKING_SPACING_MM (block averages) and normalised to zero mean, unit variance."""
    import SimpleITK as sitk

    factors = [max(1, int(round(WORKING_SPACING_MM / spacing))) for spacing in image.GetSpacing()]
    return sitk.Normalize(sitk.BinShrink(sitk.Cast(image, sitk.sitkFloat32), factors))


def _matrix(transform) -> np.ndarray:
    """4x4 matrix of a composite / Euler transform returned by SimpleITK registration."""
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform(sitk.CompositeTransform(transform).GetNthTransform(0))
    rotation = np.array(euler.GetMatrix()).reshape(3, 3)
    centre = np.array(euler.GetCenter())
    translation = np.array(euler.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = translation + centre - rotation @ centre
    return matrix


def _largest_shift(matrix: np.ndarray, grid: Volume) -> float:
    """Largest displacement (mm) the matrix gives the corners of ``grid``."""
    shape = np.array(grid.spatial_shape) - 1
    corners = np.array(np.meshgrid(*[[0, n] for n in shape], indexing="ij")).reshape(3, -1)
    points = grid.affine @ np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.linalg.norm((matrix @ points - points)[:3], axis=0).max())
