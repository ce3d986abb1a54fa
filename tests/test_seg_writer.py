"""DICOM-SEG writer: validity, exact pixel and spatial round trip, identity quirks, input checks."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from tests.dicom_checks import assert_frames_on_sources, dciodvfy_errors, make_mr_series, seg_label_volume

from msk_node.codes import ALGORITHM_FAMILY, anatomic_region
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, LabelMap, load_label_map
from msk_node.seg_writer import (
    TYPE2_PATIENT_STUDY_ATTRIBUTES,
    AlgorithmInfo,
    build_segmentation,
    segment_number_map,
    with_type2_patient_attributes,
    write_segmentation,
)

ALGORITHM = AlgorithmInfo(name="msk-node test", version="1.2.3", weights_sha256="ab" * 32)
_C, _S = math.cos(math.radians(20)), math.sin(math.radians(20))
ORIENTATIONS = {
    "sagittal": (0, 1, 0, 0, 0, -1),
    "axial": (1, 0, 0, 0, 1, 0),
    # rotated 20 degrees about the patient's z axis, then tilted: a double-oblique plane
    "oblique": (round(_C, 8), round(_S, 8), 0.0, round(-_S * _S, 8), round(_C * _S, 8), round(-_C, 8)),
}


@pytest.fixture(scope="module")
def label_map() -> LabelMap:
    return load_label_map(DEFAULT_LABEL_MAP_PATH)


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in paths]


def _code(sequence: pydicom.Sequence) -> hd.sr.CodedConcept:
    (item,) = sequence
    return hd.sr.CodedConcept.from_dataset(item)


def _l_shapes(n: int, rows: int, cols: int, values: list[int]) -> np.ndarray:
    """A different, mirror-asymmetric L per label, each only in some slices."""
    volume = np.zeros((n, rows, cols), dtype=np.uint8)
    for j, value in enumerate(values):
        top, left = 2 + 3 * j, 3 + 4 * j
        for k in range(j % n, n, 2 + j % 2):  # a different subset of slices per label
            volume[k, top:top + 8, left:left + 2] = value  # vertical stroke
            volume[k, top + 6:top + 8, left:left + 6] = value  # foot, pointing to higher columns
    return volume


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_seg_is_valid_and_round_trips_exactly(tmp_path: Path, label_map: LabelMap, orientation: str) -> None:
    sources = _read(make_mr_series(tmp_path / "mr", iop=ORIENTATIONS[orientation]))
    names = ["femur", "femoral_cartilage", "meniscus"]
    values = [label_map.by_name(name).value for name in names]
    volume = _l_shapes(len(sources), int(sources[0].Rows), int(sources[0].Columns), values)

    path = write_segmentation(build_segmentation(sources, volume, label_map, ALGORITHM), tmp_path / "seg.dcm")

    assert dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert seg.Manufacturer == "msk-node" and seg.ManufacturerModelName and seg.SoftwareVersions
    assert seg.DeviceSerialNumber
    assert int(seg.NumberOfFrames) == len(sources) * len(names)
    # Segment numbers follow label-map order.
    assert segment_number_map(seg) == {"femur": 1, "femoral_cartilage": 2, "meniscus": 3}
    for item in seg.SegmentSequence:
        spec = label_map.by_name(item.SegmentLabel)
        assert _code(item.SegmentedPropertyCategoryCodeSequence) == spec.category
        assert _code(item.SegmentedPropertyTypeCodeSequence) == spec.property_type
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == ALGORITHM.name and algorithm.AlgorithmVersion == ALGORITHM.version
        assert _code(algorithm.AlgorithmFamilyCodeSequence) == ALGORITHM_FAMILY
        assert ALGORITHM.weights_sha256 in algorithm.AlgorithmParameters
        assert item.TrackingID == spec.name and item.TrackingUID
        region = anatomic_region(spec.name)
        assert ("AnatomicRegionSequence" in item) == (region is not None)
        if region is not None:
            assert _code(item.AnatomicRegionSequence) == region
        assert hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb() == spec.colour

    # Every frame lies exactly on the source instance it references.
    assert_frames_on_sources(seg, sources)
    orientation_values = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orientation_values], ORIENTATIONS[orientation])

    # Pixels come back in source order with no flip or shift.
    np.testing.assert_array_equal(seg_label_volume(seg, sources, label_map), volume)


def test_segments_only_for_labels_present_in_label_map_order(tmp_path: Path, label_map: LabelMap) -> None:
    sources = _read(make_mr_series(tmp_path / "mr", n=3))
    volume = np.zeros((3, 32, 40), dtype=np.uint8)
    volume[0, 1:4, 1:3] = label_map.by_name("intervertebral_disc").value
    volume[2, 10:12, 5:9] = label_map.by_name("quadriceps").value
    seg = build_segmentation(sources, volume, label_map, ALGORITHM, series_number=42, series_description="test")
    assert segment_number_map(seg) == {"quadriceps": 1, "intervertebral_disc": 2}
    assert seg.SeriesNumber == 42 and seg.SeriesDescription == "test"
    np.testing.assert_array_equal(seg_label_volume(seg, sources, label_map), volume)


def test_sources_without_patient_identity(tmp_path: Path, label_map: LabelMap) -> None:
    sources = _read(make_mr_series(tmp_path / "mr", drop=TYPE2_PATIENT_STUDY_ATTRIBUTES))
    originals = [copy.deepcopy(ds) for ds in sources]
    volume = _l_shapes(len(sources), 32, 40, [label_map.by_name("tibia").value])

    path = write_segmentation(build_segmentation(sources, volume, label_map, ALGORITHM), tmp_path / "seg.dcm")

    assert dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    for keyword in TYPE2_PATIENT_STUDY_ATTRIBUTES:
        assert keyword in seg, keyword
        assert seg[keyword].value in (None, ""), keyword
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    # The caller's datasets are untouched.
    for ds, original in zip(sources, originals):
        assert "PatientID" not in ds and "PatientName" not in ds
        assert ds == original


def test_with_type2_patient_attributes_copies_and_keeps_present_values(tmp_path: Path) -> None:
    ds = pydicom.dcmread(make_mr_series(tmp_path, n=1, drop=("PatientID", "StudyDate"))[0])
    filled = with_type2_patient_attributes(ds)
    assert filled is not ds
    assert filled.PatientID in (None, "") and filled.StudyDate in (None, "")
    assert filled.PatientName == ds.PatientName and filled.SOPInstanceUID == ds.SOPInstanceUID
    assert "PatientID" not in ds and "StudyDate" not in ds


@pytest.fixture
def valid_inputs(tmp_path: Path, label_map: LabelMap) -> tuple[list[pydicom.Dataset], np.ndarray]:
    sources = _read(make_mr_series(tmp_path / "mr", n=4))
    volume = np.zeros((4, 32, 40), dtype=np.uint8)
    volume[1, 5:9, 5:9] = label_map.by_name("patella").value
    return sources, volume


def test_wrong_shape_is_rejected(valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    with pytest.raises(ValueError, match="label_volume"):
        build_segmentation(sources, volume[:, :, ::-1].T.copy(), label_map, ALGORITHM)
    with pytest.raises(ValueError, match="label_volume"):
        build_segmentation(sources[:3], volume, label_map, ALGORITHM)


def test_wrong_dtype_is_rejected(valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    with pytest.raises(TypeError, match="label_volume"):
        build_segmentation(sources, volume.astype(np.int64), label_map, ALGORITHM)


def test_unknown_label_value_is_rejected(valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    volume[2, 0, 0] = 200
    with pytest.raises(ValueError, match=r"label_volume: values \[200\]"):
        build_segmentation(sources, volume, label_map, ALGORITHM)


def test_mixed_series_are_rejected(tmp_path: Path, valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    other = _read(make_mr_series(tmp_path / "other", n=1))
    with pytest.raises(ValueError, match="source_images.*SeriesInstanceUID"):
        build_segmentation(sources[:3] + other, volume, label_map, ALGORITHM)


def test_inconsistent_geometry_is_rejected(valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    tilted = copy.deepcopy(sources[2])
    tilted.ImageOrientationPatient = [0, 1, 0, 0, 0.1, -0.99498744]
    with pytest.raises(ValueError, match=r"source_images\[2\]: ImageOrientationPatient"):
        build_segmentation(sources[:2] + [tilted] + sources[3:], volume, label_map, ALGORITHM)


def test_bad_algorithm_info_is_rejected(valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    with pytest.raises(ValueError, match="algorithm.name"):
        build_segmentation(sources, volume, label_map, AlgorithmInfo("x" * 65, "1", "ab" * 32))
    with pytest.raises(ValueError, match="algorithm.weights_sha256"):
        build_segmentation(sources, volume, label_map, AlgorithmInfo("x", "1", ""))


def test_empty_label_volume_has_no_segment(valid_inputs, label_map: LabelMap) -> None:
    sources, volume = valid_inputs
    with pytest.raises(ValueError, match="no segment"):
        build_segmentation(sources, np.zeros_like(volume), label_map, ALGORITHM)
