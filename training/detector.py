"""Train the YOLO anatomy detector on phantoms and export it as a node model.

The default detector of ``models/detector`` is made by::

    msk-train detector training/configs/default_detector.yaml --export models/detector
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from msk_node import config_checks as checks
from msk_node.labels import LabelMap, load_label_map
from msk_node.models import file_sha256
from msk_node.yolo_env import import_yolo
from msk_node_training.boxes import instance_boxes
from msk_node_training.sources import (TrainingVolume, check_cases, data_description, load_real_data, phantom_volumes,
                                       real_spine_volumes, synthetic_volumes)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorConfig:
    cases: dict[str, int]
    seed: int = 0
    image_size: int = 256
    epochs: int = 30
    batch: int = 16
    model: str = "yolov8n.yaml"
    val_fraction: float = 0.15
    label_map: str = "models/detector/label_map.yaml"
    min_box_pixels: int = 10
    confidence: float = 0.25
    augment: dict | None = None
    #: real_data.yaml: knee label maps for synthetic knees and real spine cases (None: phantoms only)
    real_data: str | None = None
    synthetic_per_map: int = 0
    real_slice_stride: int = 2
    #: real cases with vertebral bodies only: the gap between two bodies up to this height is their disc
    max_disc_gap_mm: float = 16.0
    #: start from these YOLO weights (e.g. the phantom detector) instead of the bare architecture
    init_weights: str | None = None

    def __post_init__(self) -> None:
        checks.check_field_types(self)
        check_cases(self.cases)
        for key in ("image_size", "epochs", "batch", "min_box_pixels", "real_slice_stride"):
            checks.at_least(getattr(self, key), 0, key, strict=True)
        for key in ("val_fraction", "confidence", "synthetic_per_map", "max_disc_gap_mm"):
            checks.at_least(getattr(self, key), 0, key)
        for key in ("val_fraction", "confidence"):
            if getattr(self, key) >= 1:
                raise ValueError(f"key {key!r} must be < 1, got {getattr(self, key)}")


def load_detector_config(path: Path) -> DetectorConfig:
    """Read a detector config; an unknown key or a wrong type names the file and the key."""
    return checks.load_yaml_config(path, lambda raw: checks.config_from_mapping(DetectorConfig, raw, ("cases",)))


def write_yolo_dataset(config: DetectorConfig, label_map: LabelMap, out_dir: Path) -> Path:
    """Every training source -> normalised slice PNGs and YOLO label files; returns data.yaml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    for volume in training_volumes(config, label_map):
        split = "val" if volume.validation else "train"
        stride = config.real_slice_stride if volume.unlabelled else 1
        labels = volume.labels
        if volume.unlabelled:
            labels = with_gap_structures(labels, label_map, volume.unlabelled, config.max_disc_gap_mm,
                                         volume.pixel_mm)
        counts[split] += _write_slices(volume.images[::stride], labels[::stride], volume.name, label_map, config,
                                       out_dir / split)
    data = {"path": str(out_dir.resolve()), "train": "train/images", "val": "val/images",
            "names": {spec.class_id: spec.name for spec in label_map.labels}}
    (out_dir / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    logger.info("detector dataset: %s", counts)
    return out_dir / "data.yaml"


def training_volumes(config: DetectorConfig, label_map: LabelMap) -> Iterator[TrainingVolume]:
    """Phantoms, then synthetic knees and real spines where ``real_data`` names them."""
    val_every = max(2, round(1 / config.val_fraction)) if config.val_fraction > 0 else None
    yield from phantom_volumes(config.cases, config.seed, val_every)
    if config.real_data is None:
        return
    data = load_real_data(Path(config.real_data))
    if config.synthetic_per_map:
        yield from synthetic_volumes(data.knee_label_maps, label_map, config.synthetic_per_map, config.seed,
                                     val_every)
    # only vertebral bodies have boxes here: cases labelling the discs alone would teach bodies as background
    with_bodies = tuple(case for case in data.spine_training if "vertebral_body" in case.names.values())
    yield from real_spine_volumes(with_bodies, label_map)
    yield from real_spine_volumes(data.spine_validation, label_map, validation=True)


def with_gap_structures(labels: np.ndarray, label_map: LabelMap, unlabelled: tuple[int, ...], max_gap_mm: float,
                        pixel_mm: float) -> np.ndarray:
    """Labels with each disc drawn as the gap between two vertebral bodies of the same slice column.

    Cases labelled with vertebral bodies only still show their discs; without a box
    the detector would learn them as background. Column by column (anterior to
    posterior), the rows between one body's lower edge and the next body's upper edge
    become disc where that gap is at most ``max_gap_mm`` (a disc, not a missing level).
    """
    body, disc = label_map.by_name("vertebral_body").value, label_map.by_name("intervertebral_disc").value
    if disc not in unlabelled:
        return labels
    out = labels.copy()
    max_gap = int(round(max_gap_mm / pixel_mm))
    for k, label_slice in enumerate(labels):
        components, _ = ndimage.label(label_slice == body)
        for column in np.flatnonzero((components > 0).any(axis=0)):
            ids = components[:, column]
            rows = np.flatnonzero(ids)
            for upper, lower in zip(rows[:-1], rows[1:]):
                if lower - upper > 1 and ids[upper] != ids[lower] and lower - upper - 1 <= max_gap:
                    out[k, upper + 1:lower, column] = disc
    return out


def _write_slices(images: np.ndarray, labels: np.ndarray, stem: str, label_map: LabelMap, config: DetectorConfig,
                  split_dir: Path) -> int:
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    (split_dir / "labels").mkdir(parents=True, exist_ok=True)
    rows, cols = images.shape[1:]
    for index, (image, label_slice) in enumerate(zip(images, labels)):
        name = f"{stem}-{index:03d}"
        Image.fromarray(image).save(split_dir / "images" / f"{name}.png")
        write_yolo_labels(split_dir / "labels" / f"{name}.txt", label_slice, label_map, config.min_box_pixels,
                          cols, rows)
    return len(images)


def write_yolo_labels(path: Path, label_slice: np.ndarray, label_map: LabelMap, min_pixels: int,
                      width: int, height: int) -> int:
    """Write the YOLO label file of one slice; returns the number of boxes.

    One line ``class_id cx cy w h`` per label and 2D component of at least ``min_pixels``
    pixels (:func:`msk_node_training.boxes.instance_boxes`), normalised by the ``width`` x
    ``height`` pixels of the image the file is paired with; an empty file means no objects.
    """
    lines = []
    for value, (x0, y0, x1, y1) in instance_boxes(label_slice, list(label_map.values), min_pixels):
        class_id = label_map.by_value(value).class_id
        cx, cy = (x0 + x1 + 1) / 2 / width, (y0 + y1 + 1) / 2 / height
        w, h = (x1 - x0 + 1) / width, (y1 - y0 + 1) / height
        lines.append(f"{class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def train_detector(config: DetectorConfig, run_dir: Path) -> Path:
    """Build the dataset and train YOLO from its architecture or ``init_weights`` (no download); returns best.pt."""
    data_yaml = write_yolo_dataset(config, load_label_map(config.label_map), run_dir / "dataset")
    return fit_detector(config, data_yaml, run_dir)


def fit_detector(config: DetectorConfig, data_yaml: Path, run_dir: Path) -> Path:
    """Train YOLO on a written dataset (``data.yaml``); returns best.pt."""
    YOLO = import_yolo()
    model = YOLO(config.model)
    augment = {"fliplr": 0.5, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.3, "mosaic": 0.5, "scale": 0.3,
               "degrees": 10.0, **(config.augment or {})}
    model.train(data=str(data_yaml), imgsz=config.image_size, epochs=config.epochs, batch=config.batch,
                workers=0, device="cpu", amp=False, plots=False, seed=config.seed, deterministic=True,
                project=str((run_dir / "yolo").resolve()), name="train", exist_ok=True, verbose=False,
                pretrained=_init_weights(config), **augment)
    return run_dir / "yolo" / "train" / "weights" / "best.pt"


def _init_weights(config: DetectorConfig) -> str | bool:
    if config.init_weights is None:
        return False
    weights = Path(config.init_weights)
    if not weights.is_file():
        raise FileNotFoundError(f"init_weights {weights} not found")
    return str(weights.resolve())


def export_detector(weights: Path, config: DetectorConfig, config_path: Path, target: Path) -> Path:
    """Copy weights and label map into a node model folder with a manifest (hash, how to reproduce)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target / "detector.pt")
    label_map_target = target / "label_map.yaml"
    if Path(config.label_map).resolve() != label_map_target.resolve():
        shutil.copyfile(config.label_map, label_map_target)
    manifest = {
        "name": "msk-node-yolov8n",
        "family": "yolo",
        "version": "0.2.0",
        "weights": "detector.pt",
        "sha256": file_sha256(target / "detector.pt"),
        "label_map": "label_map.yaml",
        "image_size": config.image_size,
        "confidence": config.confidence,
        "reproduce": f"msk-train detector {config_path} --export {target}",
        "training_data": json.dumps(data_description(config.cases, config.seed, config.real_data,
                                                     config.synthetic_per_map)),
        **({"initial_weights_sha256": file_sha256(Path(config.init_weights))} if config.init_weights else {}),
    }
    (target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return target
