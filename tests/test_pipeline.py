"""The main job end to end on phantoms: detector boxes + LiteMedSAM against exact truth."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pydicom.uid import JPEG2000Lossless

from msk_node_evaluation import cli as eval_cli
from msk_node.biomarkers.relaxometry import split_relaxation_series
from msk_node.dicom_input import read_study_folder
from msk_node.metrics import dice_per_label
from msk_node_phantoms import write_phantom
from msk_node.pipeline import LabelVolume, process_study
from msk_node.plausibility import label_figures
from msk_node.precision import resolve_precision
from msk_node.sr_writer import read_measurements
from msk_node.status import EXIT_BAD_INPUT, EXIT_BAD_MODELS
from msk_node.volume import labels_on_volume_grid, series_to_volume, volume_to_sitk
from tests.dicom_checks import (
    assert_frames_on_sources,
    dciodvfy_errors,
    make_mr_series,
    seg_label_volume,
    sr_validator_errors,
    tid1500_read,
    tid1500_values,
)

from tests.conftest import MODELS, REPO, TEST_SEED

#: The console script of the environment running the tests.
MSK_NODE = str(Path(sys.executable).with_name("msk-node"))

BONES = {"knee": ["femur", "tibia", "patella"], "thigh": ["femoral_cortex", "femoral_marrow"],
         "spine": ["vertebral_body"]}
MUSCLES = {"thigh": ["quadriceps", "hamstrings", "adductors", "sartorius", "gracilis"]}

@pytest.mark.parametrize("kind", ["knee", "thigh", "spine"])
def test_default_pipeline_reaches_the_dice_targets_on_phantoms(phantom_run, models, kind):
    case, out, work = phantom_run(kind)

    (job,) = work.series_results
    assert job.outcome == "segmented", job.reason
    truth = labels_on_volume_grid(case / "truth_labels.nii.gz", job.volume.volume)
    names = {spec.name: spec.value for spec in models.label_map.for_anatomy(kind).labels}
    dice = dice_per_label(job.label_volume.labels, truth, names)
    print(kind, {k: round(v, 3) for k, v in dice.items()})
    for bone in BONES[kind]:
        assert dice[bone] >= 0.85, (bone, dice[bone])
    for muscle in MUSCLES.get(kind, []):
        assert dice[muscle] >= 0.80, (muscle, dice[muscle])

    # The SEG is valid, and reads back onto exactly the source slices with the same labels.
    assert dciodvfy_errors(job.output) == []
    seg = hd.seg.segread(job.output)
    assert_frames_on_sources(seg, job.volume.datasets)
    assert (seg_label_volume(seg, job.volume.datasets, models.label_map) == job.label_volume.labels).all()

    # The precision and encoder backend used travel with the result: report, SEG and SR.
    used = {"precision": resolve_precision("auto"), "backend": models.provenance()["backend"]}
    report = json.loads((out / "report.json").read_text())
    assert {key: report["models"][key] for key in used} == used
    parameters = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"precision={used['precision']}" in parameters and f"backend={used['backend']}" in parameters
    assert job.report_output is not None
    sr_text = str(pydicom.dcmread(job.report_output))
    assert f"precision={used['precision']}" in sr_text and f"backend={used['backend']}" in sr_text
    _assert_valid_report(job.report_output)


def test_each_label_carries_the_detector_scores_and_predicted_ious_of_its_boxes(phantom_run, models):
    """The knee phantom: a score pair per box that made a label's mask, the detector's scores those of the
    detections, and the decoder predicting good masks of the bones."""
    _, _, work = phantom_run("knee")
    (job,) = work.series_results
    present = {models.label_map.by_value(int(v)).name for v in np.unique(job.label_volume.labels) if v}
    assert present <= set(job.scores)
    for label, scores in job.scores.items():
        boxes = [d for d in job.detections if d.label == label]
        assert sorted(scores.detector) == pytest.approx(sorted(d.score for d in boxes))
        assert len(scores.predicted_iou) == len(boxes) and np.isfinite(scores.predicted_iou).all()
    medians = {bone: float(np.median(job.scores[bone].predicted_iou)) for bone in BONES["knee"]}
    print("median predicted IoU", medians)
    assert all(median > 0.7 for median in medians.values()), medians


def test_the_application_graph_is_the_data_flow_of_the_step_list(tmp_path):
    """compose() makes an operator per step and connects each named port to the operator that makes its value."""
    from msk_node_app.app import MskSegmentationApp

    (tmp_path / "in").mkdir()
    app = MskSegmentationApp([sys.executable, "app", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                              "-m", str(MODELS)])
    app.compose()
    graph = app.graph
    flows = {(op.name, following.name): {port for ports in graph.get_port_map(op, following).values()
                                         for port in ports}
             for op in graph.get_nodes() for following in graph.get_next_nodes(op)}
    assert flows == {
        ("study_loader", "volume"): {"series", "records"},
        ("study_loader", "detect"): {"series", "records"},
        ("study_loader", "segment"): {"series", "records"},
        ("study_loader", "postprocess"): {"records"},
        ("study_loader", "plausibility"): {"series", "records"},
        ("study_loader", "measure"): {"series", "records", "study"},
        ("study_loader", "seg_sr_writer"): {"records", "study"},
        ("volume", "detect"): {"normalised"},
        ("volume", "segment"): {"normalised"},
        ("volume", "postprocess"): {"volumes"},
        ("volume", "seg_sr_writer"): {"volumes"},
        ("detect", "segment"): {"detections"},
        ("segment", "postprocess"): {"segmentations"},
        ("postprocess", "plausibility"): {"label_volumes"},
        ("postprocess", "seg_sr_writer"): {"scores"},
        ("plausibility", "measure"): {"label_volumes"},
        ("plausibility", "seg_sr_writer"): {"label_volumes", "plausibility"},
        ("measure", "seg_sr_writer"): {"measurements"},
    }


def test_a_label_volume_is_tied_to_the_grid_of_its_volume(tmp_path):
    """A label volume of another shape than its volume is refused; step values cannot be reassigned."""
    volume = series_to_volume([pydicom.dcmread(p) for p in make_mr_series(tmp_path, n=4)])
    labels = LabelVolume(volume, np.zeros(volume.array.shape, dtype=np.uint8))
    with pytest.raises(ValueError, match="not on its volume's grid"):
        LabelVolume(volume, np.zeros((volume.array.shape[0] + 1, *volume.array.shape[1:]), dtype=np.uint8))
    with pytest.raises(FrozenInstanceError):
        labels.labels = np.ones(volume.array.shape, dtype=np.uint8)


def _assert_valid_report(path: Path) -> None:
    """dciodvfy and DicomSRValidator accept the SR; dcmqi's tid1500reader reads the numbers ours reads (dcmqi
    reads no measurement-level method, and no number where a value failed)."""
    assert dciodvfy_errors(path) == [] and sr_validator_errors(path) == []
    read_back = read_measurements(pydicom.dcmread(path))
    ours = {(group, name.split(" [")[0]): value for (group, name), value in read_back.items() if not math.isnan(value)}
    assert tid1500_values(tid1500_read(path)) == pytest.approx(ours, rel=1e-9)


def test_bad_input_is_reported_and_the_rest_of_the_study_is_processed(tmp_path, models):
    """A corrupt file, a CT series, a single-slice series and JPEG 2000 pixel data in one study."""
    study = tmp_path / "study"
    case = write_phantom("knee", tmp_path / "case", seed=TEST_SEED + 1, n_slices=24)
    knee_files = sorted((case / "dicom").rglob("*.dcm"))
    (study / "knee").mkdir(parents=True)
    for path in knee_files:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(study / "knee" / path.name)
    corrupt = study / "knee" / knee_files[3].name
    corrupt.write_bytes(corrupt.read_bytes()[:2000])
    for path in make_mr_series(study / "ct", n=10):
        ds = pydicom.dcmread(path)
        ds.Modality = "CT"
        ds.save_as(path)
    make_mr_series(study / "single", n=1)

    work = process_study(study, tmp_path / "out", models)
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    (knee,) = [s for s in report["series"] if s["anatomy"] == "knee"]
    assert knee["outcome"] == "segmented" and knee["instances"] == len(knee_files) - 1
    assert {"femur", "tibia"} <= set(knee["labels"])
    reasons = {Path(s["source"]).name if "/" in s["source"] else s["source"]: s["reason"]
               for s in report["skipped"]}
    # Cut inside its header or its pixel data, depending on the compressed size: either way it is named.
    assert any(text in reasons[corrupt.name] for text in ("not a readable DICOM file", "no pixel data",
                                                         "cannot be decoded"))
    (result,) = work.series_results
    assert knee.get("missing_slices") == [next(k for k, ds in enumerate(result.volume.slices) if ds is None)]
    joined = " ".join(reasons.values())
    assert "modality CT is not MR" in joined
    assert "1 slice(s)" in joined
    assert dciodvfy_errors(result.output) == []
    _assert_valid_report(result.report_output)  # on JPEG 2000 sources


def _run_entry_point_from_environment(input_dir: Path, work_dir: Path) -> None:
    """``python -m msk_node_app`` as the MAP image runs it: paths from HOLOSCAN_*, results in ``work_dir/out``."""
    env = {**os.environ, "HOLOSCAN_INPUT_PATH": str(input_dir),
           "HOLOSCAN_OUTPUT_PATH": str(work_dir / "out"), "HOLOSCAN_MODEL_PATH": str(MODELS)}
    result = subprocess.run([sys.executable, "-m", "msk_node_app"], cwd=work_dir, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_application_entry_point_reads_the_map_paths_from_the_environment(tmp_path):
    case = write_phantom("spine", tmp_path / "case", seed=TEST_SEED + 2)
    _run_entry_point_from_environment(case / "dicom", tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (series,) = report["series"]
    assert series["outcome"] == "segmented"
    assert set(series["labels"]) == {"vertebral_body", "intervertebral_disc"}
    assert dciodvfy_errors(tmp_path / "out" / series["seg"]) == []
    _assert_valid_report(tmp_path / "out" / series["sr"])


REAL_MESE = Path(os.environ.get("MSK_NODE_REAL_MESE", REPO.parent / "shared" / "data" / "knee-mese-t2-ge-3t"))
#: Hand-checked gastrocnemius on the MESE echo volumes (all muscle, viewed slice by slice): slices 12-14,
#: rows 160-219, columns 185-204.
MESE_MUSCLE_BOX = (slice(12, 15), slice(160, 220), slice(185, 205))


@pytest.mark.skipif(not REAL_MESE.is_dir(), reason=f"real MESE data not found at {REAL_MESE}")
def test_real_mese_study_alone_gets_a_t2_parametric_map_from_its_eight_echoes(tmp_path):
    """The 8-echo big-endian series as a study of its own, through the application entry point: nothing to
    segment (a mapping series), yet its T2 map is written as a Parametric Map on its slices, in ms."""
    _run_entry_point_from_environment(REAL_MESE / "dicom", tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["series"] == [] and "is excluded" in report["skipped"][0]["reason"]
    (path,) = (tmp_path / "out").glob("*.dcm")
    assert report["parametric_maps"] == [path.name]
    assert dciodvfy_errors(path) == []

    (source,) = read_study_folder(REAL_MESE / "dicom").series
    echoes = split_relaxation_series([source.datasets])
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30" and ds.StudyInstanceUID == source.study_instance_uid
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.series_instance_uid
    # One frame per slice position, each on an instance of the second echo (the first is left out of the fit).
    echo2 = {str(d.SOPInstanceUID) for d in echoes[1].volume.datasets}
    referenced = {str(i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for i in ds.PerFrameFunctionalGroupsSequence}
    assert ds.NumberOfFrames == 24 and referenced == echo2
    mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "ms"
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "113065"  # DCM T2

    # The map read back where the muscle is in patient space: gastrocnemius T2 at 3 T.
    stored = hd.pm.ParametricMap.from_dataset(ds).get_volume(apply_real_world_transform=True)
    grid = echoes[0].volume.volume
    k, j, i = (axis.ravel() for axis in np.mgrid[MESE_MUSCLE_BOX])
    patient = grid.affine @ np.stack([k, j, i, np.ones_like(k)])
    index = np.linalg.inv(stored.affine) @ patient
    assert np.allclose(index, np.rint(index), atol=1e-3)  # the map lies on the echoes' grid
    muscle = stored.array[tuple(np.rint(index[:3]).astype(int))]
    fitted = muscle[muscle > 0]  # 0 is stored where no fit was valid
    print(f"MESE gastrocnemius T2 {fitted.mean():.1f} ms over {fitted.size} of {muscle.size} voxels")
    assert fitted.size >= 0.95 * muscle.size
    assert 25.0 <= float(fitted.mean()) <= 45.0


def test_application_refuses_corrupted_models_at_start_up(tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(MODELS, models)
    weights = models / "detector" / "detector.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    case = make_mr_series(tmp_path / "in", n=10)
    result = subprocess.run([sys.executable, "-m", "msk_node_app", "-i", str(case[0].parent),
                             "-o", str(tmp_path / "out"), "-m", str(models)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == EXIT_BAD_MODELS
    assert "detector.pt are corrupted or replaced" in result.stderr
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["outcome"] == "could not run" and status["exit_code"] == EXIT_BAD_MODELS
    assert status["reason"].startswith("models not loaded: ModelError: ")
    assert "detector.pt are corrupted or replaced" in status["reason"]
    assert status["series"] == [] and status["results"] == []


@pytest.mark.parametrize("command", [[sys.executable, "-m", "msk_node_app"], [MSK_NODE, "run"]],
                         ids=["entry point", "msk-node run"])
def test_application_without_a_readable_input_folder_says_so_in_status_json(tmp_path, command):
    not_a_folder = tmp_path / "study.dcm"
    not_a_folder.write_bytes(b"not a folder")
    result = subprocess.run([*command, "-i", str(not_a_folder), "-o", str(tmp_path / "out"), "-m", str(MODELS)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    reason = f"input folder {not_a_folder} is not a folder"
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status == {"outcome": "could not run", "exit_code": EXIT_BAD_INPUT, "reason": reason, "series": [],
                      "results": []}
    if command[-1] == "run":
        assert f"msk-node: could not run: {reason}" in result.stderr


@pytest.fixture(scope="module")
def real_knee_work(real_knee_run):
    return real_knee_run[1]


def test_real_knee_dess_without_patient_id_gives_a_valid_aligned_seg(real_knee_work, models):
    work = real_knee_work

    # Both DESS echoes are segmented; the spin-lock series are not segmentation targets. Check the first echo.
    assert len(work.series_results) == 2
    job = min(work.series_results, key=lambda j: float(j.selected.series.datasets[0].EchoTime))
    assert "DESS" in job.selected.series.description
    assert job.outcome == "segmented", job.reason
    assert len(job.volume.datasets) == 80 and "PatientID" not in job.volume.datasets[0]
    skipped = " ".join(s["reason"] for s in work.report["skipped"])
    assert skipped.count("is excluded") == 4
    assert dciodvfy_errors(job.output) == []
    seg = hd.seg.segread(job.output)
    assert seg.PatientID == ""
    assert_frames_on_sources(seg, job.volume.datasets)
    assert (seg_label_volume(seg, job.volume.datasets, models.label_map) == job.label_volume.labels).all()
    _assert_valid_report(job.report_output)
    found = set(work.report["series"][0]["labels"])
    assert {"femur", "tibia"} <= found, found


@pytest.mark.xfail(reason="patellar cartilage is missed on real DESS: the detector scores its boxes 0.04-0.08, "
                          "under its 0.25 threshold", strict=False)
def test_real_knee_anatomy_is_where_a_knee_has_it(real_knee_work, models):
    """The first DESS echo: whole bones in their order, cartilage plates of a real knee's size."""
    job = min(real_knee_work.series_results, key=lambda j: float(j.selected.series.datasets[0].EchoTime))
    figures = {f.label: f for f in label_figures(job.label_volume.labels, job.volume, models.label_map)}
    print({name: (round(f.volume_cm3, 2), f.components, np.round(f.centroid_mm, 1).tolist())
           for name, f in figures.items()})
    for bone in ("femur", "tibia", "patella"):
        assert figures[bone].components == 1, bone
    # patient coordinates are LPS: +z superior, -y anterior
    assert figures["tibia"].centroid_mm[2] < figures["femur"].centroid_mm[2]
    assert figures["patella"].centroid_mm[1] < figures["femur"].centroid_mm[1]
    assert 7.0 <= figures["femoral_cartilage"].volume_cm3 <= 15.0
    thickness = next(m for m in job.measurements.by_segment["femoral_cartilage"]
                     if m.name == "mean_thickness_3d" and m.available)
    assert 1.5 <= thickness.value <= 3.0, thickness
    for plate in ("tibial_cartilage", "patellar_cartilage"):
        assert figures[plate].volume_cm3 > 0.5, plate


def test_real_knee_as_nifti_with_named_labels_evaluates_with_truth_boxes(real_knee_work, tmp_path, capsys):
    """The NIfTI evaluation path on a real scan: the node's bone labels stand in for manual ones."""
    job = min(real_knee_work.series_results, key=lambda j: float(j.selected.series.datasets[0].EchoTime))
    names = {1: "femur", 2: "tibia"}
    files = {"image": tmp_path / "dess.nii.gz", "labels": tmp_path / "labels.nii.gz", "names": tmp_path / "names.yaml"}
    sitk.WriteImage(volume_to_sitk(job.volume.volume, job.volume.array.astype(np.int16)), str(files["image"]))
    bones = np.where(np.isin(job.label_volume.labels, list(names)), job.label_volume.labels, 0).astype(np.uint8)
    sitk.WriteImage(volume_to_sitk(job.volume.volume, bones), str(files["labels"]))
    files["names"].write_text(yaml.safe_dump(names))

    assert eval_cli.main(["segment", "--image", str(files["image"]), "--labels", str(files["labels"]),
                          "--label-names", str(files["names"]), "--model", "litemedsam", "--prompts", "gt",
                          "--slice-step", "8", "--out", str(tmp_path / "eval")]) == 0
    table = pd.read_csv(tmp_path / "eval" / "labels.csv").set_index("label")
    print(table[["dice", "hd95_mm"]])
    assert set(table.index) == set(names.values())
    assert (table["dice"] > 0.7).all(), table["dice"]
    assert (table["hd95_mm"] > 0).all() and (table["hd95_mm"] < 20).all(), table["hd95_mm"]


def test_a_failing_step_costs_its_series_alone_and_status_json_lists_every_outcome(tmp_path, models, monkeypatch):
    """KeyError in the spine's detection and in the knee's measurement; the thigh is untouched.

    A study-wide step failing too (the maps of acquisitions no series measured on) is listed at the
    study level, and every series' results are written all the same.
    """
    from msk_node import pipeline

    study = tmp_path / "study"
    uids = {}
    for kind, seed in (("knee", TEST_SEED + 5), ("spine", TEST_SEED + 6), ("thigh", TEST_SEED + 7)):
        case = write_phantom(kind, tmp_path / kind, seed=seed, n_slices=16)
        shutil.copytree(case / "dicom", study / kind)
    for uid, selected in pipeline.load_study(study, pipeline.load_study_rules()).selected.items():
        uids[selected.anatomy] = uid
    assert sorted(uids) == ["knee", "spine", "thigh"]

    def failing(step, anatomy):
        def run(selected, *args, **uses):
            if selected.series.series_instance_uid == uids[anatomy]:
                raise KeyError("injected")
            return step.function(selected, *args, **uses)
        return replace(step, function=run)

    injected = {"detect": "spine", "measure": "knee"}
    monkeypatch.setattr(pipeline, "STEPS", tuple(failing(step, injected[step.name]) if step.name in injected
                                                 else step for step in pipeline.STEPS))

    def failing_maps(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(pipeline, "unmeasured_relaxation_maps", failing_maps)
    out = tmp_path / "out"
    process_study(study, out, models)

    study_report = json.loads((out / "report.json").read_text())
    assert study_report["failures"] == [{"step": "relaxation maps", "error": "RuntimeError: injected"}]
    report = {s["anatomy"]: s for s in study_report["series"]}
    assert report["spine"]["outcome"] == "failed"
    assert report["spine"]["reason"] == "detection failed: KeyError: 'injected'"
    assert report["spine"]["failures"] == [{"step": "detect", "error": "KeyError: 'injected'"}]
    assert "seg" not in report["spine"]
    # A failed measurement keeps the SEG and says so; no SR without measurements.
    assert report["knee"]["outcome"] == "segmented" and "reason" not in report["knee"]
    assert report["knee"]["failures"] == [{"step": "measure", "error": "KeyError: 'injected'"}]
    assert {"femur", "tibia"} <= set(report["knee"]["labels"]) and "sr" not in report["knee"]
    assert report["thigh"]["outcome"] == "segmented" and "failures" not in report["thigh"]
    assert "sr" in report["thigh"]

    status = json.loads((out / "status.json").read_text())
    assert status["outcome"] == "ran" and status["exit_code"] == 0
    by_uid = {s["series_instance_uid"]: s for s in status["series"]}
    assert {anatomy: by_uid[uid]["outcome"] for anatomy, uid in uids.items()} == {
        "knee": "segmented", "spine": "failed", "thigh": "segmented"}
    assert by_uid[uids["knee"]]["failures"] == report["knee"]["failures"]
    listed = {entry["file"]: entry for entry in status["results"]}
    assert set(listed) == {p.name for p in out.glob("*.dcm")}
    assert {report["knee"]["seg"], report["thigh"]["seg"], report["thigh"]["sr"]} <= set(listed)
    for name, entry in listed.items():
        ds = pydicom.dcmread(out / name, stop_before_pixels=True)
        assert (entry["sop_class_uid"], entry["sop_instance_uid"]) == (ds.SOPClassUID, ds.SOPInstanceUID)
    seg = pydicom.dcmread(out / report["knee"]["seg"])
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uids["knee"]
