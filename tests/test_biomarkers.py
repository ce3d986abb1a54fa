"""Biomarkers against known answers: phantom truth, analytic shapes, real T1rho data."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from highdicom import Volume

from msk_node.biomarkers import Measurement
from msk_node.biomarkers.cartilage import (
    SplitPlane,
    cartilage_thickness,
    split_by_plane,
    thickness_2d,
    thickness_3d,
)
from msk_node.biomarkers.disc import LUMBAR_LEVELS, disc_heights, min_area_rectangle
from msk_node.biomarkers.relaxometry import (
    fit_monoexponential,
    mask_on_grid,
    mean_relaxation,
    relaxation_map_from_series,
    spin_lock_times,
)
from msk_node.biomarkers.volume import tissue_volumes
from msk_node.dicom_input import read_study_folder
from msk_node_phantoms import write_phantom
from msk_node.volume import SeriesVolume, labels_on_volume_grid, series_to_volume

REPO = Path(__file__).resolve().parent.parent
REAL_KNEE = Path(os.environ.get("MSK_NODE_REAL_KNEE", REPO.parent / "shared" / "data" / "knee-mri-ge-3t"))
PLATES = ("femoral_cartilage", "tibial_cartilage", "patellar_cartilage")

#: n_slices per phantom kind: the knee keeps its full 48 slices so every plate is whole.
_SLICES = {"knee": None, "spine": 5, "thigh": 6, "knee-t1rho": 24}


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("biomarker_phantoms")
    return {kind: write_phantom(kind, root / kind, seed=0, n_slices=n) for kind, n in _SLICES.items()}


def _truth(out: Path) -> dict:
    return json.loads((out / "truth.json").read_text())


def _series(out: Path) -> dict[str, SeriesVolume]:
    """Every series of a phantom as a volume, keyed by its truth.json folder."""
    by_uid = {s.series_instance_uid: s for s in read_study_folder(out / "dicom").series}
    return {e["folder"]: series_to_volume(by_uid[e["series_instance_uid"]].datasets) for e in _truth(out)["series"]}


def _morphology(out: Path) -> tuple[SeriesVolume, np.ndarray]:
    """The morphology series and the truth labels resampled onto its grid."""
    entry = next(e for e in _truth(out)["series"] if e["role"] == "morphology")
    volume = _series(out)[entry["folder"]]
    return volume, labels_on_volume_grid(out / "truth_labels.nii.gz", volume.volume)


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], origin=(0.0, 0.0, 0.0),
            array: np.ndarray | None = None) -> Volume:
    """Axis-aligned highdicom Volume: slice axis along patient x, rows along y, columns along z."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return Volume(np.zeros(shape, np.float32) if array is None else array, affine, "PATIENT")


# Measurement ---------------------------------------------------------------------------------


def test_measurement_requires_a_reason_exactly_when_nan() -> None:
    ok = Measurement("volume", "femur", 1.5, "cm3", "count")
    assert ok.available and ok.reason == ""
    missing = Measurement("volume", "femur", math.nan, "cm3", "count", reason="no femur voxels")
    assert not missing.available
    with pytest.raises(ValueError, match="reason"):
        Measurement("volume", "femur", math.nan, "cm3", "count")
    with pytest.raises(ValueError, match="reason"):
        Measurement("volume", "femur", 1.0, "cm3", "count", reason="why")
    with pytest.raises(ValueError, match="unit"):
        Measurement("volume", "femur", 1.0, "", "count")


# Cartilage thickness -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["2d", "3d"])
def test_knee_cartilage_thickness_matches_the_design(phantoms: dict[str, Path], method: str) -> None:
    """Whole plates on the 0.6 mm x 2 mm knee grid, every slice; bar 10 %.

    Measured (seed 0): 2D femoral +0.7 %, tibial -2.0 % (medial -2.1, lateral -2.0), patellar -1.2 %;
    3D femoral -0.8 %, tibial -1.3 % (medial -1.4, lateral -1.2), patellar -1.1 %.
    """
    out = phantoms["knee"]
    truth = _truth(out)
    volume, labels = _morphology(out)
    design = truth["biomarkers"]["cartilage_thickness_mm"]
    split = SplitPlane.knee_medial_lateral(truth["biomarkers"]["medial_lateral_split_x_mm"],
                                           truth["biomarkers"]["medial_side"])
    results = cartilage_thickness(labels, volume.volume.spacing, {p: truth["labels"][p] for p in PLATES},
                                  method, affine=volume.volume.affine, split_planes={"tibial_cartilage": split})
    by_label = {m.label: m for m in results}
    assert list(by_label) == ["femoral_cartilage", "tibial_cartilage", "tibial_cartilage_medial",
                              "tibial_cartilage_lateral", "patellar_cartilage"]
    for plate in PLATES:
        m = by_label[plate]
        assert (m.name, m.unit) == ("mean_thickness", "mm")
        assert m.value == pytest.approx(design[plate], rel=0.10), (plate, m.value, design[plate])
        assert m.extra["n_slices"] >= 3 and m.extra["percentiles_mm"][5] <= m.value <= m.extra["percentiles_mm"][95]
    # Both tibial compartments have the designed tibial thickness.
    for side in ("medial", "lateral"):
        m = by_label[f"tibial_cartilage_{side}"]
        assert m.value == pytest.approx(design["tibial_cartilage"], rel=0.10), (side, m.value)


def _tilted_slab(shape, spacing, thickness, angle_deg, length=40.0, offset=0.13):
    """2D slab (rows x columns) of given thickness (mm) whose normal is tilted from the row axis."""
    r, c = np.meshgrid(np.arange(shape[0]) * spacing[0], np.arange(shape[1]) * spacing[1], indexing="ij")
    a = np.radians(angle_deg)
    r, c = r - r.mean(), c - c.mean()
    across = r * np.cos(a) + c * np.sin(a) + offset
    along = -r * np.sin(a) + c * np.cos(a)
    return (np.abs(across) <= thickness / 2) & (np.abs(along) <= length / 2)


def test_tilted_slab_on_anisotropic_pixels() -> None:
    """2.0 mm slab tilted 20 degrees, pixels 0.4 x 0.7 mm: within 5 % (measured 2.006 mm, +0.3 %)."""
    spacing = (0.4, 0.7)
    slab = _tilted_slab((160, 100), spacing, 2.0, 20.0)
    result = thickness_2d(slab, spacing)
    assert result.mean == pytest.approx(2.0, rel=0.05)
    assert result.per_slice_mean.keys() == {0}
    # The paper's 2 x EDT reads low on the pixel staircase (measured 1.907 mm, -4.6 %).
    assert thickness_2d(slab, spacing, estimator="edt").mean == pytest.approx(2.0, rel=0.10)
    # Swapping the spacing is a different (wrong) geometry and must not give the same answer.
    assert abs(thickness_2d(slab, spacing[::-1]).mean - 2.0) > 0.1
    # The same slab stacked into 6 slices, 3D method with slice spacing 3 mm (measured 2.006 mm).
    stack = np.repeat(slab[None], 6, axis=0)
    assert thickness_3d(stack, (3.0, *spacing)).mean == pytest.approx(2.0, rel=0.05)


def test_thickness_scales_with_the_in_plane_spacing_only() -> None:
    """The reference code multiplied by the slice thickness; here only pixel spacing matters."""
    slab = np.repeat(_tilted_slab((120, 120), (0.5, 0.5), 2.5, 33.0)[None], 3, axis=0)
    fine = thickness_2d(slab, (0.5, 0.5)).mean
    assert thickness_2d(slab, (1.0, 1.0)).mean == pytest.approx(2 * fine, rel=1e-9)
    thin, thick = (cartilage_thickness(slab.astype(np.uint8), (s, 0.5, 0.5), {"plate": 1})[0].value
                   for s in (0.5, 5.0))
    assert thin == thick == pytest.approx(fine)


def test_plate_oblique_to_the_slices_3d_measures_the_true_normal() -> None:
    """2.5 mm plate tilted 30 degrees out of the slice plane, voxels 1.0 x 0.4 x 0.7 mm.

    The 2D method sees the in-plane section (2.5 / cos 30 = 2.89 mm; median measured 2.8,
    whole pixels of this row-aligned section); the 3D method the plate's own thickness
    (measured 2.46 mm, -1.5 %).
    """
    spacing = (1.0, 0.4, 0.7)
    k, r, c = np.meshgrid(*(np.arange(n) * s for n, s in zip((40, 120, 100), spacing)), indexing="ij")
    k, r, c = k - k.mean(), r - r.mean(), c - c.mean()
    tilt = np.radians(30.0)
    across = k * np.sin(tilt) + r * np.cos(tilt) + 0.13
    along = k * np.cos(tilt) - r * np.sin(tilt)
    plate = (np.abs(across) <= 1.25) & (np.abs(along) < 12.0) & (np.abs(c) < 15.0)
    assert thickness_3d(plate, spacing).mean == pytest.approx(2.5, rel=0.06)
    # Median, because the plate's rim slices cut the in-plane section short.
    assert thickness_2d(plate, spacing[1:]).percentiles[50] == pytest.approx(2.5 / np.cos(tilt), rel=0.06)


def test_empty_plates_are_nan_with_a_reason_never_zero() -> None:
    empty = np.zeros((4, 30, 30), dtype=bool)
    for stats in (thickness_2d(empty, (0.5, 0.5)), thickness_3d(empty, (2.0, 0.5, 0.5))):
        assert math.isnan(stats.mean) and stats.reason and not stats.available
    labels = np.zeros((4, 30, 30), dtype=np.uint8)
    labels[1:3, 10:14, 5:25] = 4
    results = cartilage_thickness(labels, (2.0, 0.5, 0.5), {"femoral_cartilage": 4, "patellar_cartilage": 6})
    assert results[0].available
    assert math.isnan(results[1].value) and results[1].reason == "no patellar_cartilage voxels"
    # A speck without a measurable medial axis is NaN too, with its own reason.
    speck = np.zeros((1, 9, 9), dtype=bool)
    speck[0, 4, 4] = True
    assert not thickness_2d(speck, (0.5, 0.5)).available and thickness_2d(speck, (0.5, 0.5)).reason


def test_bad_spacing_and_shapes_are_refused() -> None:
    mask = np.ones((2, 5, 5), dtype=bool)
    with pytest.raises(ValueError, match="pixel_spacing"):
        thickness_2d(mask, (0.5, 0.0))
    with pytest.raises(ValueError, match="spacing"):
        thickness_3d(mask, (0.5, 0.5))
    with pytest.raises(ValueError, match="mask"):
        thickness_3d(mask[0], (1.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="method"):
        cartilage_thickness(mask.astype(int), (1.0, 0.5, 0.5), {"a": 1}, method="4d")
    with pytest.raises(ValueError, match="affine"):
        cartilage_thickness(mask.astype(int), (1.0, 0.5, 0.5), {"a": 1},
                            split_planes={"a": SplitPlane((0.0, 0.0, 0.0), (1.0, 0.0, 0.0))})


def test_split_by_plane_uses_patient_coordinates() -> None:
    mask = np.ones((6, 4, 4), dtype=bool)
    affine = np.diag([2.0, 0.5, 0.5, 1.0])
    affine[0, 3] = -5.0  # slice k at x = -5 + 2k
    positive, negative = split_by_plane(mask, affine, (0.5, 0.0, 0.0), (1.0, 0.0, 0.0))
    assert positive.any(axis=(1, 2)).tolist() == [False, False, False, True, True, True]
    assert (positive | negative).all() and not (positive & negative).any()
    # Reversing the slice order in the affine flips which slices are on the + side.
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -2.0, 5.0
    positive, _ = split_by_plane(mask, flipped, (0.5, 0.0, 0.0), (1.0, 0.0, 0.0))
    assert positive.any(axis=(1, 2)).tolist() == [True, True, True, False, False, False]


# Disc height ---------------------------------------------------------------------------------


def test_spine_disc_heights_match_the_design(phantoms: dict[str, Path]) -> None:
    """Six discs, 0.9 mm pixels: every height within 0.5 mm (measured -0.19 ... -0.04 mm)."""
    out = phantoms["spine"]
    truth = _truth(out)
    volume, labels = _morphology(out)
    designed = truth["biomarkers"]["disc_height_mm"]
    results = disc_heights(labels, volume.pixel_spacing, volume.volume.affine,
                           value=truth["labels"]["intervertebral_disc"],
                           bodies=labels == truth["labels"]["vertebral_body"])
    assert [m.label for m in results] == list(designed) == list(LUMBAR_LEVELS)
    for m in results:
        assert (m.name, m.unit) == ("disc_height", "mm")
        assert m.value == pytest.approx(designed[m.label], abs=0.5), m.label
        assert m.extra["width_mm"] > 2 * m.value and m.extra["level_assigned"]


def test_disc_levels_follow_patient_z_not_image_rows(phantoms: dict[str, Path]) -> None:
    out = phantoms["spine"]
    truth = _truth(out)
    volume, labels = _morphology(out)
    discs = labels == truth["labels"]["intervertebral_disc"]
    bodies = labels == truth["labels"]["vertebral_body"]
    reference = {m.label: m.value for m in disc_heights(discs, volume.pixel_spacing, volume.volume.affine,
                                                        bodies=bodies)}
    assert list(reference) == list(LUMBAR_LEVELS)
    # Store the rows bottom-up: same anatomy, so the same names and heights.
    flipped_affine = volume.volume.affine.copy()
    flipped_affine[:3, 3] += flipped_affine[:3, 1] * (discs.shape[1] - 1)
    flipped_affine[:3, 1] *= -1
    flipped = disc_heights(discs[:, ::-1], volume.pixel_spacing, flipped_affine, bodies=bodies[:, ::-1])
    assert {m.label: m.value for m in flipped} == pytest.approx(reference, rel=1e-4)
    # Only the three lowest discs segmented: names come from the sacrum, not from a count of discs.
    affine = volume.volume.affine
    assert affine[2, 0] == affine[2, 2] == 0.0  # sagittal: patient z depends on the row only
    z_of_row = affine[2, 1] * np.arange(discs.shape[1]) + affine[2, 3]
    centres = [m.extra["centroid_mm"][2] for m in disc_heights(discs, volume.pixel_spacing, affine, bodies=bodies)]
    lower = discs.copy()
    lower[:, z_of_row > (centres[2] + centres[3]) / 2] = False
    assert [m.label for m in disc_heights(lower, volume.pixel_spacing, affine, bodies=bodies)] == [
        "L3-L4", "L4-L5", "L5-S1"]
    # Without vertebral bodies there is no anchor: no level, and no guess.
    assert all(not m.extra["level_assigned"] and "level uncertain" in m.label
               for m in disc_heights(discs, volume.pixel_spacing, affine))
    # Without an affine there is no level, only row order.
    assert [m.label for m in disc_heights(discs, volume.pixel_spacing)][:2] == ["disc_1", "disc_2"]


def test_disc_height_on_anisotropic_pixels() -> None:
    """A 10 x 40 mm disc tilted 10 degrees on 0.5 x 1.0 mm pixels: points are scaled before the fit."""
    spacing = (0.5, 1.0)
    r, c = np.meshgrid(np.arange(200) * spacing[0], np.arange(80) * spacing[1], indexing="ij")
    r, c = r - 50.0, c - 40.0
    a = np.radians(10.0)
    disc = (np.abs(r * np.cos(a) + c * np.sin(a)) <= 5.0) & (np.abs(-r * np.sin(a) + c * np.cos(a)) <= 20.0)
    affine = np.eye(4)
    affine[2, 1], affine[1, 2] = -spacing[0], spacing[1]  # rows go inferior
    (m,) = disc_heights(disc[None], spacing, affine, level_names=["L5-S1"])
    assert m.label == "disc 1 (level uncertain)" and not m.extra["level_assigned"]  # no vertebral body to anchor
    assert m.value == pytest.approx(10.0, abs=0.5)
    short, long, _ = min_area_rectangle(np.argwhere(disc) * spacing)
    assert (short, long) == pytest.approx((m.value, m.extra["width_mm"]))


def test_empty_disc_mask_gives_no_discs() -> None:
    assert disc_heights(np.zeros((3, 20, 20), dtype=bool), (0.9, 0.9), np.eye(4)) == []
    with pytest.raises(ValueError, match="level_names"):
        disc_heights(np.zeros((3, 20, 20), dtype=bool), (0.9, 0.9), np.eye(4), level_names=["L4-L5", "L4-L5"])


# Volumes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["thigh", "knee"])
def test_tissue_volumes_match_the_truth(phantoms: dict[str, Path], kind: str) -> None:
    """Exact (relative error < 1e-5) on the truth labels; the bar is 3 %."""
    out = phantoms[kind]
    truth = _truth(out)
    volume, labels = _morphology(out)
    results = tissue_volumes(labels, volume.volume.spacing, truth["labels"])
    assert [m.label for m in results] == [*truth["labels"], "total"]
    for m in results[:-1]:
        assert m.unit == "cm3"
        assert m.value == pytest.approx(truth["volumes_cm3"][m.label], rel=0.03)
        assert m.value == pytest.approx(truth["volumes_cm3"][m.label], rel=1e-5)
    assert results[-1].value == pytest.approx(sum(truth["volumes_cm3"].values()), rel=1e-5)


def test_volume_applies_anisotropic_spacing() -> None:
    labels = np.zeros((6, 20, 30), dtype=np.uint8)
    labels[1:5, 5:15, 5:25] = 3  # 4 x 10 x 20 voxels
    labels[0, 0, 0] = 7
    results = tissue_volumes(labels, (3.0, 0.5, 0.7), {"muscle": 3, "fat": 7, "bone": 9})
    muscle, fat, bone, total = results
    assert muscle.value == pytest.approx(800 * 3.0 * 0.5 * 0.7 / 1000.0)
    assert fat.value == pytest.approx(1.05 / 1000.0)
    assert math.isnan(bone.value) and bone.reason == "no bone voxels"
    assert total.value == pytest.approx(801 * 1.05 / 1000.0) and total.extra["missing_labels"] == ["bone"]
    empty = tissue_volumes(np.zeros((2, 2, 2), np.uint8), (1.0, 1.0, 1.0), {"muscle": 3})
    assert all(not m.available and m.reason for m in empty)
    with pytest.raises(ValueError, match="spacing"):
        tissue_volumes(labels, (3.0, 0.5), {"muscle": 3})


# Relaxometry ---------------------------------------------------------------------------------


def test_monoexponential_fit_recovers_known_decay() -> None:
    rng = np.random.default_rng(7)
    times = [1.0, 10.0, 30.0, 60.0]
    t_true = np.array([25.0, 40.0, 70.0])[:, None] * np.ones((3, 400))
    images = 1000.0 * np.exp(-np.asarray(times)[:, None, None] / t_true[None]) + rng.normal(0, 5.0, (4, 3, 400))
    t_map, s0, r2 = fit_monoexponential(images, times)
    assert np.median(t_map, axis=1) == pytest.approx([25.0, 40.0, 70.0], rel=0.02)
    assert np.median(s0) == pytest.approx(1000.0, rel=0.02) and np.nanmin(r2) > 0.95
    # Masked-out voxels, pure noise and rising signals are NaN, never 0.
    mask = np.ones((3, 400), dtype=bool)
    mask[0, :10] = False
    noise = np.abs(rng.normal(0, 5.0, (4, 3, 400))) + 1e-3
    rising = images[::-1]
    assert np.isnan(fit_monoexponential(images, times, mask)[0][0, :10]).all()
    assert np.isnan(fit_monoexponential(noise, times)[0]).mean() > 0.9
    assert np.isnan(fit_monoexponential(rising, times)[0]).all()


def test_fewer_than_three_spin_lock_times_are_refused(phantoms: dict[str, Path]) -> None:
    images = np.ones((2, 4, 4))
    with pytest.raises(ValueError, match="at least 3 distinct times"):
        fit_monoexponential(images, [1.0, 10.0])
    with pytest.raises(ValueError, match="at least 3 distinct times"):
        fit_monoexponential(np.ones((3, 4)), [1.0, 10.0, 10.0])
    series = _series(phantoms["knee-t1rho"])
    spin = [v for f, v in series.items() if "tsl" in f]
    morph = next(v for f, v in series.items() if "tsl" not in f)
    with pytest.raises(ValueError, match="at least 3"):
        relaxation_map_from_series(spin[:2])
    with pytest.raises(ValueError, match="duplicated"):
        relaxation_map_from_series(spin, [1.0, 1.0, 30.0, 60.0])
    with pytest.raises(ValueError, match="Sag 3D DESS"):
        relaxation_map_from_series([*spin[:3], morph], [1.0, 10.0, 30.0, 60.0])
    # EchoTime carries the spin-lock time; inconsistent or repeated values are refused.
    by_key = {f: v.datasets for f, v in series.items() if "tsl" in f}
    assert [t for _, t in spin_lock_times(by_key)] == [1.0, 10.0, 30.0, 60.0]
    broken = dict(by_key)
    key = next(iter(broken))
    broken[key] = [copy.deepcopy(ds) for ds in broken[key]]
    broken[key][0].EchoTime = 99.0
    with pytest.raises(ValueError, match="disagree on EchoTime"):
        spin_lock_times(broken)


def test_mask_on_grid_gives_covered_fractions_through_patient_space() -> None:
    """Source 1 mm slices; target 3 mm slices offset by 1 mm: known partial fractions."""
    source = _volume((30, 4, 4), (1.0, 1.0, 1.0))
    labels = np.zeros((30, 4, 4), dtype=np.uint8)
    labels[10:] = 5  # covers x >= 9.5 mm
    target = _volume((9, 4, 4), (3.0, 1.0, 1.0), origin=(1.0, 0.0, 0.0))  # slice k spans [3k - 0.5, 3k + 2.5]
    fraction = mask_on_grid(labels, source, target, 5, margin_mm=0.0, samples=(6, 1, 1))
    # Target slice 3 spans [8.5, 11.5]: 2 of its 3 mm are inside; slice 2 is outside, slice 4 inside.
    assert fraction[:, 1, 1].tolist() == pytest.approx([0, 0, 0, 2 / 3, 1, 1, 1, 1, 1])
    # The default margin (half a source voxel) marks one more target slice as partial.
    assert mask_on_grid(labels, source, target, 5)[4, 1, 1] == pytest.approx(1.0)
    assert mask_on_grid(labels, source, target, 5)[3, 1, 1] < 0.99
    # The target may store its slices in the opposite order: the mask follows the anatomy.
    reversed_target = _volume((9, 4, 4), (-3.0, 1.0, 1.0), origin=(25.0, 0.0, 0.0))
    back = mask_on_grid(labels, source, reversed_target, 5, margin_mm=0.0, samples=(6, 1, 1))
    assert back[::-1, 1, 1].tolist() == pytest.approx(fraction[:, 1, 1].tolist())
    with pytest.raises(ValueError, match="source grid"):
        mask_on_grid(labels[:-1], source, target, 5)


def test_mean_relaxation_excludes_partial_voxels_and_reports_missing() -> None:
    t_map = np.full((2, 3, 3), 40.0)
    t_map[0, 0, 0] = 250.0  # fluid, partially covered
    t_map[1, 2, 2] = np.nan  # failed fit
    fraction = np.ones((2, 3, 3))
    fraction[0, 0, 0] = 0.5
    m = mean_relaxation(t_map, fraction, "femoral_cartilage")
    assert (m.name, m.unit, m.value) == ("t1rho_mean", "ms", pytest.approx(40.0))
    assert m.extra["n_partial_excluded"] == 1 and m.extra["n_fit_failed"] == 1
    # Out-of-range values are rejected and counted, never clipped.
    mixed = mean_relaxation(np.array([[[150.0, 40.0]]]), np.ones((1, 1, 2)), "fluid", name="t2_mean")
    assert mixed.name == "t2_mean" and mixed.value == pytest.approx(40.0)
    assert mixed.extra["n_out_of_range"] == 1 and mixed.extra["rejected_share"] == pytest.approx(0.5)
    fluid = mean_relaxation(np.full((1, 1, 2), 150.0), np.ones((1, 1, 2)), "fluid", name="t2_mean")
    assert math.isnan(fluid.value) and fluid.extra["n_out_of_range"] == 2
    nothing = mean_relaxation(t_map, np.zeros_like(t_map), "patellar_cartilage")
    assert math.isnan(nothing.value) and "no patellar_cartilage voxels" in nothing.reason
    partial = mean_relaxation(t_map, np.full_like(t_map, 0.5), "patellar_cartilage")
    assert math.isnan(partial.value) and "fully inside" in partial.reason


def test_knee_t1rho_per_compartment_matches_the_design(phantoms: dict[str, Path]) -> None:
    """Truth mask (2 mm grid) carried to the 3 mm spin-lock grid shifted by 0.7 mm; fit; within 5 %.

    Measured: femoral 40.03 (40), tibial 34.88 (35), medial 33.08 (33), lateral 37.04 (37),
    patellar 45.06 (45) ms.
    """
    out = phantoms["knee-t1rho"]
    truth = _truth(out)
    morphology, labels = _morphology(out)
    series = _series(out)
    spin = [series[e["folder"]] for e in truth["series"] if e["role"] == "spin_lock"]
    assert spin[0].slice_spacing != morphology.slice_spacing
    relaxation = relaxation_map_from_series(spin)  # times from EchoTime
    assert relaxation.times_ms == (1.0, 10.0, 30.0, 60.0)
    assert np.array_equal(relaxation.volume.affine, spin[0].volume.affine)  # the map keeps its geometry
    designed = truth["biomarkers"]["t1rho_ms"]
    masks = {plate: labels == truth["labels"][plate] for plate in PLATES}
    split = truth["biomarkers"]["medial_lateral_split_x_mm"]
    masks["tibial_cartilage_medial"], masks["tibial_cartilage_lateral"] = split_by_plane(
        masks["tibial_cartilage"], morphology.volume.affine, (split, 0.0, 0.0), (1.0, 0.0, 0.0))
    for name, mask in masks.items():
        fraction = mask_on_grid(mask, morphology.volume, relaxation.geometry)
        m = mean_relaxation(relaxation.t_ms, fraction, name)
        assert m.extra["n_voxels"] >= 30, name
        assert m.value == pytest.approx(designed[name], rel=0.05), (name, m.value)


# Real data -----------------------------------------------------------------------------------

#: Hand-checked femoral cartilage box on the real knee (TSL=1 image viewed slice by slice):
#: slice 6 of the 20 T1rho slices in series_to_volume order (x = -52.17 mm, InstanceNumber 173),
#: rows 262-275, columns 168-175. There the anterior femoral cartilage is a bright band ~12
#: pixels (3.8 mm) wide between the dark condyle (posterior, columns > 180) and Hoffa's fat
#: pad (anterior, columns < 160); the box sits in the middle of the band.
REAL_BOX = (6, slice(262, 276), slice(168, 176))


@pytest.mark.skipif(not REAL_KNEE.is_dir(), reason=f"real knee data not found at {REAL_KNEE}")
def test_real_knee_t1rho_in_cartilage_is_physiological() -> None:
    folders = ["t1rho-tsl01", "t1rho-tsl10", "t1rho-tsl30", "t1rho-tsl60"]
    volumes = []
    for folder in folders:
        study = read_study_folder(REAL_KNEE / folder)
        assert len(study.series) == 1
        volumes.append(series_to_volume(study.series[0].datasets))
    relaxation = relaxation_map_from_series(volumes[::-1])  # any order; TSL from EchoTime
    assert relaxation.times_ms == (1.0, 10.0, 30.0, 60.0)
    assert relaxation.t_ms.shape == (20, 512, 512)
    box = relaxation.t_ms[REAL_BOX]
    assert np.isfinite(box).mean() > 0.9
    assert 20.0 <= float(np.nanmedian(box)) <= 80.0
    fraction = np.zeros(relaxation.t_ms.shape)
    fraction[REAL_BOX] = 1.0
    m = mean_relaxation(relaxation.t_ms, fraction, "femoral_cartilage")
    assert 20.0 <= m.value <= 80.0
