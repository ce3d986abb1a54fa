"""T1rho / T2 relaxometry: mono-exponential fits, masks across grids, compartment means (ms).

The relaxation series (for example GE CubeQuant T1rho, whose spin-lock time is stored
in EchoTime) usually has its own grid: thicker slices at other positions than the
morphology series the cartilage was segmented on. :func:`mask_on_grid` therefore
carries masks through patient coordinates and reports, per map voxel, the fraction of
its volume inside the mask; :func:`mean_relaxation` averages only voxels fully inside,
so partial-volume voxels (cartilage + joint fluid, T1rho > 100 ms) do not bias the mean.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pydicom
from highdicom import Volume

from msk_node.biomarkers import Measurement, unavailable
from msk_node.volume import SeriesVolume

__all__ = [
    "RelaxationMap",
    "fit_monoexponential",
    "mask_on_grid",
    "mean_relaxation",
    "relaxation_map_from_series",
    "spin_lock_times",
]

#: Relaxation times (ms) outside this range are treated as failed fits by default.
PLAUSIBLE_MS = (0.5, 1000.0)


def fit_monoexponential(
    images: npt.ArrayLike,
    times_ms: Sequence[float],
    mask: npt.ArrayLike | None = None,
    *,
    min_r2: float = 0.8,
    plausible_ms: tuple[float, float] = PLAUSIBLE_MS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-wise fit of ``S(t) = S0 * exp(-t / T)``.

    Parameters
    ----------
    images : array_like, shape (n_times, ...)
        Signal per time point; the remaining axes are the voxel grid.
    times_ms : sequence of float
        Spin-lock (T1rho) or echo (T2) time of each image, ms. At least 3 distinct
        values, finite and non-negative; repeats are allowed (repeated measurements).
    mask : array_like of bool, optional
        Voxels to fit (shape ``images.shape[1:]``); the others are NaN.
    min_r2 : float
        Fits whose coefficient of determination (weighted, on log signal) is below this
        are rejected (NaN).
    plausible_ms : tuple of float
        Relaxation times outside ``[low, high]`` are rejected (NaN).

    Returns
    -------
    t_map : numpy.ndarray
        Relaxation time T in ms; NaN where the voxel is masked out, has a non-positive
        signal, decays not at all (slope >= 0), or fails ``min_r2`` / ``plausible_ms``.
    s0_map : numpy.ndarray
        Extrapolated signal at t = 0 (NaN where ``t_map`` is NaN).
    r2_map : numpy.ndarray
        Coefficient of determination of the log-linear fit (NaN where not fitted).

    Raises
    ------
    ValueError
        If ``times_ms`` does not match ``images`` or has fewer than 3 distinct finite,
        non-negative values, if ``mask`` has the wrong shape, or if the thresholds are
        invalid.

    Notes
    -----
    Method: weighted linear least squares of ``ln S = ln S0 - t / T`` with weights
    ``S**2`` (the variance of ``ln S`` is about ``sigma**2 / S**2`` for Gaussian noise
    ``sigma``), solved in closed form for all voxels at once.
    """
    data = np.asarray(images)
    times = _check_times(times_ms, "times_ms")
    if data.ndim < 2 or data.shape[0] != len(times):
        raise ValueError(f"images must have shape (n_times={len(times)}, ...), got {data.shape}")
    if not 0.0 <= min_r2 <= 1.0:
        raise ValueError(f"min_r2 must be within [0, 1], got {min_r2}")
    low, high = (float(v) for v in plausible_ms)
    if not 0.0 <= low < high:
        raise ValueError(f"plausible_ms must be (low, high) with 0 <= low < high, got {plausible_ms}")
    grid = data.shape[1:]
    if mask is None:
        selected = np.ones(grid, dtype=bool)
    else:
        selected = np.asarray(mask, dtype=bool)
        if selected.shape != grid:
            raise ValueError(f"mask shape {selected.shape} differs from the image grid {grid}")

    t_map = np.full(grid, np.nan)
    s0_map = np.full(grid, np.nan)
    r2_map = np.full(grid, np.nan)
    signal = data[:, selected]  # (n_times, n_voxels)
    t_sel = np.full(signal.shape[1], np.nan)
    s0_sel = np.full(signal.shape[1], np.nan)
    r2_sel = np.full(signal.shape[1], np.nan)
    for start in range(0, signal.shape[1], _FIT_CHUNK):
        part = slice(start, start + _FIT_CHUNK)
        t_sel[part], s0_sel[part], r2_sel[part] = _fit_log_linear(signal[:, part], times, min_r2, low, high)
    t_map[selected] = t_sel
    s0_map[selected] = s0_sel
    r2_map[selected] = r2_sel
    return t_map, s0_map, r2_map


@dataclass(frozen=True)
class RelaxationMap:
    """A fitted relaxation map with the grid it lives on.

    Attributes
    ----------
    t_ms, s0, r2 : numpy.ndarray
        Outputs of :func:`fit_monoexponential`, indexed ``[slice, row, column]``.
    geometry : highdicom.Volume
        The grid shared by the series (the volume of the first series passed);
        ``geometry.affine`` maps indices of the maps to patient mm.
    times_ms : tuple of float
        Sorted spin-lock / echo times used.
    kind : str
        What the map measures: ``"t1rho"``, ``"t2"`` or ``"dess_t2"``; empty if not known.
    source_datasets : list of pydicom.Dataset
        Instances of one echo (or spin-lock time) on ``geometry``, in slice order: what
        derived DICOM objects reference.
    """

    t_ms: np.ndarray
    s0: np.ndarray
    r2: np.ndarray
    geometry: Volume
    times_ms: tuple[float, ...]
    kind: str = ""
    source_datasets: list[pydicom.Dataset] = field(default_factory=list)

    @property
    def volume(self) -> Volume:
        """The relaxation time map as a ``highdicom.Volume`` (ms, NaN where not fitted)."""
        return self.geometry.with_array(self.t_ms.astype(np.float32))


def relaxation_map_from_series(
    volumes: Sequence[SeriesVolume],
    times_ms: Sequence[float] | None = None,
    mask: npt.ArrayLike | None = None,
    *,
    min_r2: float = 0.8,
    grid_tolerance_mm: float = 0.01,
) -> RelaxationMap:
    """Fit a relaxation map from one series per spin-lock (or echo) time.

    Parameters
    ----------
    volumes : sequence of SeriesVolume
        One volume per time, in any order.
    times_ms : sequence of float, optional
        Time of each volume in ms; by default EchoTime of its instances (see
        :func:`spin_lock_times`).
    mask : array_like of bool, optional
        Voxels to fit.
    min_r2 : float
        Goodness-of-fit threshold passed to :func:`fit_monoexponential`.
    grid_tolerance_mm : float
        Largest difference of the index-to-patient matrices accepted as "same grid".

    Returns
    -------
    RelaxationMap

    Raises
    ------
    ValueError
        If fewer than 3 volumes or times are given, their numbers differ, a time
        appears twice, the instances of one series disagree on EchoTime, or a series
        does not share the grid (shape, affine, frame of reference) of the first; the
        message names the series.
    """
    volumes = list(volumes)
    if times_ms is None:
        names = {_series_name(v, i): i for i, v in enumerate(volumes)}
        times = [0.0] * len(volumes)
        for key, value in spin_lock_times({name: volumes[i].datasets for name, i in names.items()}):
            times[names[key]] = value
    else:
        times = [float(t) for t in times_ms]
        if len(times) != len(volumes):
            raise ValueError(f"times_ms has {len(times)} values for {len(volumes)} volumes")
    if len(volumes) < 3:
        raise ValueError(f"a relaxation fit needs at least 3 series with distinct times, got {len(volumes)}")
    duplicated = sorted({t for t in times if times.count(t) > 1})
    if duplicated:
        names = [_series_name(v, i) for i, v in enumerate(volumes) if times[i] in duplicated]
        raise ValueError(f"duplicated time(s) {duplicated} ms in series {names}")
    _check_times(times, "times_ms")

    reference = volumes[0].volume
    for index, series in enumerate(volumes[1:], start=1):
        other = series.volume
        name = _series_name(series, index)
        if other.spatial_shape != reference.spatial_shape:
            raise ValueError(f"series {name}: grid shape {other.spatial_shape} differs from "
                             f"{reference.spatial_shape} of series {_series_name(volumes[0], 0)}")
        if not np.allclose(other.affine, reference.affine, atol=grid_tolerance_mm):
            raise ValueError(f"series {name}: slice positions/orientation/spacing differ from series "
                             f"{_series_name(volumes[0], 0)}; resample it onto one grid first")
        if (other.frame_of_reference_uid and reference.frame_of_reference_uid
                and other.frame_of_reference_uid != reference.frame_of_reference_uid):
            raise ValueError(f"series {name}: FrameOfReferenceUID differs from series {_series_name(volumes[0], 0)}")

    order = np.argsort(times)
    images = np.stack([volumes[i].volume.array for i in order]).astype(np.float64)
    sorted_times = tuple(float(times[i]) for i in order)
    t_map, s0, r2 = fit_monoexponential(images, sorted_times, mask, min_r2=min_r2)
    return RelaxationMap(t_map, s0, r2, reference, sorted_times)


def spin_lock_times(
    datasets_by_series: Mapping[str, Sequence[pydicom.Dataset]],
) -> list[tuple[str, float]]:
    """Spin-lock time of each series, read from EchoTime, sorted by time.

    Parameters
    ----------
    datasets_by_series : mapping of str to sequence of pydicom.Dataset
        Instances of each series under any key (e.g. SeriesInstanceUID or folder).

    Returns
    -------
    list of (str, float)
        ``(key, time_ms)`` in increasing time.

    Raises
    ------
    ValueError
        If a series is empty, an instance lacks EchoTime, the instances of one series
        disagree on it, or two series share a time.

    Note
    ----
    GE CubeQuant stores the spin-lock time (TSL) in EchoTime (0018,0081); the same
    function reads echo times of multi-echo T2 series stored as one series per echo.
    """
    result = []
    for key, datasets in datasets_by_series.items():
        if len(datasets) == 0:
            raise ValueError(f"series {key!r}: no instances")
        values = set()
        for ds in datasets:
            value = ds.get("EchoTime")
            if value is None or value == "":
                raise ValueError(f"series {key!r}: instance {ds.get('SOPInstanceUID', '?')} has no EchoTime")
            values.add(round(float(value), 6))
        if len(values) > 1:
            raise ValueError(f"series {key!r}: instances disagree on EchoTime {sorted(values)} ms")
        result.append((key, values.pop()))
    result.sort(key=lambda pair: pair[1])
    for (key_a, a), (key_b, b) in zip(result, result[1:]):
        if a == b:
            raise ValueError(f"series {key_a!r} and {key_b!r} have the same spin-lock time {a:g} ms")
    return result


def mask_on_grid(
    label_volume: npt.ArrayLike,
    source: Volume,
    target: Volume,
    value: int | Collection[int] | None = None,
    *,
    slice_thickness: float | None = None,
    margin_mm: float | Sequence[float] | None = None,
    samples: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """Fraction of each target voxel covered by a mask given on another grid.

    Parameters
    ----------
    label_volume : array_like, shape ``source.spatial_shape``
        Label map (or mask) on the source grid.
    source : highdicom.Volume
        Grid of ``label_volume`` (its affine maps (slice, row, column) to patient mm).
    target : highdicom.Volume
        Grid to carry the mask to, e.g. the relaxation series.
    value : int or collection of int, optional
        Label value(s) forming the mask; by default every non-zero voxel.
    slice_thickness : float, optional
        Extent of a target voxel along its slice axis, mm; by default the target's
        spacing between slices (pass SliceThickness for gapped or overlapping slices).
    margin_mm : float or sequence of 3 float, optional
        Grow each target voxel by this much on every side (per target axis: slice, row,
        column) before measuring its coverage. The boundary of a mask drawn on the source
        grid is only known to within half a source voxel, so by default the margin is
        half the source voxel's extent along each target axis: a fraction of 1 then
        means "inside even if the true boundary is half a source voxel further in".
        Pass 0 for the plain covered fraction.
    samples : tuple of 3 int, optional
        Sample points per target voxel along (slice, row, column). By default enough to
        resolve the source grid: ``ceil(2 * extent / source voxel extent)`` along each
        target axis (extent including the margins), between 2 and 8.

    Returns
    -------
    numpy.ndarray of float32, shape ``target.spatial_shape``
        Covered fraction in [0, 1].

    Raises
    ------
    ValueError
        If shapes disagree, the two grids have different frames of reference, or the
        options are invalid.

    Notes
    -----
    Method: each target voxel is supersampled on a regular ``samples`` lattice spanning
    its extent (pixel spacing in plane, ``slice_thickness`` along the slice axis, plus
    ``margin_mm`` on each side); every
    point is mapped to patient coordinates with the target affine, to source indices
    with the inverse source affine, and looked up nearest-neighbour (outside the source
    grid counts as not covered). The fraction is the share of covered points. Only the
    target region around the mask's bounding box is evaluated.
    """
    labels = np.asarray(label_volume)
    if labels.shape != tuple(source.spatial_shape):
        raise ValueError(f"label_volume shape {labels.shape} differs from source grid {source.spatial_shape}")
    if (source.frame_of_reference_uid and target.frame_of_reference_uid
            and source.frame_of_reference_uid != target.frame_of_reference_uid):
        raise ValueError("source and target have different FrameOfReferenceUID; they share no patient space")
    if value is None:
        mask = labels != 0
    elif isinstance(value, (int, np.integer)):
        mask = labels == value
    else:
        mask = np.isin(labels, list(value))
    thickness = float(slice_thickness) if slice_thickness is not None else float(target.spacing_between_slices)
    if not thickness > 0:
        raise ValueError(f"slice_thickness must be positive, got {slice_thickness}")
    if margin_mm is None:
        margins = _half_source_extent(source, target)
    else:
        margins = np.broadcast_to(np.asarray(margin_mm, dtype=float), (3,)).copy()
        if not (np.isfinite(margins).all() and (margins >= 0).all()):
            raise ValueError(f"margin_mm must be non-negative, got {margin_mm!r}")
    extents_mm = np.array([thickness, *target.pixel_spacing], dtype=float) + 2.0 * margins
    if samples is None:
        source_extent = 2.0 * _half_source_extent(source, target)
        counts = np.clip(np.ceil(2.0 * extents_mm / source_extent), 2, 8).astype(int)
    else:
        counts = np.asarray(samples, dtype=int)
        if counts.shape != (3,) or (counts < 1).any():
            raise ValueError(f"samples must be 3 positive integers, got {samples!r}")

    fraction = np.zeros(target.spatial_shape, dtype=np.float32)
    if not mask.any():
        return fraction
    # Target index -> source index.
    to_source = np.linalg.inv(source.affine) @ target.affine
    lo, hi = _target_bounds(mask, source, target)
    if (hi < lo).any():
        return fraction
    # Offsets of the sample points in target index units.
    index_extent = extents_mm / np.array(target.spacing, dtype=float)
    offsets = [((np.arange(n) + 0.5) / n - 0.5) * e for n, e in zip(counts, index_extent)]
    dk, dj, di = (o.ravel() for o in np.meshgrid(*offsets, indexing="ij"))
    sub = np.stack([dk, dj, di])  # (3, n_samples)
    rows = np.arange(lo[1], hi[1] + 1)
    cols = np.arange(lo[2], hi[2] + 1)
    jj, ii = np.meshgrid(rows, cols, indexing="ij")
    shape = np.array(mask.shape)
    for k in range(lo[0], hi[0] + 1):
        centres = np.stack([np.full(jj.size, k, dtype=float), jj.ravel(), ii.ravel()])  # (3, n_voxels)
        points = centres[:, :, None] + sub[:, None, :]  # (3, n_voxels, n_samples)
        src = np.tensordot(to_source[:3, :3], points, axes=1) + to_source[:3, 3][:, None, None]
        nearest = np.rint(src).astype(np.int64)
        inside = ((nearest >= 0) & (nearest < shape[:, None, None])).all(axis=0)
        covered = np.zeros(inside.shape, dtype=bool)
        covered[inside] = mask[nearest[0][inside], nearest[1][inside], nearest[2][inside]]
        fraction[k, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = covered.mean(axis=1).reshape(jj.shape)
    return fraction


def mean_relaxation(
    t_map: npt.ArrayLike,
    fraction: npt.ArrayLike,
    label: str,
    *,
    min_fraction: float = 0.99,
    clip: tuple[float, float] | None = (0.0, 100.0),
    name: str = "t1rho_mean",
) -> Measurement:
    """Mean relaxation time of the map voxels that lie fully inside a compartment.

    Parameters
    ----------
    t_map : array_like
        Relaxation map in ms (NaN where not fitted).
    fraction : array_like
        Fraction of each map voxel inside the compartment (:func:`mask_on_grid`), or a
        boolean mask on the map grid.
    label : str
        Compartment name, e.g. ``"femoral_cartilage"``.
    min_fraction : float
        Voxels covered less than this are excluded (partial volume).
    clip : tuple of float or None
        Values are clipped to this range (ms) before averaging, as in the paper (0-100).
    name : str
        Measurement name, e.g. ``"t1rho_mean"`` or ``"t2_mean"``.

    Returns
    -------
    Measurement
        Mean in ms (voxel-weighted) with ``extra``: ``sd_ms``, ``median_ms``,
        ``n_voxels`` (averaged), ``n_partial_excluded``, ``n_fit_failed`` (qualifying
        voxels without a valid fit), ``per_slice_mean_ms``. NaN with a reason if the
        compartment is absent, only partly covers every voxel, or has no valid fit.

    Raises
    ------
    ValueError
        If the shapes differ or ``min_fraction`` / ``clip`` are invalid.
    """
    values = np.asarray(t_map, dtype=float)
    cover = np.asarray(fraction, dtype=float)
    if values.shape != cover.shape:
        raise ValueError(f"t_map shape {values.shape} differs from fraction shape {cover.shape}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be within (0, 1], got {min_fraction}")
    if clip is not None and not clip[0] < clip[1]:
        raise ValueError(f"clip must be (low, high) with low < high, got {clip}")
    method = (f"mean of mono-exponential fit over voxels >= {min_fraction:g} inside the mask"
              + (f", clipped to {clip[0]:g}-{clip[1]:g} ms" if clip is not None else ""))
    touched = cover > 0
    if not touched.any():
        return unavailable(name, label, "ms", method, f"no {label} voxels on the map grid")
    full = cover >= min_fraction - 1e-6
    n_partial = int((touched & ~full).sum())
    if not full.any():
        return unavailable(name, label, "ms", method,
                           f"no map voxel lies fully inside {label} (min_fraction={min_fraction:g})",
                           n_partial_excluded=n_partial)
    finite = full & np.isfinite(values)
    n_failed = int((full & ~np.isfinite(values)).sum())
    if not finite.any():
        return unavailable(name, label, "ms", method, f"no valid fit in the {int(full.sum())} voxels of {label}",
                           n_partial_excluded=n_partial, n_fit_failed=n_failed)
    selected = values[finite]
    if clip is not None:
        selected = np.clip(selected, clip[0], clip[1])
    slice_index = np.nonzero(finite)[0]
    per_slice = {int(k): float(selected[slice_index == k].mean()) for k in np.unique(slice_index)}
    extra = {
        "sd_ms": float(selected.std(ddof=1)) if selected.size > 1 else 0.0,
        "median_ms": float(np.median(selected)),
        "n_voxels": int(selected.size),
        "n_partial_excluded": n_partial,
        "n_fit_failed": n_failed,
        "per_slice_mean_ms": per_slice,
    }
    return Measurement(name, label, float(selected.mean()), "ms", method, extra=extra)


# Internals -----------------------------------------------------------------------------------

#: Voxels fitted per chunk (bounds the temporaries to a few tens of MB).
_FIT_CHUNK = 1 << 18


def _fit_log_linear(
    signal: np.ndarray, times: np.ndarray, min_r2: float, low: float, high: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (S**2) log-linear fit of columns of ``signal`` (n_times, n); NaN where rejected."""
    s = np.asarray(signal, dtype=np.float64)
    n = s.shape[1]
    t_out, s0_out, r2_out = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    positive = (s > 0).all(axis=0) & np.isfinite(s).all(axis=0)
    s = s[:, positive]
    y = np.log(s)
    w = s * s
    x = times[:, None]
    sw = w.sum(axis=0)
    mx = (w * x).sum(axis=0) / sw
    my = (w * y).sum(axis=0) / sw
    dx, dy = x - mx, y - my
    sxx = (w * dx * dx).sum(axis=0)
    sxy = (w * dx * dy).sum(axis=0)
    syy = (w * dy * dy).sum(axis=0)
    slope = sxy / sxx
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(syy > 0, sxy * sxy / (sxx * syy), 0.0)
        t = -1.0 / slope
    good = (slope < 0) & (r2 >= min_r2) & (t >= low) & (t <= high)
    r2_out[positive] = r2
    t_out[positive] = np.where(good, t, np.nan)
    s0_out[positive] = np.where(good, np.exp(my - slope * mx), np.nan)
    return t_out, s0_out, r2_out


def _check_times(times_ms: Sequence[float], name: str) -> np.ndarray:
    try:
        times = np.asarray([float(t) for t in times_ms], dtype=float)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers in ms, got {times_ms!r}") from error
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {list(times)}")
    if len(np.unique(times)) < 3:
        raise ValueError(f"{name}: a mono-exponential fit needs at least 3 distinct times, got {list(times)}")
    return times


def _series_name(series: SeriesVolume, index: int) -> str:
    first = series.datasets[0] if series.datasets else None
    if first is None:
        return f"#{index}"
    description = str(first.get("SeriesDescription", "")).strip()
    uid = str(first.get("SeriesInstanceUID", ""))
    return f"#{index} {description!r} ({uid})" if description else f"#{index} ({uid})"


def _half_source_extent(source: Volume, target: Volume) -> np.ndarray:
    """Half the extent (mm) of a source voxel along each target axis (slice, row, column)."""
    source_axes = source.affine[:3, :3]  # columns: index steps in mm
    target_units = target.affine[:3, :3] / np.linalg.norm(target.affine[:3, :3], axis=0)
    return 0.5 * np.abs(target_units.T @ source_axes).sum(axis=1)


def _target_bounds(mask: np.ndarray, source: Volume, target: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive target index bounds of the mask's bounding box, one voxel of margin."""
    nonzero = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3)]
    lo = np.array([n.min() for n in nonzero], dtype=float) - 0.5
    hi = np.array([n.max() for n in nonzero], dtype=float) + 0.5
    corners = np.array([[c[0], c[1], c[2], 1.0] for c in np.array(np.meshgrid(*zip(lo, hi))).reshape(3, -1).T])
    to_target = np.linalg.inv(target.affine) @ source.affine
    mapped = (to_target @ corners.T)[:3]
    shape = np.array(target.spatial_shape)
    low = np.clip(np.floor(mapped.min(axis=1)).astype(int) - 1, 0, shape - 1)
    high = np.clip(np.ceil(mapped.max(axis=1)).astype(int) + 1, 0, shape - 1)
    if (mapped.max(axis=1) < -1).any() or (mapped.min(axis=1) > shape).any():
        return np.ones(3, int), np.zeros(3, int)
    return low, high

