"""The two ways a ``rows x cols`` slice maps onto a family's square model input, and back.

:class:`msk_node.intensity.SquareFrame` pads, :class:`StretchFrame` stretches; which one a
family uses is its ``frame`` in :data:`msk_node.segmenters.registry.FAMILIES`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from msk_node.intensity import SquareFrame
from msk_node.segmenters.registry import segmenter_family


@dataclass(frozen=True)
class StretchFrame:
    """Maps a ``rows x cols`` slice onto a ``size x size`` model input by resizing each axis on its own.

    This is SAM2's own convention (its predictor resizes any image to the square input), so
    x and y have different scales on a non-square slice. The methods match
    :class:`msk_node.intensity.SquareFrame`'s.
    """

    rows: int
    cols: int
    size: int

    @property
    def pixel_size(self) -> tuple[float, float]:
        """Slice pixels per model pixel along x (columns) and y (rows)."""
        return self.cols / self.size, self.rows / self.size

    def image_to_model(self, image: np.ndarray) -> torch.Tensor:
        """uint8 ``rows x cols`` slice -> float tensor (1, 3, size, size) in 0-1."""
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None, None]
        tensor = F.interpolate(tensor, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return tensor.expand(1, 3, self.size, self.size).contiguous()

    def labels_to_model(self, labels: np.ndarray) -> np.ndarray:
        """Label or mask slice(s) ``[..., rows, cols]`` onto the model's square, nearest neighbour."""
        row_source = np.minimum(((np.arange(self.size) + 0.5) * self.rows / self.size).astype(int), self.rows - 1)
        col_source = np.minimum(((np.arange(self.size) + 0.5) * self.cols / self.size).astype(int), self.cols - 1)
        return labels[..., row_source[:, None], col_source[None, :]]

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in slice pixels -> model pixels."""
        x_scale, y_scale = self.pixel_size
        return np.asarray(boxes, dtype=np.float32) / np.array([x_scale, y_scale] * 2, dtype=np.float32)

    def masks_to_slice(self, masks: torch.Tensor) -> np.ndarray:
        """(n, 1, h, w) probabilities on the model's square -> (n, rows, cols) float32."""
        full = F.interpolate(masks.float(), size=(self.rows, self.cols), mode="bilinear", align_corners=False)
        return full[:, 0].cpu().numpy()


ModelFrame = SquareFrame | StretchFrame


def model_frame(family: str, rows: int, cols: int, size: int | None = None) -> ModelFrame:
    """The frame ``family`` sees a ``rows x cols`` slice in, at ``size`` (default: the family's input size)."""
    spec = segmenter_family(family)
    frame = StretchFrame if spec.frame == "stretch" else SquareFrame
    return frame(rows, cols, spec.input_size if size is None else size)


def pixel_size(frame: ModelFrame) -> tuple[float, float]:
    """Slice pixels per model pixel along x (columns) and y (rows)."""
    if isinstance(frame, StretchFrame):
        return frame.pixel_size
    return frame.scale, frame.scale


def stored_to_stretched(stored: np.ndarray, rows: int, cols: int, nearest: bool) -> np.ndarray:
    """A slice stored on the padded square (:class:`SquareFrame`, ``[..., S, S]``) re-sampled onto the stretched one.

    The slice fills the top-left ``S * rows / side x S * cols / side`` of the padded square;
    that part is resized to ``S x S``, bilinear for images and nearest neighbour for label masks.
    """
    size = stored.shape[-1]
    side = max(rows, cols)
    # Centre of output pixel i in stored pixels: (i + 0.5) * extent / size.
    row_centres = (np.arange(size) + 0.5) * (size * rows / side) / size
    col_centres = (np.arange(size) + 0.5) * (size * cols / side) / size
    if nearest:
        row_source = np.minimum(row_centres.astype(int), size - 1)
        col_source = np.minimum(col_centres.astype(int), size - 1)
        return stored[..., row_source[:, None], col_source[None, :]]
    grid_y, grid_x = np.meshgrid(row_centres / size * 2 - 1, col_centres / size * 2 - 1, indexing="ij")
    grid = torch.from_numpy(np.stack([grid_x, grid_y], axis=-1).astype(np.float32))[None]
    tensor = torch.from_numpy(np.asarray(stored, dtype=np.float32).reshape(1, -1, size, size))
    sampled = F.grid_sample(tensor, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.reshape(stored.shape).numpy()
