"""Training volumes from every source the default models learn from.

- **phantoms**: randomized-appearance phantoms of the project (exact truth);
- **synthetic knees**: SynthSeg-style images drawn from real knee label maps
  (:mod:`msk_node_training.synthetic`), written as DICOM series and read back like a scan;
- **real spines**: real sagittal lumbar MRI with manual labels (NIfTI), oriented like
  a DICOM sagittal series (rows superior to inferior, columns anterior to posterior).

Every source yields :class:`TrainingVolume` items: the normalised slices the models
see in the node and the truth on the same grid, in the node's label values. Where a
real case labels only one of the spine's two structures, the other is marked
``unlabelled`` so that a trainer never learns it as background.
The data files are named in a YAML file (``training/configs/real_data.yaml``) whose
relative paths start at its ``data_root`` (``$MSK_NODE_DATA`` overrides it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from msk_node.config_checks import at_least, check_keys, load_yaml_config, one_of, typed, value
from msk_node.dicom_input import read_study_folder
from msk_node.intensity import normalise_volume
from msk_node.labels import LabelMap
from msk_node_phantoms import PHANTOM_KINDS, write_phantom
from msk_node.progress import progress
from msk_node.volume import labels_on_volume_grid, series_to_volume
from msk_node_training.synthetic import LabelMapSource, write_synthetic

#: Orientation of a sagittal DICOM stack for SimpleITK's DICOMOrient: columns towards
#: posterior, rows towards inferior, slices towards left.
SAGITTAL_DISPLAY = "PIL"


@dataclass(frozen=True)
class TrainingVolume:
    """Normalised slices ``[slice, row, column]`` with truth in node label values on the same grid."""

    name: str
    anatomy: str
    images: np.ndarray
    labels: np.ndarray
    #: slice, row and column spacing in mm
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    validation: bool = False
    #: label values present in the anatomy but not drawn in ``labels`` (never background)
    unlabelled: tuple[int, ...] = ()

    @property
    def pixel_mm(self) -> float:
        return self.spacing[1]


@dataclass(frozen=True)
class RealSpineCase:
    folder: Path
    names: dict[int, str]


@dataclass(frozen=True)
class RealData:
    """The real data of ``real_data.yaml``: knee label maps and real spine cases by split."""

    knee_label_maps: tuple[LabelMapSource, ...]
    spine_training: tuple[RealSpineCase, ...]
    spine_validation: tuple[RealSpineCase, ...]

    def __post_init__(self) -> None:
        overlap = {c.folder for c in self.spine_training} & {c.folder for c in self.spine_validation}
        if overlap:
            raise ValueError(f"real_spine: cases in both training and validation: {sorted(map(str, overlap))}")


def load_real_data(path: Path) -> RealData:
    """Read ``real_data.yaml``; paths start at ``$MSK_NODE_DATA`` or the file's ``data_root``."""
    path = Path(path)
    data = load_yaml_config(path, lambda raw: _parse_real_data(raw, path.parent))
    missing = [str(p) for p in [m.path for m in data.knee_label_maps]
               + [c.folder for c in data.spine_training + data.spine_validation] if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{path}: data not found (set MSK_NODE_DATA or data_root): {', '.join(missing)}")
    return data


def _parse_real_data(raw: object, base: Path) -> RealData:
    check_keys(raw, "", ("data_root", "knee_label_maps", "real_spine"), ("data_root", "knee_label_maps", "real_spine"))
    root = Path(os.environ.get("MSK_NODE_DATA") or (base / value(raw, "data_root", "", "string")))
    knee = raw["knee_label_maps"]
    check_keys(knee, "knee_label_maps", ("files", "names", "bones", "extra"), ("files", "names", "bones"))
    names = {int(k): str(v) for k, v in value(knee, "names", "knee_label_maps", "mapping").items()}
    bones = tuple(value(knee, "bones", "knee_label_maps", "list"))
    extra = tuple(value(knee, "extra", "knee_label_maps", "list", []))
    maps = tuple(LabelMapSource(root / file, names, bones, extra)
                 for file in value(knee, "files", "knee_label_maps", "list"))
    spine = raw["real_spine"]
    check_keys(spine, "real_spine", ("folder", "labels", "training", "validation"),
               ("folder", "labels", "training", "validation"))
    folder = root / value(spine, "folder", "real_spine", "string")
    labels = value(spine, "labels", "real_spine", "mapping")
    dataset_names = {dataset: {int(v): name for name, values in by_name.items() for v in values}
                     for dataset, by_name in labels.items()}

    def cases(split: str) -> tuple[RealSpineCase, ...]:
        found = []
        for case in value(spine, split, "real_spine", "list"):
            dataset = case.split("/")[0]
            if dataset not in dataset_names:
                raise ValueError(f"real_spine.{split}: {case!r}: no labels given for dataset {dataset!r}")
            found.append(RealSpineCase(folder / case, dataset_names[dataset]))
        return tuple(found)

    return RealData(maps, cases("training"), cases("validation"))


def check_cases(cases: dict) -> None:
    """``cases`` maps phantom kinds to positive case counts."""
    if not cases:
        raise ValueError("key 'cases' must map phantom kinds to case counts")
    for kind, count in cases.items():
        one_of(kind, PHANTOM_KINDS, "cases")
        typed(count, "integer", f"cases.{kind}")
        at_least(count, 0, f"cases.{kind}")


def phantom_volumes(cases: dict[str, int], seed: int, val_every: int | None) -> Iterator[TrainingVolume]:
    """Randomized-appearance phantoms, every ``val_every``-th case of a kind for validation."""
    with tempfile.TemporaryDirectory() as scratch:
        for kind_index, (kind, n_cases) in enumerate(sorted(cases.items())):
            for case in range(n_cases):
                folder = write_phantom(kind, Path(scratch) / f"{kind}-{case}", seed=seed + 1000 * case + kind_index,
                                       randomize_appearance=True)
                images, labels, spacing = read_case(folder)
                yield TrainingVolume(f"{kind}-{case:03d}", kind, images, labels, spacing,
                                     bool(val_every and case % val_every == 0))
                shutil.rmtree(folder)


def synthetic_volumes(sources: tuple[LabelMapSource, ...], label_map: LabelMap, per_map: int, seed: int,
                      val_every: int | None = None) -> Iterator[TrainingVolume]:
    """``per_map`` synthetic knees from each label map, written as DICOM and read back."""
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [(source, case) for case in range(per_map) for source in sources]
        for source, case in progress(jobs, "synthesizing knees", "case"):
            folder = write_synthetic(source, label_map, Path(scratch) / f"{source.path.stem}-{case}",
                                     seed=seed + 100 * case + sources.index(source))
            images, labels, spacing = read_case(folder)
            yield TrainingVolume(f"synthetic-{source.path.name.split('.')[0]}-{case:03d}", "knee", images, labels,
                                 spacing, bool(val_every and case % val_every == 0))
            shutil.rmtree(folder)


def read_case(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A written case's morphology series normalised as the node does, its truth on that grid, its spacing."""
    series = max(read_study_folder(folder / "dicom").series, key=len)
    volume = series_to_volume(series.datasets)
    labels = labels_on_volume_grid(folder / "truth_labels.nii.gz", volume.volume)
    return normalise_volume(volume.array), labels, (volume.slice_spacing, *volume.pixel_spacing)


def real_spine_volumes(cases: tuple[RealSpineCase, ...], label_map: LabelMap,
                       validation: bool = False) -> Iterator[TrainingVolume]:
    """Real spine cases as sagittal slices, their labels in node values."""
    spine_values = tuple(spec.value for spec in label_map.for_anatomy("spine").labels)
    for case in cases:
        image, labels, spacing = oriented_case(case.folder / "image.nii.gz", case.folder / "labels.nii.gz")
        lut = np.zeros(256, np.uint8)
        for case_value, name in case.names.items():
            lut[case_value] = label_map.by_name(name).value
        truth = lut[labels]
        drawn = {label_map.by_name(name).value for name in case.names.values()}
        yield TrainingVolume(case.folder.name, "spine", normalise_volume(image), truth, spacing, validation,
                             tuple(v for v in spine_values if v not in drawn))


def oriented_case(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A sagittal NIfTI image and its labels as ``[slice, row, column]`` arrays of a DICOM sagittal stack."""
    image = sitk.DICOMOrient(sitk.ReadImage(str(image_path), sitk.sitkFloat32), SAGITTAL_DISPLAY)
    labels = sitk.DICOMOrient(sitk.ReadImage(str(label_path), sitk.sitkUInt8), SAGITTAL_DISPLAY)
    column, row, slice_ = image.GetSpacing()
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels), (slice_, row, column)


def data_description(phantom_cases: dict[str, int], seed: int, real_data: str | None,
                     synthetic_per_map: int) -> dict:
    """What a model was trained on, for its manifest: phantoms, label maps and real cases by name."""
    described: dict = {"phantom_cases": dict(phantom_cases), "seed": seed}
    if real_data:
        data = load_real_data(Path(real_data))
        described["real_data"] = str(real_data)
        if synthetic_per_map:
            described["synthetic_knees"] = {"per_label_map": synthetic_per_map,
                                            "label_maps": [m.path.name for m in data.knee_label_maps]}
        described["real_spine_training"] = [c.folder.name for c in data.spine_training]
        described["real_spine_validation_never_trained_on"] = [c.folder.name for c in data.spine_validation]
    return described
