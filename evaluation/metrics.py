"""Segmentation metrics of one label, through MONAI, with distances in millimetres.

Dice and IoU count voxels; HD95 (symmetric 95th-percentile Hausdorff distance) and MSD
(symmetric mean surface distance) are in mm because the voxel spacing is required here
and passed on to MONAI, which would otherwise measure in voxels. When only one of the two
masks is empty there is no surface to measure from, yet the error is real: both distances
then take the penalty of :func:`empty_mask_penalty_mm` (the image diagonal), so a missed or
invented structure counts against a model rather than dropping out of its mean. Object size
strata follow SAMRI: the truth mask's share of the slice area.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou

METRICS = ("dice", "iou", "hd95_mm", "msd_mm")
#: What :func:`empty_mask` says when only the prediction (a missed structure) or only the truth is empty.
EMPTY_PREDICTION, EMPTY_TRUTH = "prediction", "truth"
#: Upper bounds of the area share of the small and medium strata; larger objects are "large".
SIZE_STRATA = ((0.005, "small"), (0.035, "medium"))
SIZE_ORDER = ("small", "medium", "large", "absent")


def compute_mask_metrics(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, IoU, HD95 and MSD of a binary prediction against a binary truth.

    Parameters
    ----------
    prediction, truth
        Binary masks of the same 2D or 3D shape.
    spacing
        Voxel spacing in mm along each array axis (``[slice,] row, column``).

    Returns
    -------
    dict
        ``dice``, ``iou`` (0-1), ``hd95_mm`` and ``msd_mm``. All are NaN when both masks are
        empty (nothing to agree on). When only one is empty, Dice and IoU are 0 and both
        distances are :func:`empty_mask_penalty_mm` of the grid.

    Raises
    ------
    ValueError
        If the shapes differ, or ``spacing`` does not give one positive value per axis.
    """
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != truth.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must give one positive value in mm per axis of a {truth.ndim}D mask, "
                         f"got {spacing}")
    if not prediction.any() and not truth.any():
        return dict.fromkeys(METRICS, math.nan)
    pred = torch.from_numpy(prediction)[None, None].float()
    true = torch.from_numpy(truth)[None, None].float()
    scores = {"dice": float(compute_dice(pred, true, include_background=True, ignore_empty=False)[0, 0]),
              "iou": float(compute_iou(pred, true, include_background=True, ignore_empty=False)[0, 0])}
    if not (prediction.any() and truth.any()):
        penalty = empty_mask_penalty_mm(truth.shape, spacing)
        return {**scores, "hd95_mm": penalty, "msd_mm": penalty}
    with warnings.catch_warnings():
        # MONAI's own deprecation notice about an argument it passes to itself
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        scores["hd95_mm"] = float(compute_hausdorff_distance(pred, true, include_background=True, percentile=95,
                                                             spacing=spacing)[0, 0])
        scores["msd_mm"] = float(compute_average_surface_distance(pred, true, include_background=True,
                                                                  symmetric=True, spacing=spacing)[0, 0])
    return scores


def size_stratum(truth_slice: np.ndarray) -> str:
    """``small`` (< 0.5 % of the slice), ``medium`` (0.5-3.5 %), ``large`` (> 3.5 %) or ``absent``."""
    share = float(np.count_nonzero(truth_slice)) / truth_slice.size
    if share == 0:
        return "absent"
    return next((name for bound, name in SIZE_STRATA if share < bound), "large")


def empty_mask_penalty_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """HD95 and MSD given when only one mask is empty: the diagonal of the image's extent in mm.

    No two points of the image are further apart, so the penalty is at least as large as any
    distance between two non-empty masks on the same grid.
    """
    return float(math.hypot(*(n * s for n, s in zip(shape, spacing))))


def empty_mask(prediction: np.ndarray, truth: np.ndarray) -> str:
    """:data:`EMPTY_PREDICTION` or :data:`EMPTY_TRUTH` when only that mask is empty, else ``""``."""
    has_prediction, has_truth = bool(np.any(prediction)), bool(np.any(truth))
    if has_truth and not has_prediction:
        return EMPTY_PREDICTION
    if has_prediction and not has_truth:
        return EMPTY_TRUTH
    return ""
