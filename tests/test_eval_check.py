"""msk-eval check on a knee phantom with the default models: figures in real units, overlays in label colours."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from msk_node_evaluation import cli
from msk_node.dicom_input import read_study_folder
from msk_node.labels import DEFAULT_LABEL_MAP_PATH, load_label_map
from msk_node_phantoms import write_phantom
from msk_node.volume import series_to_volume
from tests.dicom_checks import seg_label_volume


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    case = write_phantom("knee", root / "phantom", seed=7, n_slices=12)
    study = case / "dicom"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["check", str(study), "--out", str(root / "out")])
    return code, study, root / "out" / "dicom", printed.getvalue()


def test_check_writes_figures_that_agree_with_the_written_labels(checked):
    code, study, out, printed = checked
    assert code == 0
    assert "femur" in printed and "tibia" in printed
    label_map = load_label_map(DEFAULT_LABEL_MAP_PATH)
    figures = json.loads((out / "figures.json").read_text())
    (entry,) = figures["series"]
    assert entry["outcome"] == "segmented" and entry["anatomy"] == "knee"
    report = json.loads((out / "report.json").read_text())
    assert entry["plausibility"] == report["series"][0]["plausibility"]

    # The label volume the node wrote, read back from its SEG, and the geometry from the DICOM attributes.
    datasets = series_to_volume(read_study_folder(study).series[0].datasets).datasets
    (seg_path,) = out.glob("seg-*.dcm")
    labels = seg_label_volume(hd.seg.segread(seg_path), datasets, label_map)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    orientation = np.array([float(v) for v in datasets[0].ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in datasets[0].PixelSpacing)
    voxel_mm3 = row_spacing * column_spacing * float(np.linalg.norm(positions[1] - positions[0]))

    by_name = {item["label"]: item for item in entry["labels"]}
    assert {"femur", "tibia"} <= set(by_name)
    assert set(by_name) == {label_map.by_value(int(v)).name for v in np.unique(labels) if v}
    for name, item in by_name.items():
        mask = labels == label_map.by_name(name).value
        k, r, c = np.nonzero(mask)
        assert item["volume_cm3"] == pytest.approx(mask.sum() * voxel_mm3 / 1000, abs=1e-4)
        centroid = positions[k].mean(axis=0) + c.mean() * column_spacing * orientation[:3] \
            + r.mean() * row_spacing * orientation[3:]
        np.testing.assert_allclose(item["centroid_mm"], centroid, atol=0.01)
        assert item["components"] == ndimage.label(mask, structure=np.ones((3, 3, 3)))[1]
        assert (item["slices"], item["first_slice"], item["last_slice"]) == (len(set(k)), k.min(), k.max())
    # Knee anatomy in patient coordinates: the tibia below the femur (S = +z), the patella in front (A = -y).
    assert by_name["tibia"]["centroid_mm"][2] < by_name["femur"]["centroid_mm"][2] - 30
    if "patella" in by_name:
        assert by_name["patella"]["centroid_mm"][1] < by_name["femur"]["centroid_mm"][1]

    with (out / "figures.csv").open() as handle:
        rows = {row["label"]: row for row in csv.DictReader(handle)}
    for name, item in by_name.items():
        assert float(rows[name]["volume_cm3"]) == pytest.approx(item["volume_cm3"])
        assert float(rows[name]["centroid_z_mm"]) == pytest.approx(item["centroid_mm"][2])
        assert int(rows[name]["components"]) == item["components"]


def test_check_draws_overlays_in_the_label_colours(checked):
    _, _, out, _ = checked
    label_map = load_label_map(DEFAULT_LABEL_MAP_PATH)
    (entry,) = json.loads((out / "figures.json").read_text())["series"]
    paths = [out / path for path in entry["overlays"]]
    assert 3 <= len(paths) <= 5 and all(path.is_file() for path in paths)
    found = set()
    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        assert image.std() > 10
        for name in ("femur", "tibia"):
            if (image == label_map.by_name(name).colour).all(axis=2).sum() > 50:
                found.add(name)
    assert found == {"femur", "tibia"}
