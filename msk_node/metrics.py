"""Segmentation agreement per label, via MONAI's metric implementations."""
from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, values: dict[str, int]) -> dict[str, float]:
    """Dice of each named label value between two label volumes on the same grid.

    A label absent from both volumes gives NaN (nothing to agree on), never 1 or 0.
    """
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    return {name: mask_dice(prediction == value, truth == value) for name, value in values.items()}


def mask_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty."""
    pred = torch.from_numpy(np.asarray(prediction, dtype=bool))[None, None].float()
    true = torch.from_numpy(np.asarray(truth, dtype=bool))[None, None].float()
    return float(compute_dice(pred, true, include_background=True, ignore_empty=True)[0, 0])
