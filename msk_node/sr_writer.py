"""TID 1500 Measurement Report (Comprehensive 3D SR) with highdicom.

One measurement group per measured structure. Each group references the SEG
segment it was measured on and the source series, names its finding site, and
carries a tracking identifier and UID, so Slicer, dcmqi and any TID 1500 reader can
join the numbers to the outlines. A value that could not be measured is written with
the CID 42 qualifier "Measurement failure" and no number, never as zero.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from msk_node import __version__
from msk_node import codes as msk_codes
from msk_node.biomarkers import Measurement
from msk_node.labels import LabelMap
from msk_node.seg_writer import AlgorithmInfo, label_of_segment, segment_number_map, with_type2_patient_attributes

#: Measurement names (``Measurement.name``) to their concept and derivation codes.
CONCEPTS: dict[str, tuple[Code, Code | None]] = {
    "mean_thickness_2d": (msk_codes.CARTILAGE_THICKNESS_2D, msk_codes.MEAN),
    "mean_thickness_3d": (msk_codes.CARTILAGE_THICKNESS_3D, msk_codes.MEAN),
    "t1rho_mean": (msk_codes.T1RHO_RELAXATION_TIME, msk_codes.MEAN),
    "t2_mean": (msk_codes.T2_RELAXATION_TIME, msk_codes.MEAN),
    "disc_height": (msk_codes.DISC_HEIGHT, None),
    "volume": (msk_codes.VOLUME, None),
}
UNITS: dict[str, Code] = {"mm": msk_codes.MILLIMETER, "cm3": msk_codes.CUBIC_CENTIMETER,
                          "ms": msk_codes.MILLISECOND}


@dataclass(frozen=True)
class MeasurementGroup:
    """Measurements of one structure on one SEG segment.

    Attributes
    ----------
    segment_label
        Label of the SEG segment measured (e.g. ``"intervertebral disc L4-L5"``).
    tracking_name
        Human-readable tracking identifier, unique in the report (e.g. ``"L4-L5"``).
    measurements
        The values; NaN ones must carry a reason.
    finding_site
        Anatomy measured, when more specific than the segment's property type.
    laterality
        SNOMED CT Left or Right of the finding site, for one side of a paired structure.
    """

    segment_label: str
    tracking_name: str
    measurements: tuple[Measurement, ...]
    finding_site: Code | None = None
    laterality: Code | None = None


def build_measurement_report(
    seg: Dataset,
    groups: Sequence[MeasurementGroup],
    label_map: LabelMap,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 301,
    series_description: str = "msk-node measurements",
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 report on ``seg``, one group per entry of ``groups``.

    Raises
    ------
    ValueError
        If a group names a segment that ``seg`` lacks, a tracking name repeats, a
        measurement name or unit has no code here, or a NaN value has no reason.
    """
    numbers = segment_number_map(seg)
    names = [group.tracking_name for group in groups]
    if not groups:
        raise ValueError("groups: no measurement group to report")
    if len(set(names)) != len(names):
        raise ValueError(f"groups: tracking names repeat: {names}")
    source_series = hd.sr.SourceSeriesForSegmentation(str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=msk_codes.ALGORITHM_FAMILY,
        parameters=[f"{key}={value}" for key, value in algorithm.parameter_items().items()])
    content_groups = []
    for group in groups:
        if group.segment_label not in numbers:
            raise ValueError(f"groups: segment {group.segment_label!r} is not in the SEG ({sorted(numbers)})")
        spec = label_map.by_name(label_of_segment(group.segment_label, label_map))
        site = group.finding_site or msk_codes.anatomic_region(spec.name) or spec.property_type
        content_groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=group.tracking_name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=numbers[group.segment_label], source_series=source_series),
            finding_type=spec.property_type,
            finding_sites=[hd.sr.FindingSite(site, laterality=group.laterality)],
            algorithm_id=algorithm_id,
            measurements=[_measurement(m, algorithm_id) for m in group.measurements],
        ))
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(msk_codes.codes.DCM.Device),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="msk-node", manufacturer_name="msk-node", model_name=__version__),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=msk_codes.MAGNETIC_RESONANCE_IMAGING,
        imaging_measurements=content_groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[with_type2_patient_attributes(seg)],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="msk-node",
        is_complete=True,
        series_description=series_description,
    )
    sr.SoftwareVersions = __version__
    _drop_failed_values(sr.ContentSequence)
    return sr


def _measurement(measurement: Measurement, algorithm_id: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    if measurement.name not in CONCEPTS:
        raise ValueError(f"measurements: no code for {measurement.name!r}; known: {sorted(CONCEPTS)}")
    if measurement.unit not in UNITS:
        raise ValueError(f"measurements: no UCUM code for unit {measurement.unit!r}")
    concept, derivation = CONCEPTS[measurement.name]
    available = measurement.value is not None and math.isfinite(measurement.value)
    if not available and not measurement.reason:
        raise ValueError(f"measurements: {measurement.name} of {measurement.label} is not a number and has no reason")
    return hd.sr.Measurement(
        name=concept,
        value=float(measurement.value) if available else 0.0,
        unit=UNITS[measurement.unit],
        qualifier=None if available else msk_codes.MEASUREMENT_FAILURE,
        derivation=derivation,
        algorithm_id=algorithm_id,
    )


def _drop_failed_values(items: Sequence[Dataset]) -> None:
    """Empty the MeasuredValueSequence of items qualified as failed: no number, not a zero."""
    for item in items:
        qualifier = item.get("NumericValueQualifierCodeSequence")
        if qualifier and qualifier[0].CodeValue == msk_codes.MEASUREMENT_FAILURE.value:
            item.MeasuredValueSequence = []
        _drop_failed_values(item.get("ContentSequence", []))


def read_measurements(sr: Dataset) -> dict[tuple[str, str], float]:
    """``{(tracking identifier, concept [+ " (derivation)"]): value}`` of a TID 1500 report; NaN where failed.

    Walks the content tree directly, because a NUM item without a measured value (a
    failed measurement) is valid DICOM but not accepted by highdicom's parsers.
    """
    values: dict[tuple[str, str], float] = {}
    for group in _items(sr, "Measurement Group"):
        tracking = next(str(i.TextValue) for i in group.ContentSequence
                        if i.ValueType == "TEXT" and _meaning(i) == "Tracking Identifier")
        for item in group.ContentSequence:
            if item.ValueType != "NUM":
                continue
            key = _meaning(item)
            derivations = [m for m in item.get("ContentSequence", []) if _meaning(m) == "Derivation"]
            if derivations:
                key += f" ({derivations[0].ConceptCodeSequence[0].CodeMeaning})"
            measured = item.get("MeasuredValueSequence", [])
            values[(tracking, key)] = float(measured[0].NumericValue) if measured else np.nan
    return values


def _meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _items(node: Dataset, meaning: str) -> list[Dataset]:
    found = []
    for item in node.get("ContentSequence", []):
        if "ConceptNameCodeSequence" in item and _meaning(item) == meaning:
            found.append(item)
        found.extend(_items(item, meaning))
    return found
