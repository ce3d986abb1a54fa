"""``msk-eval segment`` / ``experiment``: models x prompt sources x datasets, scored per slice, subject and dataset.

For every case, model, prompt source and post-processing setting the evaluated slices
(every ``slice_step``-th) are segmented and scored per label with
:func:`msk_node_evaluation.metrics.compute_mask_metrics`. The papers' measure is the per-slice one:
each label is scored in 2D (in-plane spacing) on every evaluated slice where the truth or
the prediction has it; slices where both are empty are not counted (nothing to agree on,
and a Dice of 1 there would reward empty background). A subject's value for a label is the
mean over its counted slices; its Dice in the tables is the mean over its labels, and a
dataset's the mean over its subjects. An empty prediction on a slice with truth (a miss),
or the reverse, counts with Dice 0 and the distance penalty of
:func:`msk_node_evaluation.metrics.empty_mask_penalty_mm`; both are counted per subject and label.
The per-volume (3D) metrics over the evaluated slices (their spacing is ``slice_step``
times the slice spacing) are kept as ``*_3d`` columns and ``table_3d.csv``. With
``slice_step`` > 1 the 3D steps of post-processing also see the evaluated slices as
neighbours. On a stack of few slices most of the 3D surface is its first and last slice,
so 3D distances compare runs over the same slices only.

Models are compared per dataset on the subjects' mean per-slice Dice as paper 1 does:
Friedman across models (Wilcoxon signed-rank for two), then pairwise Wilcoxon signed-rank
tests with Benjamini-Hochberg correction, each pair with the direction of its difference.

Output (run folder)::

    config.yaml                       the config as read
    slices.csv                        one row per counted slice and label (truth or prediction non-empty)
    labels.csv                        one row per subject and label: per-slice means, slice counts, 3D metrics
    summary.csv                       per dataset, model, prompts, post-processing and label: mean and SD
    strata.csv                        slice metrics by object size (share of the slice area)
    table.csv                         mean per-slice Dice (over labels, then subjects), datasets x models
    table_3d.csv                      the same of the per-volume Dice
    metrics.json                      all of the above, and the comparisons
    dice_<prompts>_postprocess-<on|off>.csv          subject mean Dice, `msk-eval stats` input
    dice_by_model_<prompts>_postprocess-<on|off>.png box/raincloud plot per dataset
    comparison.csv, pairwise.csv      Friedman (or Wilcoxon) and pairwise Wilcoxon tests with BH-corrected
                                      p-values (two or more models, three or more subjects per dataset)
    overlays/<dataset>/<subject>/<model>_<prompts>_postprocess-<on|off>/slice-NNN.png
    phantoms/<dataset>/seed-<seed>/   the phantoms written for the run
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from msk_node_evaluation.cases import Case, iter_cases
from msk_node_evaluation.config import ExperimentConfig
from msk_node_evaluation.metrics import (EMPTY_PREDICTION, EMPTY_TRUTH, METRICS, SIZE_ORDER, compute_mask_metrics,
                                         empty_mask, size_stratum)
from msk_node_evaluation.segment import (EncodedSlices, EvalModel, Prompts, detector_prompts, input_pixel_size,
                                         load_eval_model, postprocessed, segment_prompts, truth_prompts)
from msk_node.labels import LabelMap

KEYS = ["dataset", "model", "prompts", "postprocess"]
SUBJECT_KEYS = [*KEYS[:1], "subject", *KEYS[1:], "label"]
METRICS_3D = tuple(f"{metric}_3d" for metric in METRICS)
SLICE_COUNTS = ("counted_slices", "missed_slices", "false_positive_slices")


def _quiet(_: str) -> None:
    """Default progress sink."""


def load_models_of(config: ExperimentConfig) -> list[EvalModel]:
    """Every model of ``config``, with the shared detector for zero-shot models when detector prompts are asked for."""
    detector = None
    if "detector" in config.prompts and config.detector_models is not None:
        from msk_node.models import load_models

        detector = load_models(config.detector_models).detector
    return [load_eval_model(spec, detector) for spec in config.models]


def case_prompts(case: Case, source: str, slices: list[int], model: EvalModel, config: ExperimentConfig,
                 label_map: LabelMap) -> Prompts:
    if source == "detector":
        return detector_prompts(model.detector, case.normalised, slices, case.labels, label_map)
    if source == "shifted" and model.segmenter is not None:
        # the shift is in pixels of the model's input, as the papers shift boxes on their resized images
        rows, cols = case.truth.shape[1:]
        return truth_prompts(case.truth, case.labels.values(), slices, shift_px=config.shift_px, seed=config.seed,
                             min_pixels=config.min_box_pixels,
                             input_pixel=input_pixel_size(model.segmenter, rows, cols))
    return truth_prompts(case.truth, case.labels.values(), slices, min_pixels=config.min_box_pixels)


def predicted_masks(case: Case, model: EvalModel, encoded: EncodedSlices | None,
                    prompts: Prompts) -> dict[str, np.ndarray]:
    """Label name -> mask on the case's grid; the ``truth`` model returns the truth."""
    if encoded is None:
        return {name: case.truth == value for name, value in case.labels.items()}
    by_value = segment_prompts(encoded, prompts, case.labels.values())
    return {name: by_value[value] for name, value in case.labels.items()}


def score_case(case: Case, masks: dict[str, np.ndarray], slices: list[int],
               slice_step: int) -> tuple[list[dict], list[dict]]:
    """Slice rows and volume (3D) rows of one prediction; ``masks`` hold the evaluated slices only.

    A slice row is written where the truth or the prediction has the label (a counted slice).
    """
    truth = case.truth[slices]
    volume_spacing = (case.spacing[0] * slice_step, *case.pixel_spacing)
    slice_rows, volume_rows = [], []
    for name, value in case.labels.items():
        true, pred = truth == value, masks[name]
        if not (true.any() or pred.any()):
            continue
        volume = compute_mask_metrics(pred, true, volume_spacing)
        volume_rows.append({"label": name, **{f"{metric}_3d": volume[metric] for metric in METRICS},
                            "truth_voxels": int(true.sum()), "predicted_voxels": int(pred.sum()),
                            "slices": len(slices)})
        for position, index in enumerate(slices):
            if not (true[position].any() or pred[position].any()):
                continue
            slice_rows.append({"label": name, "slice": index, "size": size_stratum(true[position]),
                               "area_share": float(true[position].mean()),
                               "empty": empty_mask(pred[position], true[position]),
                               **compute_mask_metrics(pred[position], true[position], case.pixel_spacing)})
    return slice_rows, volume_rows


def subject_means(slices: pd.DataFrame, volumes: pd.DataFrame) -> pd.DataFrame:
    """One row per subject and label: its slice metrics averaged over its counted slices, then its 3D metrics."""
    means = (slices.groupby(SUBJECT_KEYS, sort=False)
             .agg(**{metric: (metric, "mean") for metric in METRICS}, counted_slices=("slice", "size"),
                  missed_slices=("empty", lambda empty: int((empty == EMPTY_PREDICTION).sum())),
                  false_positive_slices=("empty", lambda empty: int((empty == EMPTY_TRUTH).sum())))
             .reset_index())
    return means.merge(volumes, on=SUBJECT_KEYS, how="left", validate="one_to_one")


@dataclass
class SegmentationResults:
    slices: pd.DataFrame
    labels: pd.DataFrame
    overlays: list[Path]


def evaluate_segmentation(config: ExperimentConfig, out_dir: Path,
                          progress: Callable[[str], None] = _quiet) -> SegmentationResults:
    """Segment and score every case of ``config``; phantoms and overlays are written below ``out_dir``."""
    label_map = config.label_map
    models = load_models_of(config)
    slice_rows, volume_rows, overlays = [], [], []
    for dataset in config.datasets:
        for case in iter_cases(dataset, label_map, out_dir / "phantoms"):
            slices = list(range(config.slice_step // 2, len(case.truth), config.slice_step))
            for model in models:
                encoded = EncodedSlices(model.segmenter, case.normalised) if model.segmenter is not None else None
                for source in config.prompts:
                    start = time.perf_counter()
                    prompts = case_prompts(case, source, slices, model, config, label_map)
                    raw = {name: mask[slices] for name, mask in predicted_masks(case, model, encoded, prompts).items()}
                    for postprocess in config.postprocess:
                        masks = postprocessed(raw, label_map, case.pixel_spacing) if postprocess else raw
                        keys = {"dataset": case.dataset, "subject": case.subject, "model": model.name,
                                "prompts": source, "postprocess": "on" if postprocess else "off"}
                        case_slices, case_volumes = score_case(case, masks, slices, config.slice_step)
                        slice_rows += [{**keys, **row} for row in case_slices]
                        volume_rows += [{**keys, **row} for row in case_volumes]
                        if config.overlay_every:
                            overlays += _overlays(case, masks, slices, prompts, keys, config.overlay_every,
                                                  label_map, out_dir)
                    progress(f"{case.dataset}/{case.subject}: {model.name}, {source} prompts: "
                             f"{time.perf_counter() - start:.1f} s")
    slices_table = pd.DataFrame(slice_rows, columns=[*SUBJECT_KEYS, "slice", "size", "area_share", "empty", *METRICS])
    volumes = pd.DataFrame(volume_rows, columns=[*SUBJECT_KEYS, *METRICS_3D, "truth_voxels", "predicted_voxels",
                                                 "slices"])
    return SegmentationResults(slices_table, subject_means(slices_table, volumes), overlays)


def _overlays(case: Case, masks: dict[str, np.ndarray], slices: list[int], prompts: Prompts, keys: dict[str, str],
              every: int, label_map: LabelMap, out_dir: Path) -> list[Path]:
    from msk_node_evaluation.overlays import label_colours, plot_overlay

    names = list(case.labels)
    colours = label_colours(names, label_map)
    name_of = {value: name for name, value in case.labels.items()}
    folder = (out_dir / "overlays" / case.dataset / case.subject
              / f"{keys['model']}_{keys['prompts']}_postprocess-{keys['postprocess']}")
    labelled = [(position, index) for position, index in enumerate(slices)
                if any((case.truth[index] == value).any() for value in case.labels.values())]
    written = []
    for position, index in labelled[::every]:
        truth = {name: case.truth[index] == value for name, value in case.labels.items()}
        prediction = {name: masks[name][position] for name in names}
        boxes = [(name_of[value], box) for value, box in prompts.get(index, []) if value in name_of]
        title = (f"{case.dataset}/{case.subject} slice {index}: {keys['model']}, {keys['prompts']} prompts, "
                 f"post-processing {keys['postprocess']}")
        written.append(plot_overlay(case.normalised[index], truth, prediction, boxes, colours,
                                    folder / f"slice-{index:03d}.png", title))
    return written


def summarise(results: SegmentationResults) -> dict[str, pd.DataFrame]:
    """Per-dataset aggregates, size strata, subject mean Dice and the datasets x models tables.

    ``subjects`` and ``table`` hold the per-slice Dice (over labels, then subjects), ``table_3d`` the per-volume one.
    """
    labels, slices = results.labels, results.slices
    statistics = {f"{metric}_{name}": (metric, name) for metric in (*METRICS, *METRICS_3D) for name in ("mean", "std")}
    summary = (labels.groupby([*KEYS, "label"], sort=False)
               .agg(subjects=("subject", "nunique"), **statistics, **{n: (n, "sum") for n in SLICE_COUNTS})
               .reset_index())
    strata = (slices.groupby([*KEYS, "size"], sort=False)
              .agg(slices=("dice", "size"), **{f"{m}_mean": (m, "mean") for m in METRICS}).reset_index())
    strata["size"] = pd.Categorical(strata["size"], SIZE_ORDER, ordered=True)
    strata = strata.sort_values([*KEYS, "size"], kind="stable")
    strata["size"] = strata["size"].astype(str)
    subjects = labels.groupby([*KEYS, "subject"], sort=False)[["dice", "dice_3d"]].mean().reset_index()
    models = list(dict.fromkeys(labels["model"]))
    tables = {name: (subjects.pivot_table(index=["dataset", "prompts", "postprocess"], columns="model", values=value,
                                          aggfunc="mean", sort=False)
                     .reindex(columns=models).reset_index().rename_axis(columns=None))
              for name, value in (("table", "dice"), ("table_3d", "dice_3d"))}
    return {"summary": summary, "strata": strata, "subjects": subjects[[*KEYS, "subject", "dice"]], **tables}


def write_segmentation_outputs(config: ExperimentConfig, results: SegmentationResults, out_dir: Path) -> list[Path]:
    """Tables, JSON, stats inputs, box plots and model comparisons of a run."""
    from msk_node_evaluation import plots, stats

    aggregates = summarise(results)
    frames = {"slices": results.slices, "labels": results.labels, "summary": aggregates["summary"],
              "strata": aggregates["strata"], "table": aggregates["table"], "table_3d": aggregates["table_3d"]}
    written = [write_config(config, out_dir)]
    for name, frame in frames.items():
        written.append(_csv(frame, out_dir / f"{name}.csv"))

    columns = stats.Columns(value="dice")
    comparisons, pairs = [], []
    for (source, postprocess), frame in aggregates["subjects"].groupby(["prompts", "postprocess"], sort=False):
        setting = f"{source}_postprocess-{postprocess}"
        written.append(_csv(frame.rename(columns={"dice": "value"})[["subject", "model", "dataset", "value"]],
                            out_dir / f"dice_{setting}.csv"))
        written.append(plots.plot_metric_by_model(frame, out_dir / f"dice_by_model_{setting}.png", columns))
        if frame["model"].nunique() < 2:
            continue
        for dataset, subset in frame.groupby("dataset", sort=False):
            reason = _identical_models(subset)
            try:
                if reason:
                    raise ValueError(reason)
                omnibus, pairwise = stats.compare_models(subset, columns, path="nonparametric")
            except ValueError as error:
                omnibus, pairwise = pd.DataFrame([{"dataset": dataset, "test": "not run", "reason": str(error)}]), None
            setting_columns = {"prompts": source, "postprocess": postprocess}
            comparisons.append(omnibus.assign(**setting_columns))
            if pairwise is not None:
                pairs.append(pairwise.assign(**setting_columns))
    for name, tests in (("comparison", comparisons), ("pairwise", pairs)):
        if tests:
            frames[name] = _settings_first(pd.concat(tests, ignore_index=True))
            written.append(_csv(frames[name], out_dir / f"{name}.csv"))
    (out_dir / "metrics.json").write_text(json.dumps({name: _records(frame) for name, frame in frames.items()},
                                                     indent=1))
    written.append(out_dir / "metrics.json")
    return written


def _identical_models(subjects: pd.DataFrame) -> str:
    """Why no test applies when two models agree on every subject (their differences are all zero), else ''."""
    wide = subjects.pivot_table(index="subject", columns="model", values="dice")
    for position, first in enumerate(wide.columns):
        for second in wide.columns[position + 1:]:
            if np.allclose(wide[first], wide[second], equal_nan=True):
                return f"models {first!r} and {second!r} give identical values"
    return ""


def write_config(config: ExperimentConfig, out_dir: Path) -> Path:
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config.raw, sort_keys=False))
    return path


def _settings_first(frame: pd.DataFrame) -> pd.DataFrame:
    first = ["dataset", "prompts", "postprocess"]
    return frame[first + [c for c in frame.columns if c not in first]]


def _csv(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON objects; NaN becomes null (JSON has no NaN)."""
    return json.loads(frame.to_json(orient="records"))
