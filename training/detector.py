"""Train the YOLO anatomy detector on phantoms and export it as a node model.

The default detector of ``models/detector`` is made by::

    msk-train detector training/configs/default_detector.yaml --export models/detector
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from msk_node.dicom_input import read_study_folder
from msk_node.intensity import normalise_volume
from msk_node.labels import LabelMap, load_label_map
from msk_node.models import file_sha256
from msk_node.phantoms import write_phantom
from msk_node.volume import labels_on_volume_grid, series_to_volume
from msk_node.yolo_env import import_yolo
from training.boxes import instance_boxes

logger = logging.getLogger(__name__)

CONFIG_KEYS = {"cases", "seed", "image_size", "epochs", "batch", "model", "val_fraction", "label_map",
               "min_box_pixels", "confidence", "augment"}


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


def load_detector_config(path: Path) -> DetectorConfig:
    """Read a detector config; an unknown key or a wrong type names the key."""
    entries = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(entries) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not isinstance(entries.get("cases"), dict) or not entries["cases"]:
        raise ValueError(f"{path}: 'cases' must map phantom kinds to case counts")
    defaults = DetectorConfig(cases={})
    for key, value in entries.items():
        expected = type(getattr(defaults, key)) if getattr(defaults, key) is not None else dict
        if key == "val_fraction" and isinstance(value, (int, float)):
            continue
        if not isinstance(value, expected):
            raise ValueError(f"{path}: '{key}' must be {expected.__name__}, got {type(value).__name__}")
    return DetectorConfig(**entries)


def write_yolo_dataset(config: DetectorConfig, label_map: LabelMap, out_dir: Path) -> Path:
    """Phantom cases -> normalised slice PNGs and YOLO label files; returns data.yaml."""
    val_every = max(2, round(1 / config.val_fraction)) if config.val_fraction > 0 else None
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    with tempfile.TemporaryDirectory() as scratch:
        for kind_index, (kind, n_cases) in enumerate(sorted(config.cases.items())):
            for case in range(n_cases):
                seed = config.seed + 1000 * case + kind_index
                case_dir = write_phantom(kind, Path(scratch) / f"{kind}-{case}", seed=seed,
                                         randomize_appearance=True)
                split = "val" if val_every and case % val_every == 0 else "train"
                counts[split] += _write_case(case_dir, f"{kind}-{case:03d}", label_map, config, out_dir / split)
                shutil.rmtree(case_dir)
    data = {"path": str(out_dir.resolve()), "train": "train/images", "val": "val/images",
            "names": {spec.class_id: spec.name for spec in label_map.labels}}
    (out_dir / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    logger.info("detector dataset: %s", counts)
    return out_dir / "data.yaml"


def _write_case(case_dir: Path, stem: str, label_map: LabelMap, config: DetectorConfig, split_dir: Path) -> int:
    study = read_study_folder(case_dir / "dicom")
    series = max(study.series, key=len)
    volume = series_to_volume(series.datasets)
    labels = labels_on_volume_grid(case_dir / "truth_labels.nii.gz", volume.volume)
    images = normalise_volume(volume.array)
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
    pixels (:func:`training.boxes.instance_boxes`), normalised by the ``width`` x
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
    """Build the phantom dataset and train YOLO from its architecture file (no download); returns best.pt."""
    label_map = load_label_map(config.label_map)
    data_yaml = write_yolo_dataset(config, label_map, run_dir / "dataset")
    YOLO = import_yolo()
    model = YOLO(config.model)
    augment = {"fliplr": 0.5, "hsv_h": 0.0, "hsv_s": 0.0, "hsv_v": 0.3, "mosaic": 0.5, "scale": 0.3,
               "degrees": 10.0, **(config.augment or {})}
    model.train(data=str(data_yaml), imgsz=config.image_size, epochs=config.epochs, batch=config.batch,
                workers=0, device="cpu", amp=False, plots=False, seed=config.seed, deterministic=True,
                project=str((run_dir / "yolo").resolve()), name="train", exist_ok=True, verbose=False,
                pretrained=False, **augment)
    return run_dir / "yolo" / "train" / "weights" / "best.pt"


def export_detector(weights: Path, config: DetectorConfig, config_path: Path, target: Path) -> Path:
    """Copy weights and label map into a node model folder with a manifest (hash, how to reproduce)."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, target / "detector.pt")
    label_map_target = target / "label_map.yaml"
    if Path(config.label_map).resolve() != label_map_target.resolve():
        shutil.copyfile(config.label_map, label_map_target)
    manifest = {
        "name": "msk-node-phantom-yolov8n",
        "family": "yolo",
        "version": "0.1.0",
        "weights": "detector.pt",
        "sha256": file_sha256(target / "detector.pt"),
        "label_map": "label_map.yaml",
        "image_size": config.image_size,
        "confidence": config.confidence,
        "reproduce": f"msk-train detector {config_path} --export {target}",
        "training_data": json.dumps({"phantom_cases": config.cases, "seed": config.seed}),
    }
    (target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return target
