"""Relaxometry from series as scanners export them: phantom truth with Rician noise, real GE MESE, CubeQuant, DESS."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom import Volume

from msk_node.biomarkers.alignment import align_to_map, moved_volume
from msk_node.biomarkers.dess import dess_parameters, dess_t2_map
from msk_node.biomarkers.relaxometry import (
    estimate_noise_sigma,
    fit_monoexponential,
    mask_on_grid,
    mean_relaxation,
    relaxation_map,
    split_relaxation_series,
)
from msk_node.dicom_input import Series, read_study_folder
from msk_node.labels import load_label_map
from msk_node.measure import measure_series, relaxometry_groups
from msk_node_phantoms import write_phantom
from msk_node.selection import load_relaxometry_rules
from msk_node.volume import labels_on_volume_grid, series_to_volume

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
REAL_KNEE = Path(os.environ.get("MSK_NODE_REAL_KNEE", SHARED / "knee-mri-ge-3t"))
REAL_MESE = Path(os.environ.get("MSK_NODE_REAL_MESE", SHARED / "knee-mese-t2-ge-3t"))
LABEL_MAP = load_label_map(REPO / "models" / "detector" / "label_map.yaml")

#: Designed relaxation times (ms) of the phantom's plates; every other tissue decays with 30 ms.
DESIGNED_MS = {"femoral_cartilage": 40.0, "tibial_cartilage": 35.0, "patellar_cartilage": 45.0}
#: Cartilage signal at t = 0 and the noise sigma: SNR 20.
CARTILAGE_S0, SIGMA = 1000.0, 50.0

#: Hand-checked anterior femoral cartilage on the real knee (see tests/test_biomarkers.py REAL_BOX): slice 6 of the
#: 20 CubeQuant slices, rows 262-275, columns 168-175; on the 1.5 mm DESS grid the same tissue is slices 34-37.
T1RHO_BOX = (6, slice(262, 276), slice(168, 176))
DESS_BOX = (slice(34, 38), slice(262, 276), slice(168, 176))


# Phantom with exact signal plus Rician noise --------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Knee T1rho phantom: morphology volume, truth labels on it, spin-lock datasets and their truth labels."""
    out = write_phantom("knee-t1rho", tmp_path_factory.mktemp("relax") / "knee", seed=0, n_slices=24)
    truth = json.loads((out / "truth.json").read_text())
    by_uid = {s.series_instance_uid: s for s in read_study_folder(out / "dicom").series}
    volumes = {e["role"] + str(i): series_to_volume(by_uid[e["series_instance_uid"]].datasets)
               for i, e in enumerate(truth["series"])}
    morphology = next(v for k, v in volumes.items() if k.startswith("morphology"))
    spin = [v for k, v in volumes.items() if k.startswith("spin_lock")]
    return {"truth": truth, "morphology": morphology,
            "labels": labels_on_volume_grid(out / "truth_labels.nii.gz", morphology.volume), "spin": spin,
            "spin_labels": labels_on_volume_grid(out / "truth_labels.nii.gz", spin[0].volume)}


def _noisy_series(phantom: dict, times_ms: list[float], *, scanning_sequence: str) -> list[pydicom.Dataset]:
    """ONE series of the exact signal ``S0 exp(-t/T)`` per time with Rician noise (SNR 20 in cartilage)."""
    rng = np.random.default_rng(1)
    labels, values = phantom["spin_labels"], phantom["truth"]["labels"]
    t_ms = np.full(labels.shape, 30.0)
    s0 = np.where(labels > 0, 0.8 * CARTILAGE_S0, 0.0)
    for plate, designed in DESIGNED_MS.items():
        t_ms[labels == values[plate]] = designed
        s0[labels == values[plate]] = CARTILAGE_S0
    template = phantom["spin"][0]
    uid = pydicom.uid.generate_uid()
    datasets = []
    for echo, time in enumerate(times_ms, start=1):
        exact = s0 * np.exp(-time / t_ms)
        noisy = np.abs(exact + rng.normal(0, SIGMA, exact.shape) + 1j * rng.normal(0, SIGMA, exact.shape))
        for k, source in enumerate(template.slices):
            ds = copy.deepcopy(source)
            ds.PixelData = np.clip(np.rint(noisy[k]), 0, 65535).astype(np.uint16).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
            ds.EchoTime, ds.EchoNumbers, ds.ScanningSequence = time, echo, scanning_sequence
            ds.InstanceNumber = (k + 1) * 100 + echo  # interleaved as scanners export it
            datasets.append(ds)
    return datasets


def _scanner_map(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """A scanner-made map series (DERIVED) with the same description: constant 500 'ms' everywhere."""
    uid = pydicom.uid.generate_uid()
    first_echo = [ds for ds in datasets if int(ds.EchoNumbers) == 1]
    derived = []
    for source in first_echo:
        ds = copy.deepcopy(source)
        ds.ImageType = ["DERIVED", "PRIMARY", "T1RHO MAP"]
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.EchoTime = uid, pydicom.uid.generate_uid(), 0
        ds.PixelData = np.full((ds.Rows, ds.Columns), 500, np.uint16).tobytes()
        derived.append(ds)
    return derived


def _plate_means(phantom: dict, fitted, name: str, morphology: Volume | None = None) -> dict[str, float]:
    values = phantom["truth"]["labels"]
    source = phantom["morphology"].volume if morphology is None else morphology
    means = {}
    for plate in DESIGNED_MS:
        fraction = mask_on_grid(phantom["labels"] == values[plate], source, fitted.geometry)
        m = mean_relaxation(fitted.t_ms, fraction, plate, name=name, noise_sigma=fitted.noise_sigma)
        assert m.extra["n_voxels"] >= 30 and m.extra["rejected_share"] < 0.1, (plate, m.extra)
        means[plate] = m.value
    return means


def test_one_spin_lock_series_with_a_scanner_map_splits_and_fits_within_5_percent(phantom: dict) -> None:
    """Measured (SNR 20, Rician): femoral 40.8 (40), tibial 35.1 (35), patellar 46.0 (45) ms; sigma 49.9 (50)."""
    one_series = _noisy_series(phantom, [1.0, 10.0, 30.0, 60.0], scanning_sequence="GR")
    scanner_map = _scanner_map(one_series)
    groups = split_relaxation_series([one_series, scanner_map])
    assert [g.time_ms for g in groups] == [1.0, 10.0, 30.0, 60.0]  # the DERIVED map (EchoTime 0) is left out
    assert all(g.volume.array.shape == phantom["spin"][0].array.shape for g in groups)
    assert np.allclose(groups[0].volume.volume.affine, phantom["spin"][0].volume.affine)
    with pytest.raises(ValueError, match="not a regular volume"):  # the naive reader's failure
        series_to_volume(one_series)
    fitted = relaxation_map("t1rho", [one_series, scanner_map])
    assert fitted.kind == "t1rho" and fitted.times_ms == (1.0, 10.0, 30.0, 60.0)
    assert fitted.noise_sigma == pytest.approx(SIGMA, rel=0.1)
    assert [int(ds.EchoNumbers) for ds in fitted.source_datasets] == [1] * len(fitted.source_datasets)
    assert np.array_equal(fitted.volume.affine, phantom["spin"][0].volume.affine)
    for plate, value in _plate_means(phantom, fitted, "t1rho_mean").items():
        assert value == pytest.approx(DESIGNED_MS[plate], rel=0.05), (plate, value)


def test_multi_echo_spin_echo_t2_drops_the_first_echo_and_fits_within_5_percent(phantom: dict) -> None:
    """Measured (SNR 20, echoes 16-64 ms): femoral 41.4 (40), tibial 36.2 (35), patellar 46.6 (45) ms."""
    echoes = [8.0 * n for n in range(1, 9)]  # 8 ms echo spacing, as in clinical MESE
    one_series = _noisy_series(phantom, echoes, scanning_sequence="SE")
    fitted = relaxation_map("t2", [one_series])
    assert fitted.kind == "t2" and fitted.times_ms == tuple(echoes[1:])
    assert relaxation_map("t2", [one_series], exclude_first_echo=False).times_ms == tuple(echoes)
    for plate, value in _plate_means(phantom, fitted, "t2_mean").items():
        assert value == pytest.approx(DESIGNED_MS[plate], rel=0.05), (plate, value)


def test_knee_moved_between_series_is_registered_back(phantom: dict) -> None:
    """The morphology grid claims the knee 3 mm further along y than the spin-lock series saw it.

    Measured: registration finds (0.07, -2.99, 0.02) mm; unmoved series are left alone (shift 0.1 mm).
    """
    fitted = relaxation_map("t1rho", [v.datasets for v in phantom["spin"]])  # the phantom's rendered series
    first_echo = series_to_volume(fitted.source_datasets).volume
    morphology = phantom["morphology"].volume
    assert not align_to_map(morphology, first_echo).registered
    shift = np.eye(4)
    shift[:3, 3] = (0.0, 3.0, 0.0)
    moved = moved_volume(morphology, shift)
    alignment = align_to_map(moved, first_echo)
    assert alignment.registered and alignment.metric_after < alignment.metric_before
    assert alignment.matrix[:3, 3] == pytest.approx([0.0, -3.0, 0.0], abs=0.3)
    for plate, value in _plate_means(phantom, fitted, "t1rho_mean", moved_volume(moved, alignment.matrix)).items():
        assert value == pytest.approx(DESIGNED_MS[plate], rel=0.05), (plate, value)


def test_noise_floor_model_removes_most_of_the_low_snr_bias() -> None:
    """T = 30 ms, TSL 0/10/40/80 ms, SNR 10: plain fit median 37.3 ms; noise-floor fit 31.7 ms."""
    rng = np.random.default_rng(0)
    times = np.array([0.0, 10.0, 40.0, 80.0])
    exact = 10.0 * np.exp(-times / 30.0)[:, None] * np.ones((1, 20000))
    magnitude = np.abs(exact + rng.normal(0, 1, exact.shape) + 1j * rng.normal(0, 1, exact.shape))
    plain = np.nanmedian(fit_monoexponential(magnitude, times)[0])
    floor = np.nanmedian(fit_monoexponential(magnitude, times, noise_sigma=1.0)[0])
    assert plain > 35.0
    assert floor == pytest.approx(30.0, rel=0.08)
    air = np.abs(rng.normal(0, 7, (4, 64, 64)) + 1j * rng.normal(0, 7, (4, 64, 64)))
    air[:, 16:48, 16:48] += 1000.0
    assert estimate_noise_sigma(air) == pytest.approx(7.0, rel=0.05)


# Real data -------------------------------------------------------------------------------------


def _one_study(series: list[Series]) -> list[Series]:
    """Give every series one StudyInstanceUID, as on the scanner (the anonymisation split them)."""
    for s in series:
        for ds in s.datasets:
            ds.StudyInstanceUID = series[0].study_instance_uid
    return series


@pytest.mark.skipif(not REAL_MESE.is_dir(), reason=f"real MESE data not found at {REAL_MESE}")
def test_real_mese_series_as_its_own_study_gives_a_t2_map() -> None:
    """Measured: 8 echoes x 24 slices; gastrocnemius T2 34 ms (no cartilage labels exist for this subject)."""
    series = read_study_folder(REAL_MESE / "dicom").series
    assert len(series) == 1 and len(series[0]) == 192
    groups = split_relaxation_series([series[0].datasets])
    assert [g.echo_number for g in groups] == list(range(1, 9))
    assert all(g.volume.array.shape == (24, 256, 256) for g in groups)
    assert groups[0].volume.slice_spacing == pytest.approx(4.0, abs=0.01)  # the 1 mm gap kept, not 0.48 mm
    echo1 = groups[0].volume
    # The study's morphology: its first echo. A box inside the gastrocnemius (viewed slice by slice: slices 12-14,
    # rows 160-219, columns 185-204, all muscle) is labelled "femoral cartilage" only to run the knee path; the
    # range checked is that of muscle T2 at 3 T.
    labels = np.zeros(echo1.array.shape, np.uint8)
    labels[12:15, 160:220, 185:205] = LABEL_MAP.by_name("femoral_cartilage").value
    result = measure_series(echo1, labels, "knee", LABEL_MAP, series)
    assert [m.kind for m in result.maps] == ["t2"]
    t2 = result.maps[0]
    assert t2.times_ms == tuple(g.time_ms for g in groups[1:])  # first echo left out (stimulated echoes)
    assert t2.t_ms.shape == (24, 256, 256)
    m = next(m for m in result.by_segment["femoral_cartilage"] if m.name == "t2_mean")
    assert 25.0 <= m.value <= 45.0, m
    assert m.extra["n_voxels"] > 1000 and 0.0 <= m.extra["rejected_share"] < 0.05, m.extra


@pytest.mark.skipif(not REAL_KNEE.is_dir(), reason=f"real knee data not found at {REAL_KNEE}")
def test_real_knee_femoral_t1rho_and_dess_t2_in_cartilage() -> None:
    """Measured on the hand-checked femoral cartilage: T1rho 57.8 ms (216 voxels), DESS T2 39.0 ms (144 voxels)."""
    folders = ["dess-echo1", "dess-echo2", "t1rho-tsl01", "t1rho-tsl10", "t1rho-tsl30", "t1rho-tsl60"]
    series = _one_study([read_study_folder(REAL_KNEE / f).series[0] for f in folders])
    morphology = series_to_volume(series[0].datasets)
    assert dess_parameters(series[0].first).spoiler_area_t_s_m == pytest.approx(3.132e-5)
    labels = np.zeros(morphology.array.shape, np.uint8)
    labels[DESS_BOX] = LABEL_MAP.by_name("femoral_cartilage").value
    result = measure_series(morphology, labels, "knee", LABEL_MAP, series)
    assert sorted(m.kind for m in result.maps) == ["dess_t2", "t1rho"]
    by_name = {m.name: m for m in result.by_segment["femoral_cartilage"]}
    t1rho, dess = by_name["t1rho_mean"], by_name["t2_mean"]
    assert "DESS" in dess.method
    assert 35.0 <= t1rho.value <= 65.0 and t1rho.extra["n_voxels"] >= 50, t1rho
    assert 20.0 <= dess.value <= 45.0 and dess.extra["n_voxels"] >= 100, dess
    assert t1rho.extra["rejected_share"] < 0.1 and dess.extra["rejected_share"] < 0.1
    assert "registered" in t1rho.extra and "registered" not in dess.extra  # DESS T2 lies on the segmented series
    dess_map = next(m for m in result.maps if m.kind == "dess_t2")
    assert dess_map.times_ms == (7.48, 42.52) and np.array_equal(dess_map.volume.affine, morphology.volume.affine)
    assert all(int(ds.EchoNumbers) == 1 for ds in dess_map.source_datasets)


@pytest.mark.skipif(not REAL_KNEE.is_dir(), reason=f"real knee data not found at {REAL_KNEE}")
def test_dess_echoes_in_one_series_split_and_missing_tags_give_a_reason() -> None:
    """Both echoes exported as ONE series, as the scanner made them: split by EchoNumbers / EchoTime."""
    echo1, echo2 = (read_study_folder(REAL_KNEE / f).series[0].datasets for f in ("dess-echo1", "dess-echo2"))
    for ds in echo2:
        ds.SeriesInstanceUID = echo1[0].SeriesInstanceUID
    dess = dess_t2_map([echo1 + echo2])
    assert dess.times_ms == (7.48, 42.52) and dess.t_ms.shape == (80, 512, 512)
    assert 20.0 <= float(np.nanmedian(dess.t_ms[DESS_BOX])) <= 45.0
    first = echo1[0]
    assert dess_parameters(first).flip_angle_deg == 30.0
    no_spoiler = copy.deepcopy(first)
    del no_spoiler[0x001910B6]
    with pytest.raises(ValueError, match="spoiler gradient"):
        dess_parameters(no_spoiler)
    no_flip = copy.deepcopy(first)
    del no_flip.FlipAngle
    with pytest.raises(ValueError, match="FlipAngle"):
        dess_parameters(no_flip)


def _header_series(description: str, echo_times: list[float], study: str = "1.2.9", derived: bool = False) -> Series:
    series = Series(series_instance_uid=f"{study}.{description}")
    for echo_time in echo_times:
        ds = pydicom.Dataset()
        ds.StudyInstanceUID, ds.SeriesDescription, ds.EchoTime = study, description, echo_time
        ds.ImageType = ["DERIVED" if derived else "ORIGINAL", "PRIMARY"]
        series.datasets.append(ds)
    return series


def test_relaxometry_groups_come_from_the_series_rules_file(tmp_path: Path) -> None:
    """Default rules: spin-lock, MESE and two-echo DESS groups; a one-echo DESS and other studies' series are not."""
    spin_lock = [_header_series(f"Sag CubeQuant TSL{t}", [10.0]) for t in (1, 10, 30, 60)]
    mese = _header_series("Sag T2 MESE", [8.0, 16.0, 24.0])
    scanner_map = _header_series("T2 Map", [0.0], derived=True)
    dess = [_header_series("Sag qDESS echo 1", [7.48]), _header_series("Sag qDESS echo 2", [42.52])]
    other_study = _header_series("T1rho other study", [10.0], study="1.2.10")
    study = [*spin_lock, mese, scanner_map, *dess, other_study]
    groups = relaxometry_groups(study, "1.2.9")
    assert groups == {"t1rho": spin_lock, "t2": [mese, scanner_map], "dess_t2": dess}
    assert "dess_t2" not in relaxometry_groups([dess[0], mese], "1.2.9")  # one echo: morphology only
    # Two DESS series whose only second echo time is a scanner-made image: one echo time counts.
    assert "dess_t2" not in relaxometry_groups([dess[0], _header_series("DESS T2", [42.52], derived=True)], "1.2.9")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("rules: []\nrelaxometry:\n  - kind: t2\n    description: ['^my t2 mapping$']\n"
                          "    min_echo_times: 3\n")
    custom = load_relaxometry_rules(rules_file)
    mine = _header_series("My T2 mapping", [10.0, 20.0, 30.0])
    assert relaxometry_groups([mine, mese, *spin_lock], "1.2.9", custom) == {"t2": [mine]}
    assert relaxometry_groups([_header_series("my t2 mapping", [10.0, 20.0])], "1.2.9", custom) == {}
