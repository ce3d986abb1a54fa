"""CubeQuant-like T1rho spin-lock series of the knee phantom.

Each spin-lock image is ``PD * exp(-TSL / T1rho)`` per structure, rendered from the
continuous anatomy on its own grid (thicker slices, shifted from the morphology
grid), with one bias field and one noise level for all spin-lock times.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from msk_node_phantoms.anatomy import AnatomyModel
from msk_node_phantoms.appearance import Look, Texture, finish, texture_amplitudes
from msk_node_phantoms.grid import SeriesGrid
from msk_node_phantoms.render import render

#: Spin-lock times in ms, stored in EchoTime as on GE CubeQuant data.
SPIN_LOCK_TIMES_MS = (1.0, 10.0, 30.0, 60.0)

#: Default number of spin-lock slices, their thickness and their offset along x from the morphology grid, mm.
SPIN_LOCK_SLICES = 16
SPIN_LOCK_THICKNESS_MM = 3.0
SPIN_LOCK_OFFSET_X_MM = 0.7

#: Noise standard deviation of the spin-lock images in proton-density units.
SPIN_LOCK_NOISE = 0.006

#: (proton density, T1rho in ms) of each knee structure.
RELAXATION: dict[str, tuple[float, float]] = {
    "air": (0.0, 1.0),
    "skin": (0.5, 30.0),
    "subcutaneous_fat": (0.85, 50.0),
    "fat": (0.85, 50.0),
    "muscle": (0.6, 30.0),
    "vessel": (0.3, 60.0),
    "tendon": (0.08, 8.0),
    "fluid": (1.0, 120.0),
    "meniscus": (0.45, 15.0),
    "femoral_cartilage": (0.75, 40.0),
    "tibial_cartilage_medial": (0.75, 33.0),
    "tibial_cartilage_lateral": (0.75, 37.0),
    "patellar_cartilage": (0.75, 45.0),
    "fibula_cortex": (0.03, 8.0),
    "fibula_marrow": (0.85, 50.0),
    "tibia_cortex": (0.03, 8.0),
    "tibia_marrow": (0.85, 50.0),
    "femur_cortex": (0.03, 8.0),
    "femur_marrow": (0.85, 50.0),
    "patella_cortex": (0.03, 8.0),
    "patella_marrow": (0.85, 50.0),
}


def t1rho_biomarkers() -> dict[str, Any]:
    """Designed T1rho (ms) of the labelled tissues; tibial cartilage also per compartment."""
    medial, lateral = RELAXATION["tibial_cartilage_medial"][1], RELAXATION["tibial_cartilage_lateral"][1]
    return {
        "t1rho_ms": {
            "femoral_cartilage": RELAXATION["femoral_cartilage"][1],
            "tibial_cartilage": (medial + lateral) / 2.0,
            "tibial_cartilage_medial": medial,
            "tibial_cartilage_lateral": lateral,
            "patellar_cartilage": RELAXATION["patellar_cartilage"][1],
            "meniscus": RELAXATION["meniscus"][1],
            "muscle": RELAXATION["muscle"][1],
            "fluid": RELAXATION["fluid"][1],
            "marrow": RELAXATION["femur_marrow"][1],
        }
    }


def spin_lock_grid(morphology: SeriesGrid, n_morphology_slices: int | None) -> SeriesGrid:
    """Spin-lock grid: same in-plane grid, thicker slices, centre shifted along patient x.

    Parameters
    ----------
    morphology : SeriesGrid
        Grid of the morphology series.
    n_morphology_slices : int or None
        The ``n_slices`` override of the morphology series; the spin-lock series then
        covers about the same extent.
    """
    n = SPIN_LOCK_SLICES
    if n_morphology_slices is not None:
        n = max(2, math.ceil(n_morphology_slices * morphology.slice_spacing / SPIN_LOCK_THICKNESS_MM))
    centre = morphology.centre + np.array([SPIN_LOCK_OFFSET_X_MM, 0.0, 0.0])
    return SeriesGrid.centred(centre, (n, *morphology.size[1:]), morphology.orientation, morphology.pixel_spacing,
                              SPIN_LOCK_THICKNESS_MM)


def render_spin_lock(
    model: AnatomyModel, grid: SeriesGrid, texture: Texture, rng: np.random.Generator
) -> list[npt.NDArray[np.uint16]]:
    """Stored pixels of the spin-lock series, one image volume per spin-lock time.

    Parameters
    ----------
    model : AnatomyModel
        The knee model (structure names must be keys of :data:`RELAXATION`).
    grid : SeriesGrid
        Spin-lock grid.
    texture : Texture
        Tissue texture shared with the morphology series.
    rng : numpy.random.Generator
        Source of the bias field and the noise.
    """
    pd, t1rho = np.array([RELAXATION[s.name] for s in model.structures]).T
    signal = [pd * np.exp(-tsl / t1rho) for tsl in SPIN_LOCK_TIMES_MS]
    amplitude = texture_amplitudes([s.tissue for s in model.structures])
    table = np.column_stack([*signal, amplitude])
    # The fixed look supplies the bias field; intensities come from the table, noise is SPIN_LOCK_NOISE.
    look = Look.fixed({}, rng, tuple(float(v) for v in grid.centre))
    _, channels, (texture_map, bias) = render(model, grid, table, (texture, look.bias))
    return [finish(channels[i], channels[-1], texture_map, bias, look, rng, SPIN_LOCK_NOISE)
            for i in range(len(SPIN_LOCK_TIMES_MS))]
