"""Cartilage thickness from binary plate masks, in mm.

Both methods sample the plate along its medial axis and measure the thickness there
with sub-voxel accuracy:

1. The mask of each slice (axis 0 of a ``[slice, row, column]`` array) is upsampled in
   plane (``upsample`` times, order-1 interpolation of the binary mask, threshold 0.5),
   skeletonised (:func:`skimage.morphology.skeletonize`) and the skeleton's end branches
   are pruned (they run into the corners of the plate, where the thickness falls to 0).
   The Euclidean distance transform (EDT) is computed with the in-plane pixel spacing
   ``(row, column)`` in mm; it sets the pruning depth, the normal-fit radius and the
   ray length (and is the thickness itself with ``estimator="edt"``). The reference
   implementation (AutoMedLabel
   ``cartilage_thickness.py``) scaled pixel distances by the slice thickness instead;
   that is wrong for any series whose slice thickness differs from its pixel spacing.
2. At every skeleton point the local normal of the plate is the least-variance direction
   of the skeleton points within a radius around it (principal component analysis, in
   mm). The thickness is the chord through the point along that normal: two rays are
   marched through the linearly interpolated mask and each boundary is placed where the
   interpolated mask crosses 0.5, between samples by linear interpolation.

:func:`thickness_2d` uses in-plane normals (the paper's per-slice definition).
:func:`thickness_3d` fits the normal in 3D to the skeleton points of neighbouring slices
with the full ``(slice, row, column)`` spacing, so a plate that is oblique to the slices
is measured along its true normal rather than its in-plane section.

Why chords and not ``2 x EDT``: on a pixelated boundary the EDT is the distance to the
*nearest* boundary pixel, so ``2 x EDT`` along the skeleton measures the narrowest point
between staircase steps. On a 0.6 mm grid it reads about +20 % high without upsampling
(pixel-centre rounding) and 5-12 % low with 4x upsampling (staircase), depending on the
plate's tilt; the chord averages the steps out and stays within about 3 % on straight
slabs down to two pixels thick. ``thickness_2d(..., estimator="edt")`` keeps the
``2 x EDT`` definition for comparison with published values.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from msk_node.biomarkers import Measurement, unavailable

__all__ = [
    "PERCENTILES",
    "SplitPlane",
    "ThicknessStats",
    "cartilage_thickness",
    "split_by_plane",
    "thickness_2d",
    "thickness_3d",
]

#: Percentiles of the point-wise thickness distribution that are reported.
PERCENTILES = (5, 25, 50, 75, 95)

#: Coarse pixels of zero padding around the cropped mask (rays and interpolation need room).
_PAD = 3

#: Points per ray chunk, to bound memory.
_CHUNK = 4096


@dataclass(frozen=True)
class ThicknessStats:
    """Point-wise cartilage thickness summarised over a plate.

    Attributes
    ----------
    mean, sd : float
        Mean and sample SD of the thickness over all medial-axis points, mm (NaN if none).
    percentiles : dict of int to float
        Thickness percentiles (:data:`PERCENTILES`), mm.
    per_slice_mean : dict of int to float
        Mean thickness of the points of each slice that has points, keyed by slice index.
    n_points : int
        Number of medial-axis points with a valid thickness.
    method : str
        Description of the method.
    reason : str
        Why no value is available; empty when ``mean`` is a number.
    values : numpy.ndarray
        Thickness of every point, mm.
    slices : numpy.ndarray
        Slice index of every point.
    """

    mean: float
    sd: float
    percentiles: dict[int, float]
    per_slice_mean: dict[int, float]
    n_points: int
    method: str
    reason: str = ""
    values: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)
    slices: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64), repr=False, compare=False)

    @property
    def available(self) -> bool:
        """True when ``mean`` is a number."""
        return not math.isnan(self.mean)

    def to_measurement(self, label: str, reason: str | None = None) -> Measurement:
        """This summary as a ``"mean_thickness"`` :class:`Measurement` in mm.

        Parameters
        ----------
        label : str
            Anatomical label of the plate.
        reason : str, optional
            Replaces :attr:`reason` when the value is unavailable.
        """
        if not self.available:
            return unavailable("mean_thickness", label, "mm", self.method, reason or self.reason)
        extra = {
            "sd_mm": self.sd,
            "percentiles_mm": dict(self.percentiles),
            "per_slice_mean_mm": dict(self.per_slice_mean),
            "n_points": self.n_points,
            "n_slices": len(self.per_slice_mean),
        }
        return Measurement("mean_thickness", label, self.mean, "mm", self.method, extra=extra)


@dataclass(frozen=True)
class SplitPlane:
    """A plane in patient coordinates that splits one label into two named parts.

    Parameters
    ----------
    point : tuple of float
        A point on the plane, patient (LPS) mm.
    normal : tuple of float
        Normal pointing towards the first part (need not be unit length).
    names : tuple of str
        Suffixes of the parts on the positive and the negative side.
    """

    point: tuple[float, float, float]
    normal: tuple[float, float, float]
    names: tuple[str, str] = ("medial", "lateral")

    def __post_init__(self) -> None:
        if len(self.point) != 3 or not all(math.isfinite(float(v)) for v in self.point):
            raise ValueError(f"SplitPlane: 'point' must be 3 finite numbers, got {self.point!r}")
        if len(self.normal) != 3 or not np.linalg.norm(np.asarray(self.normal, dtype=float)) > 0:
            raise ValueError(f"SplitPlane: 'normal' must be a non-zero 3-vector, got {self.normal!r}")
        if len(self.names) != 2 or not all(self.names) or self.names[0] == self.names[1]:
            raise ValueError(f"SplitPlane: 'names' must be two different non-empty strings, got {self.names!r}")

    @classmethod
    def knee_medial_lateral(cls, split_x_mm: float, medial_side: str = "+x") -> SplitPlane:
        """Sagittal plane ``x = split_x_mm`` with medial on ``medial_side`` (``"+x"`` or ``"-x"``).

        In LPS, +x is the patient's left, so medial is ``"+x"`` for a right knee.
        """
        if medial_side not in ("+x", "-x"):
            raise ValueError(f"medial_side must be '+x' or '-x', got {medial_side!r}")
        return cls((float(split_x_mm), 0.0, 0.0), (1.0 if medial_side == "+x" else -1.0, 0.0, 0.0))


def split_by_plane(
    mask: npt.ArrayLike,
    affine: npt.ArrayLike,
    point: Sequence[float],
    normal: Sequence[float],
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Split a mask by a plane in patient coordinates.

    Parameters
    ----------
    mask : array_like of bool, shape (slices, rows, columns)
        Mask to split.
    affine : array_like, shape (4, 4)
        Maps ``(slice, row, column)`` indices to patient (LPS) mm, e.g. ``highdicom.Volume.affine``.
    point : sequence of float
        A point on the plane, mm.
    normal : sequence of float
        Plane normal; voxels whose centre lies on its side (strictly positive signed
        distance) form the first mask.

    Returns
    -------
    positive, negative : numpy.ndarray of bool
        Voxels of ``mask`` on the normal's side, and the rest; together exactly ``mask``.

    Raises
    ------
    ValueError
        If ``mask`` is not 3D, ``affine`` not 4x4 or ``normal`` zero.
    """
    mask = np.asarray(mask, dtype=bool)
    affine = np.asarray(affine, dtype=float)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (slice, row, column), got shape {mask.shape}")
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    n = np.asarray(normal, dtype=float)
    if n.shape != (3,) or not np.linalg.norm(n) > 0:
        raise ValueError(f"normal must be a non-zero 3-vector, got {normal!r}")
    n = n / np.linalg.norm(n)
    # Signed distance is affine in the indices: d = g . (k, j, i) + d0.
    gradient = affine[:3, :3].T @ n
    offset = float((affine[:3, 3] - np.asarray(point, dtype=float)) @ n)
    k, j, i = (np.arange(s, dtype=float) for s in mask.shape)
    signed = (gradient[0] * k[:, None, None] + gradient[1] * j[None, :, None] + gradient[2] * i[None, None, :]
              + offset)
    positive = mask & (signed > 0.0)
    return positive, mask & ~positive


def thickness_2d(
    mask: npt.ArrayLike,
    pixel_spacing: Sequence[float],
    *,
    upsample: int = 4,
    estimator: Literal["chord", "edt"] = "chord",
) -> ThicknessStats:
    """Per-slice medial-axis thickness of a cartilage plate, mm.

    Parameters
    ----------
    mask : array_like of bool, shape (slices, rows, columns) or (rows, columns)
        Plate mask; slices are measured independently.
    pixel_spacing : sequence of 2 float
        In-plane spacing ``(row spacing, column spacing)`` in mm (DICOM PixelSpacing),
        NOT the slice thickness.
    upsample : int
        In-plane upsampling factor of the mask before skeletonisation (>= 1).
    estimator : {"chord", "edt"}
        ``"chord"``: length of the chord through each skeleton point along the in-plane
        normal, with sub-pixel boundaries (default, see the module notes).
        ``"edt"``: ``2 x EDT`` at each skeleton point on the upsampled grid (the paper's
        definition; biased low on pixelated boundaries).

    Returns
    -------
    ThicknessStats
        Mean, SD and percentiles over all skeleton points of all slices, and the mean of
        each slice. NaN with a reason for an empty mask or a mask without measurable
        skeleton points.

    Raises
    ------
    ValueError
        For a mask that is not 2D or 3D, a spacing that is not two positive numbers, an
        ``upsample`` below 1 or an unknown ``estimator``.
    """
    volume = _as_volume(mask, allow_2d=True)
    spacing = _spacing(pixel_spacing, 2, "pixel_spacing")
    factor = _factor(upsample)
    if estimator not in ("chord", "edt"):
        raise ValueError(f"estimator must be 'chord' or 'edt', got {estimator!r}")
    what = "chord along the in-plane normal" if estimator == "chord" else "2 x EDT"
    method = (f"2D per-slice medial axis ({factor}x upsampled, pruned), {what}, "
              f"in-plane spacing {spacing[0]:g} x {spacing[1]:g} mm")
    if not volume.any():
        return _empty(method, "empty mask")
    values, slices = [], []
    for k in np.nonzero(volume.any(axis=(1, 2)))[0]:
        medial = _medial_points(volume[k], spacing, factor)
        if medial is None:
            continue
        points, edt, crop = medial  # points index ``crop``
        if estimator == "edt":
            thickness = 2.0 * edt
        else:
            normals = _normals(points * spacing, _window(edt, spacing))
            thickness = _chords(crop, points, normals, spacing, _max_length(edt, spacing))
        keep = np.isfinite(thickness)
        values.append(thickness[keep])
        slices.append(np.full(int(keep.sum()), k, dtype=np.int64))
    return _summarise(values, slices, method)


def thickness_3d(
    mask: npt.ArrayLike,
    spacing: Sequence[float],
    *,
    upsample: int = 4,
) -> ThicknessStats:
    """Cartilage thickness along the 3D normal of the plate's mid-surface, mm.

    Parameters
    ----------
    mask : array_like of bool, shape (slices, rows, columns)
        Plate mask.
    spacing : sequence of 3 float
        Voxel spacing ``(slice spacing, row spacing, column spacing)`` in mm; the slice
        spacing is the distance between slice centres (SpacingBetweenSlices).
    upsample : int
        In-plane upsampling factor used to find the medial points (>= 1).

    Returns
    -------
    ThicknessStats
        Mean, SD and percentiles over all mid-surface points; per-slice means.

    Raises
    ------
    ValueError
        For a mask that is not 3D, a spacing that is not three positive numbers or an
        ``upsample`` below 1.

    Notes
    -----
    Method: the pruned in-plane medial axes of all slices sample the plate's mid-surface
    (the medial axis of a section through a plate of even thickness lies on the plate's
    mid-surface whatever the plate's tilt). The normal at each point is the least-variance
    direction of the mid-surface points within a radius that reaches the neighbouring
    slices (3D PCA in mm with the full anisotropic spacing; points with neighbours in one
    slice only fall back to the in-plane normal). Each point is then moved within its
    tangent plane by a deterministic -1/2 ... +1/2 slice, so that the points also cover
    the mid-surface between slice centres and the chords meet the slice staircase of an
    oblique plate at all phases. The thickness is the chord along the normal through the
    trilinearly interpolated mask, boundaries at 0.5. The grid is assumed orthogonal
    (true for DICOM volumes). On synthetic plates 2.5 mm thick tilted 0-60 degrees out of
    plane (voxels 2 x 0.5 x 0.5 and 1 x 0.4 x 0.7 mm) this reads within 6 % (-5.4 ... +0.7 %),
    where the 2D method reads about t / cos(tilt); a plate nearly parallel to the slices is
    limited by the slice spacing.
    """
    volume = _as_volume(mask, allow_2d=False)
    sk, sr, sc = _spacing(spacing, 3, "spacing")
    factor = _factor(upsample)
    method = (f"3D mid-surface normal chord (medial points from {factor}x upsampled slices, PCA normal), "
              f"spacing {sk:g} x {sr:g} x {sc:g} mm")
    if not volume.any():
        return _empty(method, "empty mask")
    ks = np.nonzero(volume.any(axis=(1, 2)))[0]
    k0, k1 = int(ks.min()), int(ks.max())
    rows = np.nonzero(volume.any(axis=(0, 2)))[0]
    cols = np.nonzero(volume.any(axis=(0, 1)))[0]
    r0, c0 = int(rows.min()), int(cols.min())
    crop = volume[k0:k1 + 1, r0:int(rows.max()) + 1, c0:int(cols.max()) + 1]
    padded = np.pad(crop, _PAD).astype(np.float32)

    points, edts = [], []
    for k in range(crop.shape[0]):
        medial = _medial_points(crop[k], (sr, sc), factor)
        if medial is None:
            continue
        p2, edt, _ = medial
        # Crop indices -> slice indices (- _PAD + bounding-box corner) -> ``padded`` indices (+ _PAD).
        corner = np.array(np.nonzero(crop[k])).min(axis=1)
        points.append(np.column_stack([np.full(len(p2), k + _PAD, dtype=float), p2 + corner]))
        edts.append(edt)
    if not points:
        return _empty(method, "no medial-axis points (plate too small to measure)")
    idx = np.concatenate(points)  # indices into ``padded``
    edt = np.concatenate(edts)
    spacing3 = np.array([sk, sr, sc])
    window = max(_window(edt, (sr, sc)), 1.5 * sk)
    normals, below, above = _local_planes(idx * spacing3, window)
    starts = idx + _between_slices(normals, sk, below, above) / spacing3
    thickness = _chords(padded, starts, normals, spacing3, _max_length(edt, spacing3))
    keep = np.isfinite(thickness)
    slices = (idx[keep, 0] - _PAD + k0).astype(np.int64)  # the slice each point was found on
    return _summarise([thickness[keep]], [slices], method)


def cartilage_thickness(
    label_volume: npt.ArrayLike,
    spacing: Sequence[float],
    label_values: Mapping[str, int],
    method: Literal["2d", "3d"] = "2d",
    *,
    affine: npt.ArrayLike | None = None,
    split_planes: Mapping[str, SplitPlane | Sequence[SplitPlane]] | None = None,
    upsample: int = 4,
) -> list[Measurement]:
    """Mean thickness of each cartilage plate of a label volume.

    Parameters
    ----------
    label_volume : array_like of int, shape (slices, rows, columns)
        Label map.
    spacing : sequence of 3 float
        ``(slice spacing, row spacing, column spacing)`` in mm. The 2D method uses the
        in-plane part only.
    label_values : mapping of str to int
        Plate names and their label values, e.g. ``{"femoral_cartilage": 4}``.
    method : {"2d", "3d"}
        :func:`thickness_2d` (per-slice, in-plane normal) or :func:`thickness_3d`.
    affine : array_like, shape (4, 4), optional
        Index-to-patient matrix; required with ``split_planes``.
    split_planes : mapping of str to SplitPlane or sequence of SplitPlane, optional
        For each named label, also measure its parts, named ``f"{label}_{suffix}"`` (e.g.
        ``tibial_cartilage_medial``). One plane gives two parts; with a sequence each plane
        but the last peels off the part on its positive side and hands the rest to the next
        (femoral cartilage: trochlear, then medial and lateral).
    upsample : int
        In-plane upsampling factor.

    Returns
    -------
    list of Measurement
        ``"mean_thickness"`` in mm per plate (and per split part), in the order of
        ``label_values``; a plate without voxels gives NaN with reason ``"no <label> voxels"``.

    Raises
    ------
    ValueError
        For a label volume that is not 3D, a bad spacing, an unknown ``method``, split
        planes without ``affine`` or naming labels not in ``label_values``.
    """
    labels = np.asarray(label_volume)
    if labels.ndim != 3:
        raise ValueError(f"label_volume must be 3D (slice, row, column), got shape {labels.shape}")
    spacing3 = _spacing(spacing, 3, "spacing")
    if method not in ("2d", "3d"):
        raise ValueError(f"method must be '2d' or '3d', got {method!r}")
    split_planes = dict(split_planes or {})
    unknown = set(split_planes) - set(label_values)
    if unknown:
        raise ValueError(f"split_planes names labels not in label_values: {sorted(unknown)}")
    if split_planes and affine is None:
        raise ValueError("split_planes requires 'affine' (index to patient mm)")

    def measure(mask: np.ndarray, label: str) -> Measurement:
        if method == "2d":
            stats = thickness_2d(mask, spacing3[1:], upsample=upsample)
        else:
            stats = thickness_3d(mask, spacing3, upsample=upsample)
        reason = f"no {label} voxels" if not mask.any() else None
        return stats.to_measurement(label, reason)

    results = []
    for label, value in label_values.items():
        mask = labels == value
        results.append(measure(mask, label))
        results.extend(measure(part, name) for name, part in plate_parts(mask, label, affine,
                                                                         split_planes.get(label, ())).items())
    return results


def plate_parts(mask: npt.NDArray[np.bool_], label: str, affine: npt.ArrayLike | None,
                planes: SplitPlane | Sequence[SplitPlane]) -> dict[str, npt.NDArray[np.bool_]]:
    """A plate's parts cut by a chain of planes: each plane takes its positive side off the rest.

    Names are ``<label>_<part>``; no planes give no parts.
    """
    planes = (planes,) if isinstance(planes, SplitPlane) else tuple(planes)
    parts, rest = {}, mask
    for n, plane in enumerate(planes):
        positive, rest = split_by_plane(rest, affine, plane.point, plane.normal)
        parts[f"{label}_{plane.names[0]}"] = positive
        if n == len(planes) - 1:
            parts[f"{label}_{plane.names[1]}"] = rest
    return parts


# Internals -----------------------------------------------------------------------------------


def _as_volume(mask: npt.ArrayLike, allow_2d: bool) -> npt.NDArray[np.bool_]:
    array = np.asarray(mask)
    if array.ndim == 2 and allow_2d:
        array = array[None]
    if array.ndim != 3:
        expected = "2D or 3D" if allow_2d else "3D (slice, row, column)"
        raise ValueError(f"mask must be {expected}, got shape {array.shape}")
    return array.astype(bool, copy=False)


def _spacing(spacing: Sequence[float], n: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be {n} positive numbers in mm, got {spacing!r}") from error
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"{name} must be {n} positive numbers in mm, got {spacing!r}")
    return values


def _factor(upsample: int) -> int:
    if int(upsample) != upsample or upsample < 1:
        raise ValueError(f"upsample must be an integer >= 1, got {upsample!r}")
    return int(upsample)


def _empty(method: str, reason: str) -> ThicknessStats:
    return ThicknessStats(math.nan, math.nan, {p: math.nan for p in PERCENTILES}, {}, 0, method, reason)


def _summarise(values: list[np.ndarray], slices: list[np.ndarray], method: str) -> ThicknessStats:
    v = np.concatenate(values) if values else np.zeros(0)
    k = np.concatenate(slices) if slices else np.zeros(0, np.int64)
    if v.size == 0:
        return _empty(method, "no medial-axis points with a valid thickness (plate too small to measure)")
    per_slice = {int(s): float(v[k == s].mean()) for s in np.unique(k)}
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    pct = dict(zip(PERCENTILES, (float(x) for x in np.percentile(v, PERCENTILES))))
    return ThicknessStats(float(v.mean()), sd, pct, per_slice, int(v.size), method, "", v, k)


def _medial_points(
    mask2d: np.ndarray, spacing: tuple[float, float], factor: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Pruned skeleton points of one slice.

    Returns the points as float (row, column) indices into the returned zero-padded
    float crop of the slice (``_PAD`` pixels around the mask's bounding box), the EDT (mm)
    at each point, and the crop; ``None`` if no skeleton point survives the pruning.
    """
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    r0, c0 = rows.min(), cols.min()
    crop = np.pad(mask2d[r0:rows.max() + 1, c0:cols.max() + 1], _PAD).astype(np.float32)
    if factor > 1:
        fine = ndimage.zoom(crop, factor, order=1, grid_mode=True, mode="grid-constant", cval=0.0) > 0.5
    else:
        fine = crop > 0.5
    h = np.asarray(spacing) / factor
    edt = ndimage.distance_transform_edt(fine, sampling=h)
    skeleton = _prune(skeletonize(fine), int(math.ceil(edt.max() / h.min())))
    fine_idx = np.argwhere(skeleton)
    if len(fine_idx) == 0:
        return None
    # Fine index m sits at coarse coordinate (m + 0.5) / factor - 0.5 (pixel edges aligned).
    in_crop = (fine_idx + 0.5) / factor - 0.5
    return in_crop, edt[skeleton], crop


def _prune(skeleton: np.ndarray, steps: int) -> np.ndarray:
    """Remove end points ``steps`` times (end branches, isolated points); loops survive.

    Each round removes every point with at most one neighbour at once. Neighbour counts
    are kept up to date around the removed points only, so a round costs the number of
    end points, not the size of the image.
    """
    skeleton = skeleton.astype(bool)
    padded = np.pad(skeleton, 1)
    offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    neighbours = ndimage.convolve(padded.astype(np.uint8), np.ones((3, 3), dtype=np.uint8), mode="constant") - 1
    ends = np.argwhere(padded & (neighbours <= 1))
    for _ in range(steps):
        if len(ends) == 0:
            break
        padded[ends[:, 0], ends[:, 1]] = False
        around = np.concatenate([ends + offset for offset in offsets])
        np.subtract.at(neighbours, (around[:, 0], around[:, 1]), 1)
        around = np.unique(around, axis=0)
        ends = around[padded[around[:, 0], around[:, 1]] & (neighbours[around[:, 0], around[:, 1]] <= 1)]
    return padded[1:-1, 1:-1]


def _window(edt: np.ndarray, spacing: Sequence[float]) -> float:
    """Radius (mm) of the neighbourhood for the normal fit: a plate thickness or 3 pixels."""
    return float(max(2.0 * np.percentile(edt, 90), 3.0 * max(spacing[-2:])))


def _max_length(edt: np.ndarray, spacing: Sequence[float]) -> float:
    """How far (mm) a ray may go before the chord is declared unmeasurable."""
    return float(4.0 * edt.max() + 2.0 * max(spacing))


def _normals(points_mm: np.ndarray, radius: float) -> np.ndarray:
    """Least-variance direction of the points within ``radius`` of each point (unit, mm frame)."""
    return _local_planes(points_mm, radius)[0]


def _local_planes(points_mm: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normals by local PCA, and whether each point has neighbours below / above along axis 0.

    In 3D (axis 0 = slices) a point whose neighbours all lie in its own slice gets the
    in-plane normal of its neighbourhood: the points alone cannot tell the plate's tilt.
    """
    n, dim = points_mm.shape
    pairs = cKDTree(points_mm).query_pairs(radius, output_type="ndarray")
    a = np.concatenate([np.arange(n), pairs[:, 0], pairs[:, 1]])
    b = np.concatenate([np.arange(n), pairs[:, 1], pairs[:, 0]])
    count = np.bincount(a, minlength=n).astype(float)
    centred = points_mm[b] - points_mm[a]  # neighbour offsets, numerically stable
    mean = np.stack([np.bincount(a, centred[:, d], minlength=n) for d in range(dim)], axis=1) / count[:, None]
    second = np.empty((n, dim, dim))
    for d in range(dim):
        for e in range(d, dim):
            second[:, d, e] = second[:, e, d] = np.bincount(a, centred[:, d] * centred[:, e], minlength=n)
    cov = second / count[:, None, None] - mean[:, :, None] * mean[:, None, :]
    _, vectors = np.linalg.eigh(cov)
    normals = vectors[:, :, 0]
    below = np.bincount(a, centred[:, 0] < -1e-6, minlength=n) > 0
    above = np.bincount(a, centred[:, 0] > 1e-6, minlength=n) > 0
    if dim == 3:
        flat = ~below & ~above
        if flat.any():
            _, in_plane = np.linalg.eigh(cov[flat][:, 1:, 1:])
            normals[flat] = np.column_stack([np.zeros(int(flat.sum())), in_plane[:, :, 0]])
    return normals / np.linalg.norm(normals, axis=1, keepdims=True), below, above


def _between_slices(normals: np.ndarray, slice_spacing: float, below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Offsets (mm) that spread points on slice centres over the mid-surface between slices.

    Each point moves within its tangent plane along the direction whose slice component
    is 1 mm per mm, by a deterministic fraction of -1/2 ... +1/2 slice (golden-ratio
    sequence). Chords through slice centres only would all meet the slice staircase of
    an oblique plate at the same phase and be biased; spread out they average over it.
    A point moves only towards slices where it has neighbours (not off the plate's rim),
    and not at all when its plane is nearly parallel to the slices.
    """
    along = np.array([1.0, 0.0, 0.0]) - normals[:, :1] * normals  # slice axis projected on the plane
    fraction = (np.arange(len(normals)) * 0.6180339887498949) % 1.0 - 0.5
    fraction = np.where(below, fraction, np.abs(fraction))
    fraction = np.where(above, fraction, -np.abs(fraction))
    fraction = np.where(below | above, fraction, 0.0)
    movable = np.abs(along[:, 0]) > 0.2
    scale = np.where(movable, fraction * slice_spacing / np.where(movable, along[:, 0], 1.0), 0.0)
    return scale[:, None] * along


def _chords(
    field: np.ndarray,
    points: np.ndarray,
    normals: np.ndarray,
    spacing: Sequence[float],
    max_length: float,
) -> np.ndarray:
    """Chord length (mm) through each point along its normal in the interpolated mask.

    ``points`` are float indices into ``field``; the boundary is where the (bi/tri)linear
    interpolation of ``field`` crosses 0.5. Points whose ray does not leave the mask
    within ``max_length`` give NaN.
    """
    spacing = np.asarray(spacing, dtype=float)
    idx = points
    step = float(spacing.min()) / 8.0
    distances = np.arange(0.0, max_length + step, step)
    result = np.full(len(idx), np.nan)
    base = np.asarray(field, dtype=np.float32)
    for start in range(0, len(idx), _CHUNK):
        sl = slice(start, start + _CHUNK)
        total = np.zeros(len(idx[sl]))
        for sign in (1.0, -1.0):
            delta = sign * normals[sl] / spacing  # index change per mm
            coords = idx[sl][:, None, :] + distances[None, :, None] * delta[:, None, :]
            values = ndimage.map_coordinates(base, np.moveaxis(coords, -1, 0), order=1, mode="constant", cval=0.0)
            outside = values < 0.5
            first = np.argmax(outside, axis=1)
            rows = np.arange(len(first))
            valid = outside[rows, first] & (first > 0)
            before, after = values[rows, first - 1], values[rows, first]
            with np.errstate(divide="ignore", invalid="ignore"):
                frac = np.clip((before - 0.5) / (before - after), 0.0, 1.0)
            total += np.where(valid, distances[first - 1] + frac * step, np.nan)
        result[sl] = total
    return result
