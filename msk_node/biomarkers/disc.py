"""Intervertebral discs of a sagittal spine label volume: located, named by level from the sacrum, measured.

Levels come from anatomy, not from counting discs: the sacrum (S1) is recognised as the
most inferior vertebral body when it is shaped like one (its lower border slopes much less
than its upper endplate, the sacral plate), and each disc is named by the number of
vertebral bodies between it and S1. A disc that does not lie
between two vertebral bodies is not a disc; a disc whose level cannot be told is reported as
"level uncertain" rather than with a guessed name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from msk_node.biomarkers import Measurement

__all__ = ["LUMBAR_LEVELS", "UNCERTAIN_LEVEL", "Disc", "disc_height", "disc_heights", "locate_discs",
           "min_area_rectangle"]

#: Disc levels, superior to inferior; the last one lies on the sacrum.
LUMBAR_LEVELS = ("T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1")
#: In the name of a disc whose level cannot be told: ``"disc 3 (level uncertain)"``.
UNCERTAIN_LEVEL = "level uncertain"

_METHOD = ("per sagittal slice: convex hull of the pixel centres (mm) of the disc's sections, "
           "minimum-area rectangle, height = shorter side; maximum over slices per 3D disc")
_FULL = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Disc:
    """One intervertebral disc of a label volume.

    Attributes
    ----------
    name : str
        Its level (``"L4-L5"``), or ``"disc <k> (level uncertain)"`` with ``k`` counted
        superior to inferior among all discs found.
    level : str or None
        The level; None when it cannot be told.
    mask : numpy.ndarray of bool
        Its voxels on the label volume's grid, pieces split by a small gap merged.
    centroid_mm : tuple of 3 float
        Centre of mass in patient coordinates (LPS, mm).
    note : str
        Why the level is uncertain; empty when it is named.
    """

    name: str
    level: str | None
    mask: np.ndarray
    centroid_mm: tuple[float, float, float]
    note: str = ""


class _Candidate(NamedTuple):
    """A disc between vertebral bodies, before it is named."""

    mask: np.ndarray
    centroid: np.ndarray
    below: int | None  # nearest body inferior to it
    above: int | None  # nearest body superior to it
    touched: int  # bodies it touches


def min_area_rectangle(points_mm: npt.ArrayLike) -> tuple[float, float, float]:
    """Minimum-area enclosing rectangle of 2D points given in mm.

    Parameters
    ----------
    points_mm : array_like, shape (n, 2)
        Point coordinates in mm (already scaled by the pixel spacing, so anisotropic
        pixels are handled before the fit).

    Returns
    -------
    short, long : float
        Side lengths in mm, ``short <= long``.
    angle_deg : float
        Direction of the long side from the first coordinate axis, degrees (0-180).

    Raises
    ------
    ValueError
        If fewer than 3 points are given or they are not 2D.
    """
    points = np.asarray(points_mm, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        raise ValueError(f"points_mm must be at least 3 points of shape (n, 2), got {points.shape}")
    hull = cv2.convexHull(points)
    (_, _), (w, h), _ = cv2.minAreaRect(hull)
    box = cv2.boxPoints(cv2.minAreaRect(hull))
    edges = np.diff(np.vstack([box, box[:1]]), axis=0)[:2]
    lengths = np.linalg.norm(edges, axis=1)
    long_edge = edges[int(np.argmax(lengths))]
    angle = math.degrees(math.atan2(float(long_edge[1]), float(long_edge[0]))) % 180.0
    return float(min(w, h)), float(max(w, h)), angle


def locate_discs(
    discs: npt.ArrayLike,
    bodies: npt.ArrayLike,
    affine: npt.ArrayLike,
    *,
    level_names: Sequence[str] = LUMBAR_LEVELS,
    merge_gap_mm: float = 3.0,
    contact_mm: float = 4.0,
    min_sacral_turn_deg: float = 15.0,
    min_body_fraction: float = 0.25,
    min_disc_fraction: float = 0.1,
    max_body_step: float = 1.5,
) -> list[Disc]:
    """Discs of a spine label volume, named by level counted from the sacrum.

    Everything is measured in patient coordinates (LPS, mm) through ``affine``, so the
    result does not depend on how the image axes are stored.

    1. Disc components (26-connected) closer than ``merge_gap_mm`` to each other are one
       disc: a cleft in a disc mask must not make two discs. Disc components, and body
       components, lying side by side (outlines projected along patient x overlapping by
       half) are one structure: a missed sagittal slice must not make two.
    2. Vertebral body components smaller than ``min_body_fraction`` of the median body,
       and discs smaller than ``min_disc_fraction`` of the median disc, are ignored
       (specks). A disc must touch (within ``contact_mm``) a body whose centre
       lies superior to its own and another inferior to it; anything else is dropped.
    3. The sacrum is the most inferior body, accepted as S1 only when its lower border
       slopes at least ``min_sacral_turn_deg`` less (anterior edge down) than its upper
       endplate: below the sacral plate the column turns backwards (sacral kyphosis), while
       a lumbar body is wedged the other way (lordosis). Each slope is a least-squares plane
       through the top (bottom) of the body's central part. A lowest body cut by the image
       edge is judged against the edge, i.e. by its upper endplate alone.
    4. A disc whose inferior neighbour is the ``n``-th body above S1 (S1 itself: ``n = 0``)
       gets ``level_names[-1 - n]``: a missed disc does not shift the names of the others.

    Without an accepted sacrum, with a body possibly missed or merged below the disc (a
    body taller, or two neighbouring body centres farther apart, than ``max_body_step``
    times the median), with more bodies above S1 than levels, with two discs on one body,
    or for a disc touching more than two bodies or lying between bodies that are not
    neighbours, the discs concerned are named "level uncertain" with a ``note``; a volume
    without vertebral bodies keeps all its discs, every one uncertain.

    Parameters
    ----------
    discs, bodies : array_like of bool, shape (slices, rows, columns)
        Disc and vertebral body masks on one grid.
    affine : array_like, shape (4, 4)
        Index-to-patient (LPS) matrix of the grid, e.g. ``highdicom.Volume.affine``.
    level_names : sequence of str
        Level names superior to inferior, the last one on the sacrum.
    merge_gap_mm, contact_mm, min_sacral_turn_deg, min_body_fraction, min_disc_fraction, max_body_step : float
        Thresholds of the steps above.

    Returns
    -------
    list of Disc
        Superior to inferior.

    Raises
    ------
    ValueError
        If the masks are not 3D of one shape, ``affine`` is not 4x4 or ``level_names``
        is empty or repeats a name.
    """
    disc_mask, body_mask = np.asarray(discs, dtype=bool), np.asarray(bodies, dtype=bool)
    if disc_mask.ndim != 3 or disc_mask.shape != body_mask.shape:
        raise ValueError(f"discs and bodies must be 3D masks of one shape, got {disc_mask.shape}, {body_mask.shape}")
    affine = _affine(affine)
    names = _level_names(level_names)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)  # mm per step along each array axis

    pieces, n_pieces = ndimage.label(disc_mask, structure=_FULL)
    disc_groups = _merge_pieces(pieces, n_pieces, affine, merge_gap_mm)
    body_pieces, n_body_pieces = ndimage.label(body_mask, structure=_FULL)
    body_groups = _merge_pieces(body_pieces, n_body_pieces, affine, None)
    lookup = np.zeros(n_body_pieces + 1, dtype=int)
    for number, group in enumerate(body_groups, start=1):
        lookup[group] = number
    body_labels = lookup[body_pieces]
    sizes = ndimage.sum_labels(body_mask, body_labels, range(1, len(body_groups) + 1)) if body_groups else []
    kept = [b for b, size in enumerate(sizes, start=1) if size >= min_body_fraction * np.median(sizes)]
    body_centre = {b: _patient(affine, np.argwhere(body_labels == b).mean(axis=0)) for b in kept}
    body_z = {b: float(centre[2]) for b, centre in body_centre.items()}

    disc_sizes = [ndimage.sum_labels(disc_mask, pieces, group).sum() for group in disc_groups]
    found = []
    for group, size in zip(disc_groups, disc_sizes):
        if size < min_disc_fraction * np.median(disc_sizes):
            continue
        mask = np.isin(pieces, group)
        centroid = _patient(affine, np.argwhere(mask).mean(axis=0))
        touching = _touching(mask, body_labels, spacing, contact_mm) & set(kept)
        below = [b for b in touching if body_z[b] < centroid[2]]
        above = [b for b in touching if body_z[b] > centroid[2]]
        if not kept or (below and above):
            found.append(_Candidate(mask, centroid, max(below, key=body_z.__getitem__) if below else None,
                                    min(above, key=body_z.__getitem__) if above else None, len(touching)))
    found.sort(key=lambda candidate: -candidate.centroid[2])

    ascending = sorted(kept, key=body_z.__getitem__)
    anchor_note = _sacrum_note(body_labels == ascending[0] if ascending else None, affine, min_sacral_turn_deg)
    first_gap = _first_gap([body_centre[b] for b in ascending],
                           [_body_height_mm(body_labels == b, affine) for b in ascending], max_body_step)
    levels, notes = [], []
    for candidate in found:
        rank = ascending.index(candidate.below) if candidate.below is not None else None
        level, note = _level(rank, names, anchor_note, first_gap)
        if level is not None and candidate.touched > 2:
            level, note = None, f"touches {candidate.touched} vertebral bodies, not two"
        elif level is not None and ascending.index(candidate.above) != rank + 1:
            level, note = None, "the vertebral bodies it lies between are not neighbours"
        levels.append(level)
        notes.append(note)
    repeated = {level for level in levels if level is not None and levels.count(level) > 1}
    for k, level in enumerate(levels):
        if level in repeated:
            levels[k], notes[k] = None, "two discs on one vertebral body"
    return [Disc(level or f"disc {k} ({UNCERTAIN_LEVEL})", level, c.mask, tuple(float(v) for v in c.centroid), note)
            for k, (c, level, note) in enumerate(zip(found, levels, notes), start=1)]


def disc_height(disc: npt.ArrayLike, pixel_spacing: Sequence[float], label: str, *,
                min_area_mm2: float = 20.0) -> Measurement | None:
    """Height of one disc, the maximum over sagittal slices of its minimum-area rectangle's short side.

    Parameters
    ----------
    disc : array_like of bool, shape (slices, rows, columns)
        The disc's voxels (one disc, possibly in pieces).
    pixel_spacing : sequence of 2 float
        In-plane spacing ``(row spacing, column spacing)`` in mm.
    label : str
        Label of the measurement (the level).
    min_area_mm2 : float
        Per-slice sections (8-connected) smaller than this are ignored (segmentation specks).

    Returns
    -------
    Measurement or None
        ``"disc_height"`` in mm with ``extra``: ``slice`` (index of the maximum),
        ``per_slice_height_mm``, ``width_mm`` (long side at the maximum) and ``n_slices``;
        None when no slice has a section of ``min_area_mm2``.

    Notes
    -----
    On each slice the rectangle encloses the pixel centres (mm) of all the disc's sections,
    so a disc split by a thin cleft is measured whole. Pixel centres put the rectangle's
    sides on the outermost centres: for endplates tilted a few degrees to the pixel grid
    this is unbiased, for endplates exactly parallel to a pixel axis it reads up to one
    pixel low.
    """
    mask = np.asarray(disc, dtype=bool)
    spacing = _spacing(pixel_spacing)
    pixel_area = spacing[0] * spacing[1]
    heights: dict[int, tuple[float, float]] = {}
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        sections, n = ndimage.label(mask[k], structure=np.ones((3, 3), dtype=bool))
        areas = ndimage.sum_labels(mask[k], sections, range(1, n + 1)) * pixel_area
        pixels = np.argwhere(np.isin(sections, np.flatnonzero(areas >= min_area_mm2) + 1))
        if len(pixels) >= 3:
            short, long, _ = min_area_rectangle(pixels * spacing)
            heights[int(k)] = (short, long)
    if not heights:
        return None
    best = max(heights, key=lambda k: heights[k][0])
    extra = {"slice": best, "per_slice_height_mm": {k: v[0] for k, v in sorted(heights.items())},
             "width_mm": heights[best][1], "n_slices": len(heights)}
    return Measurement("disc_height", label, heights[best][0], "mm", _METHOD, extra=extra)


def disc_heights(
    mask: npt.ArrayLike,
    pixel_spacing: Sequence[float],
    affine: npt.ArrayLike | None = None,
    *,
    value: int | None = None,
    bodies: npt.ArrayLike | None = None,
    level_names: Sequence[str] = LUMBAR_LEVELS,
    min_area_mm2: float = 20.0,
) -> list[Measurement]:
    """Height of each intervertebral disc, named by level (see :func:`locate_discs`).

    Parameters
    ----------
    mask : array_like, shape (slices, rows, columns)
        Sagittal disc mask, or a label map together with ``value``.
    pixel_spacing : sequence of 2 float
        In-plane spacing ``(row spacing, column spacing)`` in mm.
    affine : array_like, shape (4, 4), optional
        Index-to-patient (LPS) matrix. Without it the discs (3D components) are named
        ``disc_1 ...`` in image row order and carry no level.
    value : int, optional
        Disc label value when ``mask`` is a label map; by default every non-zero voxel.
    bodies : array_like of bool, optional
        Vertebral body mask on the same grid: the anatomy the levels are read from.
        Without it every disc is "level uncertain".
    level_names : sequence of str
        Level names superior to inferior, the last one on the sacrum.
    min_area_mm2 : float
        Per-slice sections smaller than this are ignored (segmentation specks).

    Returns
    -------
    list of Measurement
        ``"disc_height"`` in mm, superior to inferior (see :func:`disc_height`), with
        ``extra`` also holding ``level_assigned``, ``level_note`` and, with an affine,
        ``centroid_mm`` (patient LPS).

    Raises
    ------
    ValueError
        If ``mask`` is not 3D, the spacing is not two positive numbers, ``affine`` is not
        4x4, or ``level_names`` is empty or repeats a name.
    """
    volume = np.asarray(mask)
    if volume.ndim != 3:
        raise ValueError(f"mask must be 3D (slice, row, column), got shape {volume.shape}")
    discs = volume == value if value is not None else volume != 0
    _spacing(pixel_spacing)
    _level_names(level_names)
    if affine is None:
        components, count = ndimage.label(discs, structure=_FULL)
        rows = ndimage.center_of_mass(discs, components, range(1, count + 1))
        masks = [components == index for index in np.argsort([r[1] for r in rows]) + 1]
        located = [Disc(f"disc_{k}", None, m, (math.nan,) * 3, "no patient geometry")
                   for k, m in enumerate(masks, start=1)]
    else:
        located = locate_discs(discs, np.zeros_like(discs) if bodies is None else bodies, affine,
                               level_names=level_names)
    results = []
    for disc in located:
        measured = disc_height(disc.mask, pixel_spacing, disc.name, min_area_mm2=min_area_mm2)
        if measured is None:
            continue
        measured.extra.update(level_assigned=disc.level is not None, level_note=disc.note)
        if affine is not None:
            measured.extra["centroid_mm"] = disc.centroid_mm
        results.append(measured)
    return results


def _level(rank: int | None, names: list[str], anchor_note: str, first_gap: int) -> tuple[str | None, str]:
    """Level of a disc whose inferior body is the ``rank``-th above S1, or None and why not."""
    if anchor_note or rank is None:
        return None, anchor_note
    if rank >= first_gap:
        return None, "a vertebral body may be missed or merged between this disc and the sacrum"
    if rank >= len(names):
        return None, f"{rank} vertebral bodies above the sacrum, more than the levels known"
    return names[-1 - rank], ""


def _first_gap(centres: list[np.ndarray], heights: list[float], max_step: float) -> int:
    """Index of the first body (inferior to superior) that may hide a missed one; len(centres) if none.

    A body taller than ``max_step`` times the median height may be two merged; a step
    between neighbouring centres longer than ``max_step`` times the median step may skip one.
    """
    if len(centres) < 3:
        return len(centres)
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
    tall = np.flatnonzero(np.asarray(heights) > max_step * np.nanmedian(heights))
    long_steps = np.flatnonzero(steps > max_step * np.median(steps)) + 1
    suspects = [*tall, *long_steps]
    return int(min(suspects)) if suspects else len(centres)


def _merge_pieces(pieces: np.ndarray, count: int, affine: np.ndarray, gap_mm: float | None,
                  min_overlap: float = 0.5) -> list[list[int]]:
    """Component numbers grouped into one structure each.

    Two components are one when they lie within ``gap_mm`` of each other (a cleft), or
    side by side: their outlines projected along patient x (left-right) onto 1 mm cells
    overlap by ``min_overlap`` of the smaller (a structure split by a missed sagittal slice).
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    boxes = ndimage.find_objects(pieces)
    cells = []
    for number, box in enumerate(boxes, start=1):
        index = np.argwhere(pieces[box] == number) + [axis.start for axis in box]
        points = np.round(_patient(affine, index)[:, 1:]).astype(np.int64)
        cells.append(np.unique(points[:, 0] * 1_000_003 + points[:, 1]))
    parent = list(range(count + 1))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(1, count + 1):
        near = _touching(pieces == i, pieces, spacing, gap_mm) if gap_mm else set()
        for j in range(i + 1, count + 1):
            shared = len(np.intersect1d(cells[i - 1], cells[j - 1], assume_unique=True))
            if j in near or shared >= min_overlap * min(len(cells[i - 1]), len(cells[j - 1])):
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(1, count + 1):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _touching(mask: np.ndarray, labels: np.ndarray, spacing: np.ndarray, distance_mm: float) -> set[int]:
    """Non-zero values of ``labels`` within ``distance_mm`` (patient mm) of ``mask``."""
    margin = np.ceil(distance_mm / spacing).astype(int)
    found = np.argwhere(mask)
    low, high = np.maximum(found.min(axis=0) - margin, 0), found.max(axis=0) + margin + 1
    box = tuple(slice(a, b) for a, b in zip(low, high))
    near = ndimage.distance_transform_edt(~mask[box], sampling=spacing) <= distance_mm
    return {int(v) for v in np.unique(labels[box][near])} - {0}


def _sacrum_note(lowest: np.ndarray | None, affine: np.ndarray, min_turn_deg: float) -> str:
    """Empty when the most inferior body is a plausible S1, else why not."""
    if lowest is None:
        return "no vertebral body segmented: the sacrum cannot be found"
    upper, lower = _surface_slope_deg(lowest, affine, upper=True), _surface_slope_deg(lowest, affine, upper=False)
    if not upper - lower >= min_turn_deg:  # NaN too: no surface to judge
        return (f"lowest vertebral body (upper endplate {upper:.0f} deg, lower border {lower:.0f} deg) "
                "is not shaped like the sacrum")
    return ""


def _surface_slope_deg(body: np.ndarray, affine: np.ndarray, *, upper: bool) -> float:
    """Anterior-downward slope (deg) against the axial plane of a body's upper (or lower) surface, central part.

    A plane z = a y + b x + c fitted to the surface points (:func:`_central_surface`) gives
    the slope atan(a). In LPS, y points posteriorly, so a > 0 means the anterior edge is lower.
    """
    central = _central_surface(body, affine, upper=upper)
    if len(central) < 3:
        return math.nan
    design = np.c_[central[:, 1], central[:, 0], np.ones(len(central))]
    (a, _, _), *_ = np.linalg.lstsq(design, central[:, 2], rcond=None)
    return math.degrees(math.atan(a))


def _body_height_mm(body: np.ndarray, affine: np.ndarray) -> float:
    """Height of a body along patient z, median top minus median bottom of its central part."""
    top, bottom = _central_surface(body, affine, upper=True), _central_surface(body, affine, upper=False)
    return float(np.median(top[:, 2]) - np.median(bottom[:, 2])) if len(top) and len(bottom) else math.nan


def _central_surface(body: np.ndarray, affine: np.ndarray, *, upper: bool) -> np.ndarray:
    """Patient points (n, 3) of a body's top (bottom) voxel in each 1 mm (x, y) cell of its central half."""
    points = _patient(affine, np.argwhere(body))
    cells = np.round(points[:, :2]).astype(int)
    height = points[:, 2] if upper else -points[:, 2]
    order = np.lexsort((height, cells[:, 1], cells[:, 0]))[::-1]
    _, first = np.unique(cells[order], axis=0, return_index=True)
    surface = points[order][first]
    (x_low, y_low), (x_high, y_high) = np.percentile(points[:, :2], [25, 75], axis=0)
    return surface[(surface[:, 0] >= x_low) & (surface[:, 0] <= x_high)
                   & (surface[:, 1] >= y_low) & (surface[:, 1] <= y_high)]


def _patient(affine: np.ndarray, index: npt.ArrayLike) -> np.ndarray:
    """Patient coordinates (mm) of array indices, one point or an (n, 3) array."""
    index = np.asarray(index, dtype=float)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _affine(affine: npt.ArrayLike) -> np.ndarray:
    matrix = np.asarray(affine, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {matrix.shape}")
    return matrix


def _level_names(level_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in level_names]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"level_names must be distinct non-empty names, got {list(level_names)}")
    return names


def _spacing(pixel_spacing: Sequence[float]) -> tuple[float, float]:
    try:
        values = tuple(float(v) for v in pixel_spacing)
    except (TypeError, ValueError) as error:
        raise ValueError(f"pixel_spacing must be 2 positive numbers in mm, got {pixel_spacing!r}") from error
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"pixel_spacing must be 2 positive numbers in mm, got {pixel_spacing!r}")
    return values
