"""Configuration of ``msk-eval segment``, ``experiment`` and ``biomarkers``: models x prompt sources x datasets.

Config (YAML)::

    models:                              # required, non-empty; each one row group of every table
      - name: litemedsam-zero-shot       # letters, digits, '.', '_', '-'
        family: litemedsam               # zero-shot: litemedsam | sam2 | sam | medsam, or truth
        checkpoint: null                 #   weights file; required for sam2, sam, medsam
        config: null                     #   sam2 config (hiera_b+) or sam variant (vit_b)
        precision: auto                  #   litemedsam only: auto (bf16 where native) | fp32 | bf16
      - name: node-finetuned
        models_dir: models               # ... or a node models folder (load_models): its segmenter,
                                         #   and its detector for `detector` prompts
    datasets:                            # required, non-empty
      - name: knee-phantom
        phantom: knee                    # knee | thigh | spine | knee-t1rho, written into the run folder
        seeds: [1, 2, 3]                 #   one subject per seed
        n_slices: 12                     #   optional, fewer slices than the phantom's default
      - name: spine-validation
        real_data: training/configs/real_data.yaml   # the real cases of a training data file ...
        split: validation                #   training | validation
        source: chu-vb                   #   one dataset folder of it
      - name: thigh-nifti
        format: nifti                    # nifti | dicom
        root: data/thigh                 # one folder per subject ...
        image: image.nii.gz              #   image inside it (dicom: a folder; default '.')
        labels: labels.nii.gz            #   multi-label volume on the image's voxel grid
        label_names: {1: quadriceps}     # voxel value -> label name, or a YAML file of that mapping;
                                         #   default: the label map's values
        series: DESS                     # dicom: part of SeriesDescription when a folder holds several
        anatomy: thigh                   # biomarkers: default from the labels' anatomy in the label map
        subjects:                        # ... or instead of root, a list of {id, image, labels}
    prompts: [gt, shifted, detector]     # default [gt]
    shift_px: 20                         # largest box shift of `shifted`, per corner, in model input pixels
    seed: 0                              # seed of the shifts
    postprocess: [false, true]           # node post-processing off and/or on; default [false]
    slice_step: 3                        # every Nth slice (k = N//2, N//2 + N, ...); default 1
    min_box_pixels: 10                   # truth components smaller than this get no box
    overlay_every: 0                     # overlay every Nth evaluated slice that has labels; 0: none
    detector_models: models              # models folder whose detector prompts the zero-shot models
    label_map: null                      # default: the node's; kernels and priorities of post-processing
    output: runs/eval                    # run folder; `--out` overrides

Relative paths are taken from the working directory. An unknown key, a missing key or a
value of the wrong type raises :class:`ValueError` naming the key, e.g.
``unknown key 'datasets[0].sedes'``.
"""
from __future__ import annotations

import re
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msk_node import config_checks as checks
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, LabelMap, load_label_map
from msk_node_phantoms.api import PHANTOM_KINDS
from msk_node.segmenters.registry import FAMILIES

PROMPT_SOURCES = ("gt", "shifted", "detector")
FORMATS = ("dicom", "nifti")
#: Zero-shot families, plus ``truth``: the truth labels themselves, to check the measurements.
MODEL_FAMILIES = (*FAMILIES, "truth")
from msk_node.precision import PRECISIONS
#: The papers' box-shift robustness check moves boxes by up to 20 px of the model's input frame.
DEFAULT_SHIFT_PX = 20.0

_LABEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class ModelSpec:
    """One evaluated model: a zero-shot family or a node models folder."""

    name: str
    family: str | None = None
    models_dir: Path | None = None
    checkpoint: Path | None = None
    config: str | None = None
    precision: str = "auto"
    #: Where the spec sits in its config (``models[0]``), for error messages.
    where: InitVar[str] = "model"

    def __post_init__(self, where: str) -> None:
        checks.check_identifier(self.name, f"{where}.name")
        if (self.family is None) == (self.models_dir is None):
            raise ValueError(f"{where}: give exactly one of 'family' (zero-shot) and 'models_dir' "
                             "(a node models folder)")
        zero_shot = self.family not in (None, "truth")
        if zero_shot:
            family = checks.family_named(self.family, f"{where}.family")
            if not family.weights_ship and self.checkpoint is None:
                raise ValueError(f"missing key '{where}.checkpoint': {family.name} has no bundled weights")
        if self.checkpoint is not None and not zero_shot:
            raise ValueError(f"key '{where}.checkpoint' applies to a zero-shot family only")
        if self.precision not in PRECISIONS or (self.precision != "auto" and self.family != "litemedsam"):
            raise ValueError(f"key '{where}.precision' must be one of {', '.join(PRECISIONS)} "
                             f"and applies to family litemedsam only, got {self.precision!r}")


@dataclass(frozen=True)
class SubjectSpec:
    id: str
    image: Path
    labels: Path


@dataclass(frozen=True)
class DatasetSpec:
    """Phantoms (``phantom`` and ``seeds``) or labelled cases on disk (``format`` and ``subjects``)."""

    name: str
    phantom: str | None = None
    seeds: tuple[int, ...] = ()
    n_slices: int | None = None
    format: str | None = None
    subjects: tuple[SubjectSpec, ...] = ()
    label_names: dict[int, str] | None = None
    series: str | None = None
    anatomy: str | None = None
    real_data: Path | None = None
    split: str | None = None
    source: str | None = None
    #: Where the spec sits in its config (``datasets[0]``), for error messages.
    where: InitVar[str] = "dataset"

    def __post_init__(self, where: str) -> None:
        checks.check_identifier(self.name, f"{where}.name")
        if self.real_data is not None:
            checks.one_of(self.split, ("training", "validation"), f"{where}.split")
            return
        if (self.phantom is None) == (self.format is None):
            raise ValueError(f"{where}: give exactly one of 'phantom' and 'format'")
        if self.phantom is not None:
            checks.one_of(self.phantom, PHANTOM_KINDS, f"{where}.phantom")
            checks.no_duplicates([str(seed) for seed in self.seeds], where + ".seeds[{}]", "seed")
            checks.at_least(self.n_slices, 2, f"{where}.n_slices")
            return
        checks.one_of(self.format, FORMATS, f"{where}.format")
        if self.series is not None and self.format != "dicom":
            raise ValueError(f"key '{where}.series' applies to format dicom only")
        if not self.subjects:
            raise ValueError(f"key '{where}.subjects' must be a non-empty list")
        checks.no_duplicates([subject.id for subject in self.subjects], where + ".subjects[{}].id", "subject id")


@dataclass(frozen=True)
class ExperimentConfig:
    models: tuple[ModelSpec, ...]
    datasets: tuple[DatasetSpec, ...]
    prompts: tuple[str, ...] = ("gt",)
    shift_px: float = DEFAULT_SHIFT_PX
    seed: int = 0
    postprocess: tuple[bool, ...] = (False,)
    slice_step: int = 1
    min_box_pixels: int = 10
    overlay_every: int = 0
    detector_models: Path | None = None
    label_map_path: Path = DEFAULT_LABEL_MAP_PATH
    output: Path = Path("runs/eval")
    raw: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for key in ("models", "datasets"):
            if not getattr(self, key):
                raise ValueError(f"key {key!r} must be a non-empty list")
        checks.no_duplicates([m.name for m in self.models], "models[{}].name", "model name")
        checks.no_duplicates([d.name for d in self.datasets], "datasets[{}].name", "dataset name")
        for index, source in enumerate(self.prompts):
            checks.one_of(source, PROMPT_SOURCES, f"prompts[{index}]")
        if not self.prompts or len(set(self.prompts)) != len(self.prompts):
            raise ValueError(f"key 'prompts' must list each prompt source once, got {list(self.prompts)}")
        if not self.postprocess or len(set(self.postprocess)) != len(self.postprocess):
            raise ValueError(f"key 'postprocess' must be true, false or a list of both, got {list(self.postprocess)}")
        for key, low in (("shift_px", 0), ("seed", 0), ("slice_step", 1), ("min_box_pixels", 1),
                         ("overlay_every", 0)):
            checks.at_least(getattr(self, key), low, key)
        if "detector" in self.prompts and self.detector_models is None and any(
                m.models_dir is None for m in self.models):
            raise ValueError("key 'detector_models' is required: 'detector' prompts for a model without a "
                             "models_dir need a node models folder whose detector gives the boxes")
        _check_label_names(self)

    @property
    def label_map(self) -> LabelMap:
        return load_label_map(self.label_map_path)


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML; errors name the file and the key."""
    return checks.load_yaml_config(path, parse_experiment_config)


def parse_experiment_config(raw: Any) -> ExperimentConfig:
    """Validate a config mapping as read from YAML; see the module docstring for the keys."""
    top = ("models", "datasets", "prompts", "shift_px", "seed", "postprocess", "slice_step", "min_box_pixels",
           "overlay_every", "detector_models", "label_map", "output")
    checks.check_keys(raw, "", top, required=("models", "datasets"))
    models = tuple(_parse_model(entry, f"models[{i}]")
                   for i, entry in enumerate(checks.value(raw, "models", "", "list")))
    datasets = tuple(_parse_dataset(entry, f"datasets[{i}]")
                     for i, entry in enumerate(checks.value(raw, "datasets", "", "list")))
    prompts = checks.value(raw, "prompts", "", "list", ["gt"])
    for index, source in enumerate(prompts):
        checks.typed(source, "string", f"prompts[{index}]")
    postprocess = raw.get("postprocess", [False])
    postprocess = [postprocess] if isinstance(postprocess, bool) else postprocess
    if not isinstance(postprocess, list):
        raise ValueError(f"key 'postprocess' must be true, false or a list of both, got {postprocess!r}")
    for index, item in enumerate(postprocess):
        checks.typed(item, "boolean", f"postprocess[{index}]")
    detector_models = checks.value(raw, "detector_models", "", "string")
    return ExperimentConfig(
        models=models,
        datasets=datasets,
        prompts=tuple(prompts),
        shift_px=float(checks.value(raw, "shift_px", "", "number", DEFAULT_SHIFT_PX)),
        seed=checks.value(raw, "seed", "", "integer", 0),
        postprocess=tuple(postprocess),
        slice_step=checks.value(raw, "slice_step", "", "integer", 1),
        min_box_pixels=checks.value(raw, "min_box_pixels", "", "integer", 10),
        overlay_every=checks.value(raw, "overlay_every", "", "integer", 0),
        detector_models=None if detector_models is None else Path(detector_models),
        label_map_path=Path(checks.value(raw, "label_map", "", "string", str(DEFAULT_LABEL_MAP_PATH))),
        output=Path(checks.value(raw, "output", "", "string", "runs/eval")),
        raw=raw,
    )


def _check_label_names(config: ExperimentConfig) -> None:
    """Post-processing and detector boxes look labels up by name in the label map."""
    if not (any(config.postprocess) or "detector" in config.prompts):
        return
    known = load_label_map(config.label_map_path).names
    for index, dataset in enumerate(config.datasets):
        for value, name in (dataset.label_names or {}).items():
            if name not in known:
                raise ValueError(f"key 'datasets[{index}].label_names.{value}': {name!r} is not a label of the "
                                 f"label map, which post-processing and detector prompts need "
                                 f"({', '.join(known)})")


def _parse_model(raw: Any, where: str) -> ModelSpec:
    checks.check_keys(raw, where, ("name", "family", "models_dir", "checkpoint", "config", "precision"),
                      required=("name",))
    models_dir = checks.value(raw, "models_dir", where, "string")
    checkpoint = checks.value(raw, "checkpoint", where, "string")
    return ModelSpec(
        name=checks.value(raw, "name", where, "string"),
        family=checks.value(raw, "family", where, "string"),
        models_dir=None if models_dir is None else Path(models_dir),
        checkpoint=None if checkpoint is None else Path(checkpoint),
        config=checks.value(raw, "config", where, "string"),
        precision=checks.value(raw, "precision", where, "string", "auto"),
        where=where,
    )


def _parse_dataset(raw: Any, where: str) -> DatasetSpec:
    keys = ("name", "phantom", "seeds", "n_slices", "format", "root", "subjects", "image", "labels",
            "label_names", "series", "anatomy", "real_data", "split", "source")
    checks.check_keys(raw, where, keys, required=("name",))
    name = checks.value(raw, "name", where, "string")
    if "real_data" in raw:
        return _parse_real_data_dataset(raw, where, name)
    phantom = checks.value(raw, "phantom", where, "string")
    data_format = checks.value(raw, "format", where, "string")
    anatomy = checks.value(raw, "anatomy", where, "string")
    if phantom is not None and data_format is None:
        for key in ("root", "subjects", "image", "labels", "label_names", "series", "anatomy"):
            if key in raw:
                raise ValueError(f"key '{where}.{key}' does not apply to a phantom dataset")
        seeds = checks.value(raw, "seeds", where, "list", [0])
        for index, seed in enumerate(seeds):
            checks.typed(seed, "integer", f"{where}.seeds[{index}]")
        return DatasetSpec(name=name, phantom=phantom, seeds=tuple(seeds),
                           n_slices=checks.value(raw, "n_slices", where, "integer"), where=where)
    if phantom is not None or data_format is None:
        raise ValueError(f"{where}: give exactly one of 'phantom' and 'format'")
    for key in ("seeds", "n_slices"):
        if key in raw:
            raise ValueError(f"key '{where}.{key}' applies to a phantom dataset only")
    series = checks.value(raw, "series", where, "string")
    root = checks.value(raw, "root", where, "string")
    subjects = checks.value(raw, "subjects", where, "list")
    if (root is None) == (subjects is None):
        raise ValueError(f"{where}: give exactly one of 'root' and 'subjects'")
    if subjects is not None:
        for key in ("image", "labels"):
            if key in raw:
                raise ValueError(f"key '{where}.{key}' applies to 'root' only; give each subject its own")
        parsed = tuple(_parse_subject(entry, f"{where}.subjects[{i}]") for i, entry in enumerate(subjects))
    else:
        image = checks.value(raw, "image", where, "string", "." if data_format == "dicom" else "image.nii.gz")
        labels = checks.value(raw, "labels", where, "string", "labels.nii.gz")
        folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        if not folders:
            raise ValueError(f"key '{where}.root': {root} is not a folder with one sub-folder per subject")
        parsed = tuple(SubjectSpec(folder.name, folder / image, folder / labels) for folder in folders)
    names = raw.get("label_names")
    return DatasetSpec(name=name, format=data_format, subjects=parsed, series=series, anatomy=anatomy,
                       label_names=None if names is None else parse_label_names(names, f"{where}.label_names"),
                       where=where)


def _parse_real_data_dataset(raw: dict[str, Any], where: str, name: str) -> DatasetSpec:
    """The real cases of one split and source folder of a training data file (msk_node_training.sources)."""
    checks.check_keys(raw, where, ("name", "real_data", "split", "source"), required=("real_data", "split", "source"))
    return DatasetSpec(name=name, real_data=Path(checks.value(raw, "real_data", where, "string")),
                       split=checks.value(raw, "split", where, "string"),
                       source=checks.value(raw, "source", where, "string"), anatomy="spine", where=where)


def _parse_subject(raw: Any, where: str) -> SubjectSpec:
    checks.check_keys(raw, where, ("id", "image", "labels"), required=("id", "image", "labels"))
    return SubjectSpec(checks.check_identifier(checks.value(raw, "id", where, "string"), f"{where}.id"),
                       Path(checks.value(raw, "image", where, "string")),
                       Path(checks.value(raw, "labels", where, "string")))


def parse_label_names(raw: Any, key: str = "label_names") -> dict[int, str]:
    """Voxel value -> label name, from a mapping or from a YAML file holding one."""
    if isinstance(raw, str):
        path = Path(raw)
        if not path.is_file():
            raise ValueError(f"key {key!r}: label names file {path} does not exist")
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        key = str(path)
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{key!r} must be a non-empty mapping of voxel value to label name, got {raw!r}")
    for value, name in raw.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise ValueError(f"key '{key}.{value}' must be a positive integer voxel value")
        if not isinstance(name, str) or not _LABEL_NAME.fullmatch(name):
            raise ValueError(f"key '{key}.{value}' must be a label name (lower-case letters, digits, '_'), "
                             f"got {name!r}")
    checks.no_duplicates(list(raw.values()), key + ".{}", "label name")
    return dict(raw)
