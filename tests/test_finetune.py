"""``msk-train finetune / embed / export``: what trains, what a run leaves, and what the node accepts."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from msk_node.intensity import SquareFrame
from msk_node.labels import DEFAULT_LABEL_MAP_PATH
from msk_node.models import ModelError, load_models
from msk_node_phantoms import write_phantom
from msk_node.segmenters.frames import model_frame
from msk_node.segmenters.registry import FAMILIES
from msk_node_training.embed_store import EmbeddingStore
from msk_node_training.finetune import (FinetuneConfig, build_model, embed, export_run, finetune, load_finetune_config,
                                        parse_finetune_config)
from msk_node_training.finetune_data import EpochSamples, SliceSource, components, load_stored, select_slices
from msk_node_training.losses import dice_bce_loss, focal_dice_loss
from msk_node_training.preprocess import parse_preprocess_config, preprocess
from msk_node_training.sam_family import ModelSpec

# sam2's input transforms are TorchScript, which torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parent.parent
SAM2_TINY = {"family": "sam2", "model_config": "configs/sam2.1/sam2.1_hiera_t.yaml", "image_size": 128}


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    """Knee and thigh phantoms (3 subjects x 4 slices each) through msk-train preprocess at 128 px."""
    work = tmp_path_factory.mktemp("phantoms")
    datasets = []
    for kind in ("knee", "thigh"):
        subjects = []
        for seed in range(3):
            case = write_phantom(kind, work / f"{kind}-{seed}", seed=seed, n_slices=4)
            subjects.append({"id": f"s{seed}", "image": str(case / "dicom"),
                             "labels": str(case / "truth_labels.nii.gz")})
        datasets.append({"name": kind, "format": "dicom", "subjects": subjects})
    config = parse_preprocess_config({"datasets": datasets, "image_size": 128, "min_object_pixels": 10,
                                      "min_object_voxels": 10, "splits": {"train": 0.6, "val": 0.4}})
    return preprocess(config, work / "preprocessed")


def sam2_config(data: Path, **extra) -> dict:
    return {"data": str(data), "model": dict(SAM2_TINY), "epochs": 1, "batch_size": 2, "grad_accumulation": 1,
            "max_prompts_per_slice": 2, "max_batches_per_epoch": 2, "device": "cpu", "seed": 3,
            "datasets": [{"name": "knee", "groups": ["knee"]}, {"name": "thigh", "weight": 0.5, "groups": ["muscle"]}],
            **extra}


@pytest.fixture(scope="module")
def sam2_runs(phantom_data, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """One short SAM2 hiera-t run per mode, with its raw config."""
    runs = {}
    for mode in ("full", "decoder"):
        raw = sam2_config(phantom_data, mode=mode)
        runs[mode] = raw, finetune(parse_finetune_config(raw), tmp_path_factory.mktemp("runs") / mode).run_dir
    return runs


def changed_parts(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Per top-level part (and SAM2's feature projections): did any tensor change?"""
    parts: dict[str, bool] = {}
    for name, tensor in before.items():
        part = name.split(".")[0]
        if ".conv_s0." in name or ".conv_s1." in name:
            part = "feature_projections"
        parts[part] = parts.get(part, False) or not torch.equal(tensor, after[name])
    return parts


@pytest.mark.parametrize("mode, trained", [
    ("full", {"image_encoder", "sam_mask_decoder", "feature_projections"}),
    ("decoder", {"sam_mask_decoder"}),
])
def test_sam2_trains_only_the_parts_of_its_mode(sam2_runs, mode, trained):
    raw, run_dir = sam2_runs[mode]
    initial = build_model(parse_finetune_config(raw)).base.state_dict()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["mode"] == mode and set(checkpoint["model"]) == set(initial)
    parts = changed_parts(initial, checkpoint["model"])
    assert {part for part, changed in parts.items() if changed} == trained
    assert "sam_prompt_encoder" in parts and "memory_attention" in parts
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["train_loss"]) and 0 <= record["val_dice"] <= 1


def test_a_run_folder_holds_config_summary_log_curves_and_checkpoints(sam2_runs):
    raw, run_dir = sam2_runs["full"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == raw
    summary = pd.read_csv(run_dir / "dataset_summary.csv")
    assert summary["dataset"].tolist() == ["knee", "thigh"]
    assert summary["train_subjects"].tolist() == [2, 2] and summary["val_subjects"].tolist() == [1, 1]
    assert summary["samples_per_epoch"].tolist() == [8, 4]  # weight 0.5 halves thigh's share
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert {"train_loss", "val_dice", "lr", "seconds", "train_seconds"} <= set(records[0])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "label_map.yaml").is_file()
    for name in ("best", "last"):
        assert (run_dir / "checkpoints" / f"{name}.pt").is_file()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_same_config_under_torchrun_writes_the_single_process_checkpoint_format(sam2_runs, tmp_path):
    raw, single_run = sam2_runs["full"]
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(
        [str(torchrun), "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "-m", "msk_node_training.cli", "finetune", str(config),
         "--run-dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single = torch.load(single_run / "checkpoints" / "last.pt", weights_only=True)
    distributed = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(distributed) == set(single)
    assert list(distributed["model"]) == list(single["model"])
    assert not any(name.startswith("module.") for name in distributed["model"])
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1 and json.loads(records[0])["samples"] == 2 * 2 * 2  # two processes wrote one log


def test_an_embedding_store_is_half_precision_streams_by_row_and_resamples_each_epoch(phantom_data, tmp_path):
    raw = sam2_config(phantom_data, mode="decoder", embeddings=str(tmp_path / "store"), min_samples_per_dataset=12)
    config = parse_finetune_config(raw)
    store_dir = embed(config)
    store = EmbeddingStore(store_dir)
    assert len(store) == 24  # train and val slices of both datasets
    for name, shape in store.meta["arrays"].items():
        on_disk = np.load(store_dir / f"{name}.npy", mmap_mode="r")
        assert on_disk.dtype == np.float16 and on_disk.shape == (24, *shape)
    assert store.meta["arrays"]["image_embed"] == [256, 8, 8]

    # The stored features are the frozen encoder's, to half precision.
    model = build_model(config)
    with np.load(phantom_data / store.index.at[5, "image_file"]) as arrays:
        image = torch.from_numpy(arrays["image"])[None]
    with torch.no_grad():
        fresh = model.encode(model.prepare(image))
    for name, value in store.read(5).items():
        torch.testing.assert_close(value, fresh[name][0], atol=2e-2, rtol=2e-2)

    selection = select_slices(config.data, config.datasets, "all", None, 12, config.seed)
    source = SliceSource(config.data, selection.train, store, model.frame)
    samples = EpochSamples(source, {"knee": 12, "thigh": 12}, config.prompts, model.input_size, config.seed)
    assert len(samples) == 24 and len(source) == 16
    item = samples[0]
    assert {name: list(v.shape) for name, v in item["inputs"].items()} == store.meta["arrays"]
    assert item["targets"].shape[1:] == (128, 128) and len(item["boxes"]) == len(item["targets"]) <= 2
    orders = []
    for epoch in (1, 2):
        samples.set_epoch(epoch)
        datasets = [source.dataset(row) for row in samples.order]
        assert datasets.count("knee") >= 12 and datasets.count("thigh") >= 12
        orders.append(samples.order.copy())
    assert not np.array_equal(*orders)

    result = finetune(config, tmp_path / "run")
    assert math.isfinite(json.loads((result.run_dir / "metrics.jsonl").read_text())["train_loss"])
    other_encoder = parse_finetune_config({**raw, "seed": 4})
    with pytest.raises(ValueError, match="embeddings"):
        finetune(other_encoder, tmp_path / "refused")


def write_tiny_data(root: Path) -> Path:
    """One dataset in the preprocess layout: a train and a val subject with one 64 px slice each."""
    rows = []
    for split, subject, offset in (("train", "s0", 18), ("val", "s1", 22)):
        mask = np.zeros((64, 64), np.uint8)
        mask[offset:offset + 20, offset:offset + 24] = 1
        image = np.repeat((0.2 + 0.6 * (mask > 0)).astype(np.float32)[None], 3, axis=0)
        image_file = f"images/tiny/{subject}/0000.npz"
        (root / image_file).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(root / image_file, image=image, mask=mask)
        rows.append({"dataset": "tiny", "subject": subject, "split": split, "slice_index": 0,
                     "image_file": image_file, "label_file": f"labels/tiny/{subject}/0000.txt", "n_boxes": 1})
    pd.DataFrame(rows).to_parquet(root / "slices.parquet", index=False)
    shutil.copyfile(DEFAULT_LABEL_MAP_PATH, root / "label_map.yaml")
    return root


@pytest.mark.parametrize("mode, weights_file", [("decoder", "decoder.pt"), ("full", "model.pt")])
def test_an_exported_litemedsam_run_loads_in_the_node_and_corruption_is_refused(tmp_path, mode, weights_file):
    data = write_tiny_data(tmp_path / "data")
    config = parse_finetune_config({"data": str(data), "model": {"family": "litemedsam"}, "mode": mode,
                                    "epochs": 1, "batch_size": 1, "grad_accumulation": 1, "device": "cpu"})
    run_dir = finetune(config, tmp_path / "run").run_dir
    models_dir = tmp_path / "models"
    shutil.copytree(REPO / "models" / "detector", models_dir / "detector")
    target = export_run(run_dir, models_dir)
    manifest = yaml.safe_load((target / "manifest.yaml").read_text())
    assert manifest["family"] == "litemedsam" and (target / weights_file).is_file()
    assert {"label_map.yaml", "training_config.yaml", "dataset_summary.csv"} <= {p.name for p in target.iterdir()}

    trained = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    loaded = load_models(models_dir).segmenter.model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())

    with (target / weights_file).open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="corrupted"):
        load_models(models_dir)


def test_a_sam2_run_at_a_reduced_input_size_is_not_exported(sam2_runs, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        export_run(sam2_runs["decoder"][1], tmp_path / "models")


def test_subject_ablation_is_nested_and_mixing_selects_a_group(phantom_data):
    one = select_slices(phantom_data, (), "all", 1, 0, seed=7)
    two = select_slices(phantom_data, (), "all", 2, 0, seed=7)
    for dataset in ("knee", "thigh"):
        kept = set(one.train.loc[one.train["dataset"] == dataset, "subject"])
        assert len(kept) == 1 and kept < set(two.train.loc[two.train["dataset"] == dataset, "subject"])
    assert one.val.equals(two.val)
    muscle = parse_finetune_config(sam2_config(phantom_data, mix="muscle"))
    chosen = select_slices(muscle.data, muscle.datasets, muscle.mix, None, 0, muscle.seed)
    assert set(chosen.train["dataset"]) == {"thigh"} and chosen.summary["dataset"].tolist() == ["thigh"]


@pytest.mark.parametrize("family", ["litemedsam", "sam2"])
def test_a_stored_non_square_slice_reaches_training_in_the_frame_the_node_uses(tmp_path, family):
    """A 256 x 192 slice stored padded (preprocess) is read on the family's own frame: padded for
    LiteMedSAM, stretched for SAM2, so training boxes and targets sit where the node's do."""
    rows, cols, size = 256, 192, 128
    yy, xx = np.mgrid[:rows, :cols]
    label = (((yy - 170) / 45.0) ** 2 + ((xx - 60) / 30.0) ** 2 < 1.0).astype(np.uint8) * 4
    image = np.where(label > 0, 200, 40).astype(np.uint8)
    stored = SquareFrame(rows, cols, size)
    np.savez(tmp_path / "slice.npz", image=stored.image_to_model(image)[0].numpy(), mask=stored.labels_to_model(label))
    row = pd.Series({"image_file": "slice.npz", "rows": rows, "columns": cols})
    node = model_frame(family, rows, cols, size)
    mask = load_stored(tmp_path, row, "mask", FAMILIES[family].frame)
    expected = node.labels_to_model(label)
    assert mask.shape == (size, size) and (mask == expected).mean() > 0.995
    boxes, _ = components(mask, 10)
    label_rows, label_cols = np.nonzero(label)
    box = [label_cols.min(), label_rows.min(), label_cols.max() + 1, label_rows.max() + 1]
    np.testing.assert_allclose(boxes[0] + [0, 0, 1, 1], node.boxes_to_model(np.array([box]))[0], atol=1.0)
    pixels = load_stored(tmp_path, row, "image", FAMILIES[family].frame)
    assert pixels.shape == (3, size, size)
    assert np.abs(pixels - node.image_to_model(image)[0].numpy()).mean() < 0.01


def test_a_finetuning_config_built_in_code_is_checked_like_one_read_from_yaml():
    with pytest.raises(ValueError, match="'batch_size' must be > 0"):
        FinetuneConfig(data=Path("data"), model=ModelSpec("litemedsam"), run_dir=Path("run"), batch_size=0)
    with pytest.raises(ValueError, match="'model.family'"):
        ModelSpec("unet")
    with pytest.raises(ValueError, match="'model.image_size'"):
        ModelSpec("sam2", "hiera_t", image_size=100)


def test_losses_prefer_the_right_mask():
    targets = torch.zeros((2, 1, 16, 16))
    targets[:, :, 4:12, 4:12] = 1
    right, wrong = (targets * 2 - 1) * 8, (1 - targets * 2) * 8
    for loss in (dice_bce_loss, focal_dice_loss):
        assert loss(right, targets) < 0.1 < loss(wrong, targets)


@pytest.mark.parametrize("path", sorted((REPO / "training" / "configs").glob("finetune_*.yaml")), ids=lambda p: p.stem)
def test_the_example_configs_are_valid(path):
    load_finetune_config(path)


@pytest.mark.parametrize("change, key", [
    ({"learning_rat": 0.1}, "learning_rat"),
    ({"epochs": "many"}, "epochs"),
    ({"model": {"family": "unet"}}, "model.family"),
    ({"model": {"family": "litemedsam", "image_size": 128}}, "model.image_size"),
    ({"model": {"family": "sam2"}}, "model.model_config"),
    ({"datasets": [{"name": "knee", "weight": "heavy"}]}, r"datasets\[0\].weight"),
    ({"mix": "spine"}, "mix"),
    ({"embeddings": "store", "mode": "full"}, "embeddings"),
    ({"loss": "l2"}, "loss"),
])
def test_config_errors_name_the_key(tmp_path, change, key):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": "data", "model": {"family": "litemedsam"}, **change}))
    with pytest.raises(ValueError, match=key):
        load_finetune_config(path)
