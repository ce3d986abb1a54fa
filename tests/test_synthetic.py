"""Synthetic MR images from real knee label maps, and the real training sources."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from msk_node.intensity import normalise_volume
from msk_node.labels import load_label_map
from msk_node_training.detector import fit_detector, load_detector_config, with_gap_structures
from msk_node_training.sources import load_real_data, oriented_case, read_case
from msk_node_training.synthetic import PLANES, SynthesisSettings, synthesize, write_synthetic

REPO = Path(__file__).resolve().parent.parent
REAL_DATA = REPO / "training" / "configs" / "real_data.yaml"
LABEL_MAP = load_label_map(REPO / "models" / "detector" / "label_map.yaml")
SMALL = SynthesisSettings(matrix=(72, 96), max_slices=12)


def _real_data():
    try:
        return load_real_data(REAL_DATA)
    except FileNotFoundError as error:
        pytest.skip(f"shared data not here: {error}")


@pytest.fixture(scope="module")
def knee_b():
    """The label map with every structure: bones, cartilage plates, menisci and the fibula."""
    return next(m for m in _real_data().knee_label_maps if m.path.name.startswith("knee-b"))


def test_the_same_seed_gives_the_same_series_and_another_seed_another(knee_b):
    first, again, other = (synthesize(knee_b, LABEL_MAP, seed, SMALL) for seed in (3, 3, 4))
    assert np.array_equal(first.pixels, again.pixels) and np.array_equal(first.labels, again.labels)
    assert first.grid == again.grid
    assert first.grid != other.grid or not np.array_equal(first.pixels, other.pixels)


def test_without_deformation_the_truth_keeps_the_label_maps_volumes(knee_b):
    """Scale 1, no rotation or elastic warp, a slab covering the knee: volumes within a few per cent."""
    still = replace(SynthesisSettings(), plane_weights={"sagittal": 1.0}, oblique_deg=0.0, rotation_deg=0.0,
                    scale=(1.0, 1.0), anisotropy=0.0, elastic_mm=0.0, slab_offset=0.0, in_plane_offset_mm=0.0,
                    fov_mm=(170.0, 170.0), matrix=(340, 340), slice_thickness_mm=(0.7, 0.7), max_slices=400,
                    slab_coverage=(1.1, 1.1), mirror_probability=0.0)
    case = synthesize(knee_b, LABEL_MAP, 1, still)
    source = sitk.ReadImage(str(knee_b.path))
    source_voxel = np.prod(source.GetSpacing())
    source_counts = np.bincount(sitk.GetArrayViewFromImage(source).ravel(), minlength=16)
    voxel = case.grid.pixel_spacing[0] * case.grid.pixel_spacing[1] * case.grid.slice_spacing
    counts = np.bincount(case.labels.ravel(), minlength=32)
    for values, name in (((1,), "femoral_cartilage"), ((2, 3), "tibial_cartilage"), ((7,), "patella"),
                         ((9, 10), "meniscus")):
        expected = source_counts[list(values)].sum() * source_voxel
        found = counts[LABEL_MAP.by_name(name).value] * voxel
        assert found == pytest.approx(expected, rel=0.05), name
    # the fibula is drawn as bone but is never a target
    assert set(np.unique(case.labels)) <= {0, *(LABEL_MAP.by_name(n).value for n in knee_b.names.values())}


def test_a_written_case_reads_back_as_a_dicom_series_with_its_exact_truth(knee_b, tmp_path):
    folder = write_synthetic(knee_b, LABEL_MAP, tmp_path / "case", seed=5, settings=SMALL)
    case = synthesize(knee_b, LABEL_MAP, 5, SMALL)
    images, labels, spacing = read_case(folder)
    # the node stacks slices in highdicom's right-handed order, against the row x column normal
    assert np.array_equal(labels, case.labels[::-1])
    assert np.array_equal(images, normalise_volume(case.pixels.astype(np.float32))[::-1])
    assert spacing == pytest.approx((case.grid.slice_spacing, *case.grid.pixel_spacing))
    truth = sitk.ReadImage(str(folder / "truth_labels.nii.gz"))
    assert np.allclose(truth.GetOrigin(), case.grid.origin, atol=1e-4)


def test_images_are_more_than_labelled_shapes_on_black_and_the_crops_vary(knee_b):
    """Each plane, tissue around the anatomy, and slabs that reach past the target anatomy."""
    empty_slices, with_soft_tissue = 0, 0
    for seed in range(6):
        plane = ("sagittal", "coronal", "axial")[seed % 3]
        case = synthesize(knee_b, LABEL_MAP, seed, replace(SMALL, plane_weights={plane: 1.0}, max_slices=40))
        # the slice normal stays within the obliquity of the plane's own normal
        expected = np.cross(*np.reshape(PLANES[plane], (2, 3)))
        assert case.plane == plane and abs(case.grid.normal @ expected) > np.cos(np.deg2rad(25))
        empty_slices += int(((case.labels > 0).sum(axis=(1, 2)) == 0).sum())
        background = case.pixels[case.labels == 0].astype(float)
        anatomy = case.pixels[case.labels > 0].astype(float)
        # soft tissue: a good share of the unlabelled voxels is far above the air's level (unless its
        # random intensity was drawn dark, as in a fat-suppressed image)
        with_soft_tissue += (background > 0.15 * np.percentile(anatomy, 90)).mean() > 0.3
    assert with_soft_tissue >= 4
    assert empty_slices > 0


def test_discs_between_vertebral_bodies_fill_the_gap_and_a_missing_level_does_not():
    body, disc = LABEL_MAP.by_name("vertebral_body").value, LABEL_MAP.by_name("intervertebral_disc").value
    labels = np.zeros((1, 100, 40), np.uint8)
    labels[0, 10:30, 10:30] = body
    labels[0, 38:58, 12:32] = body   # 8 px gap: a disc
    labels[0, 90:99, 10:30] = body   # 32 px gap: a missing level, not a disc
    filled = with_gap_structures(labels, LABEL_MAP, (disc,), max_gap_mm=16.0, pixel_mm=1.0)
    assert (filled[0, 30:38, 12:30] == disc).all()
    assert (filled[0, 58:90] != disc).all()
    assert (filled == disc).sum() == 8 * 18
    assert np.array_equal(filled[filled != disc], labels[filled != disc])


def test_a_sagittal_nifti_is_read_like_a_dicom_sagittal_stack(tmp_path):
    """Axis 0 superior->inferior, axis 1 anterior->posterior, axis 2 left-right (the real spine files)."""
    shape = (30, 20, 5)
    image = np.zeros(shape, np.uint8)
    image[0:3, 0:2, :] = 200  # superior and anterior corner
    affine = np.array([[0, 0, 1, 0], [0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], float)
    for name in ("image", "labels"):
        nib.save(nib.Nifti1Image(image, affine), tmp_path / f"{name}.nii.gz")
    array, labels, spacing = oriented_case(tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz")
    assert array.shape == (5, 30, 20)  # slices, rows (superior->inferior), columns (anterior->posterior)
    assert (array[:, :3, :2] == 200).all() and array.sum() == 200 * 3 * 2 * 5
    assert np.array_equal(array, labels) and spacing == (1.0, 1.0, 1.0)


def test_real_data_config_errors_name_the_key_and_missing_files(tmp_path, monkeypatch):
    text = REAL_DATA.read_text()
    (tmp_path / "typo.yaml").write_text(text + "extra_key: 1\n")
    with pytest.raises(ValueError, match="extra_key"):
        load_real_data(tmp_path / "typo.yaml")
    (tmp_path / "missing.yaml").write_text(text.replace("knee-a.nii.gz", "knee-z.nii.gz"))
    monkeypatch.delenv("MSK_NODE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="knee-z"):
        load_real_data(tmp_path / "missing.yaml")


def test_detector_config_names_a_wrong_key_and_missing_initial_weights(tmp_path):
    config_path = REPO / "training" / "configs" / "default_detector.yaml"
    (tmp_path / "typo.yaml").write_text(config_path.read_text() + "init_weight: x.pt\n")
    with pytest.raises(ValueError, match="init_weight"):
        load_detector_config(tmp_path / "typo.yaml")
    (tmp_path / "missing.yaml").write_text(config_path.read_text().replace(
        "runs/detector-phantom/yolo/train/weights/best.pt", str(tmp_path / "none.pt")))
    config = load_detector_config(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="none.pt"):
        fit_detector(config, tmp_path / "data.yaml", tmp_path / "run")
