"""Decoder-only finetuning of LiteMedSAM from cached embeddings, and its hand-over to the node."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from msk_node_evaluation.segment import dice_of_masks, segment_from_truth_boxes
from msk_node.dicom_input import read_study_folder
from msk_node.intensity import normalise_volume
from msk_node.labels import load_label_map
from msk_node.models import load_models
from msk_node_phantoms import write_phantom
from msk_node.segmenters.litemedsam import LiteMedSAMSegmenter
from msk_node.volume import labels_on_volume_grid, series_to_volume
from msk_node_training.segmenter import SegmenterConfig, export_segmenter, load_segmenter_config, train_segmenter

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
HELD_OUT_SEED = 424242


@pytest.fixture(scope="module")
def held_out_thigh(tmp_path_factory):
    case = write_phantom("thigh", tmp_path_factory.mktemp("held-out"), seed=HELD_OUT_SEED)
    volume = series_to_volume(max(read_study_folder(case / "dicom").series, key=len).datasets)
    labels = labels_on_volume_grid(case / "truth_labels.nii.gz", volume.volume)
    values = [spec.value for spec in load_label_map(MODELS / "detector" / "label_map.yaml").for_anatomy("thigh").labels]
    return normalise_volume(volume.array), labels, values, range(1, len(labels), 3)


def mean_dice(segmenter, held_out) -> float:
    images, labels, values, slices = held_out
    masks = segment_from_truth_boxes(segmenter, images, labels, values, slices=slices)
    return float(np.nanmean(list(dice_of_masks(masks, labels, slices).values())))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    config_path = tmp_path_factory.mktemp("config") / "finetune.yaml"
    config_path.write_text("cases: {thigh: 1}\nseed: 11\nsteps: 120\nslice_stride: 2\nmax_boxes_per_step: 6\n"
                           f"label_map: {MODELS / 'detector' / 'label_map.yaml'}\n")
    config = load_segmenter_config(config_path)
    segmenter, losses = train_segmenter(config)
    return segmenter, losses, config, config_path


def test_a_short_decoder_finetune_beats_zero_shot_on_held_out_phantoms(finetuned, held_out_thigh):
    segmenter, losses, _, _ = finetuned
    zero_shot = mean_dice(LiteMedSAMSegmenter(), held_out_thigh)
    tuned = mean_dice(segmenter, held_out_thigh)
    print(f"held-out thigh, truth boxes, mean Dice over labels: zero-shot {zero_shot:.3f}, finetuned {tuned:.3f}")
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert tuned >= zero_shot + 0.02, (zero_shot, tuned)


def test_the_exported_decoder_loads_in_the_node_and_gives_the_finetuned_output(finetuned, held_out_thigh, tmp_path):
    segmenter, _, config, config_path = finetuned
    models_dir = tmp_path / "models"
    shutil.copytree(MODELS / "detector", models_dir / "detector")
    export_segmenter(segmenter, config, config_path, models_dir / "segmenter")

    node_segmenter = load_models(models_dir).segmenter
    images, labels, values, slices = held_out_thigh
    index = slices[len(slices) // 2]
    boxes = np.array([[30, 30, 150, 140]], dtype=np.float32)
    node_output = node_segmenter.decode(node_segmenter.encode(images[index]), boxes)
    tuned_output = segmenter.decode(segmenter.encode(images[index]), boxes)
    shipped = LiteMedSAMSegmenter()
    shipped_output = shipped.decode(shipped.encode(images[index]), boxes)
    assert np.abs(node_output - tuned_output).max() < 0.05
    assert np.abs(node_output - shipped_output).max() > 0.2


@pytest.mark.parametrize("text, key", [("cases: {thigh: 1}\nlearning_rat: 0.1\n", "learning_rat"),
                                       ("cases: {thigh: 1}\nsteps: many\n", "steps"),
                                       ("steps: 3\n", "cases"),
                                       ("cases: {ankle: 1}\n", "cases"),
                                       ("cases: {thigh: 1}\nprecision: fp16\n", "precision")])
def test_finetune_config_errors_name_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=key):
        load_segmenter_config(path)


def test_a_config_built_in_code_is_checked_like_one_read_from_yaml():
    with pytest.raises(ValueError, match="'steps' must be an integer"):
        SegmenterConfig(cases={"thigh": 1}, steps="many")
    with pytest.raises(ValueError, match="'max_boxes_per_step' must be > 0"):
        SegmenterConfig(cases={"thigh": 1}, max_boxes_per_step=0)


def test_config_defaults_match_the_documented_recipe():
    config = SegmenterConfig(cases={"knee": 1})
    assert config.learning_rate == 1e-4 and config.max_boxes_per_step >= 1
