"""Box-prompted segmenters: one encode per slice, all boxes decoded together, masks on the slice grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msk_node.intensity import SquareFrame
from msk_node.precision import native_bf16
from msk_node.segmenters.frames import StretchFrame, model_frame, pixel_size
from msk_node.segmenters.registry import FAMILIES, build_segmenter


def _two_objects(rows: int = 300, cols: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:rows, :cols]
    disk = (yy - 90) ** 2 + (xx - 70) ** 2 < 40**2
    bar = (np.abs(yy - 220) < 25) & (np.abs(xx - 130) < 35)
    image = np.full((rows, cols), 40.0)
    image[disk], image[bar] = 200.0, 140.0
    image += np.random.default_rng(0).normal(0, 8, image.shape)
    return image.clip(0, 255).astype(np.uint8), disk, bar


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def litemedsam():
    return build_segmenter("litemedsam", precision="fp32")


def test_litemedsam_segments_both_boxes_of_a_non_square_slice(litemedsam):
    image, disk, bar = _two_objects()
    embedding = litemedsam.encode(image)
    boxes = np.array([[30, 50, 110, 130], [95, 195, 165, 245]], dtype=np.float32)
    decoded = litemedsam.decode(embedding, boxes)
    probabilities = decoded.probabilities
    assert probabilities.shape == (2, 300, 200)
    assert _dice(probabilities[0] > 0.5, disk) > 0.95
    assert _dice(probabilities[1] > 0.5, bar) > 0.95
    # The decoder rates its own masks of two clean objects as good ones.
    assert decoded.predicted_iou.shape == (2,) and (decoded.predicted_iou > 0.8).all(), decoded.predicted_iou
    # Decoding one box alone gives the same mask and predicted IoU as in the batch.
    alone = litemedsam.decode(embedding, boxes[1:])
    np.testing.assert_allclose(alone.probabilities[0], probabilities[1], atol=1e-4)
    np.testing.assert_allclose(alone.predicted_iou[0], decoded.predicted_iou[1], atol=1e-4)


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16 (AVX512_BF16 or AMX): bf16 would be "
                                                "emulated, so its check does not run here")
def test_litemedsam_bf16_encoder_agrees_with_fp32(litemedsam):
    image, disk, _ = _two_objects()
    boxes = np.array([[30, 50, 110, 130]], dtype=np.float32)
    fp32 = litemedsam.decode(litemedsam.encode(image), boxes).probabilities[0] > 0.5
    bf16 = build_segmenter("litemedsam", precision="bf16")
    low = bf16.decode(bf16.encode(image), boxes).probabilities[0] > 0.5
    assert _dice(fp32, low) > 0.99


def test_no_boxes_gives_no_masks(litemedsam):
    image, _, _ = _two_objects()
    decoded = litemedsam.decode(litemedsam.encode(image), np.zeros((0, 4)))
    assert decoded.probabilities.shape == (0, 300, 200) and decoded.predicted_iou.shape == (0,)


def test_sam2_builds_from_config_with_random_weights_and_decodes_a_batch():
    segmenter = build_segmenter("sam2", config="hiera_t", allow_random_weights=True)
    image, _, _ = _two_objects(160, 120)
    decoded = segmenter.decode(segmenter.encode(image),
                               np.array([[10, 10, 60, 80], [20, 30, 110, 150], [0, 0, 119, 159]]))
    assert decoded.probabilities.shape == (3, 160, 120)
    assert decoded.probabilities.min() >= 0.0 and decoded.probabilities.max() <= 1.0
    assert decoded.predicted_iou.shape == (3,) and np.isfinite(decoded.predicted_iou).all()


@pytest.mark.parametrize("family", ["sam2", "sam", "medsam"])
def test_families_without_shipped_weights_refuse_to_run_without_a_checkpoint(family):
    with pytest.raises(ValueError, match=f"{family} needs a checkpoint path"):
        build_segmenter(family)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="'unet'"):
        build_segmenter("unet")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sam", "medsam"])
def test_sam_vit_b_with_random_weights_returns_masks_on_the_slice_grid(family):
    segmenter = build_segmenter(family, allow_random_weights=True)
    image, _, _ = _two_objects(120, 90)
    decoded = segmenter.decode(segmenter.encode(image), np.array([[5, 5, 60, 80], [10, 20, 80, 110]]))
    assert decoded.probabilities.shape == (2, 120, 90)
    assert 0.0 <= decoded.probabilities.min() <= decoded.probabilities.max() <= 1.0
    assert decoded.predicted_iou.shape == (2,) and np.isfinite(decoded.predicted_iou).all()


# --- one frame per family: a non-square slice -------------------------------------------------------

#: A 256 x 192 slice (rows x columns), the shape of many sagittal knee and spine series.
ROWS, COLS = 256, 192


def _ellipse() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice, object mask and the object's box (xyxy, pixel edges) of an ellipse off the slice centre."""
    yy, xx = np.mgrid[:ROWS, :COLS]
    mask = ((yy - 170) / 45.0) ** 2 + ((xx - 60) / 30.0) ** 2 < 1.0
    image = np.where(mask, 200.0, 40.0) + np.random.default_rng(1).normal(0, 8, mask.shape)
    rows, cols = np.nonzero(mask)
    box = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=np.float32)
    return image.clip(0, 255).astype(np.uint8), mask, box


def _edges(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float32)


def test_litemedsam_box_and_mask_line_up_with_the_object_on_a_256_by_192_slice(litemedsam):
    image, mask, box = _ellipse()
    probabilities = litemedsam.decode(litemedsam.encode(image), box).probabilities
    assert probabilities.shape == (1, ROWS, COLS)
    assert _dice(probabilities[0] > 0.5, mask) > 0.95
    np.testing.assert_allclose(_edges(probabilities[0] > 0.5), box[0], atol=2.0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_familys_frame_maps_the_box_onto_the_object_and_the_mask_back_onto_it(family):
    _, mask, box = _ellipse()
    frame = model_frame(family, ROWS, COLS)
    assert isinstance(frame, StretchFrame if FAMILIES[family].frame == "stretch" else SquareFrame)
    on_model = frame.labels_to_model(mask)
    # The prompt box lands on the object as the model sees it, within one model pixel.
    np.testing.assert_allclose(frame.boxes_to_model(box)[0], _edges(on_model), atol=1.0)
    # The model's mask comes back onto the object in slice pixels.
    back = frame.masks_to_slice(torch.from_numpy(on_model.astype(np.float32))[None, None])[0] > 0.5
    assert _dice(back, mask) > 0.97
    x_size, y_size = pixel_size(frame)
    assert (x_size == y_size) == (FAMILIES[family].frame == "pad")


def test_the_stretch_frame_is_sam2s_own_image_box_and_mask_transform():
    from sam2.utils.transforms import SAM2Transforms

    image, _, box = _ellipse()
    frame = model_frame("sam2", ROWS, COLS)
    sam2 = SAM2Transforms(resolution=frame.size, mask_threshold=0.0)
    np.testing.assert_allclose(frame.boxes_to_model(box).reshape(-1, 2, 2),
                               sam2.transform_boxes(torch.from_numpy(box), normalize=True, orig_hw=(ROWS, COLS)),
                               atol=1e-4)
    # SAM2 resizes then normalises; undo its normalisation to compare the resized pixels.
    mean, std = torch.tensor(sam2.mean)[:, None, None], torch.tensor(sam2.std)[:, None, None]
    theirs = sam2(np.repeat(image[:, :, None], 3, axis=2)) * std + mean
    torch.testing.assert_close(frame.image_to_model(image)[0], theirs, atol=1e-4, rtol=0)
    logits = torch.randn(2, 1, 256, 256)
    np.testing.assert_allclose(frame.masks_to_slice(logits), sam2.postprocess_masks(logits, (ROWS, COLS))[:, 0],
                               atol=1e-5)
