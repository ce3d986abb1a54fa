"""Evaluation cases: an image, its truth labels and its voxel spacing, from phantoms, DICOM or NIfTI.

Arrays are indexed ``[slice, row, column]``. DICOM series are stacked by the node's
:func:`~msk_node.volume.series_to_volume`; a NIfTI image is sliced along its third
(``k``) axis, where DICOM converters put the slices. A truth label volume must lie on
its image's voxel grid: it is mapped through patient coordinates (so a file stored in
another axis order still fits) and refused when that changes its number of labelled
voxels.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from msk_node_evaluation.config import DatasetSpec, SubjectSpec
from msk_node.dicom_input import Series, read_study_folder
from msk_node.intensity import normalise_volume
from msk_node.labels import LabelMap
from msk_node_phantoms import write_phantom
from msk_node.volume import SeriesVolume, labels_on_volume_grid, series_to_volume


@dataclass
class Case:
    """One subject ready to segment and score.

    ``labels`` maps each label name to its value in ``truth``; ``spacing`` is the slice,
    row and column spacing in mm. DICOM cases keep their series (``series``, and every
    series of the study in ``study_series``) for the biomarkers.
    """

    dataset: str
    subject: str
    normalised: np.ndarray
    truth: np.ndarray
    labels: dict[str, int]
    spacing: tuple[float, float, float]
    series: SeriesVolume | None = None
    study_series: list[Series] = field(default_factory=list)
    anatomy: str | None = None

    @property
    def pixel_spacing(self) -> tuple[float, float]:
        return self.spacing[1], self.spacing[2]


def iter_cases(dataset: DatasetSpec, label_map: LabelMap, phantom_root: Path) -> Iterator[Case]:
    """The cases of ``dataset``, one at a time; phantoms are written below ``phantom_root`` once."""
    if dataset.real_data is not None:
        yield from real_data_cases(dataset, label_map)
        return
    if dataset.phantom is not None:
        for seed in dataset.seeds:
            yield phantom_case(dataset.name, dataset.phantom, seed, phantom_root / dataset.name / f"seed-{seed}",
                               dataset.n_slices)
        return
    for subject in dataset.subjects:
        if dataset.format == "dicom":
            yield dicom_case(dataset, subject, label_map)
        else:
            yield nifti_case(dataset, subject, label_map)


def real_data_cases(dataset: DatasetSpec, label_map: LabelMap) -> Iterator[Case]:
    """The real spine cases of one split and source folder, read exactly as training reads them."""
    from msk_node_training.sources import load_real_data, real_spine_volumes

    data = load_real_data(dataset.real_data)
    split = data.spine_training if dataset.split == "training" else data.spine_validation
    chosen = tuple(case for case in split if case.folder.parent.name == dataset.source)
    if not chosen:
        raise ValueError(f"{dataset.real_data}: no {dataset.split} cases in {dataset.source!r}")
    for volume in real_spine_volumes(chosen, label_map):
        present = [int(v) for v in np.unique(volume.labels) if v]
        yield Case(dataset.name, volume.name, volume.images, volume.labels,
                   {label_map.by_value(v).name: v for v in present}, volume.spacing, anatomy="spine")


def phantom_case(dataset: str, kind: str, seed: int, folder: Path, n_slices: int | None = None) -> Case:
    """A phantom's morphology series and exact truth, written to ``folder`` unless already there."""
    if not (folder / "truth.json").is_file():
        write_phantom(kind, folder, seed=seed, n_slices=n_slices)
    truth = json.loads((folder / "truth.json").read_text())
    morphology = next(entry for entry in truth["series"] if entry["role"] == "morphology")
    study = read_study_folder(folder / "dicom")
    series = next(s for s in study.series if s.series_instance_uid == morphology["series_instance_uid"])
    volume = series_to_volume(series.datasets)
    labels = _truth_on_series(folder / "truth_labels.nii.gz", volume, folder / morphology["folder"])
    return _dicom_case(dataset, f"{kind}-{seed}", volume, labels, dict(truth["labels"]), study.series,
                       "knee" if kind.startswith("knee") else kind)


def dicom_case(dataset: DatasetSpec, subject: SubjectSpec, label_map: LabelMap) -> Case:
    study = read_study_folder(subject.image)
    wanted = dataset.series
    found = [s for s in study.series if wanted is None or wanted.lower() in s.description.lower()]
    if len(found) != 1:
        descriptions = ", ".join(repr(s.description) for s in study.series) or "none"
        raise ValueError(f"{subject.image}: expected one image series"
                         f"{f' whose description contains {wanted!r}' if wanted else ''}, found {len(found)} "
                         f"(series: {descriptions}); set the dataset's 'series'")
    volume = series_to_volume(found[0].datasets)
    labels = _truth_on_series(subject.labels, volume, subject.image)
    names = label_names_of(labels, dataset.label_names, label_map, subject.labels)
    return _dicom_case(dataset.name, subject.id, volume, labels, names, study.series,
                       dataset.anatomy or anatomy_of(names, label_map))


def nifti_case(dataset: DatasetSpec, subject: SubjectSpec, label_map: LabelMap) -> Case:
    image = sitk.ReadImage(str(subject.image), sitk.sitkFloat32)
    source = sitk.ReadImage(str(subject.labels))
    labels = sitk.GetArrayFromImage(sitk.Resample(source, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                  source.GetPixelID()))
    _require_same_voxels(sitk.GetArrayFromImage(source), labels, subject.labels, subject.image)
    names = label_names_of(labels, dataset.label_names, label_map, subject.labels)
    anatomy = dataset.anatomy or anatomy_of(names, label_map)
    # SimpleITK orders spacing (column, row, slice); the arrays are [slice, row, column]
    column, row, slice_ = image.GetSpacing()
    return Case(dataset.name, subject.id, normalise_volume(sitk.GetArrayFromImage(image)), labels, names,
                (slice_, row, column), anatomy=anatomy)


def _dicom_case(dataset: str, subject: str, volume: SeriesVolume, labels: np.ndarray, names: dict[str, int],
                study_series: list[Series], anatomy: str | None) -> Case:
    return Case(dataset, subject, normalise_volume(volume.array), labels, names,
                (volume.slice_spacing, *volume.pixel_spacing), volume, study_series, anatomy)


def _truth_on_series(label_path: Path, volume: SeriesVolume, image_path: Path) -> np.ndarray:
    labels = labels_on_volume_grid(label_path, volume.volume)
    _require_same_voxels(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), labels, label_path, image_path)
    return labels


def _require_same_voxels(source: np.ndarray, mapped: np.ndarray, label_path: Path, image_path: Path) -> None:
    """Nearest-neighbour mapping between identical grids keeps every voxel; anything else would be resampling."""
    before, after = np.bincount(source.ravel().astype(np.int64)), np.bincount(mapped.ravel().astype(np.int64))
    size = max(len(before), len(after))
    if not np.array_equal(np.pad(before, (0, size - len(before)))[1:], np.pad(after, (0, size - len(after)))[1:]):
        raise ValueError(f"label volume {label_path} is not on the voxel grid of image {image_path}: "
                         f"its {int(before[1:].sum())} labelled voxels become {int(after[1:].sum())} on the image")


def label_names_of(labels: np.ndarray, names: dict[int, str] | None, label_map: LabelMap,
                   source: Path) -> dict[str, int]:
    """Label name -> voxel value for every named value of ``labels`` (default names: the label map's)."""
    present = [int(v) for v in np.unique(labels) if v != 0]
    if names is None:
        unknown = [v for v in present if v not in label_map.values]
        if unknown:
            raise ValueError(f"{source}: values {unknown} are not in the label map; give label names")
        return {label_map.by_value(v).name: v for v in present}
    return {name: value for value, name in names.items() if value in present}


def anatomy_of(names: dict[str, int], label_map: LabelMap) -> str | None:
    """The one anatomy group of the label map that the named labels belong to; None if not one."""
    anatomies = {label_map.by_name(name).anatomy for name in names if name in label_map.names}
    return anatomies.pop() if len(anatomies) == 1 else None
