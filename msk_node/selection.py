"""Choose the series of a study to segment, and find its relaxometry acquisitions, by rules kept in a YAML file.

The rules play the role of MONAI Deploy's series-selector rules, but speak the
language of MSK protocols: plane from the geometry, body part, sequence names.
The same file, rendered as JSON by ``msk-node rules --json``, drives the Orthanc plugin.
"""
from __future__ import annotations

import json
import re
from dataclasses import InitVar, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from msk_node import config_checks as checks
from msk_node.dicom_input import Series, SkippedFile

PLANES = ("sagittal", "coronal", "axial")
_LIST_KEYS = ("modality", "exclude_description", "body_part", "description")
_RULE_KEYS = ("name", "anatomy", "plane", "min_slices", *_LIST_KEYS)
_RELAXOMETRY_KEYS = ("kind", "description", "min_echo_times")
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
    #: Where the rule sits in its file (``rules[0]``), for error messages.
    where: InitVar[str] = "rule"

    def __post_init__(self, where: str) -> None:
        checks.check_field_types(self, where)
        if self.plane is not None:
            checks.one_of(self.plane, PLANES, f"{where}.plane")
        checks.at_least(self.min_slices, 1, f"{where}.min_slices")
        for key in _LIST_KEYS:
            if key.endswith("description"):
                _patterns(getattr(self, key), f"{where}.{key}")
            else:
                for index, item in enumerate(getattr(self, key)):
                    checks.typed(item, "string", f"{where}.{key}[{index}]")


@dataclass(frozen=True)
class RelaxometryRule:
    """Which series of a study make one relaxometry acquisition."""

    kind: str
    description: tuple[str, ...]
    #: Distinct echo times, over images that are not scanner-derived, the acquisition needs (0: not checked).
    min_echo_times: int = 0
    #: Where the group sits in its file (``relaxometry[0]``), for error messages.
    where: InitVar[str] = "relaxometry group"

    def __post_init__(self, where: str) -> None:
        checks.check_field_types(self, where)
        checks.one_of(self.kind, RELAXOMETRY_KINDS, f"{where}.kind")
        checks.at_least(self.min_echo_times, 0, f"{where}.min_echo_times")
        if not self.description:
            raise ValueError(f"key '{where}.description' needs at least one pattern")
        _patterns(self.description, f"{where}.description")


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
    """Load and validate the segmentation rules; errors name the file, the rule and the key."""
    return checks.load_yaml_config(path if path is not None else default_rules_path(), _parse_document)[0]


def load_relaxometry_rules(path: str | Path | None = None) -> list[RelaxometryRule]:
    """Load and validate the relaxometry groups; errors name the file, the group and the key."""
    return checks.load_yaml_config(path if path is not None else default_rules_path(), _parse_document)[1]


def rules_json(path: str | Path | None = None) -> str:
    """The validated rules file as JSON, for readers with the standard library only (the Orthanc plugin)."""
    return checks.load_yaml_config(path if path is not None else default_rules_path(),
                                   lambda raw: (_parse_document(raw), json.dumps(raw, indent=2) + "\n"))[1]


def _patterns(items: tuple[str, ...], key: str) -> None:
    """Every item is a string and a regular expression."""
    for index, item in enumerate(items):
        checks.typed(item, "string", f"{key}[{index}]")
        try:
            re.compile(item)
        except re.error as error:
            raise ValueError(f"key '{key}[{index}]': bad pattern {item!r}: {error}") from None


def _parse_document(raw: Any) -> tuple[list[SeriesRule], list[RelaxometryRule]]:
    checks.check_keys(raw, "", ("rules", "relaxometry"), required=("rules",))
    rules = []
    for index, entry in enumerate(checks.value(raw, "rules", "", "list")):
        where = f"rules[{index}]"
        checks.check_keys(entry, where, _RULE_KEYS, required=("name", "anatomy"))
        rules.append(SeriesRule(
            name=checks.value(entry, "name", where, "string"),
            anatomy=checks.value(entry, "anatomy", where, "string"),
            plane=checks.value(entry, "plane", where, "string"),
            min_slices=checks.value(entry, "min_slices", where, "integer", 1),
            **{key: tuple(checks.value(entry, key, where, "list", [])) for key in _LIST_KEYS},
            where=where,
        ))
    groups: list[RelaxometryRule] = []
    for index, entry in enumerate(checks.value(raw, "relaxometry", "", "list", [])):
        where = f"relaxometry[{index}]"
        checks.check_keys(entry, where, _RELAXOMETRY_KEYS, required=("kind",))
        group = RelaxometryRule(kind=checks.value(entry, "kind", where, "string"),
                                description=tuple(checks.value(entry, "description", where, "list", [])),
                                min_echo_times=checks.value(entry, "min_echo_times", where, "integer", 0),
                                where=where)
        if group.kind in {other.kind for other in groups}:
            raise ValueError(f"key '{where}.kind': {group.kind!r} is given twice")
        groups.append(group)
    return rules, groups


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
