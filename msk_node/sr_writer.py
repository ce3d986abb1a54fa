"""TID 1500 Measurement Report (Comprehensive 3D SR) with highdicom.

One measurement group per measured structure. Each group references the SEG
segment it was measured on and the source series, names its finding site, and
carries a tracking identifier and UID, so Slicer, dcmqi and any TID 1500 reader can
join the numbers to the outlines. Sub-regions (medial, lateral, trochlear cartilage)
name their finding site with SNOMED CT laterality and topographical modifiers. A relaxation
time names its fit as its Measurement Method (a DESS T2 is not a multi-echo T2) and comes with
the share of the compartment's voxels rejected from its mean, in percent, with the same method.

A value that could not be measured is no number, never zero: it is a qualitative
evaluation of its concept with the value DCM "Measurement failure", its derivation as
a concept modifier and its reason as a DCM "Comment". The private coding scheme of the
measurement concepts is declared in the CodingSchemeIdentificationSequence. Everything
is built through highdicom's constructors; nothing is edited afterwards.

A group whose structure carries quality flags (:mod:`msk_node.quality`) adds them: the detector's
confidence and the segmenter's predicted IoU as numbers without unit, DCM "Quality Finding" =
"Anatomy coverage incomplete" when the field of view cuts the structure, and a "Quality Finding" of
the private scheme when the plausibility checks removed parts of it or could not check it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from msk_node import __version__
from msk_node import codes as msk_codes
from msk_node.biomarkers import Measurement
from msk_node.labels import LabelMap
from msk_node.quality import StructureQuality
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
#: Measurement method (TID 300 concept modifier) of each relaxation map kind (``extra["map_kind"]``). A DESS T2
#: is a T2 from a steady-state signal model, biased against a multi-echo spin-echo T2: the method tells them apart.
#: DICOM codes neither relaxometry fit, so these are private concepts.
RELAXOMETRY_METHODS: dict[str, Code] = {
    "t1rho": Code("SPIN_LOCK_FIT", msk_codes.MSK_NODE_SCHEME, "Mono-exponential spin-lock fit"),
    "t2": Code("MESE_FIT", msk_codes.MSK_NODE_SCHEME, "Mono-exponential multi-echo spin-echo fit"),
    "dess_t2": Code("DESS_T2_MODEL", msk_codes.MSK_NODE_SCHEME, "Two-echo DESS signal model (Sveinsson 2017)"),
}
#: Share of a compartment's map voxels left out of its mean (failed fit or outside the accepted range), in percent;
#: one per relaxation time, with the same method.
REJECTED_VOXEL_SHARE = Code("REJECTED_SHARE", msk_codes.MSK_NODE_SCHEME, "Rejected voxel share")
PERCENT: Code = msk_codes.codes.UCUM.Percent
#: Quality flags of a structure (DICOM codes no detector score, predicted IoU or plausibility check: private).
DETECTOR_CONFIDENCE = Code("DET_CONF", msk_codes.MSK_NODE_SCHEME, "Detector confidence")
PREDICTED_IOU = Code("PRED_IOU", msk_codes.MSK_NODE_SCHEME, "Segmenter predicted IoU")
NO_UNITS: Code = msk_codes.codes.UCUM.NoUnits
QUALITY_FINDING: Code = msk_codes.codes.DCM.QualityFinding
ANATOMY_COVERAGE_INCOMPLETE: Code = msk_codes.codes.DCM.AnatomyCoverageIncomplete
PLAUSIBILITY_FINDINGS: dict[str, Code] = {
    "implausible parts removed": Code("IMPLAUSIBLE_DROP", msk_codes.MSK_NODE_SCHEME,
                                      "Anatomically implausible components removed"),
    "unchecked": Code("PLAUS_UNCHECKED", msk_codes.MSK_NODE_SCHEME, "Anatomical plausibility not checked"),
}
#: Declaration of the private scheme of :data:`CONCEPTS` (every report carries it).
PRIVATE_SCHEME = CodingSchemeIdentificationItem(
    designator=msk_codes.MSK_NODE_SCHEME, name=msk_codes.MSK_NODE_SCHEME_NAME,
    responsible_organization=msk_codes.MSK_NODE_SCHEME_RESPONSIBLE_ORGANIZATION)


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
        Side of the body (DICOM CID 244), e.g. SCT Right for a right knee or one of two thighs.
    topographical_modifier
        Part of the finding site (DICOM CID 2), e.g. SCT Medial for medial tibial cartilage.
    quality
        Quality flags of the segment measured, when assessed.
    """

    segment_label: str
    tracking_name: str
    measurements: tuple[Measurement, ...]
    finding_site: Code | None = None
    laterality: Code | None = None
    topographical_modifier: Code | None = None
    quality: StructureQuality | None = None


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
        for m in group.measurements:
            _check(m)
        measured = [_measurement(m, algorithm_id) for m in group.measurements if m.available]
        measured += [_rejected_share(m, algorithm_id) for m in group.measurements if "rejected_share" in m.extra]
        evaluations = [MeasurementFailure(m) for m in group.measurements if not m.available]
        if group.quality is not None:
            measured += _quality_numbers(group.quality, algorithm_id)
            evaluations += _quality_findings(group.quality)
        content_groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=group.tracking_name),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=numbers[group.segment_label], source_series=source_series),
            finding_type=spec.property_type,
            finding_sites=[hd.sr.FindingSite(site, laterality=group.laterality,
                                             topographical_modifier=group.topographical_modifier)],
            algorithm_id=algorithm_id,
            measurements=measured or None,
            qualitative_evaluations=evaluations or None,
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
        coding_schemes=[PRIVATE_SCHEME],
        software_versions=__version__,
    )
    return sr


def _check(measurement: Measurement) -> None:
    if measurement.name not in CONCEPTS:
        raise ValueError(f"measurements: no code for {measurement.name!r}; known: {sorted(CONCEPTS)}")
    if measurement.unit not in UNITS:
        raise ValueError(f"measurements: no UCUM code for unit {measurement.unit!r}")
    if not measurement.available and not measurement.reason:
        raise ValueError(f"measurements: {measurement.name} of {measurement.label} is not a number and has no reason")


def _measurement(measurement: Measurement, algorithm_id: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    concept, derivation = CONCEPTS[measurement.name]
    return hd.sr.Measurement(name=concept, value=float(measurement.value), unit=UNITS[measurement.unit],
                             method=_method(measurement), derivation=derivation, algorithm_id=algorithm_id)


def _rejected_share(measurement: Measurement, algorithm_id: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=REJECTED_VOXEL_SHARE, value=100.0 * float(measurement.extra["rejected_share"]),
                             unit=PERCENT, method=_method(measurement), algorithm_id=algorithm_id)


def _quality_numbers(quality: StructureQuality,
                     algorithm_id: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    numbers = ((DETECTOR_CONFIDENCE, quality.detector_confidence), (PREDICTED_IOU, quality.predicted_iou))
    return [hd.sr.Measurement(name=concept, value=float(value), unit=NO_UNITS, algorithm_id=algorithm_id)
            for concept, value in numbers if value is not None]


def _quality_findings(quality: StructureQuality) -> list[hd.sr.QualitativeEvaluation]:
    findings = [ANATOMY_COVERAGE_INCOMPLETE] if quality.cut_at else []
    if quality.plausibility in PLAUSIBILITY_FINDINGS:
        findings.append(PLAUSIBILITY_FINDINGS[quality.plausibility])
    return [hd.sr.QualitativeEvaluation(name=QUALITY_FINDING, value=finding) for finding in findings]


def read_quality_findings(sr: Dataset) -> dict[str, list[str]]:
    """``{tracking identifier: [meaning of each Quality Finding]}`` of a TID 1500 report."""
    found: dict[str, list[str]] = {}
    for group in _items(sr, "Measurement Group"):
        tracking = next(str(i.TextValue) for i in group.ContentSequence
                        if i.ValueType == "TEXT" and _meaning(i) == "Tracking Identifier")
        found[tracking] = [str(i.ConceptCodeSequence[0].CodeMeaning) for i in group.ContentSequence
                           if i.ValueType == "CODE" and _meaning(i) == QUALITY_FINDING.meaning]
    return found


def _method(measurement: Measurement) -> Code | None:
    return RELAXOMETRY_METHODS.get(measurement.extra.get("map_kind", ""))


class MeasurementFailure(hd.sr.QualitativeEvaluation):
    """A measurement that has no value: its concept, "Measurement failure", its derivation and its reason."""

    def __init__(self, measurement: Measurement) -> None:
        concept, derivation = CONCEPTS[measurement.name]
        super().__init__(name=concept, value=msk_codes.MEASUREMENT_FAILURE)
        modifiers = [(msk_codes.codes.SCT.MeasurementMethod, _method(measurement)),
                     (msk_codes.codes.DCM.Derivation, derivation)]
        details = [hd.sr.CodeContentItem(name=name, value=value,
                                         relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)
                   for name, value in modifiers if value is not None]
        details.append(hd.sr.TextContentItem(name=msk_codes.COMMENT, value=measurement.reason[:1024],
                                             relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES))
        self[0].ContentSequence = hd.sr.ContentSequence(details)


def read_measurements(sr: Dataset) -> dict[tuple[str, str], float]:
    """``{(tracking identifier, concept [+ " (derivation)"] [+ " [method]"]): value}`` of a TID 1500 report.

    NaN where a measurement failed.
    """
    return {key: value for key, (value, _) in _read(sr).items()}


def read_failure_reasons(sr: Dataset) -> dict[tuple[str, str], str]:
    """``{(tracking identifier, concept [+ " (derivation)"] [+ " [method]"]): reason}`` of every failed measurement."""
    return {key: reason for key, (_, reason) in _read(sr).items() if reason}


def _read(sr: Dataset) -> dict[tuple[str, str], tuple[float, str]]:
    read: dict[tuple[str, str], tuple[float, str]] = {}
    for group in _items(sr, "Measurement Group"):
        tracking = next(str(i.TextValue) for i in group.ContentSequence
                        if i.ValueType == "TEXT" and _meaning(i) == "Tracking Identifier")
        for item in group.ContentSequence:
            children = item.get("ContentSequence", [])
            key = _meaning(item)
            modifiers = {_meaning(m): str(m.ConceptCodeSequence[0].CodeMeaning) for m in children
                         if m.get("RelationshipType") == "HAS CONCEPT MOD" and "ConceptCodeSequence" in m}
            if "Derivation" in modifiers:
                key += f" ({modifiers['Derivation']})"
            if "Measurement Method" in modifiers:
                key += f" [{modifiers['Measurement Method']}]"
            if item.ValueType == "NUM":
                read[(tracking, key)] = (float(item.MeasuredValueSequence[0].NumericValue), "")
            elif item.ValueType == "CODE" and _is_failure(item):
                reasons = [str(m.TextValue) for m in children if _meaning(m) == msk_codes.COMMENT.meaning]
                read[(tracking, key)] = (np.nan, reasons[0] if reasons else "")
    return read


def _is_failure(item: Dataset) -> bool:
    code = item.ConceptCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator) == (msk_codes.MEASUREMENT_FAILURE.value,
                                                             msk_codes.MEASUREMENT_FAILURE.scheme_designator)


def _meaning(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning)


def _items(node: Dataset, meaning: str) -> list[Dataset]:
    found = []
    for item in node.get("ContentSequence", []):
        if "ConceptNameCodeSequence" in item and _meaning(item) == meaning:
            found.append(item)
        found.extend(_items(item, meaning))
    return found
