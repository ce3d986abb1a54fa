"""``msk-train bench-training``: what caching the encoder's output saves (the SAMRI comparison).

On a finetuning config's data, LiteMedSAM decoder-only training runs with the
encoder in the loop and from an embedding store, for the same epochs and samples.
Every run is a fresh process, so its peak memory is its own: memory is reported as
``ru_maxrss`` (peak resident set size) of that process, and its growth over the value
after imports, for cached training on two dataset sizes (one train subject per
dataset, and all of them).
"""
from __future__ import annotations

import multiprocessing
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

from msk_node_training.finetune import embed, finetune, parse_finetune_config

MEMORY_MEASURE = ("ru_maxrss of a fresh process (peak resident set size, MiB) and its growth over the value "
                  "after imports; includes building the model")


def bench_training(config_path: Path, epochs: int = 1) -> dict[str, Any]:
    """Seconds per epoch with the encoder in the loop vs from cached embeddings, and peak memory.

    The config supplies data, datasets, prompts and optimiser settings; family,
    mode and embeddings are set here (LiteMedSAM, decoder-only).
    """
    raw = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
    raw = {**raw, "model": {"family": "litemedsam"}, "mode": "decoder", "epochs": epochs,
           "early_stopping_patience": epochs + 1}
    raw.pop("embeddings", None)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        scratch = Path(scratch)
        in_loop = _in_fresh_process(_train, raw, scratch / "in-loop")
        started = time.perf_counter()
        _in_fresh_process(_embed, raw, scratch / "store")
        embed_seconds = time.perf_counter() - started
        cached_raw = {**raw, "embeddings": str(scratch / "store")}
        cached = _in_fresh_process(_train, cached_raw, scratch / "cached")
        small = _in_fresh_process(_train, {**cached_raw, "subjects_per_dataset": 1}, scratch / "cached-small")
    return {
        "family": "litemedsam", "mode": "decoder", "device": in_loop["device"], "threads": torch.get_num_threads(),
        "epochs": epochs, "train_slices": cached["train_slices"], "samples_per_epoch": cached["samples_per_epoch"],
        "encoder_in_loop": _timing(in_loop), "cached_embeddings": _timing(cached),
        "embed_seconds": round(embed_seconds, 2),
        "train_speedup": round(in_loop["train_seconds_per_epoch"] / cached["train_seconds_per_epoch"], 2),
        "memory": {"measure": MEMORY_MEASURE, "cached_embeddings": [_memory(small), _memory(cached)]},
    }


def _in_fresh_process(function, raw: dict[str, Any], out: Path) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, raw, str(out)).result()


def _embed(raw: dict[str, Any], out: str) -> dict[str, Any]:
    embed(parse_finetune_config(raw), Path(out))
    return {}


def _train(raw: dict[str, Any], run_dir: str) -> dict[str, Any]:
    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = parse_finetune_config(raw)
    finetune(config, Path(run_dir))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = pd.read_json(Path(run_dir) / "metrics.jsonl", lines=True)
    summary = pd.read_csv(Path(run_dir) / "dataset_summary.csv")
    return {
        "device": "cuda" if torch.cuda.is_available() and config.device != "cpu" else "cpu",
        "train_slices": int(summary["train_slices"].sum()),
        "samples_per_epoch": int(summary["samples_per_epoch"].sum()),
        "train_seconds_per_epoch": statistics.mean(records["train_seconds"]),
        "epoch_seconds": statistics.mean(records["seconds"]),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": peak / 1024, "rss_growth_mib": (peak - after_imports) / 1024,
    }


def _timing(run: dict[str, Any]) -> dict[str, float]:
    return {"train_seconds_per_epoch": round(run["train_seconds_per_epoch"], 2),
            "epoch_seconds_with_validation": round(run["epoch_seconds"], 2)}


def _memory(run: dict[str, Any]) -> dict[str, float]:
    return {"train_slices": run["train_slices"], "samples_per_epoch": run["samples_per_epoch"],
            "peak_rss_mib": round(run["peak_rss_mib"], 1), "rss_growth_mib": round(run["rss_growth_mib"], 1)}
