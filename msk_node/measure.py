"""Which biomarkers apply to a segmented series, computed with the series' real geometry.

knee   cartilage thickness per plate (2D and 3D methods), tibial cartilage split medial /
       lateral and femoral cartilage trochlear / medial / lateral once the knee's side is
       known (from the anatomy, else the Laterality tag), T1rho, T2 and DESS T2 per plate
       and sub-region when the study holds a spin-lock, multi-echo or two-echo DESS
       acquisition (the fitted maps are kept in ``SeriesMeasurements.maps``), and volumes;
thigh  volumes of every tissue, per side when both thighs are in view (left and right segments);
spine  disc height and volume per disc, each disc a segment of its own named by its level.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache

import numpy as np
from highdicom import Volume
from scipy import ndimage

from msk_node.biomarkers import Measurement, unavailable
from msk_node.biomarkers.alignment import align_to_map, moved_volume
from msk_node.biomarkers.cartilage import SplitPlane, cartilage_thickness, plate_parts
from msk_node.biomarkers.dess import dess_t2_map
from msk_node.biomarkers.disc import disc_height, locate_discs
from msk_node.biomarkers.knee_side import cartilage_split_planes, knee_side
from msk_node.biomarkers.relaxometry import RelaxationMap, is_derived, mask_on_grid, mean_relaxation, relaxation_map
from msk_node.biomarkers.volume import tissue_volumes
from msk_node.dicom_input import Series
from msk_node.codes import DISC_LEVELS, LATERALITY, LEFT, RIGHT, SUB_REGION_MODIFIERS
from msk_node.labels import LabelMap
from msk_node.parallel import thread_map
from msk_node.quality import StructureQuality
from msk_node.seg_writer import SegmentInstance, segment_layout
from msk_node.selection import RelaxometryRule, load_relaxometry_rules
from msk_node.sr_writer import MeasurementGroup
from msk_node.volume import SeriesVolume, series_to_volume

logger = logging.getLogger(__name__)

CARTILAGE_PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")


@dataclass(frozen=True)
class SeriesMeasurements:
    """Measurements of one segmented series, grouped by the SEG segment label they were made on.

    ``instances`` are the labels split into segments of their own (disc levels, thigh
    sides); the SEG must be written with them so that its segments carry these labels.
    """

    by_segment: dict[str, list[Measurement]]
    instances: tuple[SegmentInstance, ...] = ()
    #: Every relaxation map fitted for these measurements (T2, T1rho, DESS T2), each on its own grid.
    maps: list[RelaxationMap] = field(default_factory=list)

    def rows(self) -> list[Measurement]:
        return [m for measurements in self.by_segment.values() for m in measurements]


def measure_series(volume: SeriesVolume, label_volume: np.ndarray, anatomy: str, label_map: LabelMap,
                   study_series: list[Series], relaxometry: Sequence[RelaxometryRule] | None = None
                   ) -> SeriesMeasurements:
    """All biomarkers that apply to ``anatomy``, keyed by the SEG segment label they belong to.

    ``relaxometry`` groups the study's relaxometry acquisitions (the packaged rules' groups by default).
    """
    spacing = (volume.slice_spacing, *volume.pixel_spacing)
    labels = label_map.for_anatomy(anatomy)
    present = {spec.name: spec.value for spec in labels.labels if (label_volume == spec.value).any()}
    heights: list[Measurement] = []
    instances: list[SegmentInstance] = []
    maps: list[RelaxationMap] = []
    disc_names: dict[str, str] = {}  # segment label -> disc name
    if anatomy == "spine" and "intervertebral_disc" in present:
        heights, instances = _discs(volume, label_volume, present)
        disc_names = {i.segment_label: m.label for i, m in zip(instances, heights)}
    elif anatomy == "thigh":
        instances = _thigh_sides(label_volume, present, volume.volume.affine)
    numbers, segments = segment_layout(label_volume, labels, instances)
    by_segment: dict[str, list[Measurement]] = {segment.segment_label: [] for segment in segments}
    values = {segment.segment_label: number for number, segment in enumerate(segments, start=1)}
    for m in tissue_volumes(numbers, spacing, values, whole_only=True):
        if m.label in by_segment:
            # A disc's volume joins its height in one group, named by the disc.
            by_segment[m.label].append(replace(m, label=disc_names.get(m.label, m.label)))
    for segment_label, name in disc_names.items():
        by_segment[segment_label].extend(m for m in heights if m.label == name)
    if anatomy == "knee":
        maps = _knee(volume, label_volume, label_map, spacing, study_series, by_segment, relaxometry)
    return SeriesMeasurements(by_segment, tuple(instances), maps)


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
          study_series: list[Series], by_segment: dict[str, list[Measurement]],
          relaxometry: Sequence[RelaxometryRule] | None) -> list[RelaxationMap]:
    plates = {name: label_map.by_name(name).value for name in CARTILAGE_PLATES if name in by_segment}
    if not plates:
        return []
    splits, side_note = _medial_lateral_split(volume, label_volume, label_map)
    methods = ("2d", "3d")
    thicknesses = thread_map(lambda method: cartilage_thickness(label_volume, spacing, plates, method,
                                                                affine=volume.volume.affine, split_planes=splits),
                             methods)
    for method, measurements in zip(methods, thicknesses):
        for m in measurements:
            renamed = _renamed(m, f"mean_thickness_{method}")
            if m.label not in plates:
                # The method column says which side was taken and why, and carries any warning.
                details = [renamed.method, side_note["knee_side_source"], side_note.get("warning", "")]
                renamed = replace(renamed, method="; ".join(filter(None, details)),
                                  extra={**renamed.extra, **side_note})
            by_segment[_plate_of(m.label)].append(renamed)
    maps = []
    for kind, group in relaxometry_groups(study_series, volume.datasets[0].StudyInstanceUID, relaxometry).items():
        fitted, measurements = _relaxation(kind, group, volume, label_volume, plates, splits)
        maps.extend([fitted] if fitted is not None else [])
        for m in measurements:
            by_segment[_plate_of(m.label)].append(m)
    return maps


def relaxometry_groups(study_series: list[Series], study_instance_uid: str,
                       rules: Sequence[RelaxometryRule] | None = None) -> dict[str, list[Series]]:
    """The series of each relaxometry acquisition (``t1rho``, ``t2``, ``dess_t2``) in one study.

    ``rules`` are the ``relaxometry`` groups of the series rules file (the packaged one by default).
    """
    groups = {}
    for rule in rules if rules is not None else _default_relaxometry_rules():
        group = [s for s in study_series if s.study_instance_uid == study_instance_uid
                 and any(re.search(p, s.description, re.IGNORECASE) for p in rule.description)]
        if group and (not rule.min_echo_times or len(_echo_times(group)) >= rule.min_echo_times):
            groups[rule.kind] = group
    return groups


@cache
def _default_relaxometry_rules() -> list[RelaxometryRule]:
    return load_relaxometry_rules()


def fit_relaxation_map(kind: str, group: list[Series]) -> RelaxationMap:
    """The map of one relaxometry acquisition, fitted over the whole imaged volume (ValueError if it cannot be)."""
    datasets = [s.datasets for s in group]
    return dess_t2_map(datasets) if kind == "dess_t2" else relaxation_map(kind, datasets)


def unmeasured_relaxation_maps(study_series: list[Series], fitted: list[RelaxationMap],
                               relaxometry: Sequence[RelaxometryRule] | None = None) -> list[RelaxationMap]:
    """Maps of the relaxometry acquisitions that no segmented series measured on, one per acquisition.

    A relaxometry acquisition always gets its map, even in a study where no cartilage was
    segmented (an axial series, a failed segmentation, a study of the mapping series
    alone); a map fails only when its series cannot be fitted, which is logged.
    """
    done = {(m.kind, str(m.source_datasets[0].SeriesInstanceUID)) for m in fitted if m.source_datasets}
    maps = []
    for study in dict.fromkeys(s.study_instance_uid for s in study_series):
        for kind, group in relaxometry_groups(study_series, study, relaxometry).items():
            if any((kind, s.series_instance_uid) in done for s in group):
                continue
            try:
                maps.append(fit_relaxation_map(kind, group))
            except ValueError as error:
                logger.warning("%s map of study %s not fitted: %s", kind, study, error)
    return maps


_MODELS = {"t1rho": "mono-exponential spin-lock fit", "t2": "mono-exponential multi-echo fit",
           "dess_t2": "two-echo DESS model (Sveinsson 2017)"}


def _echo_times(group: list[Series]) -> set[float]:
    return {round(float(ds.EchoTime), 6) for s in group for ds in s.datasets
            if ds.get("EchoTime") not in (None, "") and not is_derived(ds)}


def _medial_lateral_split(volume: SeriesVolume, label_volume: np.ndarray,
                          label_map: LabelMap) -> tuple[dict[str, tuple[SplitPlane, ...]], dict[str, str]]:
    """Cartilage split planes and a note of the knee side, from the anatomy first and the Laterality tag second.

    The anatomy decides when its cues agree (a tag can be wrong), but over a tag only with two
    agreeing cues: one cue may come from a structure the field of view cuts. A tag that
    contradicts the anatomy is logged and noted as a warning on every split measurement.
    """
    first = volume.datasets[0]
    tag = str(first.get("Laterality", "") or first.get("ImageLaterality", "")).upper()
    tag = tag if tag in ("R", "L") else ""
    values = {spec.name: spec.value for spec in label_map.labels if spec.anatomy == "knee"}
    anatomy = knee_side(label_volume, volume.volume.affine, values, _image(volume))
    anatomy_decides = bool(anatomy.laterality) and (not tag or anatomy.votes >= 2)
    side = anatomy.laterality if anatomy_decides else tag
    source = anatomy.describe() if anatomy_decides else f"Laterality tag {tag}"
    note = {"knee_side": side, "knee_side_source": source}
    if anatomy.laterality and tag and tag != anatomy.laterality:
        note["warning"] = f"Laterality tag {tag} contradicts the anatomy: {anatomy.describe()}"
        logger.warning("%s; medial and lateral follow the %s", note["warning"],
                       "anatomy" if anatomy_decides else "tag (one anatomical cue only)")
    if not side:
        logger.warning("knee side unknown (no Laterality tag; %s): cartilage not split", anatomy.describe())
        return {}, {}
    return cartilage_split_planes(label_volume, volume.volume.affine, values, 1 if side == "L" else -1), note


def _image(volume: SeriesVolume) -> np.ndarray:
    array = volume.volume.array
    return array[..., 0] if array.ndim == 4 else array


def _relaxation(kind: str, group: list[Series], volume: SeriesVolume, label_volume: np.ndarray, plates: dict[str, int],
                splits: dict[str, tuple[SplitPlane, ...]]) -> tuple[RelaxationMap | None, list[Measurement]]:
    """The map of one acquisition and its mean per plate and plate part; NaN with the reason when it cannot be fitted.

    DESS T2 is reported as ``t2_mean`` (the quantity is T2), its method naming the DESS model; ``extra["map_kind"]``
    says which map it came from, so that the SR codes the method and a DESS T2 is never taken for a multi-echo T2.
    """
    name = "t2_mean" if kind == "dess_t2" else f"{kind}_mean"
    model = _MODELS[kind]
    try:
        fitted = fit_relaxation_map(kind, group)
    except ValueError as error:
        logger.warning("%s map not fitted: %s", kind, error)
        return None, [unavailable(name, plate, "ms", model, f"no {kind} map: {error}", map_kind=kind)
                      for plate in plates]
    source, registration = _aligned_morphology(volume, fitted)
    results = []
    for plate, value in plates.items():
        parts = {plate: label_volume == value,
                 **plate_parts(label_volume == value, plate, volume.volume.affine, splits.get(plate, ()))}
        for label, mask in parts.items():
            fraction = mask_on_grid(mask, source, fitted.geometry)
            m = mean_relaxation(fitted.t_ms, fraction, label, name=name, noise_sigma=fitted.noise_sigma)
            results.append(replace(m, method=f"{model}; {m.method}",
                                   extra={**m.extra, **registration, "map_kind": kind}))
    return fitted, results


def _aligned_morphology(volume: SeriesVolume, fitted: RelaxationMap) -> tuple[Volume, dict[str, object]]:
    """The morphology grid in the map's patient space: moved by a rigid registration when the knee moved between."""
    if fitted.source_datasets[0].SeriesInstanceUID == volume.datasets[0].SeriesInstanceUID:
        return volume.volume, {}  # fitted from the segmented series itself (DESS): nothing can have moved
    alignment = align_to_map(volume.volume, series_to_volume(fitted.source_datasets).volume)
    if alignment.registered:
        logger.info("%s series registered to the morphology: anatomy moved %.1f mm", fitted.kind, alignment.shift_mm)
    return (moved_volume(volume.volume, alignment.matrix),
            {"registered": alignment.registered, "registration_shift_mm": alignment.shift_mm})


def _plate_of(label: str) -> str:
    return next(plate for plate in CARTILAGE_PLATES if label.startswith(plate))


def _renamed(measurement: Measurement, name: str) -> Measurement:
    return replace(measurement, name=name)


def measurement_groups(measurements: SeriesMeasurements) -> list[MeasurementGroup]:
    """One SR measurement group per measured structure: a segment, a plate part or a disc.

    A group on an instance segment names the instance's anatomic region (a disc level) as
    its finding site and carries its laterality; a disc of uncertain level has neither. A
    cartilage part carries its topographical modifier (medial, lateral, trochlear) and the
    knee's side as coded laterality, so readers need not parse its name.
    """
    instances = {i.segment_label: i for i in measurements.instances}
    groups = []
    for segment, rows in measurements.by_segment.items():
        by_structure: dict[str, list[Measurement]] = {}
        for m in rows:
            by_structure.setdefault(m.label, []).append(m)
        instance = instances.get(segment)
        for structure, items in by_structure.items():
            part = structure.removeprefix(segment).lstrip("_") if structure != segment else ""
            sides = {m.extra.get("knee_side", "") for m in items} - {""}
            laterality = LATERALITY[sides.pop()] if len(sides) == 1 else None
            groups.append(MeasurementGroup(
                segment, structure, tuple(items), instance.anatomic_region if instance else None,
                laterality=instance.laterality if instance and instance.laterality else laterality,
                topographical_modifier=SUB_REGION_MODIFIERS.get(part)))
    return groups


def report_groups(measurements: SeriesMeasurements,
                  quality: dict[str, StructureQuality] | None = None) -> list[MeasurementGroup]:
    """The measurement groups both the SR and the clinician report show, with their segment's quality flags.

    Groups of a segment withheld for its quality are left out; ``quality`` None reports every group.
    """
    quality = quality or {}
    return [replace(group, quality=quality.get(group.segment_label)) for group in measurement_groups(measurements)
            if group.segment_label not in quality or quality[group.segment_label].reported]
