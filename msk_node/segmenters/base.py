"""The one interface every box-prompted segmenter family implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from msk_node.intensity import SquareFrame


class BoxSegmenter(Protocol):
    """Segment a 2D slice from box prompts: encode the slice once, decode all boxes at once."""

    #: Family name as used in model manifests ("litemedsam", "sam2", "sam", "medsam").
    family: str

    def encode(self, image: np.ndarray) -> Any:
        """Encode one normalised uint8 ``rows x cols`` slice; the result feeds :meth:`decode`."""

    def decode(self, embedding: Any, boxes: np.ndarray) -> Decoded:
        """Probabilities and predicted IoUs for ``boxes`` (n, 4) xyxy in slice pixels."""


@dataclass(frozen=True)
class Decoded:
    """What a box decode gives: a mask probability map and the decoder's own quality estimate per box."""

    #: (n, rows, cols) in 0-1, one map per box on the slice's pixels.
    probabilities: np.ndarray
    #: (n,) the IoU the decoder predicts its mask has with the true one.
    predicted_iou: np.ndarray

    @classmethod
    def empty(cls, rows: int, cols: int) -> Decoded:
        return cls(np.zeros((0, rows, cols), dtype=np.float32), np.zeros(0, dtype=np.float32))


@dataclass
class SquareEmbedding:
    """Image features of one slice encoded on the model's square frame."""

    features: torch.Tensor
    frame: SquareFrame


def box_prompt_logits(model: torch.nn.Module, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mask logits (n, 1, h, w) of a SAM-style prompt encoder + mask decoder for boxes (n, 1, 4)."""
    return box_prompt_decode(model, features, boxes)[0]


def box_prompt_decode(model: torch.nn.Module, features: torch.Tensor,
                      boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask logits (n, 1, h, w) and predicted IoUs (n, 1) of a SAM-style prompt encoder + mask decoder.

    ``boxes`` are (n, 1, 4); one image embedding serves all boxes: the decoder repeats it per box itself.
    """
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    return model.mask_decoder(
        image_embeddings=features,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
