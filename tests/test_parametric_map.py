"""Relaxation maps as DICOM Parametric Maps: valid, in ms, on the source slices, written by the pipeline."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import ParametricMapStorage

from msk_node.biomarkers.relaxometry import RelaxationMap
from msk_node.labels import LabelMap, load_label_map
from msk_node.parametric_map_writer import NOT_FITTED_MS, build_parametric_map, write_parametric_map
from msk_node_phantoms import write_phantom
from msk_node.measure import SeriesMeasurements
from msk_node.pipeline import (STEPS, LabelVolume, Resources, Rules, SeriesRecord, build_volume, load_study,
                               load_study_rules, loaded_values, run_steps, write_maps, write_values)
from msk_node.selection import default_rules_path
from msk_node_service.config import Destination
from msk_node_service.delivery import read_results, send
from msk_node.volume import SeriesVolume, labels_on_volume_grid, series_to_volume
from tests.dicom_checks import dciodvfy_errors, make_mr_series, sr_validator_errors, tid1500_read
from tests.service_helpers import StoreSCP

LABEL_MAP = load_label_map(Path(__file__).resolve().parent.parent / "models" / "detector" / "label_map.yaml")
#: An oblique, non-axis-aligned orientation so a swapped axis or sign cannot go unnoticed.
OBLIQUE = (0.0, 0.8, 0.6, 0.0, 0.6, -0.8)


def _series(tmp_path: Path, drop_slice: int | None = None) -> SeriesVolume:
    paths = make_mr_series(tmp_path / "echo1", n=6, rows=12, cols=10, iop=OBLIQUE, spacing=(0.7, 0.9),
                           slice_step=3.0)
    kept = [p for k, p in enumerate(paths) if k != drop_slice]
    return series_to_volume([pydicom.dcmread(p) for p in kept])


def _known_map(volume: SeriesVolume, kind: str) -> RelaxationMap:
    """T in ms that differs per slice, row and column; one block of failed fits (NaN)."""
    k, j, i = np.indices(volume.volume.spatial_shape, dtype=float)
    t_ms = 20.0 + 5.0 * k + 0.5 * j + 0.25 * i
    t_ms[:, :3, :2] = np.nan
    return RelaxationMap(t_ms, np.ones_like(t_ms), np.ones_like(t_ms), volume.volume, (1.0, 10.0, 30.0, 60.0),
                         kind=kind, source_datasets=volume.datasets)


@pytest.mark.parametrize("kind,quantity", [("t1rho", ("T1RHO", "99MSKNODE")), ("t2", ("113065", "DCM"))])
def test_map_is_valid_and_reads_back_in_ms_on_the_source_slices(tmp_path, kind, quantity):
    volume = _series(tmp_path)
    relaxation = _known_map(volume, kind)
    path = write_parametric_map(build_parametric_map(relaxation, series_number=9201), tmp_path / "pmap.dcm")

    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    first = volume.datasets[0]
    assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID and ds.StudyInstanceUID == first.StudyInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert ds.NumberOfFrames == len(volume.datasets) and ds.BitsAllocated == 32 and "FloatPixelData" in ds

    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("ms", "UCUM")
    concept = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == quantity
    declared = [item.CodingSchemeDesignator for item in ds.get("CodingSchemeIdentificationSequence", [])]
    assert ("99MSKNODE" in declared) == (quantity[1] == "99MSKNODE")

    # The window shows the fitted range: 1st-99th percentile of the values, not the padding.
    fitted = relaxation.t_ms[np.isfinite(relaxation.t_ms)]
    voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    low, high = np.percentile(fitted, (1, 99))
    assert float(voi.WindowCenter) == pytest.approx((low + high) / 2, rel=1e-4)
    assert float(voi.WindowWidth) == pytest.approx(high - low, rel=1e-4)

    # Each frame lies exactly on the source instance it references and holds that slice in ms.
    by_uid = {str(s.SOPInstanceUID): index for index, s in enumerate(volume.slices)}
    frames = hd.pm.ParametricMap.from_dataset(ds).pixel_array
    expected = np.where(np.isfinite(relaxation.t_ms), relaxation.t_ms, NOT_FITTED_MS).astype(np.float32)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        k = by_uid[str(source.ReferencedSOPInstanceUID)]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == [float(v) for v in volume.slices[k].ImagePositionPatient]
        np.testing.assert_array_equal(frame, expected[k])
    assert len({str(i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for i in ds.PerFrameFunctionalGroupsSequence}) == len(volume.datasets)

    # highdicom rebuilds the map's grid in patient space and applies the real world value mapping.
    read = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path)).get_volume(apply_real_world_transform=True)
    assert np.allclose(read.affine, volume.volume.affine, atol=1e-4)
    np.testing.assert_allclose(read.array, expected, rtol=1e-6)


def test_a_missing_source_slice_leaves_out_its_frame_only(tmp_path):
    volume = _series(tmp_path, drop_slice=2)
    assert volume.missing == [2] or volume.missing == [3]  # volume order may run against file order
    relaxation = _known_map(volume, "t2")
    path = write_parametric_map(build_parametric_map(relaxation, series_number=9201), tmp_path / "pmap.dcm")

    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    frames = hd.pm.ParametricMap.from_dataset(ds).pixel_array
    present = [k for k, s in enumerate(volume.slices) if s is not None]
    assert len(frames) == len(present) == 5
    to_index = np.linalg.inv(volume.volume.affine)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        k = int(round((to_index @ [*position, 1.0])[0]))
        assert k in present
        np.testing.assert_array_equal(frame, np.nan_to_num(relaxation.t_ms[k], nan=NOT_FITTED_MS))


def test_sources_off_the_map_grid_and_unknown_kinds_are_refused(tmp_path):
    volume = _series(tmp_path)
    relaxation = _known_map(volume, "t1rho")
    shifted = pydicom.Dataset()
    shifted.update(volume.datasets[0])
    shifted.ImagePositionPatient = [float(v) + 1.0 for v in shifted.ImagePositionPatient]
    with pytest.raises(ValueError, match="does not lie on a slice"):
        build_parametric_map(replace(relaxation, source_datasets=[shifted]), series_number=9201)
    with pytest.raises(ValueError, match="unknown relaxation map kind"):
        build_parametric_map(replace(relaxation, kind="adc"), series_number=9201)
    with pytest.raises(ValueError, match="no voxel has a valid fit"):
        build_parametric_map(replace(relaxation, t_ms=np.full_like(relaxation.t_ms, np.nan)), series_number=9201)


def test_series_that_share_a_fitted_map_share_one_file(tmp_path):
    """Two segmented series of one study fit the same maps: one file per map, listed for both, own numbers."""
    volume = _series(tmp_path)
    maps = [_known_map(volume, "t1rho"), _known_map(volume, "t2")]
    measurements = SeriesMeasurements({}, maps=maps)
    written: dict[str, Path] = {}
    out = tmp_path / "out"
    out.mkdir()
    listed = [write_maps(SeriesRecord(uid), measurements, out, written, first_series_number=9200)
              for uid in ("1.2.3", "1.2.4")]

    uid = volume.datasets[0].SeriesInstanceUID
    names = [f"pmap-t1rho-{uid}.dcm", f"pmap-t2-{uid}.dcm"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert [[p.name for p in paths] for paths in listed] == [names, names]
    assert [int(pydicom.dcmread(out / name).SeriesNumber) for name in names] == [9200, 9201]
    assert all(dciodvfy_errors(out / name) == [] for name in names)


@dataclass
class _Models:
    """What the write step needs of a model set: the label map and the provenance."""

    label_map: LabelMap

    def provenance(self) -> dict:
        return {"segmenter_family": "truth", "detector_version": "0", "segmenter_version": "0",
                "detector_sha256": "0" * 64, "segmenter_sha256": "0" * 64, "precision": "fp32", "backend": "none"}


def _measured_on_truth(case: Path, output_dir: Path, rules: Rules) -> tuple[dict, SeriesMeasurements]:
    """The case's one selected series through the measure step and the writer, truth labels in place of the models:
    the report and the series' measurements."""
    study = load_study(case / "dicom", rules)
    ((uid, selected),) = study.selected.items()
    volume, _ = build_volume(selected)
    labels = LabelVolume(volume, labels_on_volume_grid(case / "truth_labels.nii.gz", volume.volume).astype(np.uint8))
    resources = Resources(_Models(LABEL_MAP), rules)
    (measure,) = [step for step in STEPS if step.name == "measure"]
    values = run_steps({**loaded_values(study), "volumes": {uid: volume}, "label_volumes": {uid: labels},
                        "plausibility": {uid: ()}}, resources, steps=(measure,))
    return write_values(values, resources, output_dir).report, values["measurements"][uid]


def test_pipeline_writes_a_parametric_map_per_fitted_map_and_names_it_in_the_report(tmp_path):
    """The knee T1rho phantom through the pipeline's own steps, with truth labels in place of the models;
    the node's sender then C-STOREs the map with the SEG and the SR."""
    case = write_phantom("knee-t1rho", tmp_path / "case", seed=5, n_slices=24)
    truth = json.loads((case / "truth.json").read_text())
    output_dir = tmp_path / "out"
    report, measurements = _measured_on_truth(case, output_dir, load_study_rules())

    spin_lock = sorted(e["series_instance_uid"] for e in truth["series"] if e["role"] == "spin_lock")
    (entry,) = report["series"]
    (name,) = entry["parametric_maps"]
    assert name.startswith("pmap-t1rho-") and name[len("pmap-t1rho-"):-len(".dcm")] in spin_lock
    path = output_dir / name
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    numbers = {int(pydicom.dcmread(output_dir / entry[key]).SeriesNumber) for key in ("seg", "sr")}
    sr_path = output_dir / entry["sr"]
    assert dciodvfy_errors(sr_path) == [] and sr_validator_errors(sr_path) == []
    assert {g["TrackingIdentifier"] for g in tid1500_read(sr_path)["Measurements"]} >= {"femoral_cartilage"}
    assert int(ds.SeriesNumber) >= 9200 and int(ds.SeriesNumber) not in numbers

    # The stored map is the one measured: its cartilage voxels give the designed T1rho.
    (relaxation,) = measurements.maps
    read = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path)).get_volume(apply_real_world_transform=True)
    assert np.allclose(read.affine, relaxation.geometry.affine, atol=1e-3)
    fitted = np.isfinite(relaxation.t_ms)
    np.testing.assert_allclose(read.array[fitted], relaxation.t_ms[fitted], rtol=1e-6)
    femoral = next(m for m in measurements.by_segment["femoral_cartilage"] if m.name == "t1rho_mean")
    assert femoral.value == pytest.approx(truth["biomarkers"]["t1rho_ms"]["femoral_cartilage"], rel=0.05)

    # The service sends every result of the job: the map goes to PACS with the SEG, the SR and the clinician report.
    results, problems = read_results(output_dir)
    assert problems == [] and {r.path.name for r in results} == {entry["seg"], entry["sr"], name,
                                                                 *report["clinical_reports"]}
    assert len(report["clinical_reports"]) == 2
    pacs = StoreSCP()
    try:
        confirmed: list[str] = []
        send(Destination("cstore", **{k: v for k, v in pacs.destination().items() if k != "type"}), results,
             confirmed.append, calling_ae="MSKNODE")
        assert sorted(confirmed) == sorted(pacs.sop_uids) == sorted(r.sop_uid for r in results)
        (received,) = [d for d in pacs.received if d.SOPInstanceUID == ds.SOPInstanceUID]
        assert received.SOPClassUID == ParametricMapStorage and received.FloatPixelData == ds.FloatPixelData
    finally:
        pacs.stop()


def test_a_rules_file_without_relaxometry_groups_fits_no_map_and_measures_no_relaxation(tmp_path):
    """The rules value reaches the measurement: the same T1rho study under a rules file that lists no
    relaxometry groups gets no Parametric Map and no T1rho, while thickness is measured as before."""
    case = write_phantom("knee-t1rho", tmp_path / "case", seed=5, n_slices=24)
    document = yaml.safe_load(default_rules_path().read_text())
    document.pop("relaxometry")
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(document))
    output_dir = tmp_path / "out"
    report, measurements = _measured_on_truth(case, output_dir, load_study_rules(rules_path))

    (entry,) = report["series"]
    assert entry["outcome"] == "segmented" and "parametric_maps" not in entry and "parametric_maps" not in report
    assert not list(output_dir.glob("pmap-*.dcm")) and measurements.maps == []
    names = {m.name for m in measurements.rows()}
    assert "mean_thickness_3d" in names and not any(name.startswith("t1rho") for name in names)
