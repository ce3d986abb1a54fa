"""``msk-train preprocess``: labelled MRI to the papers' training slices, masks, boxes and tables.

A subject is a DICOM series folder, or a NIfTI image (anything SimpleITK reads) with
either one multi-label volume or one volume per label, or no labels at all. Per subject:

* Geometry: DICOM goes through :func:`msk_node.volume.series_to_volume`. NIfTI is
  permuted and flipped, never resampled, into the slice, row and column directions a
  DICOM series of the same plane has there, so slice ``k`` shows the same anatomy
  the same way up in both formats. A label volume must lie on its image's voxel grid.
* Image: 1st-99th percentile of the non-zero voxels to 0-255 per volume
  (:func:`~msk_node.intensity.normalise_volume`), each slice onto the square model
  frame (:class:`~msk_node.intensity.SquareFrame`): ``image_size``, 0-1, 3 channels.
* Masks: source values mapped to label-map values (others dropped), components under
  ``min_object_voxels`` in 3D, then under ``min_object_pixels`` per slice removed,
  nearest neighbour onto a ``mask_size`` frame.
* Boxes: one per label and 2D component, as YOLO label files.
* Tables and subject-level splits, stratified by a subject column.

Config (YAML)::

    datasets:                          # required, non-empty
      - name: knee_dess                # letters, digits, '.', '_', '-'; names the output folders
        format: dicom                  # dicom | nifti
        root: data/knee-dess           # one sub-folder per subject ...
        image: dicom                   #   path of the image inside it (default: the folder
                                       #   itself for dicom, image.nii.gz for nifti)
        labels: labels.nii.gz          #   one multi-label file, or {label name: file}
        label_names: {1: femur}        # source value -> label name; default: the label
                                       # map's own values
        series: DESS                   # dicom: part of SeriesDescription when a folder
                                       # holds several series
      - name: thigh
        format: nifti
        plane: axial                   # nifti: sagittal | coronal | axial; default: the
                                       # plane across the file's third axis
        subjects:                      # ... or an explicit list
          - id: s01
            image: data/thigh/s01.nii.gz
            labels: {quadriceps: data/thigh/s01_quad.nii.gz}
            metadata: {sex: F, age: 54}   # extra subject columns
    output: runs/preprocess            # default; `--out` overrides
    label_map: models/detector/label_map.yaml   # default: the node's label map
    image_size: 1024
    mask_size: 256                     # default: image_size
    min_object_pixels: 100             # 2D, 8-connected
    min_object_voxels: 1000            # 3D, 26-connected
    splits: {train: 0.7, val: 0.15, test: 0.15}   # per dataset, by subject
    stratify: sex                      # a subject column, or null
    seed: 0

Relative paths are taken from the working directory.

Output layout::

    config.yaml                              the config as read
    label_map.yaml                           voxel values and class ids of masks and labels
    images/<dataset>/<subject>/<k:04d>.npz   image: float32 (3, image_size, image_size), 0-1;
                                             mask: uint8 (mask_size, mask_size) label values
    labels/<dataset>/<subject>/<k:04d>.txt   YOLO lines "class_id cx cy w h" on the square frame
    slices.parquet                           one row per slice: SLICE_COLUMNS
    subjects.parquet                         one row per subject: SUBJECT_COLUMNS + metadata
    summary.csv                              subjects, slices and boxes per dataset and split

Slice ``k`` is the index along the volume's slice axis; DICOM slices missing from a
series (gaps) are not written. Unlabelled subjects get images only (no ``mask``, no
label file): an unlabelled slice is not an empty one.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
import yaml
from highdicom import Volume
from pydicom.multival import MultiValue
from scipy import ndimage
from sklearn.model_selection import train_test_split
from tqdm import tqdm

from msk_node import config_checks as checks
from msk_node.dicom_input import read_study_folder
from msk_node.intensity import SquareFrame, normalise_volume
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, LabelMap, load_label_map
from msk_node.volume import SeriesVolume, series_to_volume
from msk_node_training.detector import write_yolo_labels

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti")
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLITS = {"train": 0.7, "val": 0.15, "test": 0.15}

#: Patient directions of the (slice, row, column) axes of a DICOM series of each plane as
#: series_to_volume stacks it: columns run to L (axial, coronal) or P (sagittal), rows to
#: P (axial) or F, and slices advance right-handed.
PLANE_ORIENTATIONS = {"sagittal": "LFP", "coronal": "AFL", "axial": "FPL"}
_PLANE_OF_DIRECTION = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "H": "axial", "F": "axial"}

SLICE_COLUMNS = (
    "dataset", "subject", "split", "slice_index", "image_file", "label_file", "rows", "columns",
    "pixel_spacing_row", "pixel_spacing_column", "slice_thickness", "spacing_between_slices",
    "image_position_patient", "image_orientation_patient", "sop_instance_uid", "accession_number", "n_boxes",
)
#: DICOM attributes per subject column; units as in DICOM (T, ms, degrees, kg, m).
_DICOM_TEXT = {"manufacturer": "Manufacturer", "model": "ManufacturerModelName", "sequence": "ScanningSequence",
               "acquisition_type": "MRAcquisitionType", "series_description": "SeriesDescription",
               "body_part": "BodyPartExamined", "sex": "PatientSex"}
_DICOM_NUMBER = {"field_strength": "MagneticFieldStrength", "repetition_time": "RepetitionTime",
                 "echo_time": "EchoTime", "flip_angle": "FlipAngle", "weight": "PatientWeight",
                 "height": "PatientSize"}
SUBJECT_COLUMNS = (
    "dataset", "subject", "split", "format", "image", "labelled", "n_slices", "rows", "columns",
    "pixel_spacing_row", "pixel_spacing_column", "slice_thickness", *_DICOM_TEXT, *_DICOM_NUMBER, "age",
)

_AGE = re.compile(r"(\d{3})([DWMY])")
_DAYS_PER_AGE_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


@dataclass(frozen=True)
class SubjectSource:
    """One subject's files.

    ``labels`` is None (unlabelled), one multi-label file, or one file per label name.
    """

    id: str
    image: Path
    labels: Path | dict[str, Path] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: subjects from ``root`` (one folder each) or from an explicit list."""

    name: str
    format: str
    root: Path | None = None
    subjects: tuple[SubjectSource, ...] | None = None
    image: str = "."
    labels: str | dict[str, str] | None = None
    label_names: dict[int, str] | None = None
    series: str | None = None
    plane: str | None = None
    #: Where the dataset sits in its config (``datasets[0]``), for error messages.
    where: InitVar[str] = "dataset"

    def __post_init__(self, where: str) -> None:
        checks.check_identifier(self.name, f"{where}.name")
        checks.one_of(self.format, FORMATS, f"{where}.format")
        if (self.root is None) == (self.subjects is None):
            raise ValueError(f"{where}: give exactly one of 'root' and 'subjects'")
        if self.series is not None and self.format != "dicom":
            raise ValueError(f"key '{where}.series' applies to format dicom only")
        if self.plane is not None and (self.format != "nifti" or self.plane not in PLANE_ORIENTATIONS):
            raise ValueError(f"key '{where}.plane' must be one of {', '.join(PLANE_ORIENTATIONS)} "
                             f"and applies to format nifti only, got {self.plane!r}")
        checks.no_duplicates([s.id for s in self.subjects or ()], where + ".subjects[{}].id", "subject id")


@dataclass(frozen=True)
class PreprocessConfig:
    """A validated preprocessing config (format in the module docstring)."""

    datasets: tuple[DatasetConfig, ...]
    label_map: LabelMap
    label_map_path: Path
    output: Path = Path("runs/preprocess")
    image_size: int = 1024
    mask_size: int = 1024
    min_object_pixels: int = 100
    min_object_voxels: int = 1000
    splits: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLITS))
    stratify: str | None = None
    seed: int = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("key 'datasets' must be a non-empty list")
        checks.no_duplicates([d.name for d in self.datasets], "datasets[{}].name", "dataset name")
        for key in ("image_size", "mask_size"):
            checks.at_least(getattr(self, key), 1, key)
        for key in ("min_object_pixels", "min_object_voxels"):
            checks.at_least(getattr(self, key), 0, key)
        for name, ratio in self.splits.items():
            checks.one_of(name, SPLIT_NAMES, f"splits.{name}")
            checks.at_least(ratio, 0, f"splits.{name}", strict=True)
        if not self.splits or not math.isclose(sum(self.splits.values()), 1.0, abs_tol=1e-6):
            raise ValueError(f"key 'splits' must give ratios that sum to 1, got {self.splits!r}")


# --- config -------------------------------------------------------------------------------------

def load_preprocess_config(path: str | Path) -> PreprocessConfig:
    """Read and validate a preprocessing config.

    Raises
    ------
    ValueError
        If the file is not YAML, a key is unknown or missing, or a value has the wrong
        type or range; the message names the file and the key, e.g.
        ``preprocess.yaml: unknown key 'datasets[0].rot'``.
    """
    return checks.load_yaml_config(path, parse_preprocess_config)


def parse_preprocess_config(raw: Any) -> PreprocessConfig:
    """Validate a config mapping as read from YAML; see :func:`load_preprocess_config`."""
    top = ("datasets", "output", "label_map", "image_size", "mask_size", "min_object_pixels",
           "min_object_voxels", "splits", "stratify", "seed")
    checks.check_keys(raw, "", top, required=("datasets",))
    label_map_path = Path(checks.value(raw, "label_map", "", "string", str(DEFAULT_LABEL_MAP_PATH)))
    label_map = load_label_map(label_map_path)
    entries = checks.value(raw, "datasets", "", "list")
    datasets = tuple(_parse_dataset(entry, f"datasets[{index}]", label_map) for index, entry in enumerate(entries))
    image_size = checks.value(raw, "image_size", "", "integer", 1024)
    return PreprocessConfig(
        datasets=datasets,
        label_map=label_map,
        label_map_path=label_map_path,
        output=Path(checks.value(raw, "output", "", "string", "runs/preprocess")),
        image_size=image_size,
        mask_size=checks.value(raw, "mask_size", "", "integer", image_size),
        min_object_pixels=checks.value(raw, "min_object_pixels", "", "integer", 100),
        min_object_voxels=checks.value(raw, "min_object_voxels", "", "integer", 1000),
        splits=_parse_splits(checks.value(raw, "splits", "", "mapping", DEFAULT_SPLITS)),
        stratify=checks.value(raw, "stratify", "", "string"),
        seed=checks.value(raw, "seed", "", "integer", 0),
        raw=raw,
    )


def _parse_dataset(raw: Any, where: str, label_map: LabelMap) -> DatasetConfig:
    keys = ("name", "format", "root", "subjects", "image", "labels", "label_names", "series", "plane")
    checks.check_keys(raw, where, keys, required=("name", "format"))
    data_format = checks.value(raw, "format", where, "string")
    root = checks.value(raw, "root", where, "string")
    subjects = checks.value(raw, "subjects", where, "list")
    if subjects is not None:
        for key in ("image", "labels"):
            if key in raw:
                raise ValueError(f"key '{where}.{key}' applies to 'root' only; give each subject its own")
    parsed = None
    if subjects is not None:
        parsed = tuple(_parse_subject(entry, f"{where}.subjects[{index}]", label_map)
                       for index, entry in enumerate(subjects))
    return DatasetConfig(
        name=checks.value(raw, "name", where, "string"),
        format=data_format,
        root=None if root is None else Path(root),
        subjects=parsed,
        image=checks.value(raw, "image", where, "string", "." if data_format == "dicom" else "image.nii.gz"),
        labels=_labels(raw.get("labels"), f"{where}.labels", label_map),
        label_names=_label_names(raw.get("label_names"), f"{where}.label_names", label_map),
        series=checks.value(raw, "series", where, "string"),
        plane=checks.value(raw, "plane", where, "string"),
        where=where,
    )


def _parse_subject(raw: Any, where: str, label_map: LabelMap) -> SubjectSource:
    checks.check_keys(raw, where, ("id", "image", "labels", "metadata"), required=("id", "image"))
    labels = _labels(raw.get("labels"), f"{where}.labels", label_map)
    metadata = checks.value(raw, "metadata", where, "mapping", {})
    for key, item in metadata.items():
        if not isinstance(key, str) or key in SUBJECT_COLUMNS:
            raise ValueError(f"key '{where}.metadata.{key}' is not allowed: the name is a subject column")
        if not isinstance(item, (str, int, float, bool)):
            raise ValueError(f"key '{where}.metadata.{key}' must be a string, number or boolean, got {item!r}")
    return SubjectSource(
        id=_identifier(raw, "id", where),
        image=Path(checks.value(raw, "image", where, "string")),
        labels=None if labels is None else _paths(labels),
        metadata=metadata,
    )


def _labels(raw: Any, key: str, label_map: LabelMap) -> str | dict[str, str] | None:
    if raw is None or isinstance(raw, str):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"key {key!r} must be a file (one multi-label volume) or a mapping of label name "
                         f"to file, got {raw!r}")
    for name, path in raw.items():
        _known_label(name, f"{key}.{name}", label_map)
        if not isinstance(path, str):
            raise ValueError(f"key '{key}.{name}' must be a string, got {type(path).__name__} {path!r}")
    return dict(raw)


def _label_names(raw: Any, key: str, label_map: LabelMap) -> dict[int, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"key {key!r} must be a non-empty mapping of voxel value to label name, got {raw!r}")
    for value, name in raw.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"key '{key}.{value}' must be an integer voxel value")
        _known_label(name, f"{key}.{value}", label_map)
    return dict(raw)


def _known_label(name: Any, key: str, label_map: LabelMap) -> None:
    if name not in label_map.names:
        raise ValueError(f"key {key!r}: {name!r} is not a label of the label map ({', '.join(label_map.names)})")


def _parse_splits(raw: dict[Any, Any]) -> dict[str, float]:
    checks.check_keys(raw, "splits", SPLIT_NAMES)
    for name, ratio in raw.items():
        checks.typed(ratio, "number", f"splits.{name}")
    return {name: float(ratio) for name, ratio in raw.items()}


def _identifier(raw: dict[str, Any], key: str, where: str) -> str:
    return checks.check_identifier(checks.value(raw, key, where, "string"), f"{where}.{key}")


def _paths(spec: str | dict[str, str]) -> Path | dict[str, Path]:
    return Path(spec) if isinstance(spec, str) else {name: Path(path) for name, path in spec.items()}


# --- subjects -----------------------------------------------------------------------------------

def subject_sources(dataset: DatasetConfig) -> list[SubjectSource]:
    """The subjects of ``dataset`` with their files checked to exist.

    Raises
    ------
    FileNotFoundError
        If the root folder, an image or a label file is missing (the message names it).
    ValueError
        If a root folder holds no subject folders.
    """
    if dataset.subjects is not None:
        sources = list(dataset.subjects)
    else:
        if not dataset.root.is_dir():
            raise FileNotFoundError(f"dataset {dataset.name!r}: root folder {dataset.root} does not exist")
        folders = sorted(p for p in dataset.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"dataset {dataset.name!r}: no subject folders in {dataset.root}")
        sources = []
        for folder in folders:
            labels = None if dataset.labels is None else _paths(dataset.labels)
            if isinstance(labels, Path):
                labels = folder / labels
            elif labels is not None:
                labels = {name: folder / path for name, path in labels.items()}
            sources.append(SubjectSource(folder.name, folder / dataset.image, labels))
    for source in sources:
        files = [source.image]
        if isinstance(source.labels, Path):
            files.append(source.labels)
        elif source.labels is not None:
            files.extend(source.labels.values())
        for path in files:
            if not path.exists():
                raise FileNotFoundError(f"dataset {dataset.name!r}, subject {source.id!r}: {path} does not exist")
    return sources


def read_dicom_series(folder: Path, series: str | None = None) -> SeriesVolume:
    """The one image series below ``folder`` (or the one whose description contains ``series``) as a volume."""
    study = read_study_folder(folder)
    found = [s for s in study.series if series is None or series.lower() in s.description.lower()]
    if len(found) != 1:
        descriptions = ", ".join(repr(s.description) for s in study.series) or "none"
        wanted = f" whose description contains {series!r}" if series else ""
        raise ValueError(f"{folder}: expected one image series{wanted}, found {len(found)} "
                         f"(series: {descriptions}); set the dataset's 'series'")
    return series_to_volume(found[0].datasets)


def read_image_volume(path: Path, plane: str | None = None) -> Volume:
    """A NIfTI (or other SimpleITK) image in the slice, row and column directions of a DICOM series.

    ``plane`` defaults to the plane across the file's third axis, where DICOM converters
    put the slices.
    """
    volume = Volume.from_simpleitk(sitk.ReadImage(str(path), sitk.sitkFloat32))
    # from_simpleitk orders the array (i, j, k): axis 2 is the file's slice axis.
    plane = plane or _PLANE_OF_DIRECTION[volume.get_closest_patient_orientation()[2].value]
    return volume.to_patient_orientation(PLANE_ORIENTATIONS[plane])


def read_labels(spec: Path | dict[str, Path], image: Volume, image_path: Path, label_map: LabelMap,
                label_names: dict[int, str] | None = None) -> np.ndarray:
    """Label-map values on ``image``'s grid, from one multi-label file or one file per label name.

    A multi-label file's values are mapped through ``label_names`` (value -> name; by
    default the label map's own values); values without a name are dropped. Where
    per-label files overlap, the label of higher priority wins.

    Raises
    ------
    ValueError
        If a label file does not lie on the image's voxel grid.
    """
    labels = np.zeros(image.spatial_shape, dtype=np.uint8)
    if isinstance(spec, dict):
        for name in sorted(spec, key=lambda n: label_map.by_name(n).priority):
            labels[_on_grid(spec[name], image, image_path) != 0] = label_map.by_name(name).value
        return labels
    source = _on_grid(spec, image, image_path)
    names = label_names or {value: label_map.by_value(value).name for value in label_map.values}
    for value, name in names.items():
        labels[source == value] = label_map.by_name(name).value
    return labels


def _on_grid(path: Path, image: Volume, image_path: Path) -> np.ndarray:
    """The array of label file ``path`` in ``image``'s axis order, if it covers the same voxels."""
    labels = Volume.from_simpleitk(sitk.ReadImage(str(path))).match_orientation(image)
    # A hundredth of a voxel: NIfTI headers are float32.
    if not image.geometry_equal(labels, tol=0.01 * min(image.spacing)):
        raise ValueError(f"label volume {path} is not on the voxel grid of image {image_path}: "
                         f"{_grid_difference(labels, image)}")
    return labels.array


def _grid_difference(labels: Volume, image: Volume) -> str:
    differences = []
    if labels.spatial_shape != image.spatial_shape:
        differences.append(f"shape {list(labels.spatial_shape)} vs {list(image.spatial_shape)}")
    properties = {"spacing (mm)": lambda v: v.spacing, "first voxel (mm)": lambda v: v.position,
                  "direction": lambda v: v.direction}
    for name, get in properties.items():
        a, b = np.round(np.asarray(get(labels), dtype=float), 4), np.round(np.asarray(get(image), dtype=float), 4)
        if not np.allclose(a, b, atol=1e-4):
            differences.append(f"{name} {a.tolist()} vs {b.tolist()}")
    return "; ".join(differences) or "affines differ beyond a hundredth of a voxel"


def remove_small_objects(labels: np.ndarray, min_voxels: int, min_pixels: int) -> np.ndarray:
    """``labels`` without components of fewer than ``min_voxels`` (3D) and then ``min_pixels`` (per slice).

    Components are per label value, 26-connected in 3D and 8-connected in a slice (as
    :func:`msk_node_training.boxes.instance_boxes` counts them).
    """
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = True
    cleaned = labels.copy()
    for value in np.unique(labels[labels != 0]):
        mask = labels == value
        kept = _large_components(_large_components(mask, np.ones((3, 3, 3), bool), min_voxels), in_plane, min_pixels)
        cleaned[mask & ~kept] = 0
    return cleaned


def _large_components(mask: np.ndarray, structure: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1:
        return mask
    components, _ = ndimage.label(mask, structure)
    large = np.bincount(components.ravel()) >= min_size
    large[0] = False
    return large[components]


# --- splits -------------------------------------------------------------------------------------

def split_sizes(n_subjects: int, ratios: dict[str, float], dataset: str = "") -> dict[str, int]:
    """Subjects per split (largest remainder), every split at least one.

    Raises
    ------
    ValueError
        If a split would be empty.
    """
    exact = {name: n_subjects * ratio for name, ratio in ratios.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - sizes[name], reverse=True)
    for name in by_remainder[: n_subjects - sum(sizes.values())]:
        sizes[name] += 1
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        where = f"dataset {dataset!r}: " if dataset else ""
        raise ValueError(f"{where}{n_subjects} subject(s) at ratios {ratios} leave split {empty[0]!r} empty; "
                         "add subjects or change 'splits'")
    return sizes


def assign_splits(subjects: pd.DataFrame, ratios: dict[str, float], stratify: str | None = None,
                  seed: int = 0) -> pd.Series:
    """Split name per subject row, drawn per dataset, stratified by column ``stratify``.

    The same table, ratios and seed give the same splits. Missing values of the
    stratification column form a class of their own.

    Raises
    ------
    ValueError
        If a split would be empty, ``stratify`` is not a column, or a class is too small
        to stratify.
    """
    if stratify is not None and stratify not in subjects.columns:
        raise ValueError(f"stratify: no subject column {stratify!r} (columns: {', '.join(subjects.columns)})")
    splits = pd.Series(None, index=subjects.index, dtype=object)
    for dataset, group in subjects.groupby("dataset", sort=False):
        sizes = split_sizes(len(group), ratios, str(dataset))
        remaining = group.index.to_numpy()
        for name in list(sizes)[:-1]:
            strata = None if stratify is None else subjects.loc[remaining, stratify].astype(object).map(
                lambda item: "missing" if pd.isna(item) else str(item)).to_numpy()
            try:
                taken, remaining = train_test_split(remaining, train_size=sizes[name],
                                                    test_size=len(remaining) - sizes[name],
                                                    stratify=strata, random_state=seed)
            except ValueError as error:
                raise ValueError(f"dataset {dataset!r}: cannot draw split {name!r} ({sizes[name]} of "
                                 f"{len(remaining)} subjects) stratified by {stratify!r}: {error}") from error
            splits.loc[taken] = name
        splits.loc[remaining] = list(sizes)[-1]
    return splits


# --- run ----------------------------------------------------------------------------------------

def preprocess(config: PreprocessConfig, out_dir: Path | None = None) -> Path:
    """Preprocess every subject of ``config`` into ``out_dir`` (default ``config.output``).

    Returns
    -------
    pathlib.Path
        The output folder (layout in the module docstring).

    Raises
    ------
    FileExistsError
        If the output folder exists and is not empty.
    FileNotFoundError, ValueError
        For a missing file, a series that cannot be chosen or stacked, labels off the
        image grid, or splits that cannot be drawn; checked for all subjects' files and
        split sizes before any subject is processed.
    """
    out_dir = Path(out_dir or config.output)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output folder {out_dir} is not empty")
    work = []
    for dataset in config.datasets:
        sources = subject_sources(dataset)
        split_sizes(len(sources), config.splits, dataset.name)
        work.extend((dataset, source) for source in sources)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.raw, sort_keys=False))
    shutil.copyfile(config.label_map_path, out_dir / "label_map.yaml")
    subject_rows, slice_rows = [], []
    for dataset, source in tqdm(work, desc="preprocess", unit="subject"):
        subject_row, rows = _write_subject(dataset, source, config, out_dir)
        subject_rows.append(subject_row)
        slice_rows.extend(rows)

    subjects = pd.DataFrame(subject_rows)
    subjects.insert(2, "split", assign_splits(subjects, config.splits, config.stratify, config.seed))
    slices = pd.DataFrame(slice_rows)
    slices.insert(2, "split", slices.merge(subjects[["dataset", "subject", "split"]], how="left",
                                           on=["dataset", "subject"])["split"].to_numpy())
    subjects.to_parquet(out_dir / "subjects.parquet", index=False)
    slices.to_parquet(out_dir / "slices.parquet", index=False)
    summary = slices.groupby(["dataset", "split"], sort=False).agg(
        subjects=("subject", "nunique"), slices=("slice_index", "size"),
        labelled_slices=("label_file", "count"), boxes=("n_boxes", "sum")).reset_index()
    summary.to_csv(out_dir / "summary.csv", index=False)
    logger.info("preprocessed %d subjects, %d slices into %s", len(subjects), len(slices), out_dir)
    return out_dir


def _write_subject(dataset: DatasetConfig, source: SubjectSource, config: PreprocessConfig,
                   out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write one subject's slice files; returns its subject row and slice rows."""
    if dataset.format == "dicom":
        series = read_dicom_series(source.image, dataset.series)
        volume, instances = series.volume, series.slices
    else:
        volume = read_image_volume(source.image, dataset.plane)
        instances = [None] * volume.spatial_shape[0]
    labels = None
    if source.labels is not None:
        labels = read_labels(source.labels, volume, source.image, config.label_map, dataset.label_names)
        labels = remove_small_objects(labels, config.min_object_voxels, config.min_object_pixels)

    images = normalise_volume(volume.array)
    n_slices, rows, cols = volume.spatial_shape
    image_frame = SquareFrame(rows, cols, config.image_size)
    mask_frame = SquareFrame(rows, cols, config.mask_size)
    side = max(rows, cols)
    direction = volume.direction
    orientation = [float(v) for v in (*direction[:, 2], *direction[:, 1])]
    common = {"rows": rows, "columns": cols, "pixel_spacing_row": float(volume.pixel_spacing[0]),
              "pixel_spacing_column": float(volume.pixel_spacing[1])}
    relative = Path(dataset.name) / source.id
    (out_dir / "images" / relative).mkdir(parents=True, exist_ok=True)
    if labels is not None:
        (out_dir / "labels" / relative).mkdir(parents=True, exist_ok=True)

    slice_rows = []
    for k in range(n_slices):
        instance = instances[k]
        if dataset.format == "dicom" and instance is None:
            continue  # a gap in the series: there is no source image to learn from
        image_file = Path("images") / relative / f"{k:04d}.npz"
        arrays = {"image": image_frame.image_to_model(images[k])[0].numpy()}
        label_file, n_boxes = None, None
        if labels is not None:
            arrays["mask"] = mask_frame.labels_to_model(labels[k])
            label_file = Path("labels") / relative / f"{k:04d}.txt"
            # Boxes on the source slice, normalised to the square frame the image is stored on.
            n_boxes = write_yolo_labels(out_dir / label_file, labels[k], config.label_map, 1, side, side)
        np.savez_compressed(out_dir / image_file, **arrays)
        slice_rows.append({
            "dataset": dataset.name, "subject": source.id, "slice_index": k, "image_file": image_file.as_posix(),
            "label_file": None if label_file is None else label_file.as_posix(), **common,
            "slice_thickness": _number(instance, "SliceThickness") or float(volume.spacing_between_slices),
            "spacing_between_slices": float(volume.spacing_between_slices),
            "image_position_patient": [float(v) for v in volume.map_indices_to_reference(np.array([[k, 0, 0]]))[0]],
            "image_orientation_patient": orientation,
            "sop_instance_uid": None if instance is None else str(instance.SOPInstanceUID),
            "accession_number": _text(instance, "AccessionNumber"),
            "n_boxes": n_boxes,
        })

    first = next((ds for ds in instances if ds is not None), None)
    subject_row = {
        "dataset": dataset.name, "subject": source.id, "format": dataset.format, "image": str(source.image),
        "labelled": labels is not None, "n_slices": len(slice_rows), **common,
        "slice_thickness": slice_rows[0]["slice_thickness"] if slice_rows else None,
        **{column: _text(first, keyword) for column, keyword in _DICOM_TEXT.items()},
        **{column: _number(first, keyword) for column, keyword in _DICOM_NUMBER.items()},
        "age": _age_years(_text(first, "PatientAge")),
        **source.metadata,
    }
    return subject_row, slice_rows


def _text(ds: pydicom.Dataset | None, keyword: str) -> str | None:
    item = None if ds is None else ds.get(keyword)
    if item is None or item == "":
        return None
    return "\\".join(str(v) for v in item) if isinstance(item, MultiValue) else str(item)


def _number(ds: pydicom.Dataset | None, keyword: str) -> float | None:
    item = _text(ds, keyword)
    return None if item is None else float(item.split("\\")[0])


def _age_years(age: str | None) -> float | None:
    """PatientAge ('045Y', '006M', ...) in years; a zero age ('000Y'), which anonymisers write, is unknown."""
    match = _AGE.fullmatch(age or "")
    if match is None or int(match.group(1)) == 0:
        return None
    return int(match.group(1)) * _DAYS_PER_AGE_UNIT[match.group(2)] / 365.25
