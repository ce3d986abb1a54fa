"""T2 from the two echoes of a double-echo steady-state (DESS) acquisition, in ms.

Model (Sveinsson et al., MRM 2017, "A simple analytic method for estimating T2 in the
knee from DESS"): with ``r = S2 / S1`` the ratio of the second (S-) to the first (S+)
echo,

    T2 = -2 (TR - TE) / (ln(r / k) + c1)
    k  = sin^2(a/2) (1 + E) / (1 - cos(a) E),   E = exp(-TR/T1 - TR dk^2 D)
    c1 = (TR - Tg/3) dk^2 D,                     dk = gamma * A

where ``a`` is the flip angle, ``TE`` the first echo time, ``A`` the area of the
unbalanced (spoiler) gradient of duration ``Tg`` and ``D`` the water diffusivity.

Assumptions, as in DOSMA and pyKNEEr: T1 of cartilage 1.2 s and D = 1.25e-9 m^2/s at
3 T; T2 depends on them only weakly. GE stores the spoiler area (G/cm * us) and
duration (us) in the private "user data" 15 and 16 of the acquisition block
(creator GEMS_ACQU_01, elements 0x10B6 and 0x10B7); another vendor's DESS without
these tags gets a clear "unavailable" reason instead of a guessed value.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from msk_node.biomarkers.relaxometry import (
    RelaxationMap,
    estimate_noise_sigma,
    split_relaxation_series,
)

__all__ = ["DessParameters", "dess_parameters", "dess_t2", "dess_t2_map"]

#: Assumed cartilage T1 at 3 T (ms) and water diffusivity (m^2/s).
CARTILAGE_T1_MS = 1200.0
DIFFUSIVITY_M2_S = 1.25e-9
#: Proton gyromagnetic ratio, rad / (s T).
GAMMA_RAD_S_T = 2.0 * math.pi * 42.577478e6
_GE_CREATOR = "GEMS_ACQU_01"
_GE_SPOILER_AREA, _GE_SPOILER_DURATION = 0xB6, 0xB7
#: G/cm * us in T/m * s.
_GAUSS_CM_US = 1e-2 * 1e-6


@dataclass(frozen=True)
class DessParameters:
    """Sequence parameters of the DESS model: times in ms, flip angle in degrees, spoiler area in T*s/m."""

    repetition_time_ms: float
    echo_time_ms: float
    flip_angle_deg: float
    spoiler_area_t_s_m: float
    spoiler_duration_ms: float


def dess_parameters(ds: pydicom.Dataset) -> DessParameters:
    """Read the DESS model parameters from the first echo's header.

    Raises
    ------
    ValueError
        Naming the attribute that is missing or not a positive number.
    """
    values = {}
    for keyword in ("RepetitionTime", "EchoTime", "FlipAngle"):
        value = ds.get(keyword)
        if value in (None, "") or not float(value) > 0:
            raise ValueError(f"DESS T2 needs {keyword}, missing or not positive")
        values[keyword] = float(value)
    area, duration = (_ge_acquisition_value(ds, element) for element in (_GE_SPOILER_AREA, _GE_SPOILER_DURATION))
    if area is None or duration is None:
        raise ValueError("DESS T2 needs the spoiler gradient area and duration "
                         f"({_GE_CREATOR} user data 15/16), not in the header")
    if not (area > 0 and duration > 0):
        raise ValueError(f"DESS T2: spoiler area {area} / duration {duration} not positive")
    return DessParameters(values["RepetitionTime"], values["EchoTime"], values["FlipAngle"],
                          area * _GAUSS_CM_US, duration * 1e-3)


def dess_t2(
    echo1: np.ndarray,
    echo2: np.ndarray,
    parameters: DessParameters,
    *,
    t1_ms: float = CARTILAGE_T1_MS,
    diffusivity_m2_s: float = DIFFUSIVITY_M2_S,
    noise_sigma: float = 0.0,
    floor_sigmas: float = 1.5,
    plausible_ms: tuple[float, float] = (0.5, 1000.0),
) -> np.ndarray:
    """Voxel-wise DESS T2 in ms; NaN where either echo is at the noise floor or T2 is implausible.

    Both echoes are corrected for the Rician floor (``sqrt(M**2 - 2 sigma**2)``) and a
    voxel is rejected when its second echo is below ``floor_sigmas * noise_sigma``.
    """
    tr = parameters.repetition_time_ms * 1e-3
    te = parameters.echo_time_ms * 1e-3
    tg = parameters.spoiler_duration_ms * 1e-3
    alpha = math.radians(parameters.flip_angle_deg)
    dk = GAMMA_RAD_S_T * parameters.spoiler_area_t_s_m  # rad/m
    decay = math.exp(-tr / (t1_ms * 1e-3) - tr * dk * dk * diffusivity_m2_s)
    k = math.sin(alpha / 2.0) ** 2 * (1.0 + decay) / (1.0 - math.cos(alpha) * decay)
    c1 = (tr - tg / 3.0) * dk * dk * diffusivity_m2_s
    s1, s2 = (np.sqrt(np.clip(np.asarray(e, np.float64) ** 2 - 2.0 * noise_sigma ** 2, 0.0, None))
              for e in (echo1, echo2))
    usable = (s2 > floor_sigmas * noise_sigma) & (s2 > 0) & (s1 > s2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t2 = -2000.0 * (tr - te) / (np.log(np.where(usable, s2 / s1, 1.0) / k) + c1)
    good = usable & np.isfinite(t2) & (t2 >= plausible_ms[0]) & (t2 <= plausible_ms[1])
    return np.where(good, t2, np.nan)


def dess_t2_map(series: Sequence[Sequence[pydicom.Dataset]]) -> RelaxationMap:
    """DESS T2 map from one series holding both echoes or two single-echo series at the same positions.

    Raises
    ------
    ValueError
        If there are not exactly two echoes on one grid, or a model parameter is missing
        (the message says which).
    """
    groups = split_relaxation_series(series)
    if len(groups) != 2:
        raise ValueError(f"DESS T2 needs exactly 2 echoes, found {len(groups)}")
    first, second = groups
    if not (first.volume.array.shape == second.volume.array.shape
            and np.allclose(first.volume.volume.affine, second.volume.volume.affine, atol=0.01)):
        raise ValueError("DESS echoes lie on different grids")
    parameters = dess_parameters(first.volume.datasets[0])
    sigma = estimate_noise_sigma(first.volume.array)
    t2 = dess_t2(first.volume.array, second.volume.array, parameters, noise_sigma=sigma)
    geometry = first.volume.volume
    return RelaxationMap(t2, first.volume.array.astype(np.float64), np.full(t2.shape, np.nan), geometry,
                         (first.time_ms, second.time_ms), "dess_t2", list(first.volume.datasets), sigma)


def _ge_acquisition_value(ds: pydicom.Dataset, element: int) -> float | None:
    """A number from GE's private acquisition block, wherever the creator reserved it; None if absent."""
    for block in range(0x10, 0x100):
        if str(ds.get((0x0019, block), pydicom.DataElement(0, "LO", "")).value).strip() == _GE_CREATOR:
            found = ds.get((0x0019, (block << 8) | element))
            try:
                return float(found.value) if found is not None else None
            except (TypeError, ValueError):
                return None
    return None
