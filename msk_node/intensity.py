"""Intensity normalisation and the square frame the models see.

Both papers normalise each volume to the 1st-99th percentile of its non-zero voxels
and scale to 0-255; detector, segmenters and training all use these functions so a
model sees the same input in training and in the node.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def normalise_volume(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Clip to the ``low``-``high`` percentiles of the non-zero voxels and scale to uint8 0-255."""
    values = array[array != 0]
    if values.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    scaled = (np.clip(array, lo, hi) - lo) / (hi - lo) * 255.0
    return np.round(scaled).astype(np.uint8)


@dataclass(frozen=True)
class SquareFrame:
    """Maps a ``rows x cols`` slice onto a ``size x size`` model input and back.

    The slice is padded at the bottom and right to a square (so pixel (0, 0) stays put
    and the aspect ratio is kept) and then resized.
    """

    rows: int
    cols: int
    size: int

    @property
    def scale(self) -> float:
        """Slice pixels per model pixel."""
        return max(self.rows, self.cols) / self.size

    def image_to_model(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``rows x cols`` slice -> float tensor (1, 3, size, size) in 0-1."""
        side = max(self.rows, self.cols)
        padded = np.zeros((side, side), dtype=np.float32)
        padded[: self.rows, : self.cols] = image
        tensor = torch.from_numpy(padded / 255.0)[None, None]
        tensor = F.interpolate(tensor, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return tensor.expand(1, 3, self.size, self.size).contiguous()

    def labels_to_model(self, labels: np.ndarray) -> np.ndarray:
        """Label or mask slice(s) ``[..., rows, cols]`` onto the model's square, nearest neighbour.

        Padded like :meth:`image_to_model`; each output pixel takes the source pixel under its centre.
        """
        side = max(self.rows, self.cols)
        padded = np.zeros((*labels.shape[:-2], side, side), dtype=labels.dtype)
        padded[..., : self.rows, : self.cols] = labels
        source = np.minimum(((np.arange(self.size) + 0.5) * self.scale).astype(int), side - 1)
        return padded[..., source[:, None], source[None, :]]

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in slice pixels -> model pixels."""
        return np.asarray(boxes, dtype=np.float32) / self.scale

    def masks_to_slice(self, masks: torch.Tensor) -> np.ndarray:
        """(n, 1, h, w) probabilities on the model's square -> (n, rows, cols) float32."""
        side = max(self.rows, self.cols)
        full = F.interpolate(masks.float(), size=(side, side), mode="bilinear", align_corners=False)
        return full[:, 0, : self.rows, : self.cols].cpu().numpy()
