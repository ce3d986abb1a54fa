"""SAM-family models as one trainable module: images or cached features plus prompts -> mask logits.

The node's segmenter adapters (:mod:`msk_node.segmenters`) build the models; this module
adds what training needs on top: the family's input normalisation, the batched
encoder, prompts of a box or a box plus a foreground point, and which parameters train.

* ``full``: image encoder and mask decoder train.
* ``decoder``: only the mask decoder trains. For SAM2 its two high-resolution
  projections (``conv_s0``/``conv_s1``) stay frozen too: SAM2 applies them while
  encoding the image, so they belong to the features a store caches.

Prompt encoders (and SAM2's memory modules, unused slice by slice) never train.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msk_node import config_checks as checks
from msk_node.segmenters.base import box_prompt_logits
from msk_node.segmenters.registry import build_segmenter, segmenter_family

MODES = ("full", "decoder")
_SAM2_FEATURE_PROJECTIONS = ("conv_s0", "conv_s1")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build.

    ``model_config``: a SAM2 config (package-relative path or short name such as
    ``hiera_t``) or a segment-anything variant (``vit_b``); ``checkpoint`` None means
    LiteMedSAM's bundled weights, or random weights for the other families;
    ``image_size`` (SAM2 only) builds the model for another input size than its config's.
    """

    family: str
    model_config: str | None = None
    checkpoint: Path | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        family = checks.family_named(self.family, "model.family")
        if family.name == "sam2" and self.model_config is None:
            raise ValueError("missing key 'model.model_config' "
                             "(a SAM2 config, e.g. configs/sam2.1/sam2.1_hiera_t.yaml)")
        if family.default_config is None and self.model_config is not None:
            raise ValueError(f"key 'model.model_config' does not apply to family {family.name}")
        if family.default_config is not None and self.model_config is None:
            object.__setattr__(self, "model_config", family.default_config)
        if self.image_size is not None and (family.name != "sam2" or self.image_size <= 0 or self.image_size % 32):
            raise ValueError(f"key 'model.image_size' applies to family sam2 and must be a positive multiple of 32, "
                             f"got {self.image_size!r}")


def build_base_model(spec: ModelSpec) -> nn.Module:
    """The family's model on CPU, through the node's segmenter registry."""
    if spec.family == "sam2" and spec.image_size is not None:
        # The registry builds SAM2 at its config's size; a smaller input needs a Hydra override.
        from sam2.build_sam import build_sam2

        from msk_node.segmenters.sam2 import SAM2_CONFIGS

        return build_sam2(SAM2_CONFIGS.get(spec.model_config, spec.model_config),
                          ckpt_path=None if spec.checkpoint is None else str(spec.checkpoint), device="cpu",
                          hydra_overrides_extra=[f"++model.image_size={spec.image_size}"])
    # Training needs the PyTorch encoder itself, not an accelerated copy of it.
    segmenter = build_segmenter(spec.family, spec.checkpoint, config=spec.model_config, backend="torch",
                                allow_random_weights=True, device="cpu")
    return segmenter.predictor.model if spec.family == "sam2" else segmenter.model


class PromptedModel(nn.Module):
    """A SAM-family model with the parameters of ``mode`` trainable.

    The model is kept in eval mode throughout: LiteMedSAM's TinyViT has BatchNorm,
    whose running statistics batches of a few slices would spoil, and SAM2's decoder
    picks its output mask the same way it does at inference. No family uses dropout.
    """

    def __init__(self, base: nn.Module, family: str, mode: str) -> None:
        super().__init__()
        self.parts = segmenter_family(family).parts
        #: How slices map onto the square input (registry): the node's and evaluation's convention too.
        self.frame = segmenter_family(family).frame
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.base = base
        self.family = family
        self.mode = mode
        if family == "sam2":
            from sam2.utils.transforms import SAM2Transforms

            self.input_size = int(base.image_size)
            self._sam2_normalise = SAM2Transforms(resolution=self.input_size, mask_threshold=0.0).transforms
        else:
            self.input_size = int(self.image_encoder.img_size)
        base.requires_grad_(False)
        self.mask_decoder.requires_grad_(True)
        if mode == "full":
            self.image_encoder.requires_grad_(True)
        elif family == "sam2":
            for name in _SAM2_FEATURE_PROJECTIONS:
                getattr(self.mask_decoder, name).requires_grad_(False)
        self.eval()

    @property
    def image_encoder(self) -> nn.Module:
        return getattr(self.base, self.parts[0])

    @property
    def prompt_encoder(self) -> nn.Module:
        return getattr(self.base, self.parts[1])

    @property
    def mask_decoder(self) -> nn.Module:
        return getattr(self.base, self.parts[2])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.base.parameters() if p.requires_grad]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Stored slices (B, 3, S, S), 0-1, -> the family's normalised input at its size."""
        if self.family == "sam2":
            return self._sam2_normalise(images)
        if images.shape[-1] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        if self.family == "sam":
            return (images * 255.0 - self.base.pixel_mean) / self.base.pixel_std
        return images

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image features (batched) as the mask decoder reads them; what an embedding store caches."""
        if self.family != "sam2":
            return {"image_embed": self.image_encoder(pixels)}
        backbone = self.base.forward_image(pixels)
        _, features, _, sizes = self.base._prepare_backbone_features(backbone)
        if self.base.directly_add_no_mem_embed:
            features[-1] = features[-1] + self.base.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(len(pixels), -1, *size) for f, size in zip(features, sizes)]
        return {"high_res_0": maps[0], "high_res_1": maps[1], "image_embed": maps[2]}

    def decode(self, features: dict[str, torch.Tensor], boxes: torch.Tensor,
               points: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (n, 1, h, w) for one slice's features (batch 1), boxes (n, 4) and optional points (n, 1, 2)."""
        n = len(boxes)
        if self.family == "sam2":
            # As SAM2ImagePredictor prompts: box corners are points labelled 2 and 3.
            coords = boxes.reshape(n, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(n, 1)
            if points is not None:
                coords = torch.cat([coords, points], dim=1)
                labels = torch.cat([labels, labels.new_ones(n, 1)], dim=1)
            sparse, dense = self.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
            return self.mask_decoder(
                image_embeddings=features["image_embed"], image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
                repeat_image=n > 1, high_res_features=[features["high_res_0"], features["high_res_1"]])[0]
        if points is None:
            return box_prompt_logits(self.base, features["image_embed"], boxes[:, None, :])
        labels = torch.ones((n, 1), dtype=torch.int, device=boxes.device)
        sparse, dense = self.prompt_encoder(points=(points, labels), boxes=boxes[:, None, :], masks=None)
        logits, _ = self.mask_decoder(
            image_embeddings=features["image_embed"], image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        return logits

    def forward(self, inputs: dict[str, torch.Tensor], boxes: list[torch.Tensor],
                points: list[torch.Tensor | None], mask_size: int) -> torch.Tensor | None:
        """Logits (P, 1, mask_size, mask_size) of every prompt of a batch, in order; None without prompts.

        ``inputs`` holds either ``image`` (B, 3, S, S) or cached features, batched.
        """
        if "image" in inputs:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "full"):
                features = self.encode(self.prepare(inputs["image"]))
        else:
            features = inputs
        logits = [self.decode({name: value[i:i + 1] for name, value in features.items()}, slice_boxes, slice_points)
                  for i, (slice_boxes, slice_points) in enumerate(zip(boxes, points)) if len(slice_boxes)]
        if not logits:
            return None
        logits = torch.cat(logits)
        if logits.shape[-1] != mask_size:
            logits = F.interpolate(logits, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
        return logits

    def feature_fingerprint(self) -> str:
        """SHA-256 of every weight that shapes the cached features, and of the input size."""
        modules = {"image_encoder": self.image_encoder}
        if self.family == "sam2":
            modules.update({name: getattr(self.mask_decoder, name) for name in _SAM2_FEATURE_PROJECTIONS})
        digest = hashlib.sha256(f"{self.family}:{self.input_size}:{self.frame}".encode())
        for prefix, module in modules.items():
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(f"{prefix}.{name}".encode())
                digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
        if self.family == "sam2":
            digest.update(self.base.no_mem_embed.detach().cpu().float().numpy().tobytes())
        return digest.hexdigest()
