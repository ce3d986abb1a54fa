"""Checks shared by the YAML configs of the node, training and evaluation: errors name the file and the key."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from msk_node.segmenters.registry import SegmenterFamily, segmenter_family

Config = TypeVar("Config")

KINDS = {"integer": (int,), "number": (int, float), "string": (str,), "mapping": (dict,), "list": (list,),
         "boolean": (bool,)}


def load_yaml_config(path: str | Path, parse: Callable[[Any], Config]) -> Config:
    """Read ``path`` and validate it with ``parse``; any error is prefixed with the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    try:
        return parse(raw)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def check_keys(raw: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    """``raw`` is a mapping with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {type(raw).__name__}")
    prefix = f"{where}." if where else ""
    for key in raw:
        if key not in allowed:
            raise ValueError(f"unknown key '{prefix}{key}' (known: {', '.join(allowed)})")
    for key in required:
        if raw.get(key) is None:
            raise ValueError(f"missing key '{prefix}{key}'")


def value(raw: dict[str, Any], key: str, where: str, kind: str, default: Any = None) -> Any:
    """``raw[key]`` checked to be of ``kind``; ``default`` when absent or null."""
    item = raw.get(key)
    return default if item is None else typed(item, kind, f"{where}.{key}" if where else key)


def typed(item: Any, kind: str, key: str) -> Any:
    """``item`` if it is of ``kind`` (a key of :data:`KINDS`), else an error naming ``key``."""
    # bool is an int subclass, but ``true`` is never a meaningful count, size or ratio
    if (isinstance(item, bool) and kind != "boolean") or not isinstance(item, KINDS[kind]):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"key {key!r} must be {article} {kind}, got {type(item).__name__} {item!r}")
    return item


def family_named(family: str, key: str) -> SegmenterFamily:
    """The registered segmenter family ``family``, read from ``key``; the same error wherever a family is named."""
    try:
        return segmenter_family(family)
    except ValueError as error:
        raise ValueError(f"key {key!r}: {error}") from None


def one_of(item: Any, allowed: Iterable[Any], key: str) -> None:
    """``item`` is one of ``allowed``; else an error naming ``key``."""
    allowed = tuple(allowed)
    if item not in allowed:
        raise ValueError(f"key {key!r} must be one of {', '.join(map(str, allowed))}, got {item!r}")


def at_least(item: float | None, low: float, key: str, *, strict: bool = False) -> None:
    """``item`` (None: unset, accepted) is ``>= low``, or ``> low`` when ``strict``; else an error naming ``key``."""
    if item is not None and (item <= low if strict else item < low):
        raise ValueError(f"key {key!r} must be {'>' if strict else '>='} {low}, got {item}")


_KIND_OF_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "mapping", list: "list"}


def check_field_types(config: Any, where: str = "") -> None:
    """Each field of the dataclass ``config`` holds its annotated type; an error names the key.

    Called from ``__post_init__``, so a config built in code is checked like one read from
    YAML. Fields of other types (paths, nested configs) are left to their own checks.
    """
    hints = typing.get_type_hints(type(config))
    for entry in dataclasses.fields(config):
        item = getattr(config, entry.name)
        hint = hints[entry.name]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            options = [option for option in typing.get_args(hint) if option is not type(None)]
            if item is None and len(options) < len(typing.get_args(hint)):
                continue
            hint = options[0] if len(options) == 1 else None
        kind = _KIND_OF_TYPE.get(typing.get_origin(hint) or hint)
        if kind is not None:
            typed(item, kind, f"{where}.{entry.name}" if where else entry.name)


def config_from_mapping(config_type: type[Config], raw: Any, required: tuple[str, ...] = ()) -> Config:
    """A flat dataclass config from a YAML mapping: keys are its fields; the constructor checks the values."""
    check_keys(raw or {}, "", tuple(entry.name for entry in dataclasses.fields(config_type)), required)
    return config_type(**(raw or {}))


_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_identifier(item: Any, key: str) -> str:
    """``item``, a name that is safe in file and folder names; else an error naming ``key``."""
    if not isinstance(item, str) or not _IDENTIFIER.fullmatch(item):
        raise ValueError(f"key {key!r} must be letters, digits, '.', '_' or '-' (it names files), got {item!r}")
    return item


def no_duplicates(items: list[Any], key: str, what: str) -> None:
    """No item twice; the error names the key of the second (``key`` formatted with its index)."""
    for index, item in enumerate(items):
        if item in items[:index]:
            raise ValueError(f"key {key.format(index)!r}: duplicate {what} {item!r}")


def in_range(item: float, low: float, high: float, key: str) -> float:
    """``item`` if ``low <= item <= high``; else an error naming ``key``."""
    if not low <= item <= high:
        raise ValueError(f"key {key!r} must be in {low}..{high}, got {item}")
    return item
