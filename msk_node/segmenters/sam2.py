"""SAM2 image predictor (hiera t / s / b+ / l), used slice by slice without its memory."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

from msk_node.segmenters.base import Decoded

#: Short names for the package's SAM2.1 configs.
SAM2_CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


@dataclass
class Sam2Embedding:
    features: dict
    rows: int
    cols: int


class Sam2Segmenter:
    """Box-prompted SAM2 through :class:`sam2.sam2_image_predictor.SAM2ImagePredictor`.

    Parameters
    ----------
    config
        A short name from :data:`SAM2_CONFIGS` or a package-relative config path.
    weights
        Checkpoint path (``sam2.1_hiera_base_plus.pt``). None builds random weights,
        which only tests may ask for (``allow_random_weights``).
    """

    family = "sam2"

    def __init__(
        self,
        config: str = "hiera_b+",
        weights: Path | None = None,
        *,
        allow_random_weights: bool = False,
        device: str = "cpu",
    ) -> None:
        if weights is None and not allow_random_weights:
            raise ValueError("sam2 needs a checkpoint path: no SAM2 weights ship with msk-node")
        config_path = SAM2_CONFIGS.get(config, config)
        model = build_sam2(config_path, ckpt_path=str(weights) if weights else None, device=device)
        self.predictor = SAM2ImagePredictor(model)

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> Sam2Embedding:
        self.predictor.set_image(np.repeat(image[:, :, None], 3, axis=2))
        return Sam2Embedding(
            features={"image_embed": self.predictor._features["image_embed"],
                      "high_res_feats": self.predictor._features["high_res_feats"]},
            rows=image.shape[0],
            cols=image.shape[1],
        )

    @torch.inference_mode()
    def decode(self, embedding: Sam2Embedding, boxes: np.ndarray) -> Decoded:
        if len(boxes) == 0:
            return Decoded.empty(embedding.rows, embedding.cols)
        # The predictor holds one image's features; restore this slice's before decoding.
        self.predictor._features = embedding.features
        self.predictor._orig_hw = [(embedding.rows, embedding.cols)]
        self.predictor._is_image_set = True
        logits, predicted_iou, _ = self.predictor.predict(
            box=np.asarray(boxes, dtype=np.float32), multimask_output=False, return_logits=True
        )
        logits = np.asarray(logits).reshape(len(boxes), embedding.rows, embedding.cols)
        return Decoded(1.0 / (1.0 + np.exp(-logits)), np.asarray(predicted_iou, dtype=np.float32).reshape(-1))
