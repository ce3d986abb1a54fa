"""Quality flags per segmented structure, and which structures are good enough to report.

A structure (one SEG segment: a label, or an instance of it such as a disc level) carries:
the detector's confidence in it (mean score of its boxes), the segmenter's predicted IoU when the
segmenter gives one, what the plausibility checks did to its components, and whether it is whole in
the field of view. Thresholds from a YAML file (packaged defaults in ``config/quality.yaml``) decide
which structures are withheld from the SR and the clinician report, with the reason.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from statistics import fmean

import numpy as np

from msk_node import config_checks as checks
from msk_node.labels import LabelMap
from msk_node.plausibility import Finding
from msk_node.seg_writer import SegmentInstance, label_of_segment


@dataclass(frozen=True)
class QualityThresholds:
    """Below ``min_*`` (or cut / unchecked when withheld) a structure is not reported."""

    min_detector_confidence: float = 0.3
    min_predicted_iou: float = 0.5
    withhold_cut: bool = False
    withhold_unchecked: bool = False

    def __post_init__(self) -> None:
        checks.check_field_types(self)
        checks.in_range(self.min_detector_confidence, 0.0, 1.0, "min_detector_confidence")
        checks.in_range(self.min_predicted_iou, 0.0, 1.0, "min_predicted_iou")


def default_thresholds_path() -> Path:
    return Path(str(resources.files("msk_node") / "config" / "quality.yaml"))


def load_thresholds(path: str | Path | None = None) -> QualityThresholds:
    """Thresholds from ``path`` (the packaged defaults when None); errors name the file and the key."""
    return checks.load_yaml_config(path if path is not None else default_thresholds_path(),
                                   lambda raw: checks.config_from_mapping(QualityThresholds, raw))


@dataclass(frozen=True)
class StructureQuality:
    """Quality flags of one segment; ``withheld`` holds the reasons it is not reported (empty: reported)."""

    segment_label: str
    detector_confidence: float | None
    predicted_iou: float | None
    #: "passed", "unchecked" (a component could not be checked) or "implausible parts removed".
    plausibility: str
    #: Volume borders the structure touches: "first slice", "last slice", "in-plane border".
    cut_at: tuple[str, ...]
    withheld: tuple[str, ...] = ()

    @property
    def whole_in_view(self) -> bool:
        return not self.cut_at

    @property
    def reported(self) -> bool:
        return not self.withheld

    def as_dict(self) -> dict:
        values = asdict(self)
        for key in ("detector_confidence", "predicted_iou"):
            values[key] = None if values[key] is None else round(values[key], 3)
        return {**values, "cut_at": list(self.cut_at), "withheld": list(self.withheld),
                "whole_in_view": self.whole_in_view}


@dataclass(frozen=True)
class LabelScores:
    """Per box segmented for one label, in detection order: the detector's score and the decoder's predicted IoU."""

    detector: tuple[float, ...]
    predicted_iou: tuple[float, ...] = ()

    @property
    def detector_confidence(self) -> float | None:
        """Mean score of the label's boxes; None when it has none."""
        return fmean(self.detector) if self.detector else None

    @property
    def mean_predicted_iou(self) -> float | None:
        """Mean predicted IoU of the label's masks; None when the segmenter gives none."""
        return fmean(self.predicted_iou) if self.predicted_iou else None


def plausibility_state(findings: list[Finding], label: str) -> str:
    """What the plausibility checks did to ``label``: dropped components outweigh unchecked ones."""
    actions = {f.action for f in findings if f.label == label}
    if "dropped" in actions:
        return "implausible parts removed"
    return "unchecked" if "flagged" in actions else "passed"


def cut_at(mask: np.ndarray) -> tuple[str, ...]:
    """Borders of the volume ``[slice, row, col]`` that ``mask`` touches: the field of view cuts it there."""
    if not mask.any():
        return ()
    borders = (("first slice", mask[0].any()), ("last slice", mask[-1].any()),
               ("in-plane border", mask[:, [0, -1], :].any() or mask[:, :, [0, -1]].any()))
    return tuple(name for name, touches in borders if touches)


def withheld_reasons(confidence: float | None, iou: float | None, plausibility: str, cut: tuple[str, ...],
                     thresholds: QualityThresholds) -> tuple[str, ...]:
    """Why a structure with these flags is not reported under ``thresholds``; empty when it is."""
    reasons = []
    if confidence is not None and confidence < thresholds.min_detector_confidence:
        reasons.append(f"detector confidence {confidence:.2f} < {thresholds.min_detector_confidence:.2f}")
    if iou is not None and iou < thresholds.min_predicted_iou:
        reasons.append(f"predicted IoU {iou:.2f} < {thresholds.min_predicted_iou:.2f}")
    if cut and thresholds.withhold_cut:
        reasons.append(f"cut by the field of view ({', '.join(cut)})")
    if plausibility == "unchecked" and thresholds.withhold_unchecked:
        reasons.append("plausibility could not be checked")
    return tuple(reasons)


def assess_structure(segment_label: str, label: str, mask: np.ndarray, scores: LabelScores | None,
                     findings: list[Finding], thresholds: QualityThresholds) -> StructureQuality:
    """Quality flags of one segment (``mask`` on the volume grid) of label-map label ``label``."""
    confidence = scores.detector_confidence if scores else None
    predicted_iou = scores.mean_predicted_iou if scores else None
    plausibility = plausibility_state(findings, label)
    cut = cut_at(mask)
    return StructureQuality(segment_label, confidence, predicted_iou, plausibility, cut,
                            withheld_reasons(confidence, predicted_iou, plausibility, cut, thresholds))


def assess_segments(segment_labels: list[str], label_volume: np.ndarray, label_map: LabelMap,
                    instances: tuple[SegmentInstance, ...], scores: Mapping[str, LabelScores],
                    findings: list[Finding], thresholds: QualityThresholds) -> dict[str, StructureQuality]:
    """Quality flags of every segment of a series, keyed by segment label.

    An instance segment (a disc level, a thigh side) is judged on its own voxels for the field of
    view, and on its label's boxes, plausibility findings and predicted IoU for the rest.
    ``scores`` holds each label's box scores (a label without boxes has no confidence).
    """
    by_segment = {instance.segment_label: instance for instance in instances}
    quality = {}
    for segment in segment_labels:
        label = label_of_segment(segment, label_map)
        mask = label_volume == label_map.by_name(label).value
        if segment in by_segment:
            mask &= by_segment[segment].mask
        quality[segment] = assess_structure(segment, label, mask, scores.get(label), findings, thresholds)
    return quality
