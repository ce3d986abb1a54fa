"""TID 1500 reports: valid for dciodvfy, DicomSRValidator and dcmqi, carrying exactly the CSV numbers;
the knee's side from its anatomy; volumes only of structures whole in the field of view."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from msk_node.biomarkers.cartilage import split_by_plane
from msk_node.biomarkers.knee_side import KneeSide, cartilage_split_planes, knee_side
from msk_node.dicom_input import read_study_folder
from msk_node.labels import load_label_map
from msk_node.measure import measure_series, measurement_groups
from msk_node_phantoms import write_phantom
from msk_node.pipeline import measurement_rows
from msk_node.seg_writer import AlgorithmInfo, build_segmentation, segment_number_map
from msk_node.biomarkers import Measurement, unavailable
from msk_node.sr_writer import (
    RELAXOMETRY_METHODS,
    MeasurementGroup,
    build_measurement_report,
    read_failure_reasons,
    read_measurements,
)
from msk_node.volume import labels_on_volume_grid, series_to_volume
from tests.dicom_checks import dciodvfy_errors, sr_validator_errors, tid1500_read, tid1500_values
from msk_node_training.sources import load_real_data

REPO = Path(__file__).resolve().parent.parent
LABEL_MAP = load_label_map(REPO / "models" / "detector" / "label_map.yaml")
KNEE_VALUES = {spec.name: spec.value for spec in LABEL_MAP.labels if spec.anatomy == "knee"}
ALGORITHM = AlgorithmInfo(name="msk-node test", version="0", weights_sha256="0" * 64)
STANDARD_SCHEMES = {"DCM", "SCT", "UCUM", "LN", "RFC5646"}  # in the DICOM registry (PS3.16 8.1)


def _study(kind: str, tmp_path: Path, drop_series: int = 0, laterality: str | None = "R"):
    """Phantom study (a right knee for the knee kinds); ``laterality`` None removes the tag."""
    case = write_phantom(kind, tmp_path / kind, seed=3)
    study = read_study_folder(case / "dicom")
    morphology = max(study.series, key=len)
    others = [s for s in study.series if s is not morphology][drop_series:]
    volume = series_to_volume(morphology.datasets)
    for ds in volume.datasets:
        if laterality is None:
            ds.pop("Laterality", None)
        elif "Laterality" in ds:
            ds.Laterality = laterality
    labels = labels_on_volume_grid(case / "truth_labels.nii.gz", volume.volume).astype(np.uint8)
    return volume, labels, [morphology, *others]


def _truth(kind: str, tmp_path: Path) -> dict:
    return json.loads((tmp_path / kind / "truth.json").read_text())


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
    assert sr_validator_errors(path) == []
    if shutil.which("dsrdump"):
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True).stdout
        assert "Imaging Measurement Report" in dump
    sr = pydicom.dcmread(path)
    read_back = read_measurements(sr)
    rows = _rows(measurements, volume)
    # Each relaxation time brings its rejected-voxel share (percent, the same method); the rest are the CSV's rows.
    shares = {key: value for key, value in read_back.items() if key[1].startswith("Rejected voxel share")}
    assert shares == pytest.approx(
        {(m.label, f"Rejected voxel share [{RELAXOMETRY_METHODS[m.extra['map_kind']].meaning}]"):
         100.0 * m.extra["rejected_share"] for m in measurements.rows() if "rejected_share" in m.extra}, abs=1e-6)
    assert (len(shares) > 0) == (kind == "knee-t1rho")
    assert len(read_back) - len(shares) == len(rows)
    values = sorted(v for key, v in read_back.items() if key not in shares and not math.isnan(v))
    expected = sorted(r["value"] for r in rows if r["value"] is not None)
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    # 3D Slicer's reader (dcmqi) reads the same numbers, and no number where a value failed.
    # dcmqi reads a Measurement Method only at the group level, so its keys have no "[method]".
    assert tid1500_values(tid1500_read(path)) == pytest.approx(
        {(group, name.split(" [")[0]): value for (group, name), value in read_back.items() if not math.isnan(value)},
        rel=1e-9)
    # Every failed value carries its reason, the same as the CSV's.
    reasons = read_failure_reasons(sr)
    assert set(reasons) == {key for key, value in read_back.items() if math.isnan(value)}
    assert sorted(reasons.values()) == sorted(r["reason"] for r in rows if r["value"] is None)
    _assert_schemes_declared(sr)

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
        _assert_sub_regions_coded(groups)


def _assert_schemes_declared(sr: pydicom.Dataset) -> None:
    """Every coding scheme used is a standard one or declared with its name and responsible organisation."""
    declared = {str(item.CodingSchemeDesignator): item for item in sr.CodingSchemeIdentificationSequence}
    used = set()

    def walk(node: pydicom.Dataset) -> None:
        for element in node:
            if element.VR == "SQ":
                for item in element.value:
                    if "CodingSchemeDesignator" in item:
                        used.add(str(item.CodingSchemeDesignator))
                    walk(item)

    walk(sr)
    assert "99MSKNODE" in used
    for scheme in used - STANDARD_SCHEMES:
        assert scheme in declared, scheme
        assert declared[scheme].CodingSchemeName and declared[scheme].CodingSchemeResponsibleOrganization


def _assert_sub_regions_coded(groups) -> None:
    """Cartilage parts are told apart by coded SNOMED CT modifiers and the knee's side, not by their names only."""
    sites = {}
    for group in groups:
        (site,) = group.finding_sites
        sites[group.tracking_identifier] = (site.value, site.laterality, site.topographical_modifier)
    assert sites["tibial_cartilage_medial"] == (codes.SCT.Tibia, codes.SCT.Right, codes.SCT.Medial)
    assert sites["tibial_cartilage_lateral"] == (codes.SCT.Tibia, codes.SCT.Right, codes.SCT.Lateral)
    assert sites["femoral_cartilage_medial"] == (codes.SCT.Femur, codes.SCT.Right, codes.SCT.Medial)
    assert sites["femoral_cartilage_lateral"] == (codes.SCT.Femur, codes.SCT.Right, codes.SCT.Lateral)
    assert sites["femoral_cartilage_trochlear"] == (codes.SCT.Femur, codes.SCT.Right, codes.SCT.Anterior)
    assert sites["tibial_cartilage"] == (codes.SCT.Tibia, None, None)


def test_missing_spin_lock_series_is_reported_not_zero(tmp_path):
    volume, labels, series = _study("knee-t1rho", tmp_path, drop_series=2)  # keep 2 of 4 spin-lock times
    measurements, seg, path = _report(volume, labels, "knee", series, tmp_path)
    rows = [r for r in _rows(measurements, volume) if r["measurement"] == "t1rho_mean"]
    assert rows and all(r["value"] is None and "at least 3" in r["reason"] for r in rows)
    assert dciodvfy_errors(path) == []
    assert sr_validator_errors(path) == []
    sr = pydicom.dcmread(path)
    read_back = read_measurements(sr)
    t1rho = [v for (_, name), v in read_back.items() if name.startswith("T1rho")]
    assert t1rho and all(math.isnan(v) for v in t1rho)
    reasons = read_failure_reasons(sr)
    key = "T1rho relaxation time (Mean) [Mono-exponential spin-lock fit]"
    assert all("at least 3" in reasons[(r["structure"], key)] for r in rows)
    assert not any(name.startswith("T1rho") for _, name in tid1500_values(tid1500_read(path)))


def test_bones_cut_by_the_field_of_view_are_not_reported_as_volumes(tmp_path):
    volume, labels, series = _study("knee", tmp_path)
    truth = _truth("knee", tmp_path)
    measurements, _, path = _report(volume, labels, "knee", series, tmp_path)
    assert dciodvfy_errors(path) == [] and sr_validator_errors(path) == []
    volumes = {m.label: m for m in measurements.rows() if m.name == "volume"}
    # The phantom's femoral shaft and tibia leave the field of view; patella, cartilage and menisci do not.
    for bone in ("femur", "tibia"):
        assert not volumes[bone].available and volumes[bone].reason.startswith("cut by field of view")
        assert volumes[bone].extra["visible_cm3"] == pytest.approx(truth["volumes_cm3"][bone], rel=1e-6)
    for whole in ("patella", "femoral_cartilage", "tibial_cartilage", "patellar_cartilage", "meniscus"):
        assert volumes[whole].value == pytest.approx(truth["volumes_cm3"][whole], rel=1e-6)
    sr = pydicom.dcmread(path)
    assert math.isnan(read_measurements(sr)[("femur", "Volume")])
    assert read_failure_reasons(sr)[("tibia", "Volume")].startswith("cut by field of view")
    slicer = tid1500_values(tid1500_read(path))
    assert ("femur", "Volume") not in slicer and slicer[("patella", "Volume")] == pytest.approx(
        truth["volumes_cm3"]["patella"], rel=1e-6)


def _medial_part_of_truth(volume, labels, planes, truth) -> tuple[float, float]:
    """Patient x of the tibial cartilage parts called medial and lateral, against the phantom's split."""
    plane = planes["tibial_cartilage"][0]
    medial, lateral = split_by_plane(labels == KNEE_VALUES["tibial_cartilage"], volume.volume.affine,
                                     plane.point, plane.normal)
    affine = volume.volume.affine
    x = [float((np.argwhere(part) @ affine[:3, :3].T + affine[:3, 3])[:, 0].mean()) - truth["medial_lateral_split_x_mm"]
         for part in (medial, lateral)]
    return x[0], x[1]


def test_knee_without_laterality_is_split_from_its_anatomy(tmp_path):
    volume, labels, series = _study("knee", tmp_path, laterality=None)
    truth = _truth("knee", tmp_path)["biomarkers"]
    assert "Laterality" not in volume.datasets[0]
    side = knee_side(labels, volume.volume.affine, KNEE_VALUES, volume.volume.array)
    assert side.laterality == "R"  # the phantom is a right knee: medial is +x
    planes = cartilage_split_planes(labels, volume.volume.affine, KNEE_VALUES, side.lateral_sign)
    medial_x, lateral_x = _medial_part_of_truth(volume, labels, planes, truth)
    assert truth["medial_side"] == "+x" and medial_x > 10.0 and lateral_x < -10.0
    assert abs(planes["tibial_cartilage"][0].point[0] - truth["medial_lateral_split_x_mm"]) < 1.0
    measurements = measure_series(volume, labels, "knee", LABEL_MAP, series)
    parts = {m.label for m in measurements.rows() if m.name == "mean_thickness_2d"}
    assert {"tibial_cartilage_medial", "tibial_cartilage_lateral", "femoral_cartilage_trochlear",
            "femoral_cartilage_medial", "femoral_cartilage_lateral"} <= parts
    medial = next(m for m in measurements.rows() if m.label == "tibial_cartilage_medial")
    assert medial.extra["knee_side"] == "R" and "warning" not in medial.extra
    # Each part has the plate's designed thickness (2D method bar: 10 %).
    for m in measurements.rows():
        if m.name == "mean_thickness_2d" and m.label.startswith(("tibial_cartilage_", "femoral_cartilage_")):
            plate = m.label.rsplit("_", 1)[0]
            assert m.value == pytest.approx(truth["cartilage_thickness_mm"][plate], rel=0.1), m.label


def test_a_laterality_tag_that_contradicts_the_anatomy_is_flagged_and_overruled_by_two_cues(tmp_path, monkeypatch,
                                                                                             caplog):
    """One cue can come from a structure the field of view cuts: it flags a contradicting tag without overruling
    it; two agreeing cues overrule it."""
    import msk_node.measure as measure

    volume, labels, series = _study("knee", tmp_path, laterality="L")
    anatomy = knee_side(labels, volume.volume.affine, KNEE_VALUES, volume.volume.array)
    assert anatomy.laterality == "R" and anatomy.votes == 1  # the fibula cue; patella and condyles are symmetric

    def medial_part():
        return next(m for m in measure_series(volume, labels, "knee", LABEL_MAP, series).rows()
                    if m.label == "tibial_cartilage_medial")

    medial = medial_part()
    assert medial.extra["knee_side"] == "L" and medial.extra["knee_side_source"] == "Laterality tag L"
    assert "Laterality tag L contradicts the anatomy: R knee from anatomy" in medial.extra["warning"]
    assert "contradicts" in medial.method
    assert "follow the tag (one anatomical cue only)" in caplog.text

    monkeypatch.setattr(measure, "knee_side", lambda *args: KneeSide(-1, {"patella": -6.9, "fibula": -1.8}, votes=2))
    medial = medial_part()
    assert medial.extra["knee_side"] == "R"  # the anatomy wins over the wrong tag
    assert "Laterality tag L contradicts the anatomy: R knee from anatomy (patella -6.9, fibula -1.8)" \
        in medial.extra["warning"]
    assert "medial and lateral follow the anatomy" in caplog.text


def test_knee_side_of_the_real_label_maps():
    """Real knees: the side from the anatomy matches their medial and lateral tibial cartilage labels."""
    try:
        maps = load_real_data(REPO / "training" / "configs" / "real_data.yaml").knee_label_maps
    except FileNotFoundError as error:
        pytest.skip(f"shared data not here: {error}")
    for source in maps:
        image = nib.load(source.path)
        labels = np.asarray(image.dataobj).astype(np.uint8)
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine  # RAS to LPS
        centroid = [float((np.argwhere(labels == v) @ affine[:3, :3].T + affine[:3, 3])[:, 0].mean()) for v in (2, 3)]
        lateral_sign = 1 if centroid[1] > centroid[0] else -1  # pymskt: 2 medial, 3 lateral tibial cartilage
        labels[labels == 3] = 2
        side = knee_side(labels, affine, {"tibial_cartilage": 2, "femur": 5, "tibia": 6, "patella": 7})
        assert side.lateral_sign == lateral_sign, (source.path.name, side.describe())


def test_dess_t2_and_multi_echo_t2_are_told_apart_by_their_coded_method(tmp_path):
    """One cartilage group with a multi-echo T2, a DESS T2 and a failed DESS T2: three distinct, valid items."""
    volume, labels, _ = _study("knee", tmp_path)
    seg = build_segmentation(volume.datasets, labels, LABEL_MAP, ALGORITHM)
    mese = Measurement("t2_mean", "femoral_cartilage", 38.5, "ms", "multi-echo",
                       extra={"map_kind": "t2", "rejected_share": 0.02})
    dess = Measurement("t2_mean", "femoral_cartilage", 33.25, "ms", "DESS",
                       extra={"map_kind": "dess_t2", "rejected_share": 0.125})
    failed = unavailable("t2_mean", "femoral_cartilage_medial", "ms", "DESS", "no dess_t2 map: no spoiler gradient",
                         map_kind="dess_t2")
    groups = [MeasurementGroup("femoral_cartilage", "femoral_cartilage", (mese, dess)),
              MeasurementGroup("femoral_cartilage", "femoral_cartilage_medial", (failed,))]
    path = tmp_path / "sr.dcm"
    build_measurement_report(seg, groups, LABEL_MAP, ALGORITHM).save_as(path, enforce_file_format=True)

    assert dciodvfy_errors(path) == []
    assert sr_validator_errors(path) == []
    mese_key, dess_key = "Mono-exponential multi-echo spin-echo fit", "Two-echo DESS signal model (Sveinsson 2017)"
    expected = {("femoral_cartilage", f"T2 (Mean) [{mese_key}]"): 38.5,
                ("femoral_cartilage", f"T2 (Mean) [{dess_key}]"): 33.25,
                ("femoral_cartilage", f"Rejected voxel share [{mese_key}]"): 2.0,
                ("femoral_cartilage", f"Rejected voxel share [{dess_key}]"): 12.5}
    sr = pydicom.dcmread(path)
    read_back = read_measurements(sr)
    assert math.isnan(read_back.pop(("femoral_cartilage_medial", f"T2 (Mean) [{dess_key}]")))
    assert read_back == pytest.approx(expected)
    assert read_failure_reasons(sr) == {("femoral_cartilage_medial", f"T2 (Mean) [{dess_key}]"):
                                        "no dess_t2 map: no spoiler gradient"}
    # 3D Slicer's reader (dcmqi) reads the same numbers, the share in UCUM percent; it reads a Measurement Method
    # only at the group level, so there the two T2 items differ by value alone.
    items = [item for group in tid1500_read(path)["Measurements"] for item in group["measurementItems"]]
    read_by_dcmqi = sorted((item["quantity"]["CodeMeaning"], item["units"]["CodeValue"], float(item["value"]))
                           for item in items)
    assert read_by_dcmqi == [("Rejected voxel share", "%", 2.0), ("Rejected voxel share", "%", 12.5),
                             ("T2", "ms", 33.25), ("T2", "ms", 38.5)]
    _assert_schemes_declared(sr)
