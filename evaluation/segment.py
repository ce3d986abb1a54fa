"""Box-prompted segmentation of evaluation cases, as both papers evaluate a segmenter.

Prompt sources: ``gt`` gives one box per 2D connected component of each truth label,
``shifted`` the same boxes with every corner moved by a seeded uniform offset of up to
``shift_px`` pixels of the model's input frame (the papers' robustness check, whose 20 px
are pixels of the resized model input: 256 px for LiteMedSAM, 1024 px for SAM, MedSAM and
SAM2), ``detector`` the boxes of the node's YOLO detector. Each slice is encoded once per
model and case and its boxes decoded together; probabilities are thresholded at 0.5 as in
the node. Post-processing, when asked for, is the node's own (:mod:`msk_node.postprocess`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from msk_node_evaluation.config import ModelSpec
from msk_node.labels import LabelMap
from msk_node.metrics import mask_dice
from msk_node.postprocess import THRESHOLD, merge_labels, postprocess_masks
from msk_node.progress import progress
from msk_node.segmenters.base import BoxSegmenter
from msk_node.segmenters.frames import model_frame, pixel_size
from msk_node_training.boxes import instance_boxes

Box = tuple[float, float, float, float]
#: Slice index -> (label value, xyxy box in slice pixels) for every prompt on that slice.
Prompts = dict[int, list[tuple[int, Box]]]


def input_pixel_size(segmenter: BoxSegmenter, rows: int, cols: int) -> tuple[float, float]:
    """Slice pixels per pixel of the model's input along x (columns) and y (rows) for a ``rows x cols`` slice.

    The family's frame (:data:`msk_node.segmenters.registry.FAMILIES`): LiteMedSAM, SAM and MedSAM pad
    the slice to a square and resize it, SAM2 stretches it to its square input size.
    """
    size = segmenter.predictor.model.image_size if segmenter.family == "sam2" else None
    return pixel_size(model_frame(segmenter.family, rows, cols, size))


def truth_prompts(labels: np.ndarray, values: Iterable[int], slices: Iterable[int], *, shift_px: float = 0.0,
                  seed: int = 0, min_pixels: int = 10, input_pixel: tuple[float, float] = (1.0, 1.0)) -> Prompts:
    """One box per truth component of each label value on each of ``slices``, optionally shifted.

    Each corner coordinate moves by a seeded uniform offset in ``[-shift_px, shift_px]`` pixels of the
    model's input, ``input_pixel`` (:func:`input_pixel_size`) slice pixels each along x and y; shifted
    corners are clipped to the slice.
    """
    values = list(values)
    rng = np.random.default_rng(seed)
    rows, cols = labels.shape[1:]
    to_slice = np.array([input_pixel[0], input_pixel[1]] * 2, dtype=np.float32)
    prompts: Prompts = {}
    for index in slices:
        found = instance_boxes(labels[index], values, min_pixels)
        if not found:
            continue
        boxes = np.array([box for _, box in found], dtype=np.float32)
        if shift_px:
            boxes += rng.uniform(-shift_px, shift_px, size=boxes.shape).astype(np.float32) * to_slice
            boxes = np.clip(boxes, 0, [cols - 1, rows - 1, cols - 1, rows - 1]).astype(np.float32)
        prompts[index] = [(value, tuple(float(v) for v in box)) for (value, _), box in zip(found, boxes)]
    return prompts


def detector_prompts(detector: Any, normalised: np.ndarray, slices: Sequence[int], labels: dict[str, int],
                     label_map: LabelMap) -> Prompts:
    """The detector's boxes on ``slices`` for the labels named in ``labels`` (name -> truth value)."""
    slices = list(slices)
    wanted = LabelMap(tuple(spec for spec in label_map if spec.name in labels))
    prompts: Prompts = {}
    for detection in detector.detect(normalised[slices], wanted):
        prompts.setdefault(slices[detection.slice_index], []).append((labels[detection.label], detection.box))
    return prompts


@dataclass
class EncodedSlices:
    """Each slice's embedding, computed on first use and kept for the case's other prompt sources."""

    segmenter: BoxSegmenter
    normalised: np.ndarray
    embeddings: dict[int, Any] = field(default_factory=dict)

    def __getitem__(self, index: int) -> Any:
        if index not in self.embeddings:
            self.embeddings[index] = self.segmenter.encode(self.normalised[index])
        return self.embeddings[index]


def segment_prompts(encoded: EncodedSlices, prompts: Prompts, values: Iterable[int]) -> dict[int, np.ndarray]:
    """Binary masks (one per label value, on the volume's grid) from ``prompts``; unprompted slices stay empty."""
    shape = encoded.normalised.shape
    masks = {value: np.zeros(shape, dtype=bool) for value in values}
    for index in progress(sorted(prompts), "segmenting", "slice"):
        boxes = np.array([box for _, box in prompts[index]], dtype=np.float32)
        probabilities = encoded.segmenter.decode(encoded[index], boxes)
        for (value, _), probability in zip(prompts[index], probabilities):
            if value in masks:
                masks[value][index] |= probability > THRESHOLD
    return masks


def segment_from_truth_boxes(
    segmenter: BoxSegmenter,
    normalised: np.ndarray,
    labels: np.ndarray,
    values: Iterable[int],
    *,
    slices: Iterable[int] | None = None,
    min_pixels: int = 10,
) -> dict[int, np.ndarray]:
    """Binary masks (one per label value, on the volume's grid) predicted from truth boxes.

    Slices outside ``slices`` stay empty.
    """
    values = list(values)
    prompts = truth_prompts(labels, values, slices if slices is not None else range(len(labels)),
                            min_pixels=min_pixels)
    return segment_prompts(EncodedSlices(segmenter, normalised), prompts, values)


def dice_of_masks(masks: dict[int, np.ndarray], labels: np.ndarray,
                  slices: Iterable[int] | None = None) -> dict[int, float]:
    """Dice of each predicted mask against its label, over ``slices`` (all by default)."""
    chosen = list(slices) if slices is not None else slice(None)
    return {value: mask_dice(mask[chosen], labels[chosen] == value) for value, mask in masks.items()}


def postprocessed(masks: dict[str, np.ndarray], label_map: LabelMap,
                  pixel_spacing: tuple[float, float]) -> dict[str, np.ndarray]:
    """The node's post-processing of per-label masks (name -> mask), merged to one label per voxel.

    Every name of ``masks`` stays in the result, empty where post-processing removed it.
    """
    cleaned = postprocess_masks(masks, label_map, pixel_spacing)
    if not cleaned:
        return {name: np.zeros_like(mask) for name, mask in masks.items()}
    merged = merge_labels(cleaned, label_map)
    return {name: merged == label_map.by_name(name).value for name in masks}


@dataclass
class EvalModel:
    """A model under evaluation: its segmenter (None for ``truth``) and the detector its boxes come from."""

    name: str
    segmenter: BoxSegmenter | None
    detector: Any = None


def load_eval_model(spec: ModelSpec, detector: Any = None) -> EvalModel:
    """Build ``spec``: a node models folder brings its own detector; a zero-shot family uses ``detector``."""
    if spec.models_dir is not None:
        from msk_node.models import load_models

        models = load_models(spec.models_dir)
        return EvalModel(spec.name, models.segmenter, models.detector)
    if spec.family == "truth":
        return EvalModel(spec.name, None, detector)
    from msk_node.segmenters.registry import build_segmenter

    return EvalModel(spec.name, build_segmenter(spec.family, spec.checkpoint, config=spec.config,
                                                precision=spec.precision), detector)
