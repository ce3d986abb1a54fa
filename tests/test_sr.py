"""TID 1500 reports: valid, readable by dcmtk, and carrying exactly the CSV numbers."""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from msk_node.dicom_input import read_study_folder
from msk_node.labels import load_label_map
from msk_node.measure import measure_series, measurement_groups
from msk_node.phantoms import write_phantom
from msk_node.pipeline import measurement_rows
from msk_node.seg_writer import AlgorithmInfo, build_segmentation, segment_number_map
from msk_node.sr_writer import build_measurement_report, read_measurements
from msk_node.volume import labels_on_volume_grid, series_to_volume
from tests.dicom_checks import dciodvfy_errors

LABEL_MAP = load_label_map(Path(__file__).resolve().parent.parent / "models" / "detector" / "label_map.yaml")
ALGORITHM = AlgorithmInfo(name="msk-node test", version="0", weights_sha256="0" * 64)


def _study(kind: str, tmp_path: Path, drop_series: int = 0):
    case = write_phantom(kind, tmp_path / kind, seed=3)
    study = read_study_folder(case / "dicom")
    morphology = max(study.series, key=len)
    others = [s for s in study.series if s is not morphology][drop_series:]
    volume = series_to_volume(morphology.datasets)
    labels = labels_on_volume_grid(case / "truth_labels.nii.gz", volume.volume).astype(np.uint8)
    return volume, labels, [morphology, *others]


def _report(volume, labels, anatomy, study_series, tmp_path):
    measurements = measure_series(volume, labels, anatomy, LABEL_MAP, study_series)
    seg = build_segmentation(volume.datasets, labels, LABEL_MAP, ALGORITHM, instances=measurements.instances)
    sr = build_measurement_report(seg, measurement_groups(measurements), LABEL_MAP, ALGORITHM)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    return measurements, seg, path


def _rows(measurements, volume):
    first = volume.datasets[0]
    return measurement_rows(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), measurements)


@pytest.mark.parametrize("kind", ["knee-t1rho", "spine"])
def test_report_is_valid_and_reads_back_to_the_csv_numbers(tmp_path, kind):
    volume, labels, series = _study(kind, tmp_path)
    anatomy = "knee" if kind.startswith("knee") else kind
    measurements, seg, path = _report(volume, labels, anatomy, series, tmp_path)

    assert dciodvfy_errors(path) == []
    if shutil.which("dsrdump"):
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True).stdout
        assert "Imaging Measurement Report" in dump
    sr = pydicom.dcmread(path)
    read_back = read_measurements(sr)
    rows = _rows(measurements, volume)
    assert len(read_back) == len(rows)
    values = sorted(v for v in read_back.values() if not math.isnan(v))
    expected = sorted(r["value"] for r in rows if r["value"] is not None)
    np.testing.assert_allclose(values, expected, rtol=1e-4)

    # Every group points at the SEG segment its structure was measured on.
    numbers = segment_number_map(seg)
    document = hd.sr.Comprehensive3DSR.from_dataset(sr)
    groups = document.content.get_volumetric_roi_measurement_groups()
    # The segment item (IMAGE) of TID 1411 names the SEG instance and segment number.
    segments = {g.tracking_identifier: int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)
                for g in groups}
    referenced_seg = {str(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for g in groups}
    assert referenced_seg == {str(seg.SOPInstanceUID)}
    for row in rows:
        assert segments[row["structure"]] == numbers[row["segment"]]
    if kind == "spine":
        assert {"L1-L2", "L4-L5", "L5-S1"} <= set(segments)
    else:
        assert any(r["measurement"] == "t1rho_mean" and r["value"] for r in rows)


def test_missing_spin_lock_series_is_reported_not_zero(tmp_path):
    volume, labels, series = _study("knee-t1rho", tmp_path, drop_series=2)  # keep 2 of 4 spin-lock times
    measurements, seg, path = _report(volume, labels, "knee", series, tmp_path)
    rows = [r for r in _rows(measurements, volume) if r["measurement"] == "t1rho_mean"]
    assert rows and all(r["value"] is None and "at least 3" in r["reason"] for r in rows)
    assert dciodvfy_errors(path) == []
    read_back = read_measurements(pydicom.dcmread(path))
    t1rho = [v for (_, name), v in read_back.items() if name.startswith("T1rho")]
    assert t1rho and all(math.isnan(v) for v in t1rho)
