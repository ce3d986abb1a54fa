"""Which biomarkers apply to a segmented series, computed with the series' real geometry.

knee   cartilage thickness per plate (2D and 3D methods), tibial plates split medial /
       lateral when the knee's laterality is known, T1rho or T2 per plate when the
       study holds a spin-lock or multi-echo group, and volumes;
thigh  volumes of every tissue;
spine  disc height per level and volumes.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

import numpy as np

from msk_node.biomarkers import Measurement, unavailable
from msk_node.biomarkers.cartilage import SplitPlane, cartilage_thickness
from msk_node.biomarkers.disc import disc_heights
from msk_node.biomarkers.relaxometry import RelaxationMap, mask_on_grid, mean_relaxation, relaxation_map_from_series
from msk_node.biomarkers.volume import tissue_volumes
from msk_node.dicom_input import Series
from msk_node.codes import DISC_LEVELS
from msk_node.labels import LabelMap
from msk_node.parallel import thread_map
from msk_node.sr_writer import MeasurementGroup
from msk_node.volume import SeriesVolume, series_to_volume

logger = logging.getLogger(__name__)

CARTILAGE_PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")
#: Series descriptions of spin-lock (T1rho) and multi-echo (T2) mapping acquisitions.
RELAXOMETRY_PATTERNS = {"t1rho": r"t1 ?rho|cubequant|spin.?lock|mapss", "t2": r"t2 ?map|mese|multi.?echo|qdess"}


@dataclass(frozen=True)
class SeriesMeasurements:
    """Measurements of one segmented series, grouped by the segment they were made on."""

    by_segment: dict[str, list[Measurement]]
    maps: list[RelaxationMap] = field(default_factory=list)

    def rows(self) -> list[Measurement]:
        return [m for measurements in self.by_segment.values() for m in measurements]


def measure_series(volume: SeriesVolume, label_volume: np.ndarray, anatomy: str, label_map: LabelMap,
                   study_series: list[Series]) -> SeriesMeasurements:
    """All biomarkers that apply to ``anatomy``, keyed by the SEG segment label they belong to."""
    spacing = (volume.slice_spacing, *volume.pixel_spacing)
    labels = label_map.for_anatomy(anatomy)
    present = {spec.name: spec.value for spec in labels.labels if (label_volume == spec.value).any()}
    by_segment: dict[str, list[Measurement]] = {name: [] for name in present}
    maps: list[RelaxationMap] = []
    for m in tissue_volumes(label_volume, spacing, present):
        if m.label in by_segment:
            by_segment[m.label].append(m)
    if anatomy == "knee":
        _knee(volume, label_volume, label_map, spacing, study_series, by_segment, maps)
    elif anatomy == "spine" and "intervertebral_disc" in present:
        heights = disc_heights(label_volume == present["intervertebral_disc"], volume.pixel_spacing,
                               volume.volume.affine)
        by_segment["intervertebral_disc"].extend(heights)
    return SeriesMeasurements(by_segment, maps)


def _knee(volume: SeriesVolume, label_volume: np.ndarray, label_map: LabelMap, spacing: tuple,
          study_series: list[Series], by_segment: dict[str, list[Measurement]], maps: list[RelaxationMap]) -> None:
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
            for m in _relaxation(kind, group, volume, label_volume, plates, maps):
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
                plates: dict[str, int], maps: list[RelaxationMap]) -> list[Measurement]:
    name = f"{kind}_mean"
    try:
        volumes = [series_to_volume(s.datasets) for s in group]
        fitted = relaxation_map_from_series(volumes)
    except ValueError as error:
        logger.warning("%s map not fitted: %s", kind, error)
        return [unavailable(name, plate, "ms", f"{kind} mono-exponential fit", f"no {kind} map: {error}")
                for plate in plates]
    # The map lies on the first series' grid; its instances are what a derived map references.
    maps.append(replace(fitted, kind=kind, source_datasets=volumes[0].datasets))
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
    """One SR measurement group per measured structure: a segment, a plate part or a disc level."""
    groups = []
    for segment, rows in measurements.by_segment.items():
        by_structure: dict[str, list[Measurement]] = {}
        for m in rows:
            by_structure.setdefault(m.label, []).append(m)
        for structure, items in by_structure.items():
            groups.append(MeasurementGroup(segment, structure, tuple(items), DISC_LEVELS.get(structure)))
    return groups
