"""SAM ViT-B and MedSAM ViT-B (segment-anything architecture, 1024 px input)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry

from msk_node.intensity import SquareFrame
from msk_node.segmenters.base import Decoded, SquareEmbedding, box_prompt_decode

INPUT_SIZE = 1024


class SamSegmenter:
    """Box-prompted SAM or MedSAM.

    The two differ only in weights and input normalisation: SAM standardises with
    its ImageNet pixel mean/std, MedSAM feeds the 0-1 image as it is.

    Parameters
    ----------
    family
        ``"sam"`` or ``"medsam"``.
    weights
        Checkpoint path (``sam_vit_b_01ec64.pth`` or ``medsam_vit_b.pth``). None builds
        random weights, which only tests may ask for (``allow_random_weights``).
    """

    def __init__(
        self,
        family: str = "sam",
        weights: Path | None = None,
        *,
        variant: str = "vit_b",
        allow_random_weights: bool = False,
        device: str = "cpu",
    ) -> None:
        if family not in ("sam", "medsam"):
            raise ValueError(f"family must be 'sam' or 'medsam', got {family!r}")
        if variant not in sam_model_registry:
            raise ValueError(f"variant must be one of {sorted(sam_model_registry)}, got {variant!r}")
        if weights is None and not allow_random_weights:
            raise ValueError(f"{family} needs a checkpoint path: no {family} weights ship with msk-node")
        self.family = family
        self.device = torch.device(device)
        self.model = sam_model_registry[variant](checkpoint=None)
        if weights is not None:
            state = torch.load(Path(weights), map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def encode(self, image: np.ndarray) -> SquareEmbedding:
        frame = SquareFrame(image.shape[0], image.shape[1], INPUT_SIZE)
        pixels = frame.image_to_model(image).to(self.device)
        if self.family == "sam":
            pixels = (pixels * 255.0 - self.model.pixel_mean) / self.model.pixel_std
        return SquareEmbedding(self.model.image_encoder(pixels), frame)

    @torch.inference_mode()
    def decode(self, embedding: SquareEmbedding, boxes: np.ndarray) -> Decoded:
        frame = embedding.frame
        if len(boxes) == 0:
            return Decoded.empty(frame.rows, frame.cols)
        box_tensor = torch.as_tensor(frame.boxes_to_model(boxes), device=self.device)[:, None, :]
        logits, predicted_iou = box_prompt_decode(self.model, embedding.features, box_tensor)
        logits = F.interpolate(logits, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return Decoded(frame.masks_to_slice(torch.sigmoid(logits)), predicted_iou.reshape(-1).float().cpu().numpy())
