"""Model folders are verified against their manifests before anything runs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from msk_node_evaluation.config import load_experiment_config
from msk_node.models import ModelError, load_models, verify_models
from msk_node_training.finetune import load_finetune_config

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture
def models_copy(tmp_path):
    target = tmp_path / "models"
    shutil.copytree(MODELS, target)
    return target


def test_shipped_models_verify():
    detector, segmenter = verify_models(MODELS)
    assert detector.entries["family"] == "yolo"
    assert segmenter.entries["family"] == "litemedsam"
    assert (MODELS / "detector" / "detector.pt").stat().st_size < 10 * 1024 * 1024


def test_corrupted_detector_weights_are_refused_with_the_file_named(models_copy):
    weights = models_copy / "detector" / "detector.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="detector.pt are corrupted or replaced"):
        verify_models(models_copy)


def test_missing_weights_are_refused(models_copy):
    (models_copy / "detector" / "detector.pt").unlink()
    with pytest.raises(ModelError, match="weights file missing"):
        verify_models(models_copy)


def test_unknown_manifest_key_is_named(models_copy):
    manifest = models_copy / "segmenter" / "manifest.yaml"
    entries = yaml.safe_load(manifest.read_text())
    entries["wieghts"] = "x.pth"
    manifest.write_text(yaml.safe_dump(entries))
    with pytest.raises(ModelError, match=r"manifest.yaml: unknown key 'wieghts'"):
        verify_models(models_copy)


def test_other_families_need_their_own_weights(models_copy):
    manifest = models_copy / "segmenter" / "manifest.yaml"
    entries = yaml.safe_load(manifest.read_text())
    entries["family"] = "sam2"
    manifest.write_text(yaml.safe_dump(entries))
    with pytest.raises(ModelError, match="only litemedsam has bundled weights"):
        verify_models(models_copy)


def test_an_unknown_family_gives_one_error_from_manifest_training_and_evaluation_configs(models_copy, tmp_path):
    """The node's manifest check, a finetuning config and an evaluation config name the file, the key and
    the registry's families in the same words."""
    expected = "unknown segmenter family 'unet' (known: litemedsam, sam2, sam, medsam)"
    manifest = models_copy / "segmenter" / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({**yaml.safe_load(manifest.read_text()), "family": "unet"}))
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({"data": "data", "model": {"family": "unet"}}))
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({"models": [{"name": "m", "family": "unet"}],
                                          "datasets": [{"name": "knee", "phantom": "knee", "seeds": [1]}]}))
    errors = []
    for check, error in ((lambda: verify_models(models_copy), ModelError),
                         (lambda: load_finetune_config(finetune), ValueError),
                         (lambda: load_experiment_config(experiment), ValueError)):
        with pytest.raises(error) as raised:
            check()
        errors.append(str(raised.value))
    assert errors[0] == f"{manifest}: key 'family': {expected}"
    assert errors[1] == f"{finetune}: key 'model.family': {expected}"
    assert errors[2] == f"{experiment}: key 'models[0].family': {expected}"


def test_the_thigh_has_its_own_decoder_and_the_other_anatomies_share_the_finetuned_one():
    import torch

    models = load_models(MODELS)
    thigh, knee = models.segmenter_for("thigh"), models.segmenter_for("knee")
    assert models.segmenter_for("spine") is knee is models.segmenter and thigh is not knee
    for segmenter, file in ((thigh, "decoder-thigh.pt"), (knee, "decoder.pt")):
        stored = torch.load(MODELS / "segmenter" / file, map_location="cpu", weights_only=True)
        loaded = segmenter.model.mask_decoder.state_dict()
        assert all(torch.equal(loaded[key].half(), tensor) for key, tensor in stored.items()), file


def test_a_changed_anatomy_decoder_is_refused_with_the_file_named(models_copy):
    weights = models_copy / "segmenter" / "decoder-thigh.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="decoder-thigh.pt"):
        verify_models(models_copy)


def test_decoder_anatomies_must_be_in_the_label_map(models_copy):
    manifest = models_copy / "segmenter" / "manifest.yaml"
    entries = yaml.safe_load(manifest.read_text())
    manifest.write_text(yaml.safe_dump({**entries, "decoder_anatomies": ["shoulder"]}))
    with pytest.raises(ModelError, match="shoulder"):
        load_models(models_copy)


def test_the_thigh_has_its_own_detector_checked_like_the_default(models_copy):
    import torch

    models = load_models(MODELS)
    thigh, knee = models.detector_for("thigh"), models.detector_for("knee")
    assert models.detector_for("spine") is knee is models.detector and thigh is not knee
    for detector, file in ((thigh, "detector-thigh.pt"), (knee, "detector.pt")):
        stored = torch.load(MODELS / "detector" / file, map_location="cpu", weights_only=False)["model"].state_dict()
        loaded = detector.model.model.state_dict()
        assert all(torch.equal(loaded[key].float(), tensor.float()) for key, tensor in stored.items()), file
    weights = models_copy / "detector" / "detector-thigh.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="detector-thigh.pt"):
        verify_models(models_copy)
