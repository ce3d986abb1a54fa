"""Disc levels anchored on the sacrum, and instance segments (one per disc level, per thigh side) in SEG and SR."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from msk_node.biomarkers.disc import LUMBAR_LEVELS, disc_heights, locate_discs
from msk_node.codes import DISC_LEVELS, LEFT, RIGHT
from msk_node.dicom_input import read_study_folder
from msk_node.labels import load_label_map
from msk_node.measure import measure_series, measurement_groups
from msk_node_phantoms import write_phantom
from msk_node.seg_writer import AlgorithmInfo, build_segmentation, label_volume_from_seg, segment_number_map
from msk_node.sr_writer import build_measurement_report
from msk_node.volume import SeriesVolume, labels_on_volume_grid, series_to_volume
from tests.dicom_checks import dciodvfy_errors, sr_validator_errors, tid1500_read

LABEL_MAP = load_label_map(Path(__file__).resolve().parent.parent / "models" / "detector" / "label_map.yaml")
ALGORITHM = AlgorithmInfo(name="msk-node test", version="0", weights_sha256="0" * 64)
DISC = LABEL_MAP.by_name("intervertebral_disc").value
BODY = LABEL_MAP.by_name("vertebral_body").value
#: Heights on 0.9 mm pixels read within 0.5 mm of the designed ones (measured -0.19 ... -0.04 mm).
HEIGHT_TOLERANCE_MM = 0.5


def _phantom(kind: str, out: Path, n_slices: int) -> tuple[SeriesVolume, np.ndarray, dict]:
    case = write_phantom(kind, out, seed=0, n_slices=n_slices)
    truth = json.loads((case / "truth.json").read_text())
    volume = series_to_volume(max(read_study_folder(case / "dicom").series, key=len).datasets)
    return volume, labels_on_volume_grid(case / "truth_labels.nii.gz", volume.volume).astype(np.uint8), truth


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory) -> tuple[SeriesVolume, np.ndarray, dict]:
    volume, labels, truth = _phantom("spine", tmp_path_factory.mktemp("spine"), 5)
    assert truth["labels"] == {"vertebral_body": BODY, "intervertebral_disc": DISC}
    return volume, labels, truth


def _heights(volume: SeriesVolume, labels: np.ndarray) -> dict[str, float]:
    found = disc_heights(labels, volume.pixel_spacing, volume.volume.affine, value=DISC, bodies=labels == BODY)
    return {m.label: m.value for m in found}


def _disc_components(labels: np.ndarray) -> tuple[np.ndarray, int]:
    return ndimage.label(labels == DISC, structure=np.ones((3, 3, 3), dtype=bool))


def _lowest(volume: SeriesVolume, components: np.ndarray, count: int) -> int:
    """Component number of the most inferior component (patient z)."""
    centres = ndimage.center_of_mass(components > 0, components, range(1, count + 1))
    return int(np.argmin([(volume.volume.affine @ [*c, 1.0])[2] for c in centres])) + 1


def test_levels_and_heights_match_the_phantom(spine) -> None:
    volume, labels, truth = spine
    designed = truth["biomarkers"]["disc_height_mm"]
    heights = _heights(volume, labels)
    assert list(heights) == list(designed) == list(LUMBAR_LEVELS)
    assert heights == pytest.approx(designed, abs=HEIGHT_TOLERANCE_MM)


def test_missed_l5_s1_keeps_the_names_above(spine) -> None:
    """Counting discs from the bottom would call L4-L5 "L5-S1"; counting bodies from S1 does not."""
    volume, labels, truth = spine
    components, count = _disc_components(labels)
    missed = labels.copy()
    missed[components == _lowest(volume, components, count)] = 0
    heights = _heights(volume, missed)
    designed = truth["biomarkers"]["disc_height_mm"]
    assert list(heights) == list(LUMBAR_LEVELS[:-1])
    assert heights == pytest.approx({k: designed[k] for k in heights}, abs=HEIGHT_TOLERANCE_MM)


def test_disc_split_by_a_cleft_is_one_disc_with_its_full_height(spine) -> None:
    """A 1.4 mm cleft parallel to the endplates through L3-L4: one disc, full height."""
    volume, labels, truth = spine
    components, _ = _disc_components(labels)
    affine = volume.volume.affine
    l3_l4 = 4  # components are numbered in row order: superior to inferior here
    index = np.argwhere(components == l3_l4)
    points = index @ affine[:3, :3].T + affine[:3, 3]
    centred = points - points.mean(axis=0)
    normal = np.linalg.svd(centred[:, 1:], full_matrices=False)[2][-1]  # thinnest direction in the (y, z) plane
    cleft = labels.copy()
    cut = index[np.abs(centred[:, 1:] @ normal) < 0.7]
    cleft[tuple(cut.T)] = 0
    assert _disc_components(cleft)[1] == 7  # the cleft really splits the disc
    heights = _heights(volume, cleft)
    assert list(heights) == list(LUMBAR_LEVELS)
    assert heights == pytest.approx(truth["biomarkers"]["disc_height_mm"], abs=HEIGHT_TOLERANCE_MM)


def test_small_false_disc_in_the_sacrum_is_ignored(spine) -> None:
    """A 40 mm2 disc-labelled speck inside S1, below L5-S1: not between two bodies, so not a disc."""
    volume, labels, truth = spine
    bodies, count = ndimage.label(labels == BODY, structure=np.ones((3, 3, 3), dtype=bool))
    sacrum = _lowest(volume, bodies, count)
    k, r, c = np.round(ndimage.center_of_mass(bodies == sacrum)).astype(int)
    side = int(round(np.sqrt(40.0 / np.prod(volume.pixel_spacing))))
    speck = labels.copy()
    speck[k, r - side // 2:r - side // 2 + side, c - side // 2:c - side // 2 + side] = DISC
    assert 36.0 <= side * side * np.prod(volume.pixel_spacing) <= 44.0
    heights = _heights(volume, speck)
    assert list(heights) == list(LUMBAR_LEVELS)
    assert heights == pytest.approx(truth["biomarkers"]["disc_height_mm"], abs=HEIGHT_TOLERANCE_MM)


def test_without_a_sacrum_every_level_is_uncertain(spine) -> None:
    """S1 removed: the lowest body is L5, whose endplate is no sacral plate; no disc gets a name."""
    volume, labels, _ = spine
    bodies, count = ndimage.label(labels == BODY, structure=np.ones((3, 3, 3), dtype=bool))
    no_sacrum = labels.copy()
    no_sacrum[bodies == _lowest(volume, bodies, count)] = 0
    discs = locate_discs(no_sacrum == DISC, no_sacrum == BODY, volume.volume.affine)
    assert len(discs) == 5  # L5-S1 now lies on one body only
    assert all(d.level is None and "level uncertain" in d.name and "sacrum" in d.note for d in discs)


def test_missed_vertebral_body_makes_the_levels_above_it_uncertain(spine) -> None:
    """L4 not segmented: counting bodies from S1 would call L2-L3 "L4-L5"; the long step between L5 and L3 stops it."""
    volume, labels, _ = spine
    bodies, count = ndimage.label(labels == BODY, structure=np.ones((3, 3, 3), dtype=bool))
    centres = ndimage.center_of_mass(bodies > 0, bodies, range(1, count + 1))
    ascending = np.argsort([(volume.volume.affine @ [*c, 1.0])[2] for c in centres]) + 1
    no_l4 = labels.copy()
    no_l4[bodies == ascending[2]] = 0  # S1, L5, L4
    discs = locate_discs(no_l4 == DISC, no_l4 == BODY, volume.volume.affine)
    assert [d.level for d in discs] == [None, None, None, "L5-S1"]  # L3-L4 and L4-L5 lie on one body only
    assert all("missed" in d.note for d in discs[:3])


def test_one_segment_per_disc_level_in_seg_and_sr(spine, tmp_path: Path) -> None:
    volume, labels, _ = spine
    components, count = _disc_components(labels)
    missed = labels.copy()
    missed[components == _lowest(volume, components, count)] = 0  # L5-S1 missed: the names still hold
    measurements = measure_series(volume, missed, "spine", LABEL_MAP, [])
    seg = build_segmentation(volume.datasets, missed, LABEL_MAP, ALGORITHM, instances=measurements.instances)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    assert dciodvfy_errors(seg_path) == []

    numbers = segment_number_map(seg)
    disc_segments = [f"intervertebral disc {level}" for level in LUMBAR_LEVELS[:-1]]
    assert list(numbers) == ["vertebral_body", *disc_segments]
    for item in seg.SegmentSequence[1:]:
        level = str(item.SegmentLabel).rsplit(" ", 1)[1]
        assert item.AnatomicRegionSequence[0].CodeValue == DISC_LEVELS[level].value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Intervertebral disc"
    # Per-level segments read back onto the source geometry: each is its own disc, together the labels.
    uids = [ds.SOPInstanceUID for ds in volume.datasets]
    assert np.array_equal(label_volume_from_seg(seg, uids, LABEL_MAP), missed)
    pixels = seg.get_pixels_by_source_instance(uids)
    for instance in measurements.instances:
        assert np.array_equal(pixels[..., numbers[instance.segment_label] - 1] > 0, instance.mask)

    groups = _report_groups(seg, measurements, tmp_path)
    for level in LUMBAR_LEVELS[:-1]:
        group = groups[level]
        assert _segment_number(group) == numbers[f"intervertebral disc {level}"]
        assert group.finding_sites[0].value.value == DISC_LEVELS[level].value
        # a disc reaching the first or last sagittal slice has its volume flagged as cut, not reported
        assert "Height" in {m.name.meaning for m in group.get_measurements()}


def test_uncertain_levels_reach_the_sr_without_a_level_code(spine, tmp_path: Path) -> None:
    volume, labels, _ = spine
    bodies, count = ndimage.label(labels == BODY, structure=np.ones((3, 3, 3), dtype=bool))
    no_sacrum = labels.copy()
    no_sacrum[bodies == _lowest(volume, bodies, count)] = 0
    measurements = measure_series(volume, no_sacrum, "spine", LABEL_MAP, [])
    seg = build_segmentation(volume.datasets, no_sacrum, LABEL_MAP, ALGORITHM, instances=measurements.instances)
    groups = _report_groups(seg, measurements, tmp_path)
    uncertain = {name: g for name, g in groups.items() if "level uncertain" in name}
    assert len(uncertain) == 5 and not set(groups) & set(LUMBAR_LEVELS)
    for group in uncertain.values():
        assert group.finding_sites[0].value.meaning == "Intervertebral disc"
    numbers = segment_number_map(seg)
    for k in range(1, 6):
        segment = seg.SegmentSequence[numbers[f"intervertebral disc {k} (level uncertain)"] - 1]
        assert "AnatomicRegionSequence" not in segment  # no level code
        assert _segment_number(groups[f"disc {k} (level uncertain)"]) == segment.SegmentNumber
    # The dropped L5-S1 voxels stay visible, in the label's own segment.
    assert "intervertebral_disc" in numbers


def _report_groups(seg, measurements, tmp_path: Path) -> dict:
    """SR measurement groups by tracking identifier, read back from a file that dciodvfy, DicomSRValidator and
    dcmqi's tid1500reader accept (dcmqi finding the same groups)."""
    sr = build_measurement_report(seg, measurement_groups(measurements), LABEL_MAP, ALGORITHM)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert sr_validator_errors(path) == []
    document = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    groups = {g.tracking_identifier: g for g in document.content.get_volumetric_roi_measurement_groups()}
    assert sorted(g["TrackingIdentifier"] for g in tid1500_read(path)["Measurements"]) == sorted(groups)
    return groups


def _segment_number(group) -> int:
    return int(group.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber)


def test_two_thighs_give_left_and_right_segments_and_volumes(tmp_path: Path) -> None:
    """The right-thigh phantom beside its mirror image (the left thigh) along patient x."""
    volume, labels, _ = _phantom("thigh", tmp_path / "thigh", 3)
    assert np.allclose(volume.volume.affine[:3, 2] / volume.pixel_spacing[1], [1.0, 0.0, 0.0])  # columns: +x, left
    datasets = []
    for ds in volume.datasets:
        wide = copy.deepcopy(ds)
        wide.PixelData = np.concatenate([ds.pixel_array, ds.pixel_array[:, ::-1]], axis=1).tobytes()
        wide.Columns = 2 * ds.Columns
        datasets.append(wide)
    both = series_to_volume(datasets)
    pair = np.concatenate([labels, labels[:, :, ::-1]], axis=2)

    # thighs run past the axial field of view: their volumes are the visible ones, not reported as biomarkers
    single = {m.label: _visible_cm3(m) for m in measure_series(volume, labels, "thigh", LABEL_MAP, []).rows()}
    measurements = measure_series(both, pair, "thigh", LABEL_MAP, [])
    volumes = {m.label: _visible_cm3(m) for m in measurements.rows()}
    present = {name: name.replace("_", " ") for name in single if name in LABEL_MAP.names}
    assert present and set(volumes) == {f"{shown} {side}" for shown in present.values() for side in ("right", "left")}
    for name, shown in present.items():
        assert volumes[f"{shown} right"] == pytest.approx(single[name], rel=1e-9)
        assert volumes[f"{shown} left"] == pytest.approx(single[name], rel=1e-9)

    seg = build_segmentation(both.datasets, pair, LABEL_MAP, ALGORITHM, instances=measurements.instances)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    assert dciodvfy_errors(seg_path) == []
    laterality = {str(item.SegmentLabel): item.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
                  for item in seg.SegmentSequence}
    assert laterality == {f"{shown} {side}": code.value for shown in present.values()
                          for side, code in (("right", RIGHT), ("left", LEFT))}
    uids = [ds.SOPInstanceUID for ds in both.datasets]
    assert np.array_equal(label_volume_from_seg(seg, uids, LABEL_MAP), pair)
    pixels = seg.get_pixels_by_source_instance(uids)
    numbers = segment_number_map(seg)
    half = labels.shape[2]
    for shown in present.values():  # the right thigh lies at smaller patient x: the image's left half
        assert not pixels[:, :, half:, numbers[f"{shown} right"] - 1].any()
        assert not pixels[:, :, :half, numbers[f"{shown} left"] - 1].any()

    groups = _report_groups(seg, measurements, tmp_path)
    for shown in present.values():
        for side, code in (("right", RIGHT), ("left", LEFT)):
            group = groups[f"{shown} {side}"]
            assert group.finding_sites[0].laterality.value == code.value
            assert _segment_number(group) == numbers[f"{shown} {side}"]


REPO = Path(__file__).resolve().parent.parent
REAL_SPINES = Path(os.environ.get("MSK_NODE_REAL_SPINES", REPO.parent / "shared" / "data" / "real-spine-sagittal"))
#: Datasets whose most inferior labelled vertebral body is S1 (True) or L5 (False); see the data's README.
REAL_LOWEST_IS_S1 = {"zukic-vb": True, "chu-vb": False, "myosegmentum-vb": False}


def _real_spine_cases() -> list[tuple[str, Path]]:
    return [(name, case) for name in REAL_LOWEST_IS_S1 if (REAL_SPINES / name).is_dir()
            for case in sorted((REAL_SPINES / name).iterdir()) if (case / "labels.nii.gz").is_file()]


@pytest.mark.skipif(not _real_spine_cases(), reason="real spine labels not available")
@pytest.mark.parametrize(("dataset", "case"), _real_spine_cases(), ids=lambda v: getattr(v, "name", v))
def test_real_spines_are_named_from_s1_and_never_from_l5(dataset: str, case: Path) -> None:
    """Manual vertebral bodies, discs drawn as the gaps between them: S1 below names every level; L5 below, none."""
    import nibabel as nib

    from msk_node_training.detector import with_gap_structures

    source = np.asarray(nib.load(case / "labels.nii.gz").dataobj)
    # Array axes (superior->inferior, anterior->posterior, left-right) to (sagittal slice, row, column).
    ids = source.transpose(2, 0, 1)
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # LPS; the side is unknown
    labels = np.where(ids > 0, BODY, 0).astype(np.uint8)
    labels = with_gap_structures(labels, LABEL_MAP, (DISC,), max_gap_mm=16.0, pixel_mm=1.0)
    discs = locate_discs(labels == DISC, ids > 0, affine)
    assert discs
    levels = [d.level for d in discs]
    if not REAL_LOWEST_IS_S1[dataset]:
        assert levels == [None] * len(discs)
        return
    # The level of each disc from the manual body labels below it (VerSe numbering: L1..L5 = 20..24, S1 = 26).
    names = {20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5", 26: "S1"}
    for disc, level in zip(discs, levels):
        if level is not None:
            below = ids[ndimage.binary_dilation(disc.mask, iterations=3) & (ids > 0)]
            inferior = max(set(below.tolist()))  # values grow inferiorly
            assert level.endswith(names[inferior]), (level, inferior)
    assert levels[-1] == "L5-S1" and len([level for level in levels if level]) >= 4


def _visible_cm3(measurement) -> float:
    return measurement.value if measurement.available else measurement.extra["visible_cm3"]
