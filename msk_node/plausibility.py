"""Anatomical plausibility of a merged label volume, before anything is written.

A box-prompted segmenter labels whatever the detector boxed, so one wrong box can put
a "tibia" above the femur or a disc in the abdomen. Here each label is split into 3D
connected components and every component is checked against the anatomy it belongs
to, in patient (LPS) millimetres: L = +x, P = +y, S = +z. A component that breaks a
rule is dropped; one whose reference structure (its anchor) is missing cannot be
checked, so it is kept and flagged.

Components use 26-connectivity (full, corners included): slices are often 2-5 mm
apart against 0.3-0.9 mm pixels, so a thin oblique plate (cartilage, meniscus, a disc
edge) steps across slices diagonally, and 6-connectivity would cut one structure
into pieces that then look like detached fragments. Slices missing from the series
are left out when components are labelled, so a gap does not cut a bone in two.

knee   femur, tibia, patella: one component each (the largest plausible one); the
       tibia lies inferior to the femur and the patella anterior to it, within the
       femur's left-right extent, where it glides in the trochlear groove (the femur
       anchors); cartilage touches its bone; menisci lie near the tibia, between
       tibia and femur.
thigh  femoral cortex and marrow: one component each; muscles: small pieces far
       from the muscle's main component are dropped.
spine  vertebral bodies and discs: tiny components and components isolated from
       the column are dropped; along the superior axis bodies and discs alternate,
       so of two discs with no body between them only the larger stays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from msk_node.labels import LabelMap
from msk_node.volume import SeriesVolume

#: 3D neighbourhood of components: 26-connectivity (see the module docstring).
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
#: Cartilage lies on its bone; a gap up to this (or one slice, where slices are thicker) still touches.
CARTILAGE_GAP_MM = 2.0
#: Menisci sit on the tibial plateau, partly over tibial cartilage (2-3 mm) and a thin fluid layer.
MENISCUS_GAP_MM = 5.0
#: A real muscle piece (a head cut by the slab, a belly split at a fascia) is several cm3; one false
#: detection on a single slice (about 1.5 x 1.5 cm x 5 mm) is about 1 cm3.
MIN_MUSCLE_PIECE_MM3 = 1000.0
#: Pieces of one muscle are separated by fascia (a few mm) at most; farther means another structure.
MUSCLE_GAP_MM = 10.0
#: A fifth of the smallest real disc (cervical, about 1 cm3): smaller is a stray voxel cluster.
MIN_SPINE_COMPONENT_MM3 = 200.0
#: Neighbouring centroids on the column are under ~1.4 body heights apart, even where a disc is missed.
COLUMN_GAP_BODY_HEIGHTS = 1.5

KNEE_CARTILAGE = {"femoral_cartilage": "femur", "tibial_cartilage": "tibia", "patellar_cartilage": "patella"}
THIGH_BONE = ("femoral_cortex", "femoral_marrow")
THIGH_MUSCLES = ("quadriceps", "hamstrings", "adductors", "sartorius", "gracilis")
BODY, DISC = "vertebral_body", "intervertebral_disc"
_L, _A, _S = 0, 1, 2  # LPS axes: left is +x, anterior is -y, superior is +z


@dataclass(frozen=True)
class Finding:
    """A component that failed a rule (``dropped``) or could not be checked (``flagged``)."""

    label: str
    action: str
    rule: str
    reason: str
    volume_mm3: float
    centroid_mm: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {**asdict(self), "volume_mm3": round(self.volume_mm3, 1),
                "centroid_mm": [round(v, 2) for v in self.centroid_mm]}


@dataclass(frozen=True)
class PlausibilityResult:
    """The label volume with implausible components removed, and what was found."""

    label_volume: np.ndarray
    findings: tuple[Finding, ...]

    @property
    def dropped(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "dropped"]

    @property
    def flagged(self) -> list[Finding]:
        return [f for f in self.findings if f.action == "flagged"]


@dataclass(frozen=True)
class LabelFigures:
    """Per-label figures of a label volume, in real units and patient coordinates."""

    label: str
    value: int
    volume_cm3: float
    components: int
    slices: int
    first_slice: int
    last_slice: int
    centroid_mm: tuple[float, float, float]


@dataclass
class _Component:
    label: str
    index: int
    box: tuple[slice, ...]
    volume_mm3: float
    centroid: np.ndarray
    s_range: tuple[float, float]
    #: Extent along L (patient left), like ``s_range``.
    l_range: tuple[float, float]

    @property
    def s_extent_mm(self) -> float:
        return self.s_range[1] - self.s_range[0]


class _Geometry:
    """Voxel -> patient mapping of a series volume: affine, spacing and the slices present."""

    def __init__(self, volume: SeriesVolume, shape: tuple[int, ...]) -> None:
        if tuple(shape) != tuple(volume.volume.spatial_shape):
            raise ValueError(f"label volume of shape {tuple(shape)} is not on the series' grid "
                             f"{tuple(volume.volume.spatial_shape)}")
        self.affine = np.asarray(volume.volume.affine, dtype=float)
        self.spacing = tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))
        self.voxel_mm3 = float(abs(np.linalg.det(self.affine[:3, :3])))
        self.present = np.asarray(volume.present, dtype=bool)

    def to_patient(self, indices: np.ndarray) -> np.ndarray:
        """(n, 3) voxel indices (slice, row, column) -> (n, 3) LPS mm."""
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3]


def label_components(mask: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, int]:
    """3D components of ``mask`` (26-connectivity), labelled over the slices that exist only."""
    labelled = np.zeros(mask.shape, dtype=np.int32)
    labelled[present], count = ndimage.label(mask[present], structure=CONNECTIVITY)
    return labelled, int(count)


def _components(label: str, mask: np.ndarray, geometry: _Geometry) -> tuple[np.ndarray, list[_Component]]:
    labelled, count = label_components(mask, geometry.present)
    if count == 0:
        return labelled, []
    coords = np.nonzero(labelled)
    ids = labelled[coords]
    counts = np.bincount(ids, minlength=count + 1)[1:]
    index_centroids = np.stack([np.bincount(ids, weights=c, minlength=count + 1)[1:] for c in coords], axis=1)
    index_centroids /= counts[:, None]
    index = np.arange(1, count + 1)
    points = np.stack(coords, axis=1)

    def extent(axis: int) -> list[tuple[float, float]]:
        """Range along a patient axis: voxel centres' range widened by half a voxel's own extent at each end."""
        position = points @ geometry.affine[axis, :3] + geometry.affine[axis, 3]
        half = np.abs(geometry.affine[axis, :3]).sum() / 2
        low, high = ndimage.minimum(position, ids, index), ndimage.maximum(position, ids, index)
        return [(float(a) - half, float(b) + half) for a, b in zip(low, high)]

    boxes = ndimage.find_objects(labelled)
    centroids = geometry.to_patient(index_centroids)
    s_ranges, l_ranges = extent(_S), extent(_L)
    return labelled, [_Component(label, i + 1, boxes[i], float(counts[i] * geometry.voxel_mm3), centroids[i],
                                 s_ranges[i], l_ranges[i]) for i in range(count)]


def _near(component: _Component, labelled: np.ndarray, anchor: np.ndarray, spacing: tuple[float, ...],
          limit_mm: float) -> bool:
    """Whether any voxel of ``component`` is within ``limit_mm`` of ``anchor`` (voxel centres, in mm)."""
    margin = [int(np.ceil(limit_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(component.box, margin,
                                                                                   anchor.shape))
    near_anchor = anchor[box]
    if not near_anchor.any():
        return False
    # Within the padded box, distances up to limit_mm are exact: anchor voxels outside it are farther.
    distance = ndimage.distance_transform_edt(~near_anchor, sampling=spacing)
    return bool(distance[labelled[box] == component.index].min() <= limit_mm)


class _Checker:
    """Holds the cleaned volume and the findings while the rules of one anatomy run."""

    def __init__(self, label_volume: np.ndarray, geometry: _Geometry, label_map: LabelMap) -> None:
        self.volume = label_volume.copy()
        self.geometry = geometry
        self.label_map = label_map
        self.findings: list[Finding] = []
        self._labelled: dict[str, np.ndarray] = {}

    def components(self, label: str) -> list[_Component]:
        """Components of ``label`` in the volume as it is now (earlier drops are gone)."""
        if label not in self.label_map.names:
            return []
        labelled, found = _components(label, self.volume == self.label_map.by_name(label).value, self.geometry)
        self._labelled[label] = labelled
        return found

    def mask(self, label: str) -> np.ndarray:
        return self.volume == self.label_map.by_name(label).value

    def component_mask(self, component: _Component) -> np.ndarray:
        return self._labelled[component.label] == component.index

    def drop(self, component: _Component, rule: str, reason: str) -> None:
        box = component.box
        region = self.volume[box]
        region[self._labelled[component.label][box] == component.index] = 0
        self._record(component, "dropped", rule, reason)

    def flag(self, component: _Component, rule: str, reason: str) -> None:
        self._record(component, "flagged", rule, reason)

    def near(self, component: _Component, anchor: np.ndarray, limit_mm: float) -> bool:
        return _near(component, self._labelled[component.label], anchor, self.geometry.spacing, limit_mm)

    def _record(self, component: _Component, action: str, rule: str, reason: str) -> None:
        self.findings.append(Finding(component.label, action, rule, reason, component.volume_mm3,
                                     tuple(float(v) for v in component.centroid)))

    def keep_largest(self, components: list[_Component], rule: str, reason: str) -> _Component | None:
        """Keep the largest of ``components``, drop the rest; return the one kept."""
        if not components:
            return None
        largest = max(components, key=lambda c: c.volume_mm3)
        for component in components:
            if component is not largest:
                self.drop(component, rule, reason)
        return largest


def check_label_volume(label_volume: np.ndarray, volume: SeriesVolume, anatomy: str,
                       label_map: LabelMap) -> PlausibilityResult:
    """Drop implausible 3D components of ``label_volume`` [slice, row, column] and say why.

    Labels of other anatomies and anatomies without rules pass unchanged.
    """
    checker = _Checker(np.asarray(label_volume), _Geometry(volume, label_volume.shape), label_map)
    rules = {"knee": _knee, "thigh": _thigh, "spine": _spine}.get(anatomy)
    if rules is not None:
        rules(checker)
    return PlausibilityResult(checker.volume, tuple(checker.findings))


def _knee(checker: _Checker) -> None:
    femur = checker.keep_largest(checker.components("femur"), "one_component", "detached fragment of the femur")
    bones = {"femur": femur}

    tibia_parts = checker.components("tibia")
    if femur is not None:
        # Femur anchors: a tibia at or above its centroid along S is not a tibia.
        for part in [c for c in tibia_parts if c.centroid[_S] >= femur.centroid[_S]]:
            checker.drop(part, "tibia_below_femur", "tibia centroid not inferior to the femur's")
            tibia_parts.remove(part)
    bones["tibia"] = checker.keep_largest(tibia_parts, "one_component", "detached fragment of the tibia")
    if femur is None and bones["tibia"] is not None:
        checker.flag(bones["tibia"], "no_anchor", "no femur to check the tibia's position against")

    patella_parts = checker.components("patella")
    if femur is not None:
        for part in [c for c in patella_parts if c.centroid[_A] >= femur.centroid[_A]]:
            checker.drop(part, "patella_anterior", "patella centroid not anterior to the femur's")
            patella_parts.remove(part)
        # The patella glides in the trochlear groove, between the condyles: never beside the femur.
        left, right = femur.l_range
        for part in [c for c in patella_parts if not left <= c.centroid[_L] <= right]:
            checker.drop(part, "patella_over_femur", "patella centroid outside the femur's left-right extent")
            patella_parts.remove(part)
    bones["patella"] = checker.keep_largest(patella_parts, "one_patella", "second patella")
    if femur is None and bones["patella"] is not None:
        checker.flag(bones["patella"], "no_anchor", "no femur to check the patella's position against")

    # Touching: within the gap, or one slice where slices are thicker (neighbouring voxels).
    gap = max(CARTILAGE_GAP_MM, max(checker.geometry.spacing))
    for plate, bone in KNEE_CARTILAGE.items():
        anchor = checker.mask(bone) if bones[bone] is not None else None
        for part in checker.components(plate):
            if anchor is None:
                checker.flag(part, "no_anchor", f"no {bone} to check the cartilage against")
            elif not checker.near(part, anchor, gap):
                checker.drop(part, "cartilage_on_bone", f"more than {gap:g} mm from the {bone}")

    tibia = bones["tibia"]
    tibia_mask = checker.mask("tibia") if tibia is not None else None
    for part in checker.components("meniscus"):
        if tibia is None:
            checker.flag(part, "no_anchor", "no tibia to check the meniscus against")
        elif not checker.near(part, tibia_mask, max(MENISCUS_GAP_MM, max(checker.geometry.spacing))):
            checker.drop(part, "meniscus_on_tibia", f"more than {MENISCUS_GAP_MM:g} mm from the tibia")
        elif not (tibia.centroid[_S] < part.centroid[_S] < (femur.centroid[_S] if femur else np.inf)):
            checker.drop(part, "meniscus_in_joint", "centroid not between the tibia's and the femur's")


def _thigh(checker: _Checker) -> None:
    for bone in THIGH_BONE:
        checker.keep_largest(checker.components(bone), "one_component", f"detached fragment of the {bone}")
    for muscle in THIGH_MUSCLES:
        parts = checker.components(muscle)
        if len(parts) < 2:
            continue
        main = max(parts, key=lambda c: c.volume_mm3)
        main_mask = checker.component_mask(main)
        for part in parts:
            if (part is not main and part.volume_mm3 < MIN_MUSCLE_PIECE_MM3
                    and not checker.near(part, main_mask, MUSCLE_GAP_MM)):
                checker.drop(part, "muscle_piece", f"under {MIN_MUSCLE_PIECE_MM3:g} mm3 and more than "
                                                   f"{MUSCLE_GAP_MM:g} mm from the {muscle}'s main part")


def _spine(checker: _Checker) -> None:
    parts = []
    for label in (BODY, DISC):
        for part in checker.components(label):
            if part.volume_mm3 < MIN_SPINE_COMPONENT_MM3:
                checker.drop(part, "min_volume", f"under {MIN_SPINE_COMPONENT_MM3:g} mm3")
            else:
                parts.append(part)
    bodies = [c for c in parts if c.label == BODY]
    if not bodies:
        for part in parts:
            checker.flag(part, "no_anchor", "no vertebral body to check the disc against")
        return

    # Isolated: no other component of the column within 1.5 typical body heights.
    height = float(np.median([c.s_extent_mm for c in bodies]))
    limit = COLUMN_GAP_BODY_HEIGHTS * height
    if len(parts) > 1:
        centroids = np.stack([c.centroid for c in parts])
        distances = np.linalg.norm(centroids[:, None] - centroids[None], axis=2)
        np.fill_diagonal(distances, np.inf)
        nearest = distances.min(axis=1)
        for part, gap in zip(list(parts), nearest):
            if gap > limit:
                checker.drop(part, "column", f"{gap:.0f} mm from the column, over {COLUMN_GAP_BODY_HEIGHTS:g} "
                                             f"body heights ({height:.0f} mm)")
                parts.remove(part)

    # Bodies and discs alternate along S. Pieces of one label whose S ranges overlap are one level (a
    # disc cut in two, or its lateral edge alone in the outermost slice); of two disc levels with no body
    # level between them, the smaller goes.
    levels = _levels(parts)
    run: list[list[_Component]] = []
    for level in levels + [None]:
        if level is not None and level[0].label == DISC:
            run.append(level)
            continue
        if len(run) > 1:
            largest = max(run, key=lambda group: sum(c.volume_mm3 for c in group))
            for part in [c for group in run if group is not largest for c in group]:
                checker.drop(part, "alternation", "disc not between two vertebral bodies")
        run = []
    for lower, upper in zip(levels, levels[1:]):
        if lower[0].label == upper[0].label == BODY:
            for part in upper:
                checker.flag(part, "alternation", "no disc between this vertebral body and the one below")


def _levels(parts: list[_Component]) -> list[list[_Component]]:
    """Components grouped into levels along S, inferior first: same label, S ranges overlapping by half."""
    levels: list[list[_Component]] = []
    for part in sorted(parts, key=lambda c: c.centroid[_S]):
        level = levels[-1] if levels else None
        if level is not None and level[0].label == part.label and any(_overlap(part, c) for c in level):
            level.append(part)
        else:
            levels.append([part])
    return levels


def _overlap(a: _Component, b: _Component) -> bool:
    shared = min(a.s_range[1], b.s_range[1]) - max(a.s_range[0], b.s_range[0])
    return shared >= 0.5 * min(a.s_extent_mm, b.s_extent_mm)


def label_figures(label_volume: np.ndarray, volume: SeriesVolume, label_map: LabelMap) -> list[LabelFigures]:
    """Volume, 3D component count, slices covered and centroid (LPS mm) of every label present."""
    geometry = _Geometry(volume, label_volume.shape)
    figures = []
    for value in np.unique(label_volume):
        if value == 0:
            continue
        mask = label_volume == value
        _, count = label_components(mask, geometry.present)
        slices = np.flatnonzero(mask.any(axis=(1, 2)))
        centroid = geometry.to_patient(np.array(ndimage.center_of_mass(mask)))
        figures.append(LabelFigures(label_map.by_value(int(value)).name, int(value),
                                    float(mask.sum() * geometry.voxel_mm3 / 1000.0), count, len(slices),
                                    int(slices[0]), int(slices[-1]), tuple(float(v) for v in centroid)))
    return figures
