"""Choose the series of a study to segment, and find its relaxometry acquisitions, by rules kept in a YAML file.

The rules play the role of MONAI Deploy's series-selector rules, but speak the
language of MSK protocols: plane from the geometry, body part, sequence names.
The same file, rendered as JSON by ``msk-node rules --json``, drives the Orthanc plugin.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from msk_node.dicom_input import Series, SkippedFile

PLANES = ("sagittal", "coronal", "axial")
_RULE_KEYS = {
    "name", "anatomy", "modality", "plane", "min_slices", "exclude_description", "body_part", "description",
}
_RELAXOMETRY_KEYS = {"kind", "description", "min_echo_times"}
RELAXOMETRY_KINDS = ("t1rho", "t2", "dess_t2")


@dataclass(frozen=True)
class SeriesRule:
    name: str
    anatomy: str
    modality: tuple[str, ...] = ()
    plane: str | None = None
    min_slices: int = 1
    exclude_description: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    description: tuple[str, ...] = ()


@dataclass(frozen=True)
class RelaxometryRule:
    """Which series of a study make one relaxometry acquisition."""

    kind: str
    description: tuple[str, ...]
    #: Distinct echo times, over images that are not scanner-derived, the acquisition needs (0: not checked).
    min_echo_times: int = 0


@dataclass(frozen=True)
class SelectedSeries:
    series: Series
    rule: SeriesRule

    @property
    def anatomy(self) -> str:
        return self.rule.anatomy


def default_rules_path() -> Path:
    return Path(str(resources.files("msk_node") / "config" / "series_rules.yaml"))


def load_rules(path: str | Path | None = None) -> list[SeriesRule]:
    """Load and validate the segmentation rules; errors name the rule and the key."""
    path = Path(path) if path is not None else default_rules_path()
    return _segmentation_rules(_read_rules_document(path), path.name)


def load_relaxometry_rules(path: str | Path | None = None) -> list[RelaxometryRule]:
    """Load and validate the relaxometry groups; errors name the group and the key."""
    path = Path(path) if path is not None else default_rules_path()
    return _relaxometry_rules(_read_rules_document(path), path.name)


def rules_json(path: str | Path | None = None) -> str:
    """The validated rules file as JSON, for readers with the standard library only (the Orthanc plugin)."""
    path = Path(path) if path is not None else default_rules_path()
    document = _read_rules_document(path)
    _segmentation_rules(document, path.name)
    _relaxometry_rules(document, path.name)
    return json.dumps(document, indent=2) + "\n"


def _read_rules_document(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        raise ValueError(f"{path.name}: expected a mapping with a 'rules' list")
    unknown = set(document) - {"rules", "relaxometry"}
    if unknown:
        raise ValueError(f"{path.name}: unknown key(s) {sorted(unknown)}")
    if not isinstance(document.get("relaxometry", []), list):
        raise ValueError(f"{path.name}: 'relaxometry' must be a list")
    return document


def _strings(entry: dict, key: str, where: str) -> tuple[str, ...]:
    """The list of strings under ``key``; those of a ``*description`` key must be regular expressions."""
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: '{key}' must be a list of strings")
    for pattern in value if key.endswith("description") else ():
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{where}: '{key}' has a bad pattern {pattern!r}: {error}") from error
    return tuple(value)


def _count(entry: dict, key: str, where: str, least: int, default: int) -> int:
    value = entry.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{where}: '{key}' must be an integer >= {least}")
    return value


def _segmentation_rules(document: dict, file_name: str) -> list[SeriesRule]:
    rules = []
    for index, entry in enumerate(document["rules"]):
        where = f"{file_name}: rules[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping")
        unknown = set(entry) - _RULE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        for key in ("name", "anatomy"):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"{where}: '{key}' is required and must be a string")
        plane = entry.get("plane")
        if plane is not None and plane not in PLANES:
            raise ValueError(f"{where}: 'plane' must be one of {PLANES}, got {plane!r}")
        lists = {key: _strings(entry, key, where)
                 for key in ("modality", "exclude_description", "body_part", "description")}
        rules.append(SeriesRule(name=entry["name"], anatomy=entry["anatomy"], plane=plane,
                                min_slices=_count(entry, "min_slices", where, 1, 1), **lists))
    return rules


def _relaxometry_rules(document: dict, file_name: str) -> list[RelaxometryRule]:
    groups = []
    for index, entry in enumerate(document.get("relaxometry", [])):
        where = f"{file_name}: relaxometry[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a mapping")
        unknown = set(entry) - _RELAXOMETRY_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}")
        if entry.get("kind") not in RELAXOMETRY_KINDS:
            raise ValueError(f"{where}: 'kind' must be one of {RELAXOMETRY_KINDS}, got {entry.get('kind')!r}")
        if entry["kind"] in {group.kind for group in groups}:
            raise ValueError(f"{where}: 'kind' {entry['kind']!r} is given twice")
        description = _strings(entry, "description", where)
        if not description:
            raise ValueError(f"{where}: 'description' needs at least one pattern")
        groups.append(RelaxometryRule(kind=entry["kind"], description=description,
                                      min_echo_times=_count(entry, "min_echo_times", where, 0, 0)))
    return groups


def imaging_plane(series: Series) -> str | None:
    """Plane named by the dominant axis of the slice normal, or None without geometry."""
    orientation = series.first.get("ImageOrientationPatient")
    if orientation is None or len(orientation) != 6:
        return None
    row, column = np.reshape([float(v) for v in orientation], (2, 3))
    normal = np.abs(np.cross(row, column))
    return PLANES[int(np.argmax(normal))]


def rejection_reason(series: Series, rule: SeriesRule) -> str | None:
    """Why ``rule`` does not take ``series``; None when it does."""
    if rule.modality and series.modality.upper() not in {m.upper() for m in rule.modality}:
        return f"modality {series.modality or 'absent'} is not {'/'.join(rule.modality)}"
    plane = imaging_plane(series)
    if plane is None:
        return "no ImageOrientationPatient"
    if rule.plane and plane != rule.plane:
        return f"{plane} plane, rule wants {rule.plane}"
    if len(series) < rule.min_slices:
        return f"{len(series)} slice(s), fewer than the {rule.min_slices} needed for a volume"
    description = series.description
    if any(re.search(p, description, re.IGNORECASE) for p in rule.exclude_description):
        return f"description {description!r} is excluded"
    body_part = str(series.first.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and rule.body_part:
        if body_part not in {b.upper() for b in rule.body_part}:
            return f"body part {body_part} is not {'/'.join(rule.body_part)}"
        return None
    if rule.description and not any(re.search(p, description, re.IGNORECASE) for p in rule.description):
        return f"description {description!r} names no {rule.anatomy} sequence"
    return None


def select_series(
    series_list: list[Series], rules: list[SeriesRule]
) -> tuple[list[SelectedSeries], list[SkippedFile]]:
    """Apply ``rules`` to every series; each series is selected by its first matching rule.

    Returns the selected series and, for every other series, the reason given by the
    most specific rule it failed (the first one).
    """
    selected, skipped = [], []
    for series in series_list:
        reasons = []
        for rule in rules:
            reason = rejection_reason(series, rule)
            if reason is None:
                selected.append(SelectedSeries(series, rule))
                break
            reasons.append(f"{rule.name}: {reason}")
        else:
            skipped.append(SkippedFile(f"series {series.series_instance_uid} ({series.description!r})",
                                       "no selection rule matched (" + "; ".join(reasons) + ")"))
    return selected, skipped
