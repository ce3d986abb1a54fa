"""Post-processing of per-label probabilities, as in the AutoLabel recipe.

Per label and slice: threshold at 0.5, drop small components, morphological closing,
Gaussian smoothing with the same kernel and re-threshold, and fill holes in solid
structures (whole bones); then across slices drop 3D fragments; a label declared the
interior of another (marrow of the cortex) takes the holes that label encloses;
finally one label per voxel by priority. Kernel sizes are given in mm in the label
map and turned into pixels with the slice's real spacing.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import disk

from msk_node.labels import LabelMap, LabelSpec
from msk_node.parallel import thread_map

THRESHOLD = 0.5
#: 3D components smaller than this share of the label's largest component are dropped.
MIN_FRAGMENT_SHARE = 0.02


def clean_slice(mask: np.ndarray, spec: LabelSpec, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """Small-component removal, closing, smoothing and (for solid structures) hole filling of one slice."""
    pixel_area = pixel_spacing[0] * pixel_spacing[1]
    mask = remove_small_components(mask, max(1, int(round(spec.min_area_mm2 / pixel_area))))
    radius = int(round(spec.smoothing_mm / 2.0 / min(pixel_spacing)))
    if radius >= 1 and mask.any():
        # Pad so closing does not erode structures touching the image border.
        padded = np.pad(mask, radius + 1)
        closed = ndimage.binary_closing(padded, structure=disk(radius))[radius + 1:-radius - 1, radius + 1:-radius - 1]
        mask = ndimage.gaussian_filter(closed.astype(np.float32), sigma=radius / 2.0) > THRESHOLD
    return ndimage.binary_fill_holes(mask) if spec.fill_holes else mask


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove connected components (full connectivity) smaller than ``min_size`` elements."""
    labelled, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if count == 0:
        return mask.astype(bool)
    sizes = np.bincount(labelled.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labelled]


def drop_3d_fragments(mask: np.ndarray) -> np.ndarray:
    """Drop 3D components smaller than :data:`MIN_FRAGMENT_SHARE` of the largest one."""
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    keep = sizes >= MIN_FRAGMENT_SHARE * sizes.max()
    keep[0] = False
    return keep[labelled]


def postprocess_label(
    probabilities: np.ndarray, spec: LabelSpec, pixel_spacing: tuple[float, float]
) -> np.ndarray:
    """Binary 3D mask ``[slice, row, col]`` of one label from its probability volume."""
    binary = probabilities > THRESHOLD
    cleaned = np.stack([clean_slice(s, spec, pixel_spacing) for s in binary])
    return drop_3d_fragments(cleaned)


def postprocess_masks(masks: dict[str, np.ndarray], label_map: LabelMap,
                      pixel_spacing: tuple[float, float]) -> dict[str, np.ndarray]:
    """The node's post-processing of per-label masks or probabilities, before merging.

    Labels left empty are dropped.
    """
    names = list(masks)
    cleaned = dict(zip(names, thread_map(
        lambda name: postprocess_label(masks[name], label_map.by_name(name), pixel_spacing), names)))
    return {name: mask for name, mask in add_interiors(cleaned, label_map).items() if mask.any()}


def add_interiors(masks: dict[str, np.ndarray], label_map: LabelMap) -> dict[str, np.ndarray]:
    """Give each label with ``interior_of`` the holes its enclosing label surrounds, slice by slice.

    A ring-shaped structure (the femoral cortex) defines its interior exactly, so the
    interior label is complete even where the detector gave it no box.
    """
    result = dict(masks)
    for spec in label_map:
        enclosing = masks.get(spec.interior_of) if spec.interior_of else None
        if enclosing is None:
            continue
        holes = np.stack([ndimage.binary_fill_holes(s) for s in enclosing]) & ~enclosing
        result[spec.name] = result[spec.name] | holes if spec.name in result else holes
    return result


def merge_labels(masks: dict[str, np.ndarray], label_map: LabelMap) -> np.ndarray:
    """One label value per voxel: where labels overlap, the higher ``priority`` wins.

    Ties in priority go to the label listed later in the label map, so the result
    never depends on dictionary order.
    """
    if not masks:
        raise ValueError("masks: nothing to merge")
    shape = next(iter(masks.values())).shape
    merged = np.zeros(shape, dtype=np.uint8)
    order = sorted(masks, key=lambda name: (label_map.by_name(name).priority, label_map.names.index(name)))
    for name in order:
        merged[masks[name]] = label_map.by_name(name).value
    return merged
