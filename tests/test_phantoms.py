"""Synthetic MSK phantoms: DICOM validity, grid alignment of the truth, designed biomarkers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.morphology import skeletonize
from tests.dicom_checks import dciodvfy_errors

from msk_node.labels import DEFAULT_LABEL_MAP_PATH, load_label_map
from msk_node_phantoms import LABEL_VALUES, PHANTOM_KINDS, phantom_model, write_phantom
from msk_node_phantoms.grid import SeriesGrid

#: n_slices per kind for the shared fixtures: small where the test allows it.
_SLICES = {"knee": None, "thigh": 6, "spine": 5, "knee-t1rho": 24}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One phantom of each kind, seed 0."""
    root = tmp_path_factory.mktemp("phantoms")
    return {kind: write_phantom(kind, root / kind, seed=0, n_slices=_SLICES[kind]) for kind in PHANTOM_KINDS}


def _truth(out: Path) -> dict:
    return json.loads((out / "truth.json").read_text())


def _read_sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _read_pydicom(folder: Path) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Datasets sorted by InstanceNumber and their pixels, (slices, rows, columns)."""
    datasets = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))
    return datasets, np.stack([ds.pixel_array for ds in datasets]).astype(float)


def _labels(out: Path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(out / "truth_labels.nii.gz"))
    return image, sitk.GetArrayFromImage(image)


def _morphology(out: Path) -> Path:
    return out / next(s["folder"] for s in _truth(out)["series"] if s["role"] == "morphology")


# 1. Geometry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_truth_nifti_has_the_dicom_grid(phantoms: dict[str, Path], kind: str) -> None:
    out = phantoms[kind]
    dicom = _read_sitk(_morphology(out))
    labels, array = _labels(out)
    assert labels.GetSize() == dicom.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), dicom.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(labels.GetSpacing(), dicom.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(labels.GetDirection(), dicom.GetDirection(), atol=1e-4)
    assert array.dtype == np.uint8
    assert set(np.unique(array)) - {0} == set(_truth(out)["labels"].values())


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_every_series_is_readable_and_ordered_along_the_normal(phantoms: dict[str, Path], kind: str) -> None:
    out = phantoms[kind]
    truth = _truth(out)
    study_uids, frames = set(), set()
    for entry in truth["series"]:
        datasets, pixels = _read_pydicom(out / entry["folder"])
        first = datasets[0]
        assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(datasets) + 1))
        assert {ds.SeriesInstanceUID for ds in datasets} == {entry["series_instance_uid"]}
        assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
        assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert first.SeriesDescription == entry["description"]
        assert (first.Modality, first.Manufacturer, first.PhotometricInterpretation) == (
            "MR", "msk-node phantom", "MONOCHROME2")
        assert first.PatientID == f"PHANTOM-{kind.upper()}-0"
        assert pixels.max() < 4096 and pixels.max() > 1000
        iop = np.array(first.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        along = [float(np.dot(np.array(ds.ImagePositionPatient, dtype=float), normal)) for ds in datasets]
        np.testing.assert_allclose(np.diff(along), float(first.SpacingBetweenSlices), atol=1e-4)
        study_uids.add(first.StudyInstanceUID)
        frames.add(first.FrameOfReferenceUID)
        assert _read_sitk(out / entry["folder"]).GetSize() == (first.Columns, first.Rows, len(datasets))
    assert len(study_uids) == 1 and len(frames) == 1


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_dicom_objects_are_valid(phantoms: dict[str, Path], kind: str) -> None:
    for entry in _truth(phantoms[kind])["series"]:
        assert dciodvfy_errors(next((phantoms[kind] / entry["folder"]).glob("*.dcm"))) == []


# 2. Labels sit on the pixels they describe ------------------------------------------------------


def _mean(pixels: np.ndarray, mask: np.ndarray) -> float:
    assert mask.sum() > 50
    return float(pixels[mask].mean())


def test_knee_cartilage_is_brighter_than_bone_on_the_label_grid(phantoms: dict[str, Path]) -> None:
    out = phantoms["knee"]
    _, pixels = _read_pydicom(_morphology(out))
    _, labels = _labels(out)
    femur = _mean(pixels, labels == LABEL_VALUES["femur"])
    for name in ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage"):
        mask = labels == LABEL_VALUES[name]
        assert _mean(pixels, mask) > 1.8 * femur, name
        # A flipped label would land on other tissue: the contrast must drop.
        assert _mean(pixels, np.flip(mask, axis=1)) < 0.8 * _mean(pixels, mask), name
        assert _mean(pixels, np.flip(mask, axis=2)) < 0.8 * _mean(pixels, mask), name
    assert _mean(pixels, labels == LABEL_VALUES["meniscus"]) < 0.5 * femur


def test_thigh_cortex_is_darker_than_marrow_on_the_label_grid(phantoms: dict[str, Path]) -> None:
    out = phantoms["thigh"]
    _, pixels = _read_pydicom(_morphology(out))
    _, labels = _labels(out)
    cortex = _mean(pixels, labels == LABEL_VALUES["femoral_cortex"])
    assert cortex < 0.25 * _mean(pixels, labels == LABEL_VALUES["femoral_marrow"])
    assert _mean(pixels, labels == LABEL_VALUES["subcutaneous_fat"]) > 2.0 * _mean(
        pixels, labels == LABEL_VALUES["quadriceps"])


def test_spine_marrow_is_brighter_than_discs_on_the_label_grid(phantoms: dict[str, Path]) -> None:
    out = phantoms["spine"]
    _, pixels = _read_pydicom(_morphology(out))
    _, labels = _labels(out)
    bodies = _mean(pixels, labels == LABEL_VALUES["vertebral_body"])
    assert bodies > 1.3 * _mean(pixels, labels == LABEL_VALUES["intervertebral_disc"])


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_painted_labels_are_the_label_maps_own(phantoms: dict[str, Path], kind: str) -> None:
    """Every value the phantom paints is a label of the default label map, with the same name and anatomy."""
    label_map = load_label_map(DEFAULT_LABEL_MAP_PATH)
    assert LABEL_VALUES == {spec.name: spec.value for spec in label_map}
    anatomy = "knee" if kind == "knee-t1rho" else kind
    model_labels = {s.label for s in phantom_model(kind).structures if s.label}
    assert model_labels <= set(label_map.for_anatomy(anatomy).names)
    truth = _truth(phantoms[kind])
    _, labels = _labels(phantoms[kind])
    painted = {int(v) for v in np.unique(labels) if v}
    assert painted == set(truth["labels"].values())
    for name, value in truth["labels"].items():
        spec = label_map.by_value(value)
        assert (spec.name, spec.anatomy) == (name, anatomy)
    assert set(truth["labels"]) == model_labels


# 3. Cartilage thickness ----------------------------------------------------------------------------


def _pruned_skeleton(mask: np.ndarray, steps: int) -> np.ndarray:
    """Skeleton without its end branches: remove end points ``steps`` times."""
    skeleton = skeletonize(mask)
    for _ in range(steps):
        neighbours = ndimage.convolve(skeleton.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant") - 1
        skeleton &= neighbours > 1
    return skeleton


def _skeleton_thickness(mask: np.ndarray, spacing: float, design: float) -> float:
    """2 x mean Euclidean distance transform along the 2D skeleton, mm."""
    edt = ndimage.distance_transform_edt(mask, sampling=(spacing, spacing))
    skeleton = _pruned_skeleton(mask, int(np.ceil(design / spacing)))
    return 2.0 * float(edt[skeleton].mean())


def _central_slices(labels: np.ndarray, value: int) -> list[tuple[int, np.ndarray]]:
    """(slice, 2D mask) of the central half of each 3D plate of a label."""
    plates, n = ndimage.label(labels == value)
    result = []
    for plate in range(1, n + 1):
        ks = np.nonzero((plates == plate).any(axis=(1, 2)))[0]
        quarter = (ks.max() - ks.min()) / 4.0
        for k in range(int(np.ceil(ks.min() + quarter)), int(np.floor(ks.max() - quarter)) + 1):
            result.append((k, plates[k] == plate))
    return result


@pytest.mark.parametrize("name", ["femoral_cartilage", "tibial_cartilage", "patellar_cartilage"])
def test_designed_cartilage_thickness_is_recovered(phantoms: dict[str, Path], name: str) -> None:
    """Skeleton thickness over the central sagittal slices of each plate.

    On the anatomy sampled 4x finer in-plane (0.15 mm) the designed thickness comes back
    within 5 %. On the 0.6 mm truth grid the same measurement is quantised to pixels and
    reads high for thin plates (about +0.3 mm on 2 mm cartilage), so there it must only
    agree within one pixel.
    """
    out = phantoms["knee"]
    design = _truth(out)["biomarkers"]["cartilage_thickness_mm"][name]
    image, labels = _labels(out)
    grid = SeriesGrid(labels.shape, tuple(image.GetDirection()[0::3] + image.GetDirection()[1::3]),
                      (image.GetSpacing()[1], image.GetSpacing()[0]), image.GetSpacing()[2],
                      image.GetSpacing()[2], image.GetOrigin())
    model = phantom_model("knee", 0)
    lut = model.label_lut()
    value = LABEL_VALUES[name]
    native, fine = [], []
    for k, mask in _central_slices(labels, value):
        native.append(_skeleton_thickness(mask, grid.pixel_spacing[0], design))
        # Resample the continuous anatomy 4x finer over the plate's bounding box.
        rows, cols = np.nonzero(mask)
        j0, i0 = rows.min() - 4, cols.min() - 4
        shape = (1, 4 * (rows.max() - j0 + 4), 4 * (cols.max() - i0 + 4))
        corner = grid.slice_position(k) + i0 * grid.pixel_spacing[1] * grid.row_dir + j0 * grid.pixel_spacing[0] * grid.col_dir
        fine_grid = SeriesGrid(shape, grid.orientation, (grid.pixel_spacing[0] / 4, grid.pixel_spacing[1] / 4),
                               grid.slice_spacing, grid.slice_thickness, tuple(corner))
        x, y, z = fine_grid.points([0], [(0.0, 0.0)])
        plate, _ = ndimage.label(lut[model.structure_ids(x[0, 0], y[0, 0], z[0, 0])] == value)
        largest = plate == np.argmax(np.bincount(plate.ravel())[1:]) + 1
        fine.append(_skeleton_thickness(largest, fine_grid.pixel_spacing[0], design))
    assert len(fine) >= 4
    assert np.mean(fine) == pytest.approx(design, rel=0.05)
    assert abs(np.mean(native) - design) < grid.pixel_spacing[0]


# 4. Disc heights ----------------------------------------------------------------------------------


def _min_area_rectangle(points: np.ndarray) -> tuple[float, float]:
    """Sides (short, long) of the minimum-area enclosing rectangle, rotating calipers on the hull."""
    hull = points[ConvexHull(points).vertices]
    best = (np.inf, 0.0, 0.0)
    for a, b in zip(hull, np.roll(hull, -1, axis=0)):
        edge = (b - a) / np.linalg.norm(b - a)
        normal = np.array([-edge[1], edge[0]])
        along, across = hull @ edge, hull @ normal
        w, h = along.max() - along.min(), across.max() - across.min()
        if w * h < best[0]:
            best = (w * h, min(w, h), max(w, h))
    return best[1], best[2]


def test_disc_heights_match_the_design(phantoms: dict[str, Path]) -> None:
    out = phantoms["spine"]
    designed = _truth(out)["biomarkers"]["disc_height_mm"]
    assert list(designed) == ["T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"]
    image, labels = _labels(out)
    spacing = image.GetSpacing()[0]
    assert image.GetSpacing()[1] == spacing
    centre = labels.shape[0] // 2
    measured = np.zeros((3, len(designed)))
    for n, k in enumerate((centre - 1, centre, centre + 1)):
        discs, count = ndimage.label(labels[k] == LABEL_VALUES["intervertebral_disc"])
        assert count == len(designed)
        # Rows run superior -> inferior, so sorting by row gives T12-L1 first.
        order = np.argsort(ndimage.center_of_mass(discs > 0, discs, range(1, count + 1)), axis=0)[:, 0]
        for level, disc in enumerate(order + 1):
            short, long = _min_area_rectangle(np.argwhere(discs == disc).astype(float))
            assert long > 2.0 * short
            measured[n, level] = short * spacing
    np.testing.assert_allclose(measured.max(axis=0), list(designed.values()), atol=0.5)


# 5. Volumes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PHANTOM_KINDS)
def test_volumes_are_voxel_counts_times_voxel_volume(phantoms: dict[str, Path], kind: str) -> None:
    out = phantoms[kind]
    truth = _truth(out)
    image, labels = _labels(out)
    voxel_cm3 = float(np.prod(image.GetSpacing())) / 1000.0  # NIfTI stores spacing as float32
    assert set(truth["volumes_cm3"]) == set(truth["labels"])
    for name, value in truth["labels"].items():
        assert truth["volumes_cm3"][name] == pytest.approx(np.count_nonzero(labels == value) * voxel_cm3, rel=1e-6)
        assert truth["volumes_cm3"][name] > 0.0


# 6. T1rho -----------------------------------------------------------------------------------------


def test_t1rho_fit_recovers_the_designed_values(phantoms: dict[str, Path]) -> None:
    out = phantoms["knee-t1rho"]
    truth = _truth(out)
    spin_lock = sorted((s for s in truth["series"] if s["role"] == "spin_lock"), key=lambda s: s["spin_lock_time_ms"])
    assert [s["spin_lock_time_ms"] for s in spin_lock] == [1.0, 10.0, 30.0, 60.0]
    morph_sets, _ = _read_pydicom(_morphology(out))
    series = [_read_pydicom(out / s["folder"]) for s in spin_lock]
    first = series[0][0][0]
    assert {int(sets[0].SeriesNumber) for sets, _ in series} == {int(first.SeriesNumber)}
    assert [float(sets[0].EchoTime) for sets, _ in series] == [1.0, 10.0, 30.0, 60.0]
    assert float(first.SliceThickness) == 3.0 != float(morph_sets[0].SliceThickness)
    morph_x = {round(float(ds.ImagePositionPatient[0]), 3) for ds in morph_sets}
    spin_x = [float(ds.ImagePositionPatient[0]) for ds in series[0][0]]
    assert not morph_x & {round(v, 3) for v in spin_x}
    assert np.mean(spin_x) - np.mean(sorted(morph_x)) == pytest.approx(0.7, abs=1e-3)

    # Voxels whose 2x2 sub-samples (and a margin) all lie in one structure of the continuous anatomy.
    image = _read_sitk(out / spin_lock[0]["folder"])
    grid = SeriesGrid(image.GetSize()[::-1], tuple(float(v) for v in first.ImageOrientationPatient),
                      tuple(float(v) for v in first.PixelSpacing), image.GetSpacing()[2], 3.0, image.GetOrigin())
    model = phantom_model("knee-t1rho", 0)
    offsets = [(0.0, 0.0)] + [(dj, di) for dj in (-0.5, 0.5) for di in (-0.5, 0.5)]
    ids = np.concatenate([model.structure_ids(*grid.points([k], offsets)) for k in range(grid.size[0])], axis=1)
    pure = (ids == ids[0]).all(axis=0)
    signal = np.stack([pixels for _, pixels in series])
    tsl = np.array([1.0, 10.0, 30.0, 60.0])
    names = [s.name for s in model.structures]
    split = truth["biomarkers"]["medial_lateral_split_x_mm"]
    x_centre = grid.points(range(grid.size[0]), [(0.0, 0.0)])[0][0]
    for structure in ("femoral_cartilage", "tibial_cartilage_medial", "tibial_cartilage_lateral", "patellar_cartilage"):
        voxels = pure & (ids[0] == names.index(structure))
        assert voxels.sum() >= 20, structure
        if structure.startswith("tibial"):
            assert ((x_centre[voxels] > split) == structure.endswith("medial")).all()
        logs = np.log(signal[:, voxels])
        slope = np.polyfit(tsl, logs, 1)[0]
        fitted = float(np.median(-1.0 / slope))
        assert fitted == pytest.approx(truth["biomarkers"]["t1rho_ms"][structure], rel=0.05), structure


# 7-8. Determinism and appearance randomisation ------------------------------------------------------


def test_same_seed_gives_identical_pixels_and_other_seeds_other_shapes(tmp_path: Path) -> None:
    a = write_phantom("knee", tmp_path / "a", seed=3, n_slices=4)
    b = write_phantom("knee", tmp_path / "b", seed=3, n_slices=4)
    c = write_phantom("knee", tmp_path / "c", seed=4, n_slices=4)
    sets_a, pixels_a = _read_pydicom(_morphology(a))
    sets_b, pixels_b = _read_pydicom(_morphology(b))
    np.testing.assert_array_equal(pixels_a, pixels_b)
    assert [ds.SOPInstanceUID for ds in sets_a] == [ds.SOPInstanceUID for ds in sets_b]
    assert _truth(a) == _truth(b)
    labels_a, labels_c = _labels(a)[1], _labels(c)[1]
    assert np.mean(labels_a != labels_c) > 0.01
    assert _truth(a)["biomarkers"] != _truth(c)["biomarkers"]


def test_randomised_appearance_changes_intensities_not_labels(tmp_path: Path) -> None:
    fixed = write_phantom("thigh", tmp_path / "fixed", seed=2, n_slices=3)
    looks = [write_phantom("thigh", tmp_path / f"random{seed}", seed=seed, n_slices=3, randomize_appearance=True)
             for seed in (2, 5)]
    _, labels = _labels(fixed)
    np.testing.assert_array_equal(_labels(looks[0])[1], labels)
    assert _truth(looks[0])["volumes_cm3"] == _truth(fixed)["volumes_cm3"]
    _, pixels = _read_pydicom(_morphology(fixed))
    _, random_pixels = _read_pydicom(_morphology(looks[0]))
    tissue = labels > 0
    assert abs(np.corrcoef(pixels[tissue], random_pixels[tissue])[0, 1]) < 0.95
    assert _read_pydicom(_morphology(looks[0]))[0][0].SeriesInstanceUID != \
        _read_pydicom(_morphology(fixed))[0][0].SeriesInstanceUID

    def contrast(out: Path) -> np.ndarray:
        _, px = _read_pydicom(_morphology(out))
        lab = _labels(out)[1]
        return np.array([px[lab == v].mean() for v in range(8, 16)]) / px[lab > 0].mean()

    assert np.abs(contrast(looks[0]) - contrast(looks[1])).max() > 0.2
