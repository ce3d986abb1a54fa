"""``msk-eval check``: plausibility figures of the node's labels on studies that have no truth.

Without reference labels a real series can still be judged: the node's own pipeline runs
on each study, and for every segmented series the volume, number of 3D components,
slices covered and centroid (patient LPS mm) of each label are written beside the
plausibility findings and a few overlay PNGs, so an implausible result (a bone in three
pieces, a femur of 2 cm3, labels on two slices) shows at a glance.
"""
from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from msk_node.intensity import normalise_volume
from msk_node.labels import LabelMap
from msk_node.models import ModelSet
from msk_node.overlay import render_overlays
from msk_node.pipeline import SeriesResult, process_study
from msk_node.plausibility import label_figures

FIGURE_COLUMNS = ("series_instance_uid", "description", "anatomy", "label", "volume_cm3", "components", "slices",
                  "first_slice", "last_slice", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
                  "dropped_components", "dropped_mm3", "flagged_components")


@dataclass
class StudyCheck:
    """One study's series entries (as in ``figures.json``) and the files written for it."""

    name: str
    output_dir: Path
    series: list[dict] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def evenly_spaced_slices(label_volume: np.ndarray, count: int) -> list[int]:
    """``count`` slice indices spread evenly through the labelled slices, the outermost two left out.

    The first and last labelled slices hold the edge of the anatomy, where little is seen.
    """
    labelled = np.flatnonzero(label_volume.any(axis=(1, 2)))
    if len(labelled) <= count:
        return [int(k) for k in labelled]
    positions = np.round(np.linspace(0, len(labelled) - 1, count + 2)[1:-1]).astype(int)
    return [int(labelled[p]) for p in np.unique(positions)]


def write_overlays(job: SeriesResult, label_map: LabelMap, out_dir: Path, count: int) -> list[Path]:
    """Label outlines in the label map's colours on ``count`` slices, named by their volume slice index."""
    labels = job.label_volume.labels
    chosen = evenly_spaced_slices(labels, count)
    if not chosen:
        return []
    scratch = out_dir / ".rendering"
    shutil.rmtree(scratch, ignore_errors=True)
    rendered = render_overlays(normalise_volume(job.label_volume.volume.array)[chosen], labels[chosen], label_map,
                               scratch, every=1)
    written = []
    for index, path in zip(chosen, rendered):
        target = out_dir / f"slice-{index:03d}.png"
        path.replace(target)
        written.append(target)
    shutil.rmtree(scratch, ignore_errors=True)
    return written


def series_entry(job: SeriesResult, report_entry: dict, label_map: LabelMap) -> dict:
    """Figures of one series' labels after plausibility, with the findings of ``report.json``."""
    entry = {key: report_entry[key] for key in ("series_instance_uid", "description", "anatomy", "outcome",
                                                 "reason") if key in report_entry}
    entry["plausibility"] = report_entry.get("plausibility", [])
    if job.outcome == "segmented":
        entry["labels"] = [{**asdict(figures), "volume_cm3": round(figures.volume_cm3, 4),
                            "centroid_mm": [round(v, 2) for v in figures.centroid_mm]}
                           for figures in label_figures(job.label_volume.labels, job.label_volume.volume,
                                                        label_map)]
    return entry


def figure_rows(entry: dict) -> list[dict]:
    """One CSV row per label of a series; labels whose every component was dropped get a row of zeros."""
    findings = defaultdict(list)
    for finding in entry["plausibility"]:
        findings[finding["label"]].append(finding)
    rows = []
    labels = {figures["label"]: figures for figures in entry.get("labels", [])}
    for name in list(labels) + [name for name in findings if name not in labels]:
        figures = labels.get(name)
        dropped = [f for f in findings[name] if f["action"] == "dropped"]
        row = {"series_instance_uid": entry["series_instance_uid"], "description": entry["description"],
               "anatomy": entry["anatomy"], "label": name, "volume_cm3": 0.0, "components": 0, "slices": 0,
               "first_slice": "", "last_slice": "", "centroid_x_mm": "", "centroid_y_mm": "", "centroid_z_mm": "",
               "dropped_components": len(dropped), "dropped_mm3": round(sum(f["volume_mm3"] for f in dropped), 1),
               "flagged_components": sum(f["action"] == "flagged" for f in findings[name])}
        if figures is not None:
            row.update({key: figures[key] for key in ("volume_cm3", "components", "slices", "first_slice",
                                                      "last_slice")})
            row.update(zip(("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"), figures["centroid_mm"]))
        rows.append(row)
    return rows


def check_study(study_dir: Path, out_dir: Path, models: ModelSet, overlays: int = 5) -> StudyCheck:
    """Run the node on ``study_dir`` into ``out_dir`` and add figures.json, figures.csv and overlays."""
    out_dir = Path(out_dir)
    work = process_study(Path(study_dir), out_dir, models)
    report = {entry["series_instance_uid"]: entry for entry in work.report["series"]}
    result = StudyCheck(out_dir.name, out_dir)
    for job in work.series_results:
        entry = series_entry(job, report[job.series_instance_uid], models.label_map)
        if job.outcome == "segmented":
            paths = write_overlays(job, models.label_map, out_dir / "overlays" / job.series_instance_uid, overlays)
            entry["overlays"] = [path.relative_to(out_dir).as_posix() for path in paths]
            result.written += paths
        result.series.append(entry)
    (out_dir / "figures.json").write_text(json.dumps({"study": result.name, "input": str(study_dir),
                                                      "series": result.series}, indent=2))
    with (out_dir / "figures.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIGURE_COLUMNS)
        writer.writeheader()
        writer.writerows(row for entry in result.series for row in figure_rows(entry))
    result.written += [out_dir / "figures.json", out_dir / "figures.csv"]
    return result


def study_names(studies: list[Path]) -> list[str]:
    """Output folder names: each study folder's own name, numbered where two are the same."""
    names: list[str] = []
    for study in studies:
        base = Path(study).resolve().name or "study"
        name, number = base, 2
        while name in names:
            name, number = f"{base}-{number}", number + 1
        names.append(name)
    return names


def format_summary(results: list[StudyCheck]) -> str:
    """One line per label of each segmented series, one per series that was not."""
    header = ("study", "series", "label", "cm3", "parts", "slices", "centroid LPS mm", "dropped", "flagged")
    lines = []
    for result in results:
        for entry in result.series:
            # Series of one study can share a description (two echoes): the UID's tail tells them apart.
            series = f"...{entry['series_instance_uid'][-6:]} {entry.get('description', '')[:24]}".rstrip()
            if "labels" not in entry:
                lines.append((result.name, series, f"{entry['outcome']}: {entry.get('reason', '')}"))
                continue
            for row in figure_rows(entry):
                slices = f"{row['slices']} ({row['first_slice']}-{row['last_slice']})" if row["slices"] else "0"
                centroid = ("" if row["centroid_x_mm"] == "" else
                            " ".join(f"{row[f'centroid_{a}_mm']:.1f}" for a in "xyz"))
                lines.append((result.name, series, row["label"], f"{row['volume_cm3']:.2f}", str(row["components"]),
                              slices, centroid, str(row["dropped_components"]), str(row["flagged_components"])))
    widths = [max(len(line[i]) for line in [header, *lines] if len(line) > i) for i in range(len(header))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip()
                     for line in [header, *lines])
