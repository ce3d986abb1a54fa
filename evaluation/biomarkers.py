"""``msk-eval biomarkers``: the node's biomarkers from the manual (truth) labels and from a model's, per subject.

Both label volumes go through :func:`msk_node.measure.measure_series` with the series'
real geometry, so the two values of a row differ only by the segmentation. Discs are paired
by the level each side's anatomy gives them; a disc whose level is uncertain on either side
has no partner to be compared with and is left out. The model
segments every slice (``slice_step`` does not apply: volumes and thicknesses need the
whole structure). Cases must be DICOM series (phantoms included): the biomarkers read
laterality and the study's relaxometry series from the headers.

Output::

    biomarkers.csv        dataset, subject, model, prompts, postprocess, structure, measurement,
                          truth_value, model_value, unit, reason (why a value is missing)
    biomarkers_long.csv   subject, model, dataset, value: `msk-eval stats --reference manual`
                          input, one dataset per structure and measurement
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from msk_node_evaluation.cases import Case, iter_cases
from msk_node_evaluation.config import ExperimentConfig
from msk_node_evaluation.experiment import case_prompts, load_models_of, predicted_masks, write_config
from msk_node_evaluation.segment import EncodedSlices, postprocessed
from msk_node.biomarkers import Measurement
from msk_node.biomarkers.disc import UNCERTAIN_LEVEL
from msk_node.labels import LabelMap
from msk_node.measure import measure_series
from msk_node.postprocess import merge_labels

REFERENCE = "manual"
COLUMNS = ["dataset", "subject", "model", "prompts", "postprocess", "structure", "measurement", "truth_value",
           "model_value", "unit", "reason"]


def label_volume(masks: dict[str, np.ndarray], label_map: LabelMap, shape: tuple[int, ...]) -> np.ndarray:
    """Label-map values, one per voxel (the node's priorities where masks overlap)."""
    present = {name: mask for name, mask in masks.items() if mask.any()}
    return merge_labels(present, label_map) if present else np.zeros(shape, dtype=np.uint8)


def measurements(case: Case, volume: np.ndarray, label_map: LabelMap) -> dict[tuple[str, str], Measurement]:
    """(structure, measurement) -> value of one label volume of ``case``."""
    if case.series is None:
        raise ValueError(f"{case.dataset}/{case.subject}: biomarkers need a DICOM series "
                         "(laterality, geometry and relaxometry series come from its headers)")
    if case.anatomy is None:
        raise ValueError(f"{case.dataset}/{case.subject}: labels {sorted(case.labels)} do not name one anatomy "
                         "of the label map; set the dataset's 'anatomy'")
    found = measure_series(case.series, volume, case.anatomy, label_map, case.study_series)
    return {(m.label, m.name): m for m in found.rows() if UNCERTAIN_LEVEL not in m.label}


def evaluate_biomarkers(config: ExperimentConfig, out_dir: Path,
                        progress: Callable[[str], None] = lambda _: None) -> pd.DataFrame:
    """One row per subject, model variant and measured (structure, measurement), truth and model side by side."""
    label_map = config.label_map
    models = load_models_of(config)
    rows = []
    for dataset in config.datasets:
        for case in iter_cases(dataset, label_map, out_dir / "phantoms"):
            unknown = [name for name in case.labels if name not in label_map.names]
            if unknown:
                raise ValueError(f"{case.dataset}/{case.subject}: labels {unknown} are not in the label map, "
                                 "so no biomarker applies to them")
            truth_masks = {name: case.truth == value for name, value in case.labels.items()}
            truth = measurements(case, label_volume(truth_masks, label_map, case.truth.shape), label_map)
            slices = list(range(len(case.truth)))
            for model in models:
                encoded = EncodedSlices(model.segmenter, case.normalised) if model.segmenter is not None else None
                for source in config.prompts:
                    start = time.perf_counter()
                    prompts = case_prompts(case, source, slices, model, config, label_map)
                    raw = predicted_masks(case, model, encoded, prompts)
                    for postprocess in config.postprocess:
                        masks = postprocessed(raw, label_map, case.pixel_spacing) if postprocess else raw
                        predicted = measurements(case, label_volume(masks, label_map, case.truth.shape), label_map)
                        keys = {"dataset": case.dataset, "subject": case.subject, "model": model.name,
                                "prompts": source, "postprocess": "on" if postprocess else "off"}
                        rows += [{**keys, **_pair(key, truth.get(key), predicted.get(key))}
                                 for key in [*truth, *(k for k in predicted if k not in truth)]]
                    progress(f"{case.dataset}/{case.subject}: {model.name}, {source} prompts: "
                             f"{time.perf_counter() - start:.1f} s")
    return pd.DataFrame(rows, columns=COLUMNS)


def _pair(key: tuple[str, str], truth: Measurement | None, model: Measurement | None) -> dict:
    reasons = [f"{side}: {m.reason if m is not None else 'not measured'}"
               for side, m in (("truth", truth), ("model", model)) if m is None or not m.available]
    return {"structure": key[0], "measurement": key[1],
            "truth_value": truth.value if truth is not None else math.nan,
            "model_value": model.value if model is not None else math.nan,
            "unit": (truth or model).unit, "reason": "; ".join(reasons)}


def long_format(table: pd.DataFrame) -> pd.DataFrame:
    """Truth as model ``manual`` and every model variant, one dataset per structure and measurement.

    A variant is named by its model, plus the prompt source and post-processing when the
    table holds more than one of them; missing values are left out.
    """
    varying = [column for column in ("prompts", "postprocess") if table[column].nunique() > 1]
    variant = table["model"].astype(str)
    for column in varying:
        variant = variant + "_" + (column + "-" if column == "postprocess" else "") + table[column].astype(str)
    dataset = table["dataset"] + ":" + table["structure"] + ":" + table["measurement"]
    truth = pd.DataFrame({"subject": table["subject"], "model": REFERENCE, "dataset": dataset,
                          "value": table["truth_value"]}).drop_duplicates(["subject", "dataset"])
    models = pd.DataFrame({"subject": table["subject"], "model": variant, "dataset": dataset,
                           "value": table["model_value"]})
    return pd.concat([truth, models], ignore_index=True).dropna(subset=["value"])


def write_biomarker_outputs(config: ExperimentConfig, table: pd.DataFrame, out_dir: Path) -> list[Path]:
    paths = [write_config(config, out_dir), out_dir / "biomarkers.csv", out_dir / "biomarkers_long.csv"]
    table.to_csv(paths[1], index=False)
    long_format(table).to_csv(paths[2], index=False)
    return paths
