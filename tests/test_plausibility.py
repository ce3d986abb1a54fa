"""Anatomical plausibility on phantom truth with known geometry: wrong components go, the truth stays."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

from msk_node.dicom_input import read_study_folder
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, load_label_map
from msk_node_phantoms import write_phantom
from msk_node.pipeline import (STEPS, LabelVolume, NothingFound, Resources, build_volume, check_plausibility,
                               load_study, load_study_rules, loaded_values, run_steps, write_values)
from msk_node.plausibility import check_label_volume, label_figures
from msk_node.volume import labels_on_volume_grid, series_to_volume
from tests.dicom_checks import seg_label_volume

Box = tuple[slice, slice, slice]


@pytest.fixture(scope="module")
def label_map():
    return load_label_map(DEFAULT_LABEL_MAP_PATH)


def _case(root: Path, kind: str):
    case = write_phantom(kind, root / kind, seed=1)
    volume = series_to_volume(read_study_folder(case / "dicom").series[0].datasets)
    return case, volume, labels_on_volume_grid(case / "truth_labels.nii.gz", volume.volume)


@pytest.fixture(scope="module")
def knee(tmp_path_factory):
    return _case(tmp_path_factory.mktemp("plausibility"), "knee")


@pytest.fixture(scope="module")
def spine(tmp_path_factory):
    return _case(tmp_path_factory.mktemp("plausibility"), "spine")


def _hand_centroid_and_volume(volume, box: Box) -> tuple[np.ndarray, float]:
    """Centre of a box of voxels in LPS mm and its volume in mm3, straight from the DICOM attributes."""
    datasets = volume.slices[box[0]]
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    row = (box[1].start + box[1].stop - 1) / 2
    column = (box[2].start + box[2].stop - 1) / 2
    # ImageOrientationPatient: direction along a row (column index grows), then down a column (row index grows).
    centre = positions.mean(axis=0) + column * column_spacing * orientation[:3] + row * row_spacing * orientation[3:]
    slice_spacing = float(np.linalg.norm(positions[1] - positions[0]))
    voxels = np.prod([s.stop - s.start for s in box])
    return centre, float(voxels * row_spacing * column_spacing * slice_spacing)


def _inject(labels: np.ndarray, box: Box, value: int) -> None:
    assert not labels[box].any(), "the injected box must lie in background"
    labels[box] = value


def _figure(labels: np.ndarray, volume, label_map, name: str):
    return next(f for f in label_figures(labels, volume, label_map) if f.label == name)


def _dropped(result) -> dict[str, str]:
    return {f.label: f.rule for f in result.dropped}


@pytest.mark.parametrize("kind", ["knee", "thigh", "spine"])
def test_truth_labels_pass_unchanged(tmp_path, label_map, kind):
    _, volume, truth = _case(tmp_path, kind)
    result = check_label_volume(truth, volume, kind, label_map)
    assert result.dropped == []
    assert np.array_equal(result.label_volume, truth)


def test_knee_drops_a_tibia_above_the_femur_a_second_patella_and_stray_cartilage(knee, label_map):
    _, volume, truth = knee
    value = {name: label_map.by_name(name).value for name in ("tibia", "patella", "femoral_cartilage")}
    labels = truth.copy()
    injected = {"tibia": (slice(20, 26), slice(5, 20), slice(30, 45)),  # rows 5-20: 55-63 mm superior
                "patella": (slice(20, 26), slice(170, 185), slice(35, 50)),  # anterior, at the tibia's level
                "femoral_cartilage": (slice(20, 24), slice(100, 110), slice(230, 240))}  # posterior, off the bone
    for name, box in injected.items():
        _inject(labels, box, value[name])

    result = check_label_volume(labels, volume, "knee", label_map)

    assert _dropped(result) == {"tibia": "tibia_below_femur", "patella": "one_patella",
                                "femoral_cartilage": "cartilage_on_bone"}
    assert len(result.dropped) == 3 and result.flagged == []
    assert np.array_equal(result.label_volume, truth)
    for finding in result.dropped:
        centre, volume_mm3 = _hand_centroid_and_volume(volume, injected[finding.label])
        np.testing.assert_allclose(finding.centroid_mm, centre, atol=1e-6)
        assert finding.volume_mm3 == pytest.approx(volume_mm3)
    # The femur's centroid along S (+z in LPS) is what the tibia blob is compared with.
    femur = _figure(truth, volume, label_map, "femur")
    tibia_blob = next(f for f in result.dropped if f.label == "tibia")
    assert tibia_blob.centroid_mm[2] > femur.centroid_mm[2] + 30


def test_knee_drops_a_patella_beside_the_femur(knee, label_map):
    """Anterior to the femur but beyond its left-right extent (slices past the condyles): not a patella."""
    _, volume, truth = knee
    femur = np.argwhere(truth == label_map.by_name("femur").value)
    beside = slice(femur[:, 0].max() + 1, truth.shape[0])
    assert beside.start < beside.stop
    labels = truth.copy()
    _inject(labels, (beside, slice(48, 110), slice(42, 76)), label_map.by_name("patella").value)

    result = check_label_volume(labels, volume, "knee", label_map)

    assert _dropped(result) == {"patella": "patella_over_femur"} and len(result.dropped) == 1
    assert np.array_equal(result.label_volume, truth)


def test_without_a_femur_the_bones_it_anchors_are_flagged_not_dropped(knee, label_map):
    _, volume, truth = knee
    labels = truth.copy()
    labels[labels == label_map.by_name("femur").value] = 0

    result = check_label_volume(labels, volume, "knee", label_map)

    assert result.dropped == []
    assert np.array_equal(result.label_volume, labels)
    assert {f.label for f in result.flagged} == {"tibia", "patella", "femoral_cartilage"}
    assert {f.rule for f in result.flagged} == {"no_anchor"}


def _components_along_s(labels: np.ndarray, value: int, volume) -> list[tuple[float, np.ndarray]]:
    """(S coordinate of the centroid, mask) of each 3D component, inferior first."""
    labelled, count = ndimage.label(labels == value, structure=np.ones((3, 3, 3)))
    parts = []
    for index in range(1, count + 1):
        mask = labelled == index
        centroid = volume.volume.affine @ np.r_[ndimage.center_of_mass(mask), 1.0]
        parts.append((float(centroid[2]), mask))
    return sorted(parts, key=lambda part: part[0])


def test_a_slice_missing_from_the_series_does_not_cut_a_bone_in_two(knee, label_map):
    case, volume, _ = knee
    gap = 24
    datasets = [ds for k, ds in enumerate(volume.slices) if k != gap]
    holed = series_to_volume(datasets)
    assert holed.missing == [gap]
    labels = labels_on_volume_grid(case / "truth_labels.nii.gz", holed.volume)
    labels[gap] = 0  # the pipeline leaves a missing slice blank

    result = check_label_volume(labels, holed, "knee", label_map)

    assert result.dropped == [] and np.array_equal(result.label_volume, labels)
    assert _figure(labels, holed, label_map, "femur").components == 1


def test_spine_drops_a_disc_off_the_column_and_a_tiny_body(spine, label_map):
    _, volume, truth = spine
    disc, body = label_map.by_name("intervertebral_disc").value, label_map.by_name("vertebral_body").value
    labels = truth.copy()
    off_column = (slice(5, 8), slice(118, 138), slice(20, 40))  # ~90 mm anterior of the column
    tiny = (slice(6, 7), slice(100, 102), slice(100, 102))  # 2 x 2 voxels in one slice: 13 mm3
    _inject(labels, off_column, disc)
    _inject(labels, tiny, body)

    result = check_label_volume(labels, volume, "spine", label_map)

    assert _dropped(result) == {"intervertebral_disc": "column", "vertebral_body": "min_volume"}
    assert len(result.dropped) == 2
    assert np.array_equal(result.label_volume, truth)
    finding = next(f for f in result.dropped if f.label == "intervertebral_disc")
    centre, volume_mm3 = _hand_centroid_and_volume(volume, off_column)
    np.testing.assert_allclose(finding.centroid_mm, centre, atol=1e-6)
    assert finding.volume_mm3 == pytest.approx(volume_mm3)


def test_spine_keeps_one_disc_between_two_bodies(spine, label_map):
    """Without the body between them, two discs follow each other along S: the smaller one goes."""
    _, volume, truth = spine
    disc, body = label_map.by_name("intervertebral_disc").value, label_map.by_name("vertebral_body").value
    bodies = _components_along_s(truth, body, volume)
    discs = _components_along_s(truth, disc, volume)
    middle_s, middle = bodies[3]
    labels = truth.copy()
    labels[middle] = 0
    below = max((part for part in discs if part[0] < middle_s), key=lambda part: part[0])[1]
    above = min((part for part in discs if part[0] > middle_s), key=lambda part: part[0])[1]
    smaller = below if below.sum() < above.sum() else above

    result = check_label_volume(labels, volume, "spine", label_map)

    assert _dropped(result) == {"intervertebral_disc": "alternation"} and len(result.dropped) == 1
    expected = labels.copy()
    expected[smaller] = 0
    assert np.array_equal(result.label_volume, expected)


def test_spine_keeps_both_pieces_of_a_disc_cut_in_two_from_left_to_right(spine, label_map):
    """Pieces of one disc at the same level (a slice of it missed) are one level, not two discs in a row."""
    _, volume, truth = spine
    disc = label_map.by_name("intervertebral_disc").value
    _, middle = _components_along_s(truth, disc, volume)[2]
    labels = truth.copy()
    labels[6][middle[6]] = 0
    assert len(_components_along_s(labels, disc, volume)) == len(_components_along_s(truth, disc, volume)) + 1

    result = check_label_volume(labels, volume, "spine", label_map)

    assert result.findings == ()
    assert np.array_equal(result.label_volume, labels)


def test_label_figures_are_in_real_units_and_patient_coordinates(knee, label_map):
    _, volume, truth = knee
    labels = np.zeros_like(truth)
    box = (slice(10, 14), slice(50, 70), slice(60, 90))
    labels[box] = label_map.by_name("patella").value
    labels[20:22, 100:110, 100:110] = labels[30:32, 100:110, 100:110] = label_map.by_name("meniscus").value

    figures = {f.label: f for f in label_figures(labels, volume, label_map)}

    centre, volume_mm3 = _hand_centroid_and_volume(volume, box)
    patella = figures["patella"]
    assert patella.volume_cm3 == pytest.approx(volume_mm3 / 1000)
    np.testing.assert_allclose(patella.centroid_mm, centre, atol=1e-6)
    assert (patella.components, patella.slices, patella.first_slice, patella.last_slice) == (1, 4, 10, 13)
    meniscus = figures["meniscus"]
    assert (meniscus.components, meniscus.slices, meniscus.first_slice, meniscus.last_slice) == (2, 4, 20, 31)


class _Models(SimpleNamespace):
    """What writing the SEG needs from a model set: the label map and the provenance."""

    def provenance(self) -> dict:
        return {"segmenter_family": "truth", "detector_version": "0", "segmenter_version": "0",
                "detector_sha256": "0", "segmenter_sha256": "0", "precision": "fp32", "backend": "none"}


def test_pipeline_drops_components_before_measuring_and_reports_them(knee, tmp_path, label_map):
    case, _, truth = knee
    rules = load_study_rules()
    study = load_study(case / "dicom", rules)
    ((uid, selected),) = study.selected.items()
    volume, _ = build_volume(selected)
    labels = truth.copy()
    blob = (slice(20, 26), slice(5, 20), slice(30, 45))
    _inject(labels, blob, label_map.by_name("tibia").value)
    resources = Resources(_Models(label_map=label_map), rules)

    steps = tuple(step for step in STEPS if step.name in ("plausibility", "measure"))
    values = run_steps({**loaded_values(study), "volumes": {uid: volume},
                        "label_volumes": {uid: LabelVolume(volume, labels)}}, resources, steps)
    written = write_values(values, resources, tmp_path / "out")

    assert np.array_equal(values["label_volumes"][uid].labels, truth)
    assert (labels[blob] == label_map.by_name("tibia").value).all()  # the step made a new value, its input stands
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (entry,) = report["series"]
    assert entry["outcome"] == "segmented"
    (finding,) = entry["plausibility"]
    centre, volume_mm3 = _hand_centroid_and_volume(volume, blob)
    assert (finding["label"], finding["action"], finding["rule"]) == ("tibia", "dropped", "tibia_below_femur")
    np.testing.assert_allclose(finding["centroid_mm"], centre, atol=0.01)
    assert finding["volume_mm3"] == pytest.approx(volume_mm3, abs=0.1)
    assert "plausibility" in resources.times.seconds
    # Neither the SEG nor the volumes measured hold the dropped blob.
    seg = hd.seg.segread(written.series[uid].seg)
    assert np.array_equal(seg_label_volume(seg, volume.datasets, label_map), truth)
    tibia_volume = next(m for m in values["measurements"][uid].by_segment["tibia"] if m.name == "volume")
    # the phantom's tibia runs out of the field of view: its volume is the visible one, flagged, not reported
    measured = tibia_volume.value if tibia_volume.available else tibia_volume.extra["visible_cm3"]
    assert measured == pytest.approx(_figure(truth, volume, label_map, "tibia").volume_cm3, rel=1e-3)


def test_a_series_whose_every_component_is_dropped_finds_nothing(spine, tmp_path, label_map):
    case, _, truth = spine
    rules = load_study_rules()
    study = load_study(case / "dicom", rules)
    ((uid, selected),) = study.selected.items()
    volume, _ = build_volume(selected)
    labels = np.zeros_like(truth)
    labels[6, 100:102, 100:102] = label_map.by_name("vertebral_body").value
    labels[6, 120:122, 100:102] = label_map.by_name("intervertebral_disc").value

    (step,) = [step for step in STEPS if step.name == "plausibility"]
    values = run_steps({**loaded_values(study), "volumes": {uid: volume},
                        "label_volumes": {uid: LabelVolume(volume, labels)}},
                       Resources(_Models(label_map=label_map), rules), (step,))

    record = values["records"][uid]
    assert record.outcome == "nothing found" and record.failed and record.failures == []
    assert "plausibility" in record.reason and "vertebral_body" in record.reason
    assert "intervertebral_disc" in record.reason
    # What the step found still reaches the report: the emptied label volume and the findings.
    assert values["label_volumes"][uid].volume is volume and not values["label_volumes"][uid].labels.any()
    assert {f.rule for f in values["plausibility"][uid]} == {"min_volume"}
    with pytest.raises(NothingFound):
        check_plausibility(selected, LabelVolume(volume, labels), label_map=label_map)
