"""Training slices from ``msk-train preprocess`` output: selection, mixing, prompts and per-epoch samples.

A sample is one labelled slice. Its prompts are one box per label and 2D component of
the stored mask (optionally with a foreground point of the component), and its
targets are the components themselves, at the stored mask size.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from msk_node.segmenters.frames import stored_to_stretched

if TYPE_CHECKING:
    from msk_node_training.embed_store import EmbeddingStore

PROMPTS = ("box", "box_point")
#: Box shifts are given in pixels of a 1024 px frame, the papers' image size.
SHIFT_REFERENCE_SIZE = 1024


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset of the data folder, its sampling weight and the named groups it belongs to."""

    name: str
    weight: float = 1.0
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptSettings:
    kind: str = "box"
    box_shift_px: float = 20.0
    max_prompts: int | None = None
    min_pixels: int = 10


@dataclass
class Selection:
    """Train and val slice tables (rows of ``slices.parquet``) and the per-dataset summary."""

    train: pd.DataFrame
    val: pd.DataFrame
    summary: pd.DataFrame


def labelled_slices(data_dir: Path) -> pd.DataFrame:
    """Rows of ``slices.parquet`` that have a mask with at least one box."""
    slices = pd.read_parquet(Path(data_dir) / "slices.parquet")
    labelled = slices["label_file"].notna() & (pd.to_numeric(slices["n_boxes"]).fillna(0) > 0)
    return slices[labelled].reset_index(drop=True)


def select_slices(data_dir: Path, entries: tuple[DatasetEntry, ...], mix: str, subjects_per_dataset: int | None,
                  min_samples_per_dataset: int, seed: int) -> Selection:
    """The train and val slices of the datasets in group ``mix`` (or ``all``).

    ``subjects_per_dataset`` keeps that many train subjects of each dataset, drawn by
    ``seed`` so that smaller subsets are nested in larger ones; val keeps all subjects.

    Raises
    ------
    ValueError
        If a dataset is not in the data folder, ``mix`` names no group, or a selected
        dataset has no labelled train or val slices.
    """
    slices = labelled_slices(data_dir)
    available = list(dict.fromkeys(slices["dataset"]))
    if not entries:
        entries = tuple(DatasetEntry(name) for name in available)
    for index, entry in enumerate(entries):
        if entry.name not in available:
            raise ValueError(f"key 'datasets[{index}].name': no labelled slices of dataset {entry.name!r} in "
                             f"{data_dir} (datasets: {', '.join(available) or 'none'})")
    chosen = [e for e in entries if mix == "all" or mix in e.groups]
    if not chosen:
        groups = sorted({g for e in entries for g in e.groups})
        raise ValueError(f"key 'mix': no dataset is in group {mix!r} (groups: {', '.join(groups) or 'none'})")
    train, val, rows = [], [], []
    for entry in chosen:
        own = slices[slices["dataset"] == entry.name]
        train_subjects = sorted(own.loc[own["split"] == "train", "subject"].unique())
        order = np.random.default_rng([seed, zlib.crc32(entry.name.encode())]).permutation(len(train_subjects))
        kept = [train_subjects[i] for i in order[:subjects_per_dataset]]
        entry_train = own[(own["split"] == "train") & own["subject"].isin(kept)]
        entry_val = own[own["split"] == "val"]
        for split, table in (("train", entry_train), ("val", entry_val)):
            if table.empty:
                raise ValueError(f"dataset {entry.name!r} has no labelled {split} slices in {data_dir}")
        train.append(entry_train)
        val.append(entry_val)
        rows.append({
            "dataset": entry.name, "groups": " ".join(entry.groups), "weight": entry.weight,
            "train_subjects_available": len(train_subjects), "train_subjects": len(kept),
            "train_slices": len(entry_train), "train_components": int(entry_train["n_boxes"].sum()),
            "val_subjects": entry_val["subject"].nunique(), "val_slices": len(entry_val),
            "samples_per_epoch": samples_per_epoch(len(entry_train), entry.weight, min_samples_per_dataset),
        })
    return Selection(pd.concat(train, ignore_index=True), pd.concat(val, ignore_index=True), pd.DataFrame(rows))


def samples_per_epoch(n_slices: int, weight: float, minimum: int) -> int:
    """Slices a dataset contributes per epoch: ``weight`` times its size, at least ``minimum`` and one."""
    return max(1, round(weight * n_slices), minimum)


# --- prompts ------------------------------------------------------------------------------------

def components(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (n, 4) xyxy, inclusive pixel indices, and masks (n, H, W) of every 8-connected
    component of every label value with at least ``min_pixels`` pixels."""
    boxes, masks = [], []
    for value in np.unique(mask[mask != 0]):
        labelled, _ = ndimage.label(mask == value, structure=np.ones((3, 3)))
        for index, found in enumerate(ndimage.find_objects(labelled), start=1):
            component = labelled == index
            if found is None or component.sum() < min_pixels:
                continue
            rows, cols = found
            boxes.append((cols.start, rows.start, cols.stop - 1, rows.stop - 1))
            masks.append(component)
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0, *mask.shape), bool)
    return np.asarray(boxes, np.float32), np.stack(masks)


def make_prompts(mask: np.ndarray, settings: PromptSettings, input_size: int,
                 rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Boxes (n, 4) and points (n, 1, 2) in model input pixels, and targets (n, H, W) of one slice mask.

    With ``rng`` (training): at most ``max_prompts`` components drawn at random, box
    edges shifted by up to ``box_shift_px`` (at 1024 px, scaled to the mask size) and a
    random foreground point. Without (validation): every component, exact boxes and
    each component's most interior pixel.
    """
    boxes, masks = components(mask, settings.min_pixels)
    if rng is not None and settings.max_prompts is not None and len(boxes) > settings.max_prompts:
        chosen = np.sort(rng.choice(len(boxes), settings.max_prompts, replace=False))
        boxes, masks = boxes[chosen], masks[chosen]
    size = mask.shape[-1]
    if rng is not None and settings.box_shift_px > 0:
        shift = settings.box_shift_px * size / SHIFT_REFERENCE_SIZE
        boxes = np.clip(boxes + rng.uniform(-shift, shift, boxes.shape), 0, size - 1)
        boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], 1)
    scale = input_size / size
    points = None
    if settings.kind == "box_point":
        points = torch.as_tensor(np.array([_point(m, rng) for m in masks], np.float32).reshape(-1, 1, 2) * scale)
    return (torch.as_tensor(boxes * scale, dtype=torch.float32), points,
            torch.from_numpy(masks.astype(np.float32)))


def _point(component: np.ndarray, rng: np.random.Generator | None) -> tuple[float, float]:
    """(x, y) of a random pixel of ``component``, or of its pixel farthest from the background."""
    if rng is None:
        row, col = np.unravel_index(np.argmax(ndimage.distance_transform_edt(component)), component.shape)
    else:
        rows, cols = np.nonzero(component)
        pick = rng.integers(len(rows))
        row, col = rows[pick], cols[pick]
    return float(col), float(row)


# --- datasets -----------------------------------------------------------------------------------

def load_stored(data_dir: Path, row: pd.Series, member: str, frame: str = "pad") -> np.ndarray:
    """The ``image`` or ``mask`` of one stored slice (a row of ``slices.parquet``) on a family's ``frame``.

    Slices are stored padded to a square (``pad``); a ``stretch`` family (SAM2) gets the
    slice part of that square resized to the whole of it, as its own predictor sees a slice.
    """
    # An npz member is read on its own: the mask does not decompress the image.
    with np.load(Path(data_dir) / row["image_file"]) as arrays:
        stored = arrays[member]
    if frame == "stretch":
        stored = stored_to_stretched(stored, int(row["rows"]), int(row["columns"]), nearest=member == "mask")
    return stored.astype(np.float32) if member == "image" else stored


class SliceSource:
    """Model inputs and masks of a slice table on a family's ``frame``: the stored image, or its cached features."""

    def __init__(self, data_dir: Path, table: pd.DataFrame, store: EmbeddingStore | None = None,
                 frame: str = "pad") -> None:
        self.data_dir = Path(data_dir)
        self.table = table.reset_index(drop=True)
        self.store = store
        self.frame = frame
        self.rows = None if store is None else store.rows_of(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def dataset(self, index: int) -> str:
        return str(self.table.at[index, "dataset"])

    def inputs(self, index: int) -> dict[str, torch.Tensor]:
        if self.store is not None:
            return self.store.read(int(self.rows[index]))
        return {"image": torch.from_numpy(load_stored(self.data_dir, self.table.loc[index], "image", self.frame))}

    def mask(self, index: int) -> np.ndarray:
        return load_stored(self.data_dir, self.table.loc[index], "mask", self.frame)

    def item(self, index: int, settings: PromptSettings, input_size: int,
             rng: np.random.Generator | None) -> dict:
        boxes, points, targets = make_prompts(self.mask(index), settings, input_size, rng)
        return {"inputs": self.inputs(index), "boxes": boxes, "points": points, "targets": targets,
                "dataset": self.dataset(index)}


class EpochSamples(Dataset):
    """Training samples of one epoch, drawn afresh by :meth:`set_epoch`.

    Dataset ``d`` contributes ``counts[d]`` slices: whole random passes over its slices,
    the last one cut short, so a dataset below its count is repeated and one above it
    is subsampled. Prompts are drawn per (seed, epoch, sample), the same in any worker.
    """

    def __init__(self, source: SliceSource, counts: dict[str, int], settings: PromptSettings, input_size: int,
                 seed: int) -> None:
        self.source = source
        self.counts = dict(counts)
        self.settings = settings
        self.input_size = input_size
        self.seed = seed
        self.by_dataset = {name: np.flatnonzero(source.table["dataset"].to_numpy() == name) for name in counts}
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        parts = []
        for name, count in self.counts.items():
            rows = self.by_dataset[name]
            passes = [rng.permutation(rows) for _ in range(math.ceil(count / len(rows)))]
            parts.append(np.concatenate(passes)[:count])
        self.order = rng.permutation(np.concatenate(parts))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        """The sample's slice with its prompts; a slice whose components are all below
        ``min_pixels`` is replaced by another of its dataset, so every sample has a prompt."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        row = int(self.order[index])
        same_dataset = self.by_dataset[self.source.dataset(row)]
        for _ in range(len(same_dataset)):
            item = self.source.item(row, self.settings, self.input_size, rng)
            if len(item["boxes"]):
                return item
            row = int(rng.choice(same_dataset))
        raise ValueError(f"dataset {self.source.dataset(row)!r}: {len(same_dataset)} draws found no component of "
                         f"at least {self.settings.min_pixels} pixels in the stored masks")


class FixedSamples(Dataset):
    """Every slice of a table once, with deterministic prompts (validation)."""

    def __init__(self, source: SliceSource, settings: PromptSettings, input_size: int,
                 indices: list[int] | None = None) -> None:
        self.source = source
        self.settings = settings
        self.input_size = input_size
        self.indices = list(range(len(source))) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source.item(self.indices[index], self.settings, self.input_size, None)


def collate(items: list[dict]) -> dict:
    """Stack inputs; prompts stay per slice, targets are concatenated in prompt order."""
    return {
        "inputs": {name: torch.stack([item["inputs"][name] for item in items]) for name in items[0]["inputs"]},
        "boxes": [item["boxes"] for item in items],
        "points": [item["points"] for item in items],
        "targets": torch.cat([item["targets"] for item in items])[:, None],
        "datasets": [item["dataset"] for item in items],
    }
