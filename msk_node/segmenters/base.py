"""The one interface every box-prompted segmenter family implements."""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class BoxSegmenter(Protocol):
    """Segment a 2D slice from box prompts: encode the slice once, decode all boxes at once."""

    #: Family name as used in model manifests ("litemedsam", "sam2", "sam", "medsam").
    family: str

    def encode(self, image: np.ndarray) -> Any:
        """Encode one normalised uint8 ``rows x cols`` slice; the result feeds :meth:`decode`."""

    def decode(self, embedding: Any, boxes: np.ndarray) -> np.ndarray:
        """Probabilities (n, rows, cols) in 0-1 for ``boxes`` (n, 4) xyxy in slice pixels."""
