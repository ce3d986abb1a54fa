"""The label map: detector class ids, voxel values and codes of the anatomical labels.

A label map is a YAML file with one top-level key, ``labels``, holding a list of
entries::

    labels:
      - name: femur              # identifier: lower-case letters, digits, '_' (max. 64)
        value: 1                 # voxel value in label volumes, 1..255, unique
        class_id: 0              # detector class id, >= 0, unique
        anatomy: knee            # group the label belongs to ("knee", "thigh", "spine", ...)
        colour: [230, 220, 170]  # recommended display colour, RGB 0..255
        smoothing_mm: 3.0        # diameter of the closing / smoothing kernel in mm, >= 0
        priority: 1              # the higher priority wins where two labels claim a voxel
        min_area_mm2: 20         # 2D components smaller than this are removed, >= 0
        # optional, both or either; otherwise msk_node.codes.anatomy_codes(name) supplies them:
        category: {scheme: SCT, value: "91723000", meaning: "Anatomical Structure"}
        type: {scheme: SCT, value: "71341001", meaning: "Femur"}
        # optional: the label also takes what another label encloses in each slice
        # (marrow inside the cortical ring), so it is found even when not detected
        interior_of: femoral_cortex
        # optional: the structure is solid (a whole bone), so holes in a slice are filled
        fill_holes: true

Every problem found while loading raises :class:`ValueError` naming the file, the
entry and the key, e.g. ``label_map.yaml: labels[3] (meniscus): unknown key 'colur'``.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from highdicom.sr import CodedConcept

from msk_node import config_checks as checks
from msk_node.codes import anatomy_codes

#: The label map installed with the package (package data): the default detector's, which the phantoms use.
DEFAULT_LABEL_MAP_PATH = Path(str(resources.files("msk_node") / "config" / "label_map.yaml"))

_REQUIRED_KEYS = ("name", "value", "class_id", "anatomy", "colour", "smoothing_mm", "priority", "min_area_mm2")
_OPTIONAL_KEYS = ("category", "type", "interior_of", "fill_holes")
_CODED_KEYS = ("category", "type")
_CODE_KEYS = ("scheme", "value", "meaning")
_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class LabelSpec:
    """One anatomical label.

    Attributes
    ----------
    name : str
        Identifier, also the DICOM segment label, e.g. ``"femur"``.
    value : int
        Voxel value in label volumes, 1..255.
    class_id : int
        Detector class id, 0-based.
    anatomy : str
        Group the label belongs to, e.g. ``"knee"``.
    category : highdicom.sr.CodedConcept
        Segmented property category.
    property_type : highdicom.sr.CodedConcept
        Segmented property type.
    colour : tuple of int
        Recommended display colour, RGB 0..255.
    smoothing_mm : float
        Diameter in mm of the closing / smoothing kernel used in post-processing.
    priority : int
        The higher priority wins where two labels claim one pixel.
    min_area_mm2 : float
        2D components smaller than this are removed.
    interior_of : str or None
        Name of a label whose enclosed holes (per slice) belong to this label.
    fill_holes : bool
        The structure is solid: holes inside it in a slice belong to it.
    """

    name: str
    value: int
    class_id: int
    anatomy: str
    category: CodedConcept
    property_type: CodedConcept
    colour: tuple[int, int, int]
    smoothing_mm: float
    priority: int
    min_area_mm2: float
    interior_of: str | None = None
    fill_holes: bool = False

    def __post_init__(self) -> None:
        check_label_name(self.name)
        checks.in_range(checks.typed(self.value, "integer", "value"), 1, 255, "value")
        checks.at_least(checks.typed(self.class_id, "integer", "class_id"), 0, "class_id")
        if not isinstance(self.anatomy, str) or not self.anatomy:
            raise ValueError(f"key 'anatomy' must be a non-empty string, got {self.anatomy!r}")
        colour = self.colour
        if not isinstance(colour, tuple) or len(colour) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in colour):
            raise ValueError(f"key 'colour' must be 3 integers 0..255, got {colour!r}")
        for key in ("smoothing_mm", "min_area_mm2"):
            item = getattr(self, key)
            if not (_is_int(item) or isinstance(item, float)) or not math.isfinite(item) or item < 0:
                raise ValueError(f"key {key!r} must be a number >= 0, got {item!r}")
            object.__setattr__(self, key, float(item))
        checks.typed(self.priority, "integer", "priority")
        if self.interior_of is not None and not isinstance(self.interior_of, str):
            raise ValueError(f"key 'interior_of' must be a label name, got {self.interior_of!r}")
        if not isinstance(self.fill_holes, bool):
            raise ValueError(f"key 'fill_holes' must be true or false, got {self.fill_holes!r}")


def check_label_name(name: object) -> None:
    """A label name is an identifier: lower-case letters, digits and '_' (max. 64)."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"key 'name' must be lower-case letters, digits and '_' (max. 64), got {name!r}")


@dataclass(frozen=True)
class LabelMap:
    """An ordered set of labels with unique names, values and class ids."""

    labels: tuple[LabelSpec, ...]

    def __post_init__(self) -> None:
        for attribute in ("name", "value", "class_id"):
            seen = [getattr(spec, attribute) for spec in self.labels]
            duplicates = sorted({item for item in seen if seen.count(item) > 1}, key=str)
            if duplicates:
                raise ValueError(f"labels: duplicate {attribute} {duplicates}")

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[LabelSpec]:
        return iter(self.labels)

    @property
    def names(self) -> tuple[str, ...]:
        """Label names in map order."""
        return tuple(spec.name for spec in self.labels)

    @property
    def values(self) -> tuple[int, ...]:
        """Voxel values in map order."""
        return tuple(spec.value for spec in self.labels)

    @property
    def anatomies(self) -> tuple[str, ...]:
        """Distinct anatomy groups in map order."""
        return tuple(dict.fromkeys(spec.anatomy for spec in self.labels))

    def by_name(self, name: str) -> LabelSpec:
        """The label called ``name``; :class:`KeyError` if there is none."""
        return self._find("name", name)

    def by_value(self, value: int) -> LabelSpec:
        """The label with voxel value ``value``; :class:`KeyError` if there is none."""
        return self._find("value", value)

    def by_class_id(self, class_id: int) -> LabelSpec:
        """The label of detector class ``class_id``; :class:`KeyError` if there is none."""
        return self._find("class_id", class_id)

    def for_anatomy(self, anatomy: str) -> LabelMap:
        """The labels of one anatomy group, in map order.

        Raises
        ------
        KeyError
            If no label belongs to ``anatomy``.
        """
        selected = tuple(spec for spec in self.labels if spec.anatomy == anatomy)
        if not selected:
            raise KeyError(f"no labels for anatomy {anatomy!r}; known: {', '.join(self.anatomies)}")
        return LabelMap(selected)

    def _find(self, attribute: str, key: Any) -> LabelSpec:
        for spec in self.labels:
            if getattr(spec, attribute) == key:
                return spec
        raise KeyError(f"no label with {attribute} {key!r}")


@functools.cache
def default_label_map() -> LabelMap:
    """The label map installed with the package, read once: the one source of label values."""
    return load_label_map(DEFAULT_LABEL_MAP_PATH)


def load_label_map(path: str | Path) -> LabelMap:
    """Read and validate a label map YAML file.

    Parameters
    ----------
    path : str or pathlib.Path
        The YAML file (format in the module docstring).

    Returns
    -------
    LabelMap
        Labels in file order.

    Raises
    ------
    ValueError
        If the file is not valid YAML or any entry breaks the format; the message
        names the file, the entry and the key.
    """
    path = Path(path)
    source = path.name
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: not valid YAML: {error}") from error
    if not isinstance(document, dict):
        raise ValueError(f"{source}: expected a mapping with the key 'labels'")
    unknown = sorted(set(document) - {"labels"}, key=str)
    if unknown:
        raise ValueError(f"{source}: unknown top-level key {unknown[0]!r}")
    entries = document.get("labels")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: 'labels' must be a non-empty list")

    labels = [_parse_entry(entry, f"{source}: labels[{index}]") for index, entry in enumerate(entries)]
    names = {spec.name for spec in labels}
    for index, spec in enumerate(labels):
        if spec.interior_of is not None and (spec.interior_of not in names or spec.interior_of == spec.name):
            raise ValueError(f"{source}: labels[{index}] ({spec.name}): key 'interior_of' must name another label, "
                             f"got {spec.interior_of!r}")
    for attribute in ("name", "value", "class_id"):
        first: dict[Any, int] = {}
        for index, spec in enumerate(labels):
            key = getattr(spec, attribute)
            if key in first:
                raise ValueError(
                    f"{source}: labels[{index}] ({spec.name}): duplicate {attribute} {key!r}, "
                    f"already used by labels[{first[key]}] ({labels[first[key]].name})"
                )
            first[key] = index
    return LabelMap(tuple(labels))


def _parse_entry(entry: Any, where: str) -> LabelSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if isinstance(name, str):
        where = f"{where} ({name})"
    unknown = [key for key in entry if key not in _REQUIRED_KEYS + _OPTIONAL_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    missing = [key for key in _REQUIRED_KEYS if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing required key {missing[0]!r}")

    try:
        check_label_name(name)
        category, property_type = _codes(entry, name)
        colour = entry["colour"]
        return LabelSpec(
            name=name,
            value=entry["value"],
            class_id=entry["class_id"],
            anatomy=entry["anatomy"],
            category=category,
            property_type=property_type,
            colour=tuple(colour) if isinstance(colour, list) else colour,
            smoothing_mm=entry["smoothing_mm"],
            priority=entry["priority"],
            min_area_mm2=entry["min_area_mm2"],
            interior_of=entry.get("interior_of"),
            fill_holes=entry.get("fill_holes", False),
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _codes(entry: dict[str, Any], name: str) -> tuple[CodedConcept, CodedConcept]:
    explicit = {key: _code(entry[key], key) for key in _CODED_KEYS if key in entry}
    if len(explicit) < len(_CODED_KEYS):
        try:
            default_category, default_type = anatomy_codes(name)
        except KeyError:
            absent = next(key for key in _CODED_KEYS if key not in explicit)
            raise ValueError(f"unknown label name {name!r} has no built-in codes; key {absent!r} is required") from None
        explicit.setdefault("category", CodedConcept.from_code(default_category))
        explicit.setdefault("type", CodedConcept.from_code(default_type))
    return explicit["category"], explicit["type"]


def _code(raw: Any, key: str) -> CodedConcept:
    if not isinstance(raw, dict) or set(raw) != set(_CODE_KEYS):
        raise ValueError(f"key {key!r} must be a mapping with exactly {', '.join(_CODE_KEYS)}, got {raw!r}")
    for part in _CODE_KEYS:
        if not isinstance(raw[part], str) or not raw[part]:
            raise ValueError(f"key {key!r}: {part!r} must be a non-empty string, got {raw[part]!r}")
    return CodedConcept(value=raw["value"], scheme_designator=raw["scheme"], meaning=raw["meaning"])


def _is_int(item: Any) -> bool:
    # bool is an int subclass, but ``true`` is never a meaningful label value.
    return isinstance(item, int) and not isinstance(item, bool)
