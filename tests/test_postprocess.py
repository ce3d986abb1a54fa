"""Post-processing in millimetres: small components, closing, 3D fragments, label priority."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from msk_node.labels import load_label_map
from msk_node.postprocess import clean_slice, drop_3d_fragments, merge_labels, postprocess_label, postprocess_masks


@pytest.fixture(scope="module")
def label_map():
    return load_label_map("models/detector/label_map.yaml")


def test_small_components_are_removed_by_area_in_mm2_not_pixels(label_map):
    spec = dataclasses.replace(label_map.by_name("femur"), min_area_mm2=20.0, smoothing_mm=0.0)
    mask = np.zeros((100, 100), bool)
    mask[10:40, 10:40] = True  # large
    mask[70:75, 70:75] = True  # 25 px
    fine = clean_slice(mask, spec, (0.5, 0.5))  # 25 px = 6.25 mm2 -> removed
    coarse = clean_slice(mask, spec, (1.0, 1.0))  # 25 px = 25 mm2 -> kept
    assert fine[10:40, 10:40].all() and not fine[70:75, 70:75].any()
    assert coarse[70:75, 70:75].all()


def test_closing_bridges_a_gap_smaller_than_the_kernel_and_keeps_the_shape(label_map):
    spec = dataclasses.replace(label_map.by_name("femur"), min_area_mm2=1.0, smoothing_mm=3.0)
    mask = np.zeros((80, 80), bool)
    mask[20:60, 20:39] = True
    mask[20:60, 41:60] = True  # a 2-pixel (1 mm) cut through the middle
    cleaned = clean_slice(mask, spec, (0.5, 0.5))
    assert cleaned[25:55, 39:41].all()
    original = mask.copy()
    original[20:60, 39:41] = True
    assert (cleaned ^ original).sum() < 0.05 * original.sum()


def test_border_objects_are_not_eroded_by_closing(label_map):
    spec = dataclasses.replace(label_map.by_name("femur"), min_area_mm2=1.0, smoothing_mm=4.0)
    mask = np.zeros((60, 60), bool)
    mask[:30, :] = True
    assert clean_slice(mask, spec, (1.0, 1.0))[:28, :].all()


def test_3d_fragments_are_dropped_but_comparable_parts_kept():
    mask = np.zeros((10, 50, 50), bool)
    mask[1:9, 5:25, 5:25] = True
    mask[1:9, 30:45, 30:45] = True  # another real part (56% of the first)
    mask[4, 47, 47] = True  # a speck
    kept = drop_3d_fragments(mask)
    assert kept[1:9, 30:45, 30:45].all() and not kept[4, 47, 47]


def test_thresholds_probabilities_at_one_half(label_map):
    spec = dataclasses.replace(label_map.by_name("femur"), min_area_mm2=0.0, smoothing_mm=0.0)
    probabilities = np.zeros((1, 20, 20), np.float32)
    probabilities[0, 5:15, 5:15] = 0.6
    probabilities[0, 5:15, 15:18] = 0.4
    out = postprocess_label(probabilities, spec, (1.0, 1.0))
    assert out[0, 5:15, 5:15].all() and not out[0, :, 15:].any()


def test_overlaps_go_to_the_label_with_higher_priority(label_map):
    femur = np.zeros((1, 10, 10), bool)
    femur[0, 2:8, 2:8] = True
    cartilage = np.zeros_like(femur)
    cartilage[0, 6:9, 2:8] = True
    assert label_map.by_name("femur").priority > label_map.by_name("femoral_cartilage").priority
    for order in (("femur", "femoral_cartilage"), ("femoral_cartilage", "femur")):
        masks = {name: {"femur": femur, "femoral_cartilage": cartilage}[name] for name in order}
        merged = merge_labels(masks, label_map)
        assert (merged[0, 2:8, 2:8] == label_map.by_name("femur").value).all()
        assert (merged[0, 8, 2:8] == label_map.by_name("femoral_cartilage").value).all()


def test_marrow_takes_the_interior_of_the_cortical_ring_even_when_not_detected(label_map):
    assert label_map.by_name("femoral_marrow").interior_of == "femoral_cortex"
    rows, cols = np.mgrid[:80, :80]
    radius = np.hypot(rows - 40, cols - 40)
    ring = np.repeat(((radius >= 14) & (radius < 20))[None], 3, axis=0)
    ring[2, 34:46, 18:28] = False  # a ring broken wider than the closing kernel encloses nothing

    masks = postprocess_masks({"femoral_cortex": ring.astype(np.float32)}, label_map, (0.5, 0.5))
    merged = merge_labels(masks, label_map)

    marrow, cortex = label_map.by_name("femoral_marrow").value, label_map.by_name("femoral_cortex").value
    assert (merged[:2][(radius < 13)[None].repeat(2, 0)] == marrow).all()
    assert (merged[:2][((radius > 15) & (radius < 19))[None].repeat(2, 0)] == cortex).all()
    assert not (merged[2] == marrow).any()
