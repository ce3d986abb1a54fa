"""msk-eval autolabel on a small cohort: three spine phantoms of 4 slices, the first again as NIfTI, and a
corrupt study.

The cohort is labelled locally, labelled again (resumption), and labelled on a Ray
cluster this test starts on 127.0.0.1; the SEG pixel data must not depend on where a
study ran.
"""
from __future__ import annotations

import csv
import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import psutil
import pydicom
import pytest
import SimpleITK as sitk

from msk_node_evaluation.autolabel import DONE_MARKER, local_ray_cluster, seg_pixel_data, write_phantom_cohort
from msk_node_evaluation.cli import main
from msk_node.dicom_input import read_study_folder
from msk_node.labels import load_label_map
from msk_node.volume import labels_on_volume_grid, series_to_volume
from tests.dicom_checks import assert_frames_on_sources, seg_label_volume

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
#: Phantom seeds never used to train the default detector.
SEEDS = (424250, 424251, 424252)
DICOM_STUDIES = [f"spine-{seed}" for seed in SEEDS]
NIFTI_STUDY = f"spine-{SEEDS[0]}-nifti"
ARGS = ["--workers", "2", "--threads", "1", "--anatomy", "spine", "--nifti"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """``root/studies``: the phantoms' DICOM folders, the first phantom as NIfTI, and garbage .dcm files."""
    root = tmp_path_factory.mktemp("autolabel")
    studies = write_phantom_cohort(root, "spine", list(SEEDS), n_slices=4)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in sorted((studies / DICOM_STUDIES[0]).rglob("*.dcm"))])
    (studies / NIFTI_STUDY).mkdir()
    sitk.WriteImage(reader.Execute(), str(studies / NIFTI_STUDY / "image.nii.gz"))
    corrupt = studies / "corrupt"
    corrupt.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        (corrupt / f"IM_{index:04d}.dcm").write_bytes(rng.bytes(4096))
    first_slice = sorted((studies / DICOM_STUDIES[1]).rglob("*.dcm"))[0]
    (corrupt / "IM_0003.dcm").write_bytes(first_slice.read_bytes()[:1500])
    return root


def _summary(out: Path) -> dict[str, dict]:
    return {row["study"]: row for row in json.loads((out / "autolabel-summary.json").read_text())}


@pytest.fixture(scope="module")
def local_run(cohort) -> tuple[Path, int]:
    out = cohort / "local"
    return out, main(["autolabel", str(cohort / "studies"), "--out", str(out), *ARGS])


def test_local_run_labels_every_good_study_and_reports_the_corrupt_one(cohort, local_run):
    out, status = local_run
    assert status == 1  # a study failed
    rows = _summary(out)
    assert set(rows) == {*DICOM_STUDIES, NIFTI_STUDY, "corrupt"}
    for name in [*DICOM_STUDIES, NIFTI_STUDY]:
        assert rows[name]["status"] == "ok", rows[name]
        assert (out / name / DONE_MARKER).is_file()
    assert rows["corrupt"]["status"] == "failed"
    assert "no series selected: 4 file(s)" in rows["corrupt"]["reason"]
    assert "not a readable DICOM file" in rows["corrupt"]["reason"]
    assert not (out / "corrupt" / DONE_MARKER).exists()
    with (out / "autolabel-summary.csv").open() as handle:
        assert {row["study"]: row["status"] for row in csv.DictReader(handle)} == {
            name: row["status"] for name, row in rows.items()}

    label_map = load_label_map(MODELS / "detector" / "label_map.yaml")
    for name in DICOM_STUDIES:
        (seg_path,) = (out / name).glob("seg-*.dcm")
        assert seg_path.name in rows[name]["outputs"]
        seg = hd.seg.segread(seg_path)
        volume = series_to_volume(read_study_folder(cohort / "studies" / name).series[0].datasets)
        assert_frames_on_sources(seg, volume.datasets)
        labels = seg_label_volume(seg, volume.datasets, label_map)
        truth = labels_on_volume_grid(cohort / "phantoms" / name / "truth_labels.nii.gz", volume.volume)
        for value in np.unique(truth[truth > 0]):
            predicted, expected = labels == value, truth == value
            # the segment is drawn on the frames of exactly the slices that show the structure
            assert (predicted.any(axis=(1, 2)) == expected.any(axis=(1, 2))).all(), (name, value)
            dice = 2 * (predicted & expected).sum() / (predicted.sum() + expected.sum())
            assert dice >= 0.8, (name, label_map.by_value(int(value)).name, dice)
        # --nifti: the same labels on the series' grid
        (nifti,) = (out / name).glob("labels-*.nii.gz")
        assert (labels_on_volume_grid(nifti, volume.volume) == labels).all()

    # The NIfTI study: labels on the image's own grid, voxel for voxel the DICOM study's labels.
    image = sitk.ReadImage(str(cohort / "studies" / NIFTI_STUDY / "image.nii.gz"))
    labels = sitk.ReadImage(str(out / NIFTI_STUDY / "labels.nii.gz"))
    assert labels.GetSize() == image.GetSize()
    for get in ("GetOrigin", "GetSpacing", "GetDirection"):
        assert np.allclose(getattr(labels, get)(), getattr(image, get)()), get
    (from_dicom,) = (out / DICOM_STUDIES[0]).glob("labels-*.nii.gz")
    on_image = sitk.Resample(sitk.ReadImage(str(from_dicom)), image, sitk.Transform(), sitk.sitkNearestNeighbor,
                             0, sitk.sitkUInt8)
    assert np.count_nonzero(sitk.GetArrayViewFromImage(labels))
    assert (sitk.GetArrayFromImage(labels) == sitk.GetArrayFromImage(on_image)).all()
    # ... after the same plausibility checks, whose findings its report names as the SEG's report.json does
    nifti_report = json.loads((out / NIFTI_STUDY / "report.json").read_text())
    (dicom_series,) = json.loads((out / DICOM_STUDIES[0] / "report.json").read_text())["series"]
    assert nifti_report["plausibility"] == dicom_series["plausibility"]


def test_second_run_skips_the_done_studies_and_redoes_the_rest(cohort, local_run):
    out, _ = local_run
    markers = {name: (out / name / DONE_MARKER).stat().st_mtime_ns for name in [*DICOM_STUDIES, NIFTI_STUDY]}
    first = _summary(out)
    (out / "corrupt" / "left-over.txt").write_text("from an interrupted run")

    assert main(["autolabel", str(cohort / "studies"), "--out", str(out), *ARGS]) == 1

    rows = _summary(out)
    for name, mtime in markers.items():
        assert rows[name]["status"] == "skipped" and rows[name]["outputs"] == first[name]["outputs"]
        assert (out / name / DONE_MARKER).stat().st_mtime_ns == mtime
    assert rows["corrupt"]["status"] == "failed"
    assert not (out / "corrupt" / "left-over.txt").exists()


def _ray_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "ray" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def _is_loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def test_a_ray_cluster_gives_the_local_seg_pixel_data(cohort, local_run):
    if importlib.util.find_spec("ray") is None:  # not imported here: the cluster sets Ray's mode before that
        pytest.skip("ray is not installed (pin: ray[data]==2.60.0)")
    local_out, _ = local_run
    out = cohort / "ray"
    with local_ray_cluster(num_cpus=2) as cluster:
        assert cluster.address.startswith("127.0.0.1:")
        run = subprocess.run([sys.executable, "-m", "msk_node_evaluation.cli", "autolabel", str(cohort / "studies"),
                              "--out", str(out), "--ray", cluster.address, "--threads", "1", "--anatomy", "spine",
                              "--nifti"],
                             cwd=REPO, capture_output=True, text=True, env={**os.environ, **cluster.driver_env},
                             timeout=900)
        listening = {ipaddress.ip_address(connection.laddr.ip) for process in _ray_processes()
                     for connection in process.net_connections("inet") if connection.status == "LISTEN"}
    assert run.returncode == 1, run.stderr[-3000:]
    assert listening and all(_is_loopback(address) for address in listening), listening

    assert {name: row["status"] for name, row in _summary(out).items()} == {
        **{name: "ok" for name in [*DICOM_STUDIES, NIFTI_STUDY]}, "corrupt": "failed"}
    local_segs, ray_segs = seg_pixel_data(local_out), seg_pixel_data(out)
    assert len(local_segs) == len(DICOM_STUDIES) and ray_segs == local_segs
    for name in [*DICOM_STUDIES, NIFTI_STUDY]:
        for path in (local_out / name).glob("*.nii.gz"):
            assert (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) ==
                    sitk.GetArrayFromImage(sitk.ReadImage(str(out / name / path.name)))).all(), path
    # The SEGs are new objects (their own UIDs) around the same pixels.
    name = DICOM_STUDIES[0]
    (local_seg,), (ray_seg,) = (local_out / name).glob("seg-*.dcm"), (out / name).glob("seg-*.dcm")
    assert pydicom.dcmread(local_seg).SOPInstanceUID != pydicom.dcmread(ray_seg).SOPInstanceUID

    deadline = time.monotonic() + 30
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ray_processes() == []


def test_encoder_is_deterministic_per_input(cohort):
    """At the precision this CPU runs natively, on the accelerated backend, the same slice gives the same features."""
    import torch

    from msk_node.intensity import normalise_volume
    from msk_node.models import load_models
    from msk_node.precision import resolve_precision

    segmenter = load_models(MODELS).segmenter
    assert segmenter.precision == resolve_precision("auto")
    volume = series_to_volume(read_study_folder(cohort / "studies" / DICOM_STUDIES[0]).series[0].datasets)
    image = normalise_volume(volume.array)[2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test's workers run
    try:
        first, second = segmenter.encode(image).features, segmenter.encode(image).features
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)
