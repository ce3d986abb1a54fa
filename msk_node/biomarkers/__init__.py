"""Quantitative MSK biomarkers computed from label masks and parametric maps.

Every biomarker is a pure function of arrays plus their spacing (or affine) in mm and
returns :class:`Measurement` objects. A value that cannot be computed, for example
because its label is empty, is NaN with a ``reason``, never 0.

Modules
-------
cartilage
    Cartilage thickness in mm along the medial axis: per slice with in-plane normals
    (2D), or along the plate's 3D mid-surface normal (3D); sub-pixel chords.
relaxometry
    Mono-exponential T1rho/T2 fitting, carrying masks between grids through patient
    coordinates, and mean relaxation times per compartment in ms.
disc
    Intervertebral disc height per level from sagittal disc masks, in mm.
volume
    Tissue volumes per label and in total, in cm3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Measurement", "unavailable"]


@dataclass(frozen=True)
class Measurement:
    """One named biomarker value of one anatomical label.

    Parameters
    ----------
    name : str
        Quantity, e.g. ``"mean_thickness"``, ``"t1rho_mean"``, ``"disc_height"``, ``"volume"``.
    label : str
        Anatomical label or level, e.g. ``"femoral_cartilage"`` or ``"L4-L5"``.
    value : float
        The value in ``unit``; NaN when it is not available.
    unit : str
        UCUM unit: ``"mm"``, ``"cm3"`` or ``"ms"``.
    method : str
        Short description of how the value was computed.
    reason : str
        Why the value is not available; non-empty exactly when ``value`` is NaN.
    extra : dict
        Supporting statistics, e.g. SD, number of slices, percentiles.

    Raises
    ------
    ValueError
        If ``name``, ``label`` or ``unit`` is empty, or if ``reason`` is empty while
        ``value`` is NaN, or non-empty while ``value`` is a number.
    """

    name: str
    label: str
    value: float
    unit: str
    method: str
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attribute in ("name", "label", "unit"):
            if not getattr(self, attribute):
                raise ValueError(f"Measurement: {attribute!r} must be a non-empty string")
        object.__setattr__(self, "value", float(self.value))
        if math.isinf(self.value):
            raise ValueError(f"Measurement {self.name}/{self.label}: 'value' must be finite or NaN, got {self.value}")
        if math.isnan(self.value) and not self.reason:
            raise ValueError(f"Measurement {self.name}/{self.label}: 'reason' is required when 'value' is NaN")
        if not math.isnan(self.value) and self.reason:
            raise ValueError(f"Measurement {self.name}/{self.label}: 'reason' must be empty when 'value' is a number")

    @property
    def available(self) -> bool:
        """True when ``value`` is a number (not NaN)."""
        return not math.isnan(self.value)


def unavailable(name: str, label: str, unit: str, method: str, reason: str, **extra: Any) -> Measurement:
    """A :class:`Measurement` with value NaN and the given ``reason``."""
    return Measurement(name=name, label=label, value=math.nan, unit=unit, method=method, reason=reason, extra=extra)
