"""A training run's folder: what the papers keep per run.

Layout::

    config.yaml            the config as read
    label_map.yaml         the data folder's label map (mask values)
    dataset_summary.csv    subjects, slices and samples per epoch of each dataset
    metrics.jsonl          one JSON object per epoch
    curves.png             train loss and val Dice per epoch
    checkpoints/best.pt    {"model": state dict, ...metadata}; best val Dice
    checkpoints/last.pt    the same after the last epoch
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from matplotlib.figure import Figure


def check_run_dir_free(path: Path) -> None:
    """Raise FileExistsError if ``path`` exists and is not empty (runs are never overwritten)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"run folder {path} is not empty")


class RunDir:
    """Writes one run's files; only one process of a distributed run creates it."""

    def __init__(self, path: Path, config: dict[str, Any], summary: pd.DataFrame, label_map: Path) -> None:
        check_run_dir_free(path)
        self.path = Path(path)
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shutil.copyfile(label_map, self.path / "label_map.yaml")
        summary.to_csv(self.path / "dataset_summary.csv", index=False)
        self.records: list[dict[str, Any]] = []

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` and redraw the curves."""
        self.records.append(record)
        with (self.path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.plot()

    def plot(self) -> None:
        epochs = [r["epoch"] for r in self.records]
        figure = Figure(figsize=(9, 3.5), layout="constrained")
        loss_axes, dice_axes = figure.subplots(1, 2)
        loss_axes.plot(epochs, [r["train_loss"] for r in self.records], marker="o")
        loss_axes.set(xlabel="epoch", ylabel="train loss", title="Training loss")
        dice_axes.plot(epochs, [r["val_dice"] for r in self.records], marker="o", color="tab:green")
        dice_axes.set(xlabel="epoch", ylabel="val Dice", title="Validation Dice", ylim=(0, 1))
        figure.savefig(self.path / "curves.png", dpi=100)

    def save_checkpoint(self, name: str, state: dict[str, Any]) -> Path:
        path = self.path / "checkpoints" / f"{name}.pt"
        torch.save(state, path)
        return path
