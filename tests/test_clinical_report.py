"""The clinician report: an Encapsulated PDF and a Secondary Capture in the source's study, valid for dciodvfy,
delivered like the SEG and SR, printing exactly the SR's numbers; quality flags per structure and the thresholds
that withhold a structure."""
from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pypdf
import pytest

from msk_node.clinical_report import COLUMNS, QUALITY_DECIMALS, REFERENCES
from msk_node.plausibility import Finding
from msk_node.quality import (LabelScores, QualityThresholds, assess_structure, cut_at, load_thresholds,
                              plausibility_state)
from msk_node.report_writer import ENCAPSULATED_PDF_STORAGE
from msk_node.sr_writer import CONCEPTS, DETECTOR_CONFIDENCE, PREDICTED_IOU, read_measurements
from tests.dicom_checks import dciodvfy_errors

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NUMBER = re.compile(r"-?\d+\.\d+")


def _pdf_text(path: Path) -> str:
    ds = pydicom.dcmread(path)
    pdf = bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)]
    return "\n".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf)).pages)


def _decimals(concept: str) -> int | None:
    """Decimals the page prints a SR concept with; None for SR items the page does not print."""
    if concept.startswith((DETECTOR_CONFIDENCE.meaning, PREDICTED_IOU.meaning)):
        return QUALITY_DECIMALS
    for name, (code, _) in CONCEPTS.items():
        if concept.startswith(code.meaning):
            return next(column.decimals for key, column in COLUMNS.items() if key[0] == name)
    return None


def _sr_numbers(path: Path) -> dict[str, Counter]:
    """The numbers of each measurement group of one SR as the page prints them, by tracking identifier."""
    numbers: dict[str, Counter] = {}
    for (tracking, concept), value in read_measurements(pydicom.dcmread(path)).items():
        decimals = _decimals(concept)
        row = numbers.setdefault(tracking, Counter())
        if decimals is not None and not math.isnan(value):
            row[f"{value:.{decimals}f}"] += 1
    return numbers


def _rows(lines: list[str], tracking: str) -> list[Counter]:
    """The numbers of the table rows of ``tracking``, one per series table in page order (a row's cells follow
    the structure's name on one text line)."""
    name = tracking.replace("_", " ")
    rows = [line for line in lines if re.match(rf"{re.escape(name)} (n/a|—|-?\d)", line)]
    return [Counter(NUMBER.findall(row[len(name):])) for row in rows]


def _check_report(out: Path, work) -> None:
    report = json.loads((out / "report.json").read_text())
    status = json.loads((out / "status.json").read_text())
    names = report["clinical_reports"]
    assert len(names) == 2
    results = {entry["file"]: entry["sop_class_uid"] for entry in status["results"]}
    pdf_path, sc_path = (out / name for name in names)
    assert results[pdf_path.name] == ENCAPSULATED_PDF_STORAGE
    assert results[sc_path.name] == SECONDARY_CAPTURE
    source = work.series_results[0].volume.datasets[0]
    others = {pydicom.dcmread(out / name, stop_before_pixels=True).SeriesNumber for name in results
              if name not in names}
    numbers = set()
    for path in (pdf_path, sc_path):
        assert dciodvfy_errors(path) == []
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.get("PatientID", "") == source.get("PatientID", "")
        assert ds.get("PatientName", "") == source.get("PatientName", "")
        numbers.add(ds.SeriesNumber)
    assert len(numbers) == 2 and not numbers & others
    sc = pydicom.dcmread(sc_path)
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape[2] == 3
    # The page's numbers are the SR's: every SR value as printed, and no other number than the fixed text's.
    text = _pdf_text(pdf_path)
    # One table per series with an SR, in report.json's order: the k-th row of a structure is the k-th SR's group.
    sr_groups = [_sr_numbers(out / entry["sr"]) for entry in report["series"] if "sr" in entry]
    assert sr_groups and all(sr_groups)
    for tracking in {tracking for groups in sr_groups for tracking in groups}:
        assert _rows(text.splitlines(), tracking) == [groups[tracking] for groups in sr_groups if tracking in groups]
    printed = Counter(NUMBER.findall(text))
    expected = sum((numbers for groups in sr_groups for numbers in groups.values()), Counter())
    # Besides the SR's numbers: the reference row of each table, the footnotes, provenance and withheld reasons.
    withheld = [reason for entry in report["series"] for quality in entry.get("quality", {}).values()
                for reason in quality["withheld"]]
    # Table headings name each series' echo time (the echoes of one acquisition share number and description).
    echo_times = [f"{float(result.volume.datasets[0].EchoTime):g}" for result in work.series_results
                  if result.volume is not None and result.volume.datasets[0].get("EchoTime") not in (None, "")]
    fixed = " ".join([*REFERENCES, *[column.reference for column in COLUMNS.values()] * len(sr_groups),
                      report["software"], *report["models"].values(), *withheld, *echo_times * 2])
    assert not (printed - expected) - Counter(NUMBER.findall(fixed))
    assert "NOT FOR DIAGNOSIS" in text
    assert report["models"]["detector_sha256"] in text.replace("\n", "")
    # report.json carries every segment's flags, the SR the same confidences, and no group of a withheld segment.
    for entry in (e for e in report["series"] if "sr" in e):
        values = read_measurements(pydicom.dcmread(out / entry["sr"]))
        confidences = {tracking: round(value, 3) for (tracking, concept), value in values.items()
                       if concept == DETECTOR_CONFIDENCE.meaning and tracking in entry["quality"]}
        assert confidences and confidences == {segment: entry["quality"][segment]["detector_confidence"]
                                               for segment in confidences}
        withheld = {segment for segment, quality in entry["quality"].items() if quality["withheld"]}
        assert not withheld & {tracking for tracking, _ in values}


def test_phantom_knee_report_is_in_the_study_and_prints_the_sr_numbers(phantom_run):
    _, out, work = phantom_run("knee")
    _check_report(out, work)


def test_real_knee_report_is_in_the_study_and_prints_the_sr_numbers(real_knee_run):
    out, work = real_knee_run
    _check_report(out, work)


def test_a_structure_touching_the_last_slice_or_the_border_is_cut():
    mask = np.zeros((6, 20, 20), dtype=bool)
    mask[2:4, 5:10, 5:10] = True
    assert cut_at(mask) == ()
    mask[5, 6, 6] = True
    assert cut_at(mask) == ("last slice",)
    mask[3, 6, 19] = True
    assert cut_at(mask) == ("last slice", "in-plane border")
    quality = assess_structure("femur", "femur", mask, None, [], QualityThresholds())
    assert not quality.whole_in_view and quality.reported
    withheld = assess_structure("femur", "femur", mask, None, [], QualityThresholds(withhold_cut=True))
    assert withheld.withheld == ("cut by the field of view (last slice, in-plane border)",)


def test_low_scores_withhold_a_structure():
    femur_boxes = LabelScores((0.2, 0.3), (0.9, 0.7))
    assert femur_boxes.detector_confidence == pytest.approx(0.25)
    assert femur_boxes.mean_predicted_iou == pytest.approx(0.8)
    assert LabelScores(()).detector_confidence is None and LabelScores((0.9,)).mean_predicted_iou is None
    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[1:3, 2:5, 2:5] = True
    thresholds = QualityThresholds(min_detector_confidence=0.35, min_predicted_iou=0.6)
    femur = assess_structure("femur", "femur", mask, femur_boxes, [], thresholds)
    assert femur.withheld == ("detector confidence 0.25 < 0.35",)
    tibia = assess_structure("tibia", "tibia", mask, LabelScores((0.9,), (0.5, 0.3)), [], thresholds)
    assert tibia.withheld == ("predicted IoU 0.40 < 0.60",)
    assert assess_structure("tibia", "tibia", mask, LabelScores((0.9,), (0.8,)), [], thresholds).reported
    assert assess_structure("patella", "patella", mask, None, [], thresholds).detector_confidence is None


def test_plausibility_state_of_a_label():
    def finding(label: str, action: str) -> Finding:
        return Finding(label, action, "rule", "reason", 10.0, (0.0, 0.0, 0.0))

    findings = [finding("tibia", "flagged"), finding("femur", "flagged"), finding("femur", "dropped")]
    assert plausibility_state(findings, "femur") == "implausible parts removed"
    assert plausibility_state(findings, "tibia") == "unchecked"
    assert plausibility_state(findings, "patella") == "passed"


def test_quality_thresholds_file_is_validated(tmp_path):
    assert load_thresholds() == QualityThresholds()
    path = tmp_path / "quality.yaml"
    path.write_text("min_detector_confidence: 1.5\n")
    with pytest.raises(ValueError, match=r"quality.yaml: key 'min_detector_confidence' must be in 0.0..1.0"):
        load_thresholds(path)
    path.write_text("min_confidence: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown key 'min_confidence'"):
        load_thresholds(path)
    path.write_text("withhold_cut: 1\n")
    with pytest.raises(ValueError, match=r"'withhold_cut' must be a boolean"):
        load_thresholds(path)
    path.write_text("withhold_cut: true\nmin_predicted_iou: 0.7\n")
    assert load_thresholds(path) == QualityThresholds(withhold_cut=True, min_predicted_iou=0.7)
