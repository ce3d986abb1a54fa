"""Mask losses of the two finetuning recipes, on logits (n, 1, h, w) and 0/1 targets of the same shape.

* ``dice_bce``: soft Dice + binary cross-entropy with logits (AutoMedLabel).
* ``focal_dice``: 20 x focal + soft Dice (SAMRI).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

FOCAL_WEIGHT = 20.0


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice per mask, averaged; the +1 smoothing makes an empty target with an empty prediction cost 0."""
    probabilities = torch.sigmoid(logits)
    dims = tuple(range(1, logits.ndim))
    intersection = (probabilities * targets).sum(dim=dims)
    dice = (2 * intersection + 1) / (probabilities.sum(dim=dims) + targets.sum(dim=dims) + 1)
    return (1 - dice).mean()


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return soft_dice_loss(logits, targets) + F.binary_cross_entropy_with_logits(logits, targets)


def focal_dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    focal = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="mean")
    return FOCAL_WEIGHT * focal + soft_dice_loss(logits, targets)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dice_bce": dice_bce_loss,
    "focal_dice": focal_dice_loss,
}
