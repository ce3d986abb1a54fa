"""``write_phantom``: DICOM series, ground-truth labels and truth.json of one phantom."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from msk_node_phantoms import knee, spine, thigh
from msk_node_phantoms.anatomy import LABEL_VALUES, AnatomyModel
from msk_node_phantoms.appearance import Look, Texture, finish, texture_amplitudes
from msk_node_phantoms.dicom_series import SeriesInfo, StudyInfo, phantom_uid, slug, write_series
from msk_node_phantoms.grid import SeriesGrid
from msk_node_phantoms.render import render
from msk_node_phantoms.t1rho import SPIN_LOCK_TIMES_MS, render_spin_lock, spin_lock_grid, t1rho_biomarkers

PHANTOM_KINDS = ("knee", "thigh", "spine", "knee-t1rho")

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

#: Independent random streams, so appearance never changes shapes and vice versa.
_STREAMS = {"shape": 1, "appearance": 2, "texture": 3, "noise": 4, "spin_lock": 5}


@dataclass(frozen=True)
class KindSpec:
    """Anatomy, default grid and acquisition attributes of one phantom kind."""

    model: type[AnatomyModel]
    contrast: dict[str, float]
    centre: tuple[float, float, float]
    size: tuple[int, int, int]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    series: SeriesInfo
    body_part: str
    patient_position: str
    laterality: str | None


def _series(description: str, number: int, te: float, tr: float, flip: float, sequence: str, mode: str) -> SeriesInfo:
    """Series attributes without the UID, which depends on kind and seed."""
    return SeriesInfo("", description, number, te, tr, flip, sequence, mode)


_SPECS: dict[str, KindSpec] = {
    "knee": KindSpec(knee.KneeModel, knee.DESS_CONTRAST, (0.0, 5.0, -10.0), (48, 256, 256), SAGITTAL, (0.6, 0.6), 2.0,
                     _series("Sag 3D DESS", 3, 7.5, 25.0, 30.0, "GR", "3D"), "KNEE", "FFS", "R"),
    "thigh": KindSpec(thigh.ThighModel, thigh.T1_CONTRAST, (0.0, 0.0, 0.0), (16, 256, 256), AXIAL, (0.8, 0.8), 5.0,
                      _series("Ax T1 thigh", 2, 10.0, 600.0, 90.0, "SE", "2D"), "THIGH", "FFS", "R"),
    "spine": KindSpec(spine.SpineModel, spine.T1_CONTRAST, (0.0, 5.0, 0.0), (13, 256, 256), SAGITTAL, (0.9, 0.9), 4.0,
                      _series("Sag T1 lumbar", 2, 10.0, 500.0, 90.0, "SE", "2D"), "LSPINE", "HFS", None),
}


def _rng(seed: int, stream: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream]]))


def phantom_model(kind: str, seed: int = 0) -> AnatomyModel:
    """The continuous anatomy of a phantom, e.g. to sample its labels at arbitrary points.

    Parameters
    ----------
    kind : str
        One of :data:`PHANTOM_KINDS`; ``"knee-t1rho"`` has the anatomy of ``"knee"``.
    seed : int
        Phantom seed.

    Returns
    -------
    AnatomyModel
        Call ``structure_ids(x, y, z)`` with patient coordinates (LPS, mm) and map the
        indices through ``label_lut()`` to get label values.
    """
    return _spec(kind).model(_rng(seed, "shape"))


def _spec(kind: str) -> KindSpec:
    if kind not in PHANTOM_KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {PHANTOM_KINDS}")
    return _SPECS["knee" if kind == "knee-t1rho" else kind]


def write_phantom(
    kind: str,
    out_dir: Path,
    seed: int = 0,
    *,
    randomize_appearance: bool = False,
    n_slices: int | None = None,
) -> Path:
    """Write a synthetic MSK MRI phantom with exact ground truth.

    Parameters
    ----------
    kind : str
        One of :data:`PHANTOM_KINDS`.
    out_dir : pathlib.Path
        Output folder (created if missing). Receives ``dicom/<series>/IM_0001.dcm ...``,
        ``truth_labels.nii.gz`` (labels on the grid of the morphology series) and
        ``truth.json``.
    seed : int
        Varies the shapes (sizes, pose) and the noise.
    randomize_appearance : bool
        Draw random tissue intensities, bias, noise, blur, gamma and inversion for the
        morphology series instead of the fixed realistic contrast. Labels do not change;
        T1rho spin-lock series keep their quantitative contrast.
    n_slices : int, optional
        Number of morphology slices instead of the default, keeping the field of view
        centred; the spin-lock series of ``"knee-t1rho"`` then cover about the same extent.

    Returns
    -------
    pathlib.Path
        ``out_dir``.
    """
    spec = _spec(kind)
    if n_slices is not None and n_slices < 1:
        raise ValueError(f"n_slices must be positive, got {n_slices}")
    out_dir = Path(out_dir)
    model = spec.model(_rng(seed, "shape"))
    grid = SeriesGrid.centred(spec.centre, (n_slices or spec.size[0], *spec.size[1:]), spec.orientation,
                              spec.pixel_spacing, spec.slice_spacing)
    make_look = Look.randomised if randomize_appearance else Look.fixed
    look = make_look(spec.contrast, _rng(seed, "appearance"), spec.centre)
    texture = Texture.draw(_rng(seed, "texture"))
    tissues = [s.tissue for s in model.structures]
    table = np.column_stack([[look.intensity[t] for t in tissues], texture_amplitudes(tissues)])
    labels, channels, (texture_map, bias) = render(model, grid, table, (texture, look.bias))
    pixels = finish(channels[0], channels[1], texture_map, bias, look, _rng(seed, "noise"))

    uid_key = (kind, seed, randomize_appearance)
    study = StudyInfo(
        patient_name=f"Phantom^{kind.capitalize()}",
        patient_id=f"PHANTOM-{kind.upper()}-{seed}",
        study_uid=phantom_uid(*uid_key, "study"),
        frame_of_reference_uid=phantom_uid(*uid_key, "frame"),
        body_part=spec.body_part,
        patient_position=spec.patient_position,
        laterality=spec.laterality,
    )
    morphology = replace(spec.series, series_uid=phantom_uid(*uid_key, spec.series.description))
    series_entries = [_write(out_dir, pixels, grid, study, morphology, "morphology")]
    biomarkers = model.biomarkers()
    if kind == "knee-t1rho":
        sl_grid = spin_lock_grid(grid, n_slices)
        images = render_spin_lock(model, sl_grid, texture, _rng(seed, "spin_lock"))
        for tsl, image in zip(SPIN_LOCK_TIMES_MS, images):
            description = f"CubeQuant T1rho TSL={tsl:g}"
            info = SeriesInfo(phantom_uid(*uid_key, description), description, 10, tsl, 1500.0, 90.0, "SE", "3D", 32)
            entry = _write(out_dir, image, sl_grid, study, info, "spin_lock")
            series_entries.append({**entry, "spin_lock_time_ms": tsl})
        biomarkers.update(t1rho_biomarkers())

    _write_labels(out_dir / "truth_labels.nii.gz", labels, grid)
    names = sorted({s.label for s in model.structures if s.label}, key=LABEL_VALUES.__getitem__)
    truth = {
        "kind": kind,
        "seed": seed,
        "randomize_appearance": randomize_appearance,
        "labels": {name: LABEL_VALUES[name] for name in names},
        "series": series_entries,
        "biomarkers": biomarkers,
        "volumes_cm3": _volumes(labels, grid, names),
    }
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return out_dir


def _write(out_dir: Path, pixels: npt.NDArray[np.uint16], grid: SeriesGrid, study: StudyInfo, series: SeriesInfo,
           role: str) -> dict[str, Any]:
    """Write one series under ``out_dir/dicom`` and describe it for truth.json."""
    folder = Path("dicom") / slug(series.description)
    write_series(out_dir / folder, pixels, grid, study, series)
    return {"series_instance_uid": series.series_uid, "description": series.description,
            "folder": folder.as_posix(), "role": role}


def _write_labels(path: Path, labels: npt.NDArray[np.uint8], grid: SeriesGrid) -> None:
    """Write labels as NIfTI on exactly the DICOM grid (label [k, j, i] = slice k, row j, column i)."""
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(grid.sitk_spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.sitk_direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def _volumes(labels: npt.NDArray[np.uint8], grid: SeriesGrid, names: list[str]) -> dict[str, float]:
    """Volume of each label in cm^3: voxel count x voxel volume / 1000."""
    voxel_mm3 = grid.pixel_spacing[0] * grid.pixel_spacing[1] * grid.slice_spacing
    counts = np.bincount(labels.ravel(), minlength=256)
    return {name: float(counts[LABEL_VALUES[name]] * voxel_mm3 / 1000.0) for name in names}
