"""Which biomarkers apply to a segmented series, computed with the series' real geometry.

knee   cartilage thickness per plate (2D and 3D methods), tibial plates split medial /
       lateral when the knee's laterality is known, T1rho or T2 per plate when the
       study holds a spin-lock or multi-echo group, and volumes;
thigh  volumes of every tissue, per side when both thighs are in view (left and right segments);
spine  disc height and volume per disc, each disc a segment of its own named by its level.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from msk_node.biomarkers import Measurement, unavailable
from msk_node.biomarkers.cartilage import SplitPlane, cartilage_thickness
from msk_node.biomarkers.disc import disc_height, locate_discs
from msk_node.biomarkers.relaxometry import mask_on_grid, mean_relaxation, relaxation_map_from_series
from msk_node.biomarkers.volume import tissue_volumes
from msk_node.dicom_input import Series
from msk_node.codes import DISC_LEVELS, LEFT, RIGHT
from msk_node.labels import LabelMap
from msk_node.parallel import thread_map
from msk_node.seg_writer import SegmentInstance, segment_layout
from msk_node.sr_writer import MeasurementGroup
from msk_node.volume import SeriesVolume, series_to_volume

logger = logging.getLogger(__name__)

CARTILAGE_PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")
#: Series descriptions of spin-lock (T1rho) and multi-echo (T2) mapping acquisitions.
RELAXOMETRY_PATTERNS = {"t1rho": r"t1 ?rho|cubequant|spin.?lock|mapss", "t2": r"t2 ?map|mese|multi.?echo|qdess"}


@dataclass(frozen=True)
class SeriesMeasurements:
    """Measurements of one segmented series, grouped by the SEG segment label they were made on.

    ``instances`` are the labels split into segments of their own (disc levels, thigh
    sides); the SEG must be written with them so that its segments carry these labels.
    """

    by_segment: dict[str, list[Measurement]]
    instances: tuple[SegmentInstance, ...] = ()

    def rows(self) -> list[Measurement]:
        return [m for measurements in self.by_segment.values() for m in measurements]


def measure_series(volume: SeriesVolume, label_volume: np.ndarray, anatomy: str, label_map: LabelMap,
                   study_series: list[Series]) -> SeriesMeasurements:
    """All biomarkers that apply to ``anatomy``, keyed by the SEG segment label they belong to."""
    spacing = (volume.slice_spacing, *volume.pixel_spacing)
    labels = label_map.for_anatomy(anatomy)
    present = {spec.name: spec.value for spec in labels.labels if (label_volume == spec.value).any()}
    heights: list[Measurement] = []
    instances: list[SegmentInstance] = []
    disc_names: dict[str, str] = {}  # segment label -> disc name
    if anatomy == "spine" and "intervertebral_disc" in present:
        heights, instances = _discs(volume, label_volume, present)
        disc_names = {i.segment_label: m.label for i, m in zip(instances, heights)}
    elif anatomy == "thigh":
        instances = _thigh_sides(label_volume, present, volume.volume.affine)
    numbers, segments = segment_layout(label_volume, labels, instances)
    by_segment: dict[str, list[Measurement]] = {segment.segment_label: [] for segment in segments}
    values = {segment.segment_label: number for number, segment in enumerate(segments, start=1)}
    for m in tissue_volumes(numbers, spacing, values):
        if m.label in by_segment:
            # A disc's volume joins its height in one group, named by the disc.
            by_segment[m.label].append(replace(m, label=disc_names.get(m.label, m.label)))
    for segment_label, name in disc_names.items():
        by_segment[segment_label].extend(m for m in heights if m.label == name)
    if anatomy == "knee":
        _knee(volume, label_volume, label_map, spacing, study_series, by_segment)
    return SeriesMeasurements(by_segment, tuple(instances))


def _discs(volume: SeriesVolume, label_volume: np.ndarray,
           present: dict[str, int]) -> tuple[list[Measurement], list[SegmentInstance]]:
    """Height of every disc located on the spine and its segment instance, in the same order.

    A disc too small to measure gets a NaN height with the reason.
    """
    bodies = label_volume == present.get("vertebral_body", -1)
    discs = locate_discs(label_volume == present["intervertebral_disc"], bodies, volume.volume.affine)
    heights, instances = [], []
    for disc in discs:
        # "intervertebral disc L4-L5", or "intervertebral disc 3 (level uncertain)"
        instances.append(SegmentInstance("intervertebral_disc", disc.level or disc.name.removeprefix("disc "),
                                         disc.mask, DISC_LEVELS.get(disc.level)))
        height = disc_height(disc.mask, volume.pixel_spacing, disc.name)
        if height is None:
            height = unavailable("disc_height", disc.name, "mm", "minimum-area rectangle per sagittal slice",
                                 "no sagittal section of the disc reaches the minimum area")
        height.extra.update(level_assigned=disc.level is not None, level_note=disc.note,
                            centroid_mm=disc.centroid_mm)
        heights.append(height)
    return heights, instances


def _thigh_sides(label_volume: np.ndarray, present: dict[str, int], affine: np.ndarray) -> list[SegmentInstance]:
    """Left and right instances of every thigh label when two thighs are in view, else none.

    The thighs are the two largest connected components of all thigh tissue, the smaller
    at least a quarter of the larger; the one at larger patient x (LPS) is the left.
    """
    tissue = np.isin(label_volume, list(present.values()))
    components, count = ndimage.label(tissue, structure=np.ones((3, 3, 3), dtype=bool))
    if count < 2:
        return []
    sizes = ndimage.sum_labels(tissue, components, range(1, count + 1))
    largest = np.argsort(sizes)[::-1][:2] + 1
    if sizes[largest[1] - 1] < 0.25 * sizes[largest[0] - 1]:
        return []
    centres_x = [(affine @ [*ndimage.center_of_mass(components == c), 1.0])[0] for c in largest]
    right, left = (components == c for c in largest[np.argsort(centres_x)])
    return [SegmentInstance(name, side, mask, laterality=code)
            for side, mask, code in (("right", right, RIGHT), ("left", left, LEFT)) for name in present]


def _knee(volume: SeriesVolume, label_volume: np.ndarray, label_map: LabelMap, spacing: tuple,
          study_series: list[Series], by_segment: dict[str, list[Measurement]]) -> None:
    plates = {name: label_map.by_name(name).value for name in CARTILAGE_PLATES if name in by_segment}
    if not plates:
        return
    splits = _medial_lateral_split(volume, label_volume, plates)
    methods = ("2d", "3d")
    thicknesses = thread_map(lambda method: cartilage_thickness(label_volume, spacing, plates, method,
                                                                affine=volume.volume.affine, split_planes=splits),
                             methods)
    for method, measurements in zip(methods, thicknesses):
        for m in measurements:
            by_segment[_plate_of(m.label)].append(_renamed(m, f"mean_thickness_{method}"))
    for kind, pattern in RELAXOMETRY_PATTERNS.items():
        group = [s for s in study_series if re.search(pattern, s.description, re.IGNORECASE)
                 and s.study_instance_uid == volume.datasets[0].StudyInstanceUID]
        if group:
            for m in _relaxation(kind, group, volume, label_volume, plates):
                by_segment[_plate_of(m.label)].append(m)


def _medial_lateral_split(volume: SeriesVolume, label_volume: np.ndarray,
                          plates: dict[str, int]) -> dict[str, SplitPlane]:
    """Split the tibial plate at its centre along patient x, medial side from the knee's laterality."""
    laterality = str(volume.datasets[0].get("Laterality", "") or volume.datasets[0].get("ImageLaterality", "")).upper()
    if "tibial_cartilage" not in plates or laterality not in ("R", "L"):
        return {}
    voxels = np.argwhere(label_volume == plates["tibial_cartilage"])
    centre = (volume.volume.affine @ np.c_[voxels, np.ones(len(voxels))].T)[:3].mean(axis=1)
    # In LPS +x is the patient's left: the medial side of a right knee.
    return {"tibial_cartilage": SplitPlane.knee_medial_lateral(float(centre[0]), "+x" if laterality == "R" else "-x")}


def _relaxation(kind: str, group: list[Series], volume: SeriesVolume, label_volume: np.ndarray,
                plates: dict[str, int]) -> list[Measurement]:
    name = f"{kind}_mean"
    try:
        fitted = relaxation_map_from_series([series_to_volume(s.datasets) for s in group])
    except ValueError as error:
        logger.warning("%s map not fitted: %s", kind, error)
        return [unavailable(name, plate, "ms", f"{kind} mono-exponential fit", f"no {kind} map: {error}")
                for plate in plates]
    results = []
    for plate, value in plates.items():
        fraction = mask_on_grid(label_volume, volume.volume, fitted.geometry, value)
        results.append(mean_relaxation(fitted.t_ms, fraction, plate, name=name))
    return results


def _plate_of(label: str) -> str:
    return next(plate for plate in CARTILAGE_PLATES if label.startswith(plate))


def _renamed(measurement: Measurement, name: str) -> Measurement:
    return replace(measurement, name=name)


def measurement_groups(measurements: SeriesMeasurements) -> list[MeasurementGroup]:
    """One SR measurement group per measured structure: a segment, a plate part or a disc.

    A group on an instance segment names the instance's anatomic region (a disc level) as
    its finding site and carries its laterality; a disc of uncertain level has neither.
    """
    instances = {i.segment_label: i for i in measurements.instances}
    groups = []
    for segment, rows in measurements.by_segment.items():
        by_structure: dict[str, list[Measurement]] = {}
        for m in rows:
            by_structure.setdefault(m.label, []).append(m)
        instance = instances.get(segment)
        for structure, items in by_structure.items():
            groups.append(MeasurementGroup(segment, structure, tuple(items),
                                           instance.anatomic_region if instance else None,
                                           instance.laterality if instance else None))
    return groups
