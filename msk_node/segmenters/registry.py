"""The segmenter families: what each needs and how it sees a slice; builds a segmenter from a manifest entry.

Every part of msk-node that names a family (model manifests, training and evaluation
configs, the training wrapper) reads :data:`FAMILIES`, so a family is added or checked
in one place.

Frame conventions (``frame``): each family sees a non-square slice the way its weights
were trained, in the node, in training and in evaluation alike.

* ``pad``: LiteMedSAM, SAM and MedSAM. Their preprocessing resizes the long side to the
  input size and pads the short one (MedSAM's and LiteMedSAM's training code; SAM's
  ``ResizeLongestSide``), so the anatomy keeps its aspect ratio
  (:class:`msk_node.intensity.SquareFrame`).
* ``stretch``: SAM2. Its image predictor and its training transforms resize the image to
  the square input size whatever its aspect ratio, so pixels are stretched along the
  short side (:class:`msk_node.segmenters.frames.StretchFrame`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry itself stays light: command lines read it before any model library loads
    from msk_node.segmenters.base import BoxSegmenter


@dataclass(frozen=True)
class SegmenterFamily:
    """One box-prompted segmenter family.

    Attributes
    ----------
    name : str
        Family name in manifests and configs.
    weights_ship : bool
        Weights ship with msk-node; otherwise a checkpoint file is required.
    default_config : str or None
        Default of the family's ``config`` (a SAM2 config or a segment-anything variant);
        None when the family takes no config.
    parts : tuple of str
        Attribute names of the image encoder, prompt encoder and mask decoder on the
        family's ``torch.nn.Module``, the parts training freezes or trains.
    frame : str
        How a slice maps onto the square model input: ``"pad"`` or ``"stretch"``.
    input_size : int
        Side of the square model input of the shipped or published weights.
    decoder_finetune : bool
        The node can load a separately finetuned mask decoder over the weights.
    """

    name: str
    weights_ship: bool
    default_config: str | None
    parts: tuple[str, str, str]
    frame: str
    input_size: int
    decoder_finetune: bool = False


_SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")

FAMILIES: dict[str, SegmenterFamily] = {
    family.name: family for family in (
        SegmenterFamily("litemedsam", True, None, _SAM_PARTS, "pad", 256, decoder_finetune=True),
        SegmenterFamily("sam2", False, "hiera_b+", ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder"),
                        "stretch", 1024),
        SegmenterFamily("sam", False, "vit_b", _SAM_PARTS, "pad", 1024),
        SegmenterFamily("medsam", False, "vit_b", _SAM_PARTS, "pad", 1024),
    )
}


def segmenter_family(name: str) -> SegmenterFamily:
    """The family called ``name``; :class:`ValueError` naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown segmenter family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


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
    spec = segmenter_family(family)
    if spec.name == "litemedsam":
        from msk_node.segmenters.litemedsam import LiteMedSAMSegmenter

        return LiteMedSAMSegmenter(weights, decoder_weights=decoder_weights, precision=precision, backend=backend,
                                   device=device)
    if spec.name == "sam2":
        from msk_node.segmenters.sam2 import Sam2Segmenter

        return Sam2Segmenter(config or spec.default_config, weights, allow_random_weights=allow_random_weights,
                             device=device)
    from msk_node.segmenters.sam import SamSegmenter

    return SamSegmenter(spec.name, weights, variant=config or spec.default_config,
                        allow_random_weights=allow_random_weights, device=device)
