"""Reading studies: bad files, non-MR and single-slice series, compressed syntaxes, geometry."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from msk_node.dicom_input import read_study_folder
from msk_node.selection import load_relaxometry_rules, load_rules, rules_json, select_series
from msk_node.volume import series_to_volume
from tests.dicom_checks import make_mr_series


def test_corrupt_and_non_dicom_files_are_reported_and_the_rest_is_read(tmp_path):
    paths = make_mr_series(tmp_path / "study", n=5)
    truncated = paths[2].read_bytes()[:300]
    paths[2].write_bytes(truncated)
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    study = read_study_folder(tmp_path / "study")
    assert [len(s) for s in study.series] == [4]
    reasons = {p.split("/")[-1]: r for p, r in ((s.path, s.reason) for s in study.skipped)}
    assert set(reasons) == {paths[2].name, "notes.txt"}
    assert "not a readable DICOM file" in reasons["notes.txt"]


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless])
def test_compressed_series_decode_to_the_same_pixels(tmp_path, syntax):
    paths = make_mr_series(tmp_path / "study", n=3)
    originals = [pydicom.dcmread(p).pixel_array.copy() for p in paths]
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    study = read_study_folder(tmp_path / "study")
    assert study.skipped == []
    volume = series_to_volume(study.series[0].datasets)
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: original for p, original in zip(paths, originals)}
    for k, ds in enumerate(volume.datasets):
        np.testing.assert_array_equal(volume.array[k], by_uid[ds.SOPInstanceUID])


def test_selection_reports_non_mr_and_single_slice_series(tmp_path):
    make_mr_series(tmp_path / "knee", n=10)
    ct = make_mr_series(tmp_path / "ct", n=10)
    for path in ct:
        ds = pydicom.dcmread(path)
        ds.Modality = "CT"
        ds.save_as(path)
    single = make_mr_series(tmp_path / "single", n=1)
    study = read_study_folder(tmp_path)
    selected, skipped = select_series(study.series, load_rules())
    assert [s.anatomy for s in selected] == ["knee"]
    reasons = " ".join(s.reason for s in skipped)
    assert "modality CT is not MR" in reasons
    assert "1 slice(s), fewer than the 8 needed" in reasons
    assert len(skipped) == 2 and len(single) == 1


@pytest.mark.parametrize("iop", [(0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 1, 0), (0.0, 0.8, -0.6, 0.0, 0.6, 0.8)])
def test_volume_slices_sit_where_the_affine_says_whatever_the_file_order(tmp_path, iop):
    paths = make_mr_series(tmp_path / "s", n=6, iop=iop)
    rng = np.random.default_rng(3)
    datasets = [pydicom.dcmread(paths[i]) for i in rng.permutation(len(paths))]
    volume = series_to_volume(datasets)
    numbers = [int(ds.InstanceNumber) for ds in volume.datasets]
    assert numbers in ([1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
    for k, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(volume.volume.affine @ [k, 0, 0, 1], [*ds.ImagePositionPatient, 1], atol=1e-4)
    assert volume.slice_spacing == pytest.approx(1.5, abs=1e-3)
    assert volume.pixel_spacing == pytest.approx((0.5, 0.6))


def test_missing_geometry_is_a_clear_error(tmp_path):
    paths = make_mr_series(tmp_path / "s", n=4)
    datasets = [pydicom.dcmread(p) for p in paths]
    del datasets[1].ImagePositionPatient
    with pytest.raises(ValueError, match=r"datasets\[1\]: missing geometry attribute\(s\) ImagePositionPatient"):
        series_to_volume(datasets)


def test_rules_file_errors_name_the_key(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - name: x\n    anatomy: knee\n    plain: sagittal\n")
    with pytest.raises(ValueError, match=r"rules.yaml: unknown key 'rules\[0\].plain'"):
        load_rules(bad)


def test_a_missing_slice_leaves_a_blank_gap_at_its_place(tmp_path):
    paths = make_mr_series(tmp_path / "s", n=6)
    datasets = [pydicom.dcmread(p) for i, p in enumerate(paths) if i != 2]
    volume = series_to_volume(datasets)
    assert len(volume.slices) == 6 and len(volume.missing) == 1
    gap = volume.missing[0]
    assert not volume.array[gap].any()
    expected = np.asarray(pydicom.dcmread(paths[2]).ImagePositionPatient, dtype=float)
    np.testing.assert_allclose((volume.volume.affine @ [gap, 0, 0, 1])[:3], expected, atol=1e-4)
    for k, ds in enumerate(volume.slices):
        if ds is not None:
            np.testing.assert_array_equal(volume.array[k], ds.pixel_array)


@pytest.mark.parametrize(("relaxometry", "message"), [
    ("  - kind: t3\n    description: [x]\n", r"key 'relaxometry\[0\]\.kind' must be one of"),
    ("  - kind: t2\n    description: ['(unclosed']\n", r"key 'relaxometry\[0\]\.description\[0\]': bad pattern"),
    ("  - kind: t2\n    description: []\n", r"key 'relaxometry\[0\]\.description' needs at least one pattern"),
    ("  - kind: t2\n    description: [x]\n    min_echo_times: -1\n", r"key 'relaxometry\[0\]\.min_echo_times'"),
    ("  - kind: t2\n    description: [x]\n    image_type: [DERIVED]\n",
     r"unknown key 'relaxometry\[0\]\.image_type'"),
    ("  - kind: t2\n    description: [x]\n  - kind: t2\n    description: [y]\n",
     r"key 'relaxometry\[1\]\.kind': 't2' is given twice"),
])
def test_relaxometry_group_errors_name_the_group_and_key(tmp_path, relaxometry, message):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules: []\nrelaxometry:\n" + relaxometry)
    with pytest.raises(ValueError, match=message):
        load_relaxometry_rules(bad)
    with pytest.raises(ValueError, match=message):
        rules_json(bad)


def test_packaged_rules_hold_the_three_relaxometry_groups():
    groups = {rule.kind: rule for rule in load_relaxometry_rules()}
    assert list(groups) == ["t1rho", "t2", "dess_t2"]
    assert groups["dess_t2"].min_echo_times == 2 and groups["t2"].min_echo_times == 0
    assert json.loads(rules_json())["relaxometry"][0]["description"] == list(groups["t1rho"].description)
