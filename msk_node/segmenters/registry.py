"""Build a segmenter from a model manifest entry."""
from __future__ import annotations

from pathlib import Path

from msk_node.segmenters.base import BoxSegmenter

FAMILIES = ("litemedsam", "sam2", "sam", "medsam")


def build_segmenter(
    family: str,
    weights: Path | None = None,
    *,
    config: str | None = None,
    decoder_weights: Path | None = None,
    precision: str = "auto",
    backend: str = "auto",
    allow_random_weights: bool = False,
    device: str = "cpu",
) -> BoxSegmenter:
    """Create the segmenter of ``family``; its module is imported only when used.

    ``precision`` and ``backend`` apply to LiteMedSAM's encoder (see
    :class:`msk_node.segmenters.litemedsam.LiteMedSAMSegmenter`); the other families run fp32 PyTorch.
    """
    if family == "litemedsam":
        from msk_node.segmenters.litemedsam import LiteMedSAMSegmenter

        return LiteMedSAMSegmenter(weights, decoder_weights=decoder_weights, precision=precision, backend=backend,
                                   device=device)
    if family == "sam2":
        from msk_node.segmenters.sam2 import Sam2Segmenter

        return Sam2Segmenter(config or "hiera_b+", weights, allow_random_weights=allow_random_weights, device=device)
    if family in ("sam", "medsam"):
        from msk_node.segmenters.sam import SamSegmenter

        return SamSegmenter(family, weights, variant=config or "vit_b",
                            allow_random_weights=allow_random_weights, device=device)
    raise ValueError(f"segmenter family must be one of {FAMILIES}, got {family!r}")
