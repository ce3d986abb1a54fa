"""``msk-train preprocess``: slices keep their patient geometry, configs and splits fail loudly."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import yaml

from msk_node.intensity import normalise_volume
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, load_label_map
from msk_node_phantoms import write_phantom
from msk_node_training.boxes import instance_boxes
from msk_node_training.cli import main
from msk_node_training.preprocess import (
    SLICE_COLUMNS,
    SUBJECT_COLUMNS,
    assign_splits,
    load_preprocess_config,
    preprocess,
)

REPO = Path(__file__).resolve().parent.parent
REAL_KNEE = Path(os.environ.get("MSK_NODE_REAL_KNEE", REPO.parent / "shared" / "data" / "knee-mri-ge-3t"))
LABEL_MAP = load_label_map(DEFAULT_LABEL_MAP_PATH)
FEMUR, TIBIA, PATELLA = (LABEL_MAP.by_name(name).value for name in ("femur", "tibia", "patella"))


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dicom_subject(case: Path, **extra) -> dict:
    return {"id": "knee", "image": str(case / "dicom"), **extra}


def npz(out: Path, row) -> dict[str, np.ndarray]:
    with np.load(out / row.image_file) as arrays:
        return dict(arrays)


@pytest.fixture(scope="module")
def knee(tmp_path_factory) -> Path:
    """A 6-slice sagittal knee phantom, plus its series as NIfTI three ways (as stored, flipped, permuted)."""
    case = write_phantom("knee", tmp_path_factory.mktemp("knee") / "case", seed=5, n_slices=6)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(case / "dicom" / "sag_3d_dess")))
    image = reader.Execute()
    labels = sitk.ReadImage(str(case / "truth_labels.nii.gz"))
    sitk.WriteImage(image, str(case / "image.nii.gz"))
    # Same voxels in patient space, stored in another index order: rows and slices reversed ...
    flip = [False, True, True]
    sitk.WriteImage(sitk.Flip(image, flip), str(case / "flipped.nii.gz"))
    sitk.WriteImage(sitk.Flip(labels, flip), str(case / "flipped_labels.nii.gz"))
    # ... or columns and slices reversed and the slice axis stored first, one file per label.
    permuted = sitk.PermuteAxes(sitk.Flip(image, [True, False, True]), [2, 0, 1])
    sitk.WriteImage(permuted, str(case / "permuted.nii.gz"))
    permuted_labels = sitk.PermuteAxes(sitk.Flip(labels, [True, False, True]), [2, 0, 1])
    array = sitk.GetArrayFromImage(permuted_labels)
    for name, value in (("femur", FEMUR), ("tibia", TIBIA), ("patella", PATELLA)):
        mask = sitk.GetImageFromArray((array == value).astype(np.uint8))
        mask.CopyInformation(permuted_labels)
        sitk.WriteImage(mask, str(case / f"permuted_{name}.nii.gz"))
    return case


@pytest.fixture(scope="module")
def knee_run(knee, tmp_path_factory) -> Path:
    """The phantom as DICOM (listed, and found under a root) and as three NIfTI datasets, via the CLI at 256 px."""
    work = tmp_path_factory.mktemp("run")
    config = write_config(work / "preprocess.yaml", {
        "datasets": [
            {"name": "dicom", "format": "dicom", "subjects": [dicom_subject(
                knee, labels=str(knee / "truth_labels.nii.gz"), metadata={"cohort": "phantom"})]},
            {"name": "rooted", "format": "dicom", "root": str(knee.parent), "image": "dicom",
             "labels": "truth_labels.nii.gz"},
            {"name": "nifti", "format": "nifti", "subjects": [
                {"id": "knee", "image": str(knee / "image.nii.gz"), "labels": str(knee / "truth_labels.nii.gz")}]},
            {"name": "flipped", "format": "nifti", "subjects": [
                {"id": "knee", "image": str(knee / "flipped.nii.gz"),
                 "labels": str(knee / "flipped_labels.nii.gz")}]},
            {"name": "permuted", "format": "nifti", "plane": "sagittal", "subjects": [
                {"id": "knee", "image": str(knee / "permuted.nii.gz"),
                 "labels": {name: str(knee / f"permuted_{name}.nii.gz") for name in ("femur", "tibia", "patella")}}]},
        ],
        "image_size": 256,
        "splits": {"train": 1.0},
    })
    assert main(["preprocess", str(config), "--out", str(work / "out")]) == 0
    return work / "out"


def test_flipped_and_permuted_files_really_store_another_order(knee):
    plain = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "image.nii.gz")))
    assert not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "flipped.nii.gz"))), plain)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "permuted.nii.gz"))).shape != plain.shape


def test_dicom_slices_are_the_source_instances_normalised(knee, knee_run):
    slices = pd.read_parquet(knee_run / "slices.parquet").query("dataset == 'dicom'")
    files = [pydicom.dcmread(path) for path in sorted((knee / "dicom").rglob("*.dcm"))]
    normalised = normalise_volume(np.stack([ds.pixel_array.astype(np.float32) for ds in files]))
    by_uid = {str(ds.SOPInstanceUID): index for index, ds in enumerate(files)}
    normal = np.cross(*np.reshape(files[0].ImageOrientationPatient, (2, 3)))
    assert len(slices) == len(files)
    assert np.all(np.diff([np.dot(normal, p) for p in slices.image_position_patient]) != 0)
    for row in slices.itertuples():
        source = by_uid[row.sop_instance_uid]
        assert np.allclose(row.image_position_patient, files[source].ImagePositionPatient)
        assert np.allclose(row.image_orientation_patient, files[source].ImageOrientationPatient)
        image = npz(knee_run, row)["image"]
        assert image.shape == (3, 256, 256) and image.dtype == np.float32
        for channel in image:  # 256 px phantom at 256 px: no resampling
            assert np.allclose(channel, normalised[source] / 255.0, atol=1e-6)


def test_masks_match_truth_at_the_same_patient_position(knee, knee_run):
    truth = sitk.ReadImage(str(knee / "truth_labels.nii.gz"))
    truth_array = sitk.GetArrayFromImage(truth)
    slices = pd.read_parquet(knee_run / "slices.parquet").query("dataset == 'dicom'")
    for row in slices.itertuples():
        i, j, k = truth.TransformPhysicalPointToIndex([float(v) for v in row.image_position_patient])
        assert (i, j) == (0, 0)
        mask = npz(knee_run, row)["mask"]
        for value in (FEMUR, TIBIA, PATELLA):
            assert np.array_equal(mask == value, truth_array[k] == value)


@pytest.mark.parametrize("dataset", ["rooted", "nifti", "flipped", "permuted"])
def test_other_sources_match_the_dicom_slices(knee_run, dataset):
    slices = pd.read_parquet(knee_run / "slices.parquet")
    dicom, nifti = slices.query("dataset == 'dicom'"), slices.query("dataset == @dataset")
    assert list(nifti.slice_index) == list(dicom.slice_index)
    for ref, row in zip(dicom.itertuples(), nifti.itertuples()):
        assert np.allclose(row.image_position_patient, ref.image_position_patient, atol=1e-3)
        assert np.allclose(row.image_orientation_patient, ref.image_orientation_patient, atol=1e-6)
        expected, found = npz(knee_run, ref), npz(knee_run, row)
        assert np.array_equal(found["image"], expected["image"])
        if dataset == "permuted":  # only femur, tibia and patella have files
            expected["mask"] = np.where(np.isin(expected["mask"], [FEMUR, TIBIA, PATELLA]), expected["mask"], 0)
        assert np.array_equal(found["mask"], expected["mask"])
        assert (found["mask"] == FEMUR).sum() > 1000


def test_tables_have_the_documented_columns_and_spacing(knee_run):
    slices = pd.read_parquet(knee_run / "slices.parquet")
    subjects = pd.read_parquet(knee_run / "subjects.parquet")
    assert list(slices.columns) == list(SLICE_COLUMNS)
    assert list(subjects.columns[: len(SUBJECT_COLUMNS)]) == list(SUBJECT_COLUMNS)
    assert np.allclose(slices[["pixel_spacing_row", "pixel_spacing_column"]], 0.6)
    assert np.allclose(slices.slice_thickness, 2.0) and np.allclose(slices.spacing_between_slices, 2.0)
    assert slices.sop_instance_uid.notna().groupby(slices.dataset).all().to_dict() == {
        "dicom": True, "rooted": True, "nifti": False, "flipped": False, "permuted": False}
    dicom = subjects.set_index("dataset").loc["dicom"]
    assert (dicom.field_strength, dicom.repetition_time, dicom.echo_time, dicom.flip_angle) == (3.0, 25.0, 7.5, 30.0)
    assert (dicom.manufacturer, dicom.sex, dicom.cohort, dicom.n_slices) == ("msk-node phantom", "O", "phantom", 6)
    assert set(subjects.split) == {"train"} and set(slices.split) == {"train"}
    summary = pd.read_csv(knee_run / "summary.csv")
    assert summary.slices.tolist() == [6] * 5
    assert (knee_run / "config.yaml").is_file() and (knee_run / "label_map.yaml").is_file()


def test_yolo_labels_are_the_boxes_of_the_masks(knee_run):
    slices = pd.read_parquet(knee_run / "slices.parquet")
    assert slices.n_boxes.sum() > 0
    for row in slices.itertuples():
        mask = npz(knee_run, row)["mask"]
        expected = sorted(
            (LABEL_MAP.by_value(value).class_id, (x0 + x1 + 1) / 512, (y0 + y1 + 1) / 512,
             (x1 - x0 + 1) / 256, (y1 - y0 + 1) / 256)
            for value, (x0, y0, x1, y1) in instance_boxes(mask, list(LABEL_MAP.values), min_pixels=1))
        lines = (knee_run / row.label_file).read_text().split()
        found = sorted((int(c), *map(float, box)) for c, *box in zip(*[iter(lines)] * 5))
        assert len(found) == len(expected) == row.n_boxes
        for (class_id, *box), (want_id, *want) in zip(found, expected):
            assert class_id == want_id and np.allclose(box, want, atol=1e-6)


@pytest.mark.skipif(not (REAL_KNEE / "dess-echo1").is_dir(), reason=f"real knee data not found at {REAL_KNEE}")
def test_real_knee_dess_without_labels(tmp_path):
    series = REAL_KNEE / "dess-echo1"
    config = load_preprocess_config(write_config(tmp_path / "real.yaml", {
        "datasets": [{"name": "oai_like", "format": "dicom", "subjects": [{"id": "knee01", "image": str(series)}]}],
        "image_size": 256, "splits": {"train": 1.0}}))
    out = preprocess(config, tmp_path / "out")

    slices = pd.read_parquet(out / "slices.parquet")
    subject = pd.read_parquet(out / "subjects.parquet").iloc[0]
    assert len(slices) == 80 and not (out / "labels").exists() and slices.label_file.isna().all()
    assert np.allclose(slices[["pixel_spacing_row", "pixel_spacing_column"]], 0.3125)
    assert np.allclose(slices.slice_thickness, 1.5) and np.allclose(slices.spacing_between_slices, 1.5)
    assert (subject.field_strength, subject.repetition_time, subject.echo_time, subject.flip_angle) == (
        3.0, 25.0, 7.48, 30.0)
    assert subject.manufacturer == "GE MEDICAL SYSTEMS" and not subject.labelled
    assert subject.sex is None and pd.isna(subject.age)  # PatientSex empty, PatientAge '000Y'

    files = [pydicom.dcmread(path) for path in sorted(series.glob("*.dcm"))]
    normalised = normalise_volume(np.stack([ds.pixel_array.astype(np.float32) for ds in files]))
    by_uid = {str(ds.SOPInstanceUID): index for index, ds in enumerate(files)}
    for row in slices.iloc[[0, 17, 40, 79]].itertuples():
        source = by_uid[row.sop_instance_uid]
        # Positions are on the regular grid through the instances; the scanner rounded them to 0.1 um.
        assert np.allclose(row.image_position_patient, files[source].ImagePositionPatient, atol=1e-3)
        arrays = npz(out, row)
        assert set(arrays) == {"image"}
        # 512 -> 256 bilinear is the mean of each 2 x 2 block: rows stay rows, columns stay columns.
        blocks = normalised[source].astype(np.float64).reshape(256, 2, 256, 2).mean(axis=(1, 3)) / 255.0
        assert np.allclose(arrays["image"], blocks[None], atol=1e-5)


def base_config(knee: Path) -> dict:
    return {"datasets": [{"name": "knee", "format": "dicom", "subjects": [dicom_subject(knee)]}],
            "image_size": 256, "splits": {"train": 1.0}}


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(imagesize=256), "unknown key 'imagesize'"),
    (lambda c: c["datasets"][0].update(rot="data"), "unknown key 'datasets[0].rot'"),
    (lambda c: c["datasets"][0]["subjects"][0].update(label="x"), "unknown key 'datasets[0].subjects[0].label'"),
    (lambda c: c.update(image_size="256"), "key 'image_size' must be an integer, got str"),
    (lambda c: c.update(min_object_pixels=True), "key 'min_object_pixels' must be an integer"),
    (lambda c: c["datasets"][0]["subjects"][0].update(image=5),
     "key 'datasets[0].subjects[0].image' must be a string"),
    (lambda c: c["datasets"][0].update(label_names={1: "femr"}), "key 'datasets[0].label_names.1': 'femr'"),
    (lambda c: c["datasets"][0].update(format="dcm"), "key 'datasets[0].format' must be one of dicom, nifti"),
    (lambda c: c["datasets"][0].update(root="data"), "datasets[0]: give exactly one of 'root' and 'subjects'"),
    (lambda c: c["datasets"][0].update(plane="sagittal"), "key 'datasets[0].plane'"),
    (lambda c: c.update(splits={"train": 0.7, "val": 0.2}), "key 'splits' must give ratios that sum to 1"),
    (lambda c: c.update(splits={"train": 0.7, "tset": 0.3}), "unknown key 'splits.tset'"),
])
def test_config_errors_name_the_key(knee, tmp_path, change, message):
    config = base_config(knee)
    change(config)
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(ValueError) as error:
        load_preprocess_config(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_example_config_is_valid():
    config = load_preprocess_config(REPO / "training" / "configs" / "preprocess_example.yaml")
    assert config.image_size == 1024 and config.splits == {"train": 0.7, "val": 0.15, "test": 0.15}


def shifted(image: sitk.Image, mm: float) -> sitk.Image:
    moved = sitk.Image(image)
    moved.SetOrigin([v + mm for v in image.GetOrigin()])
    return moved


@pytest.mark.parametrize(("fmt", "image_file", "make_labels", "difference"), [
    ("dicom", None, lambda labels: labels[:, :, 1:], "shape [5, 256, 256] vs [6, 256, 256]"),
    ("dicom", None, lambda labels: shifted(labels, 1.0), "first voxel (mm)"),
    ("nifti", "image.nii.gz", lambda labels: shifted(labels, 0.3), "first voxel (mm)"),
])
def test_labels_off_the_image_grid_are_an_error_naming_both_files(knee, tmp_path, fmt, image_file, make_labels,
                                                                  difference):
    labels = tmp_path / "labels.nii.gz"
    sitk.WriteImage(make_labels(sitk.ReadImage(str(knee / "truth_labels.nii.gz"))), str(labels))
    image = knee / image_file if image_file else knee / "dicom"
    config = {"datasets": [{"name": "knee", "format": fmt,
                            "subjects": [{"id": "knee", "image": str(image), "labels": str(labels)}]}],
              "image_size": 256, "splits": {"train": 1.0}}
    with pytest.raises(ValueError, match="is not on the voxel grid") as error:
        preprocess(load_preprocess_config(write_config(tmp_path / "c.yaml", config)), tmp_path / "out")
    assert str(labels) in str(error.value) and str(image) in str(error.value) and difference in str(error.value)


def cohort(n_female: int, n_male: int) -> pd.DataFrame:
    sexes = ["F"] * n_female + ["M"] * n_male
    return pd.DataFrame({"dataset": "knee", "subject": [f"s{i:02d}" for i in range(len(sexes))], "sex": sexes})


def test_splits_are_reproducible_stratified_and_sized():
    subjects = cohort(24, 16)
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    first = assign_splits(subjects, ratios, "sex", seed=7)
    assert first.equals(assign_splits(subjects, ratios, "sex", seed=7))
    assert not first.equals(assign_splits(subjects, ratios, "sex", seed=8))
    counts = pd.crosstab(first, subjects.sex)
    assert counts.sum(axis=1).to_dict() == {"test": 6, "train": 28, "val": 6}
    for split, size in counts.sum(axis=1).items():
        assert abs(counts.loc[split, "F"] - 0.6 * size) <= 1, counts


def test_splits_are_drawn_per_dataset():
    subjects = pd.concat([cohort(10, 10), cohort(6, 4).assign(dataset="thigh")], ignore_index=True)
    splits = assign_splits(subjects, {"train": 0.8, "test": 0.2}, "sex", seed=0)
    assert pd.crosstab(subjects.dataset, splits).to_dict("index") == {
        "knee": {"test": 4, "train": 16}, "thigh": {"test": 2, "train": 8}}


def test_empty_or_unstratifiable_splits_are_errors(knee, tmp_path):
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    with pytest.raises(ValueError, match=r"4 subject\(s\) at ratios .* leave split 'test' empty"):
        assign_splits(cohort(2, 2), ratios)
    with pytest.raises(ValueError, match="no subject column 'bmi'"):
        assign_splits(cohort(10, 10), ratios, "bmi")
    with pytest.raises(ValueError, match="stratified by 'sex'"):
        assign_splits(cohort(19, 1), ratios, "sex")
    config = load_preprocess_config(write_config(tmp_path / "c.yaml", {**base_config(knee), "splits": ratios}))
    with pytest.raises(ValueError, match="dataset 'knee': 1 subject"):
        preprocess(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before any subject is processed
