"""msk-eval segment / experiment / biomarkers: metrics in mm, prompt sources, NIfTI and DICOM cases, configs."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from msk_node_evaluation import cli
from msk_node_evaluation.config import (DatasetSpec, ExperimentConfig, ModelSpec, load_experiment_config,
                                        parse_experiment_config)
from msk_node_evaluation.experiment import SegmentationResults, score_case, subject_means, summarise
from msk_node_evaluation.metrics import compute_mask_metrics, empty_mask, empty_mask_penalty_mm, size_stratum
from msk_node_evaluation.segment import input_pixel_size, truth_prompts
from msk_node.intensity import SquareFrame
from msk_node_phantoms import write_phantom

REPO = Path(__file__).resolve().parent.parent
SEED = 7
# compact thigh labels: one box each per slice keeps LiteMedSAM's decoder cheap on a CPU
THIGH_NAMES = {10: "hamstrings", 12: "sartorius", 13: "gracilis", 15: "femoral_marrow"}


# --- metrics against known answers -----------------------------------------------------------------


def _sphere(shape: tuple[int, ...], spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """A ball of ``radius_mm`` at the grid's centre, sampled at voxel centres."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    grids = np.meshgrid(*axes, indexing="ij")
    return sum(g ** 2 for g in grids) <= radius_mm ** 2


@pytest.mark.parametrize("spacing", [(2.0, 0.5, 0.5), (1.0, 1.0, 1.0), (0.5, 1.5, 1.0)])
def test_concentric_spheres_give_their_gap_in_mm_on_anisotropic_grids(spacing):
    shape = tuple(int(round(40 / s)) for s in spacing)
    inner, outer = _sphere(shape, spacing, 10.0), _sphere(shape, spacing, 13.0)
    scores = compute_mask_metrics(inner, outer, spacing)
    assert scores["hd95_mm"] == pytest.approx(3.0, abs=max(spacing))
    assert scores["msd_mm"] == pytest.approx(3.0, abs=max(spacing))
    assert scores["dice"] == pytest.approx(2 * 10 ** 3 / (10 ** 3 + 13 ** 3), abs=0.03)
    assert scores["iou"] == pytest.approx(10 ** 3 / 13 ** 3, abs=0.03)


def test_an_empty_mask_counts_with_the_image_diagonal_and_both_empty_drop_out():
    truth = np.zeros((20, 30), bool)
    truth[5:10, 5:10] = True
    spacing = (0.5, 2.0)
    diagonal = np.hypot(20 * 0.5, 30 * 2.0)  # 60.83 mm: the slice's field of view
    both_empty = compute_mask_metrics(np.zeros_like(truth), np.zeros_like(truth), spacing)
    assert all(np.isnan(v) for v in both_empty.values())
    assert empty_mask(np.zeros_like(truth), np.zeros_like(truth)) == ""
    missed = compute_mask_metrics(np.zeros_like(truth), truth, spacing)
    false_positive = compute_mask_metrics(truth, np.zeros_like(truth), spacing)
    for scores in (missed, false_positive):
        assert scores == {"dice": 0.0, "iou": 0.0, "hd95_mm": pytest.approx(diagonal),
                          "msd_mm": pytest.approx(diagonal)}
    assert empty_mask(np.zeros_like(truth), truth) == "prediction"
    assert empty_mask(truth, np.zeros_like(truth)) == "truth"
    assert empty_mask(truth, truth) == ""
    assert empty_mask_penalty_mm((4, 20, 30), (3.0, 0.5, 2.0)) == pytest.approx(np.hypot(12.0, diagonal))
    # the penalty outweighs any distance two non-empty masks on the grid can have
    corner = np.zeros_like(truth)
    corner[-1, -1] = True
    assert compute_mask_metrics(corner, truth, spacing)["hd95_mm"] < diagonal
    with pytest.raises(ValueError, match="spacing"):
        compute_mask_metrics(truth, truth, (1.0,))


def test_size_strata_are_shares_of_the_slice_area():
    slice_ = np.zeros((100, 100), bool)
    assert size_stratum(slice_) == "absent"
    slice_.flat[:49] = True
    assert size_stratum(slice_) == "small"
    slice_.flat[:300] = True
    assert size_stratum(slice_) == "medium"
    slice_.flat[:400] = True
    assert size_stratum(slice_) == "large"


# --- per-slice Dice averaged per subject ----------------------------------------------------------


def _case(truth: np.ndarray, labels: dict[str, int]) -> SimpleNamespace:
    return SimpleNamespace(truth=truth, labels=labels, spacing=(3.0, 1.0, 1.0), pixel_spacing=(1.0, 1.0))


def test_subject_dice_is_the_mean_over_slices_where_truth_or_prediction_has_the_label():
    # four 10 x 10 slices of one label; slice 3 is empty in both and is not counted
    truth = np.zeros((4, 10, 10), np.uint8)
    truth[0, 0:4, 0:5] = 1  # 20 px, predicted exactly: Dice 1
    truth[1, 0:4, 0:5] = 1  # 20 px, predicted half (10 px): Dice 2 * 10 / 30
    prediction = np.zeros((4, 10, 10), bool)
    prediction[0] = truth[0] == 1
    prediction[1, 0:2, 0:5] = True
    prediction[2, 5:7, 5:7] = True  # 4 px where the truth has nothing: Dice 0, an empty truth
    slices, volumes = score_case(_case(truth, {"femur": 1}), {"femur": prediction}, [0, 1, 2, 3], slice_step=1)
    assert [row["slice"] for row in slices] == [0, 1, 2]
    assert [row["dice"] for row in slices] == pytest.approx([1.0, 2 / 3, 0.0])
    assert [row["empty"] for row in slices] == ["", "", "truth"]
    assert slices[2]["hd95_mm"] == pytest.approx(np.hypot(10, 10))
    keys = {"dataset": "d", "subject": "s", "model": "m", "prompts": "gt", "postprocess": "off"}
    table = subject_means(pd.DataFrame([{**keys, **row} for row in slices]),
                          pd.DataFrame([{**keys, **row} for row in volumes]))
    row = table.iloc[0]
    assert row["dice"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert (row["counted_slices"], row["missed_slices"], row["false_positive_slices"]) == (3, 0, 1)
    # the per-volume Dice pools the voxels: 2 * 30 / (40 + 34)
    assert row["dice_3d"] == pytest.approx(60 / 74)


def test_the_default_table_averages_slices_then_labels_then_subjects():
    keys = {"dataset": "d", "model": "m", "prompts": "gt", "postprocess": "off", "size": "large",
            "area_share": 0.1, "empty": "", "iou": 0.5, "hd95_mm": 1.0, "msd_mm": 1.0}
    slice_dice = {("s1", "femur"): [1.0, 0.5], ("s1", "tibia"): [0.0], ("s2", "femur"): [0.8, 0.6, 0.4]}
    slices = pd.DataFrame([{**keys, "subject": subject, "label": label, "slice": index, "dice": dice}
                           for (subject, label), values in slice_dice.items() for index, dice in enumerate(values)])
    volumes = pd.DataFrame([{**{k: keys[k] for k in ("dataset", "model", "prompts", "postprocess")},
                             "subject": subject, "label": label, "dice_3d": 0.9, "iou_3d": 0.8, "hd95_mm_3d": 1.0,
                             "msd_mm_3d": 1.0, "truth_voxels": 1, "predicted_voxels": 1, "slices": 3}
                            for subject, label in slice_dice])
    aggregates = summarise(SegmentationResults(slices, subject_means(slices, volumes), []))
    # s1: labels 0.75 and 0.0 -> 0.375; s2: 0.6; dataset: (0.375 + 0.6) / 2
    assert aggregates["table"]["m"].iloc[0] == pytest.approx((0.375 + 0.6) / 2)
    assert aggregates["table_3d"]["m"].iloc[0] == pytest.approx(0.9)
    assert aggregates["subjects"].set_index("subject")["dice"].to_dict() == pytest.approx({"s1": 0.375, "s2": 0.6})


# --- box shift in the model's input frame ----------------------------------------------------------


def test_box_shift_is_drawn_in_pixels_of_the_model_input():
    # a 100 x 200 slice: LiteMedSAM pads it to 200 x 200 and resizes to 256, so one input pixel is 0.78 px
    labels = np.zeros((1, 100, 200), np.uint8)
    labels[0, 20:60, 30:150] = 1
    frame = SquareFrame(100, 200, 256)
    assert input_pixel_size(SimpleNamespace(family="litemedsam"), 100, 200) == (frame.scale, frame.scale)
    assert input_pixel_size(SimpleNamespace(family="sam"), 100, 200) == (200 / 1024, 200 / 1024)
    sam2 = SimpleNamespace(family="sam2", predictor=SimpleNamespace(model=SimpleNamespace(image_size=1024)))
    assert input_pixel_size(sam2, 100, 200) == (200 / 1024, 100 / 1024)  # stretched, not padded

    plain = np.array(truth_prompts(labels, [1], [0])[0][0][1])
    shifted = np.array(truth_prompts(labels, [1], [0], shift_px=20, seed=3,
                                     input_pixel=(frame.scale, frame.scale))[0][0][1])
    drawn = np.random.default_rng(3).uniform(-20, 20, size=(1, 4))[0]
    np.testing.assert_allclose(frame.boxes_to_model(shifted) - frame.boxes_to_model(plain), drawn, atol=1e-4)
    np.testing.assert_allclose(shifted - plain, drawn * 200 / 256, atol=1e-4)
    # SAM2's frame scales x and y apart
    shifted = np.array(truth_prompts(labels, [1], [0], shift_px=20, seed=3,
                                     input_pixel=(200 / 1024, 100 / 1024))[0][0][1])
    np.testing.assert_allclose(shifted - plain, drawn * np.tile([200 / 1024, 100 / 1024], 2), atol=1e-4)


# --- one NIfTI case through the CLI -------------------------------------------------------------------


def _nifti_from_phantom(folder: Path, spacing_factor: float = 1.0) -> dict[str, Path]:
    """A thigh phantom as NIfTI image + label map + label names YAML, optionally with scaled spacing."""
    phantom = folder / "phantom"
    if not (phantom / "truth.json").is_file():
        write_phantom("thigh", phantom, seed=SEED, n_slices=4)
    series = json.loads((phantom / "truth.json").read_text())["series"][0]["folder"]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(phantom / series)))
    files = {"image": folder / f"x{spacing_factor:g}" / "image.nii.gz",
             "labels": folder / f"x{spacing_factor:g}" / "labels.nii.gz",
             "names": folder / "names.yaml"}
    files["image"].parent.mkdir(parents=True, exist_ok=True)
    for image, path in ((reader.Execute(), files["image"]),
                        (sitk.ReadImage(str(phantom / "truth_labels.nii.gz")), files["labels"])):
        image.SetSpacing([s * spacing_factor for s in image.GetSpacing()])
        sitk.WriteImage(image, str(path))
    files["names"].write_text(yaml.safe_dump(THIGH_NAMES))
    return files


def _segment(files: dict[str, Path], out: Path, *prompts: str) -> int:
    return cli.main(["segment", "--image", str(files["image"]), "--labels", str(files["labels"]),
                     "--label-names", str(files["names"]), "--model", "litemedsam", "--prompts", *prompts,
                     "--slice-step", "2", "--out", str(out)])


@pytest.fixture(scope="module")
def nifti_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nifti")
    files = _nifti_from_phantom(folder)
    assert _segment(files, folder / "run", "gt", "shifted") == 0
    return files, folder / "run"


def test_a_nifti_case_with_named_labels_evaluates_end_to_end(nifti_run, capsys):
    _, run = nifti_run
    labels = pd.read_csv(run / "labels.csv")
    assert {"label", "dice", "iou", "hd95_mm", "msd_mm"} <= set(labels.columns)
    assert set(labels.loc[labels["prompts"] == "gt", "label"]) == set(THIGH_NAMES.values())
    slices = pd.read_csv(run / "slices.csv")
    assert set(slices["slice"]) == {1, 3}  # every 2nd slice of 4, centred
    assert set(slices["size"]) <= {"small", "medium", "large", "absent"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"slices", "labels", "summary", "strata", "table"} <= set(metrics)
    assert (run / "dice_by_model_gt_postprocess-off.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_truth_boxes_beat_shifted_boxes_per_label(nifti_run):
    _, run = nifti_run
    dice = pd.read_csv(run / "labels.csv").pivot(index="label", columns="prompts", values="dice")
    print(f"thigh phantom, LiteMedSAM zero-shot, mean Dice over labels: gt {dice['gt'].mean():.3f}, "
          f"shifted by up to 20 px {dice['shifted'].mean():.3f}\n{dice}")
    assert dice["gt"].mean() > dice["shifted"].mean() + 0.1


def test_doubling_the_header_spacing_doubles_distances_and_keeps_dice(nifti_run, tmp_path):
    files, run = nifti_run
    doubled = _nifti_from_phantom(files["image"].parent.parent, spacing_factor=2.0)
    assert _segment(doubled, tmp_path / "run", "gt") == 0
    for table in ("labels", "slices"):
        keys = ["label"] + (["slice"] if table == "slices" else [])
        original = pd.read_csv(run / f"{table}.csv").query("prompts == 'gt'").set_index(keys).sort_index()
        scaled = pd.read_csv(tmp_path / "run" / f"{table}.csv").set_index(keys).sort_index()
        np.testing.assert_allclose(scaled["dice"], original["dice"], atol=1e-6)
        np.testing.assert_allclose(scaled["hd95_mm"], 2 * original["hd95_mm"], rtol=1e-4)
        np.testing.assert_allclose(scaled["msd_mm"], 2 * original["msd_mm"], rtol=1e-4)


def test_a_label_map_off_the_image_grid_is_refused(nifti_run, tmp_path, capsys):
    files, _ = nifti_run
    labels = sitk.ReadImage(str(files["labels"]))
    labels.SetSpacing([1.5 * s for s in labels.GetSpacing()])
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    code = _segment({**files, "labels": tmp_path / "labels.nii.gz"}, tmp_path / "run", "gt")
    assert code == 2
    assert "is not on the voxel grid" in capsys.readouterr().err


# --- experiment ------------------------------------------------------------------------------------


def test_the_experiment_command_writes_the_table_plots_tests_and_overlays(tmp_path, capsys):
    config = {
        "models": [{"name": "litemedsam", "family": "litemedsam"}, {"name": "truth", "family": "truth"}],
        "datasets": [{"name": "thigh", "phantom": "thigh", "seeds": [1, 2, 3], "n_slices": 2}],
        "prompts": ["gt", "detector"], "postprocess": [False, True], "slice_step": 2, "overlay_every": 1,
        "detector_models": str(REPO / "models"), "output": str(tmp_path / "run"),
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["experiment", str(path)]) == 0
    run = tmp_path / "run"
    table = pd.read_csv(run / "table.csv")
    assert list(table.columns) == ["dataset", "prompts", "postprocess", "litemedsam", "truth"]
    assert len(table) == 4
    assert (table["truth"][table["postprocess"] == "off"] == 1.0).all()
    assert table["litemedsam"].between(0.2, 1.0).all()
    for setting in ("gt_postprocess-off", "gt_postprocess-on", "detector_postprocess-off"):
        assert (run / f"dice_by_model_{setting}.png").read_bytes()[:4] == b"\x89PNG"
        assert len(pd.read_csv(run / f"dice_{setting}.csv")) == 6
    comparison = pd.read_csv(run / "comparison.csv")
    assert len(comparison) == 4 and comparison["p"].notna().all()
    overlays = list((run / "overlays" / "thigh").rglob("slice-*.png"))
    assert len(overlays) == 3 * 2 * 2 * 2
    assert yaml.safe_load((run / "config.yaml").read_text()) == config
    assert "mean Dice" in capsys.readouterr().out


def test_the_example_config_is_valid(monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_experiment_config(REPO / "evaluation" / "configs" / "phantom_table.yaml")
    assert [m.name for m in config.models] == ["litemedsam-zero-shot", "node-models"]
    assert config.prompts == ("gt", "shifted", "detector") and config.shift_px == 20


def _config(**changes) -> dict:
    config = {"models": [{"name": "m", "family": "litemedsam"}],
              "datasets": [{"name": "d", "phantom": "knee", "seeds": [1]}]}
    config.update(changes)
    return config


@pytest.mark.parametrize("raw, key", [
    (_config(slice_stepp=2), "'slice_stepp'"),
    (_config(slice_step="two"), "'slice_step'"),
    (_config(datasets=[{"name": "d", "phantom": "knee", "sedes": [1]}]), "'datasets[0].sedes'"),
    (_config(datasets=[{"name": "d", "phantom": "ankle"}]), "'datasets[0].phantom'"),
    (_config(models=[{"name": "m", "family": "sam"}]), "'models[0].checkpoint'"),
    (_config(models=[{"name": "m", "family": "litemedsam", "precision": "fp16"}]), "'models[0].precision'"),
    (_config(prompts=["gt", "boxes"]), "'prompts[1]'"),
    (_config(postprocess=["on"]), "'postprocess[0]'"),
    (_config(prompts=["detector"]), "'detector_models'"),
    (_config(datasets=[{"name": "d", "format": "nifti", "subjects": []}]), "'datasets[0].subjects'"),
    (_config(postprocess=True, datasets=[{"name": "d", "format": "nifti", "label_names": {1: "knee_bone"},
                                          "subjects": [{"id": "s", "image": "i.nii", "labels": "l.nii"}]}]),
     "'datasets[0].label_names.1'"),
    ({"datasets": []}, "'models'"),
])
def test_config_errors_name_the_key(raw, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_experiment_config(raw)


@pytest.mark.parametrize("build, key", [
    (lambda: ModelSpec("m", family="unet"), "'model.family'"),
    (lambda: ModelSpec("m", family="sam2"), "'model.checkpoint'"),
    (lambda: DatasetSpec("d", phantom="ankle"), "'dataset.phantom'"),
    (lambda: ExperimentConfig((ModelSpec("m", family="litemedsam"),), (DatasetSpec("d", phantom="knee"),),
                              slice_step=0), "'slice_step'"),
])
def test_a_config_built_in_code_is_checked_like_one_read_from_yaml(build, key):
    with pytest.raises(ValueError, match=key):
        build()


def test_a_bad_config_file_stops_the_command_naming_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_config(overlay_every=-1)))
    assert cli.main(["segment", "--config", str(path)]) == 2
    assert "'overlay_every'" in capsys.readouterr().err


# --- biomarkers --------------------------------------------------------------------------------------


def test_biomarkers_of_truth_against_truth_are_identical(tmp_path):
    phantom = write_phantom("spine", tmp_path / "spine", seed=SEED)
    series = json.loads((phantom / "truth.json").read_text())["series"][0]["folder"]
    code = cli.main(["biomarkers", "--image", str(phantom / series), "--labels",
                     str(phantom / "truth_labels.nii.gz"), "--model", "truth", "--postprocess", "off",
                     "--out", str(tmp_path / "run")])
    assert code == 0
    table = pd.read_csv(tmp_path / "run" / "biomarkers.csv")
    assert {"subject", "structure", "measurement", "truth_value", "model_value", "unit"} <= set(table.columns)
    assert {"disc_height", "volume"} <= set(table["measurement"])
    assert set(table.loc[table["measurement"] == "disc_height", "unit"]) == {"mm"}
    np.testing.assert_array_equal(table["model_value"], table["truth_value"])
    long = pd.read_csv(tmp_path / "run" / "biomarkers_long.csv")
    assert set(long["model"]) == {"manual", "truth"}
    # structures cut by the field of view have no value on either side, only the reason; the long table skips them
    measured = table["truth_value"].notna()
    assert table.loc[~measured, "reason"].str.contains("cut by field of view").all()
    assert len(long) == 2 * measured.sum()


def test_biomarkers_need_a_dicom_series(nifti_run, tmp_path, capsys):
    files, _ = nifti_run
    code = cli.main(["biomarkers", "--image", str(files["image"]), "--labels", str(files["labels"]),
                     "--label-names", str(files["names"]), "--model", "truth", "--out", str(tmp_path)])
    assert code == 2
    assert "need a DICOM series" in capsys.readouterr().err


def test_a_real_data_dataset_is_one_split_and_source_of_the_training_data_file(tmp_path):
    """Validation cases read exactly as training reads them: sagittal slices, node label values."""
    real_data = REPO / "training" / "configs" / "real_data.yaml"
    config = parse_experiment_config({
        "models": [{"name": "truth", "family": "truth"}],
        "datasets": [{"name": "chu", "real_data": str(real_data), "split": "validation", "source": "chu-vb"}]})
    from msk_node_evaluation.cases import iter_cases
    from msk_node.labels import load_label_map

    try:
        cases = list(iter_cases(config.datasets[0], load_label_map(config.label_map_path), tmp_path))
    except FileNotFoundError as error:
        pytest.skip(f"shared data not here: {error}")
    assert [case.subject for case in cases] == ["lumbar-vb-chu-04"]
    case = cases[0]
    assert case.labels == {"vertebral_body": 16} and case.anatomy == "spine" and case.spacing == (1.0, 1.0, 1.0)
    # rows run superior to inferior: the seven labelled bodies stack down the rows of a mid-sagittal slice
    middle = case.truth[int(np.argmax((case.truth > 0).sum(axis=(1, 2))))]
    rows = np.flatnonzero((middle > 0).any(axis=1))
    columns = np.flatnonzero((middle > 0).any(axis=0))
    assert rows.max() - rows.min() > 150 > columns.max() - columns.min()
    with pytest.raises(ValueError, match="split"):
        parse_experiment_config({"models": [{"name": "truth", "family": "truth"}],
                                 "datasets": [{"name": "x", "real_data": "r.yaml", "split": "test", "source": "s"}]})
