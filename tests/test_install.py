"""msk-node installed from its wheel, not from a checkout: the wheel holds only msk_node* packages, and
``msk-node run`` segments a study from a folder outside the checkout with nothing but ``-m`` to find the models.

The wheel goes into a fresh virtual environment whose only link to the project's environment is a .pth line
naming its site-packages, for the third-party packages; that folder's own .pth files (the editable install of
this checkout among them) are not read, so the installed wheel is all of msk-node that the run can import.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pydicom
import pytest

from msk_node.status import EXIT_BAD_MODELS, EXIT_RAN, STATUS_FILE, Outcome
from msk_node_phantoms import write_phantom
from tests.dicom_checks import dciodvfy_errors

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
#: Phantom seeds never used to train the default detector (as in test_pipeline.py).
TEST_SEED = 424242
SEG_STORAGE = pydicom.uid.SegmentationStorage


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources: setuptools builds in the source folder and would add
    whatever an earlier build left in its build/ folder."""
    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".devpath", "build", "*.egg-info", "__pycache__", "models", "runs", "out"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(folder), str(source)], check=True, capture_output=True, text=True)
    (built,) = folder.glob("msk_node-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh environment with the wheel installed (not editable); returns its bin folder."""
    folder = tmp_path_factory.mktemp("installed")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    (site_packages,) = folder.glob("lib/python*/site-packages")
    (site_packages / "third_party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, env=clean_environment())
    return folder / "bin"


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would point Python at the checkout."""
    left_out = ("PYTHONPATH", "MSK_NODE_MODELS", "HOLOSCAN_MODEL_PATH", "VIRTUAL_ENV")
    return {key: value for key, value in os.environ.items() if key not in left_out}


def test_wheel_installs_only_packages_named_after_the_project(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"msk_node", "msk_node_app", "msk_node_operators", "msk_node_service", "msk_node_phantoms",
                         "msk_node_training", "msk_node_evaluation"}
    # Package data: the series rules, the label map, the training and evaluation configs.
    for data in ("msk_node/config/series_rules.yaml", "msk_node/config/series_rules.json",
                 "msk_node/config/label_map.yaml", "msk_node_training/configs/real_data.yaml",
                 "msk_node_evaluation/configs/phantom_table.yaml"):
        assert data in names, data
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ("msk-node = msk_node.cli:main", "msk-train = msk_node_training.cli:main",
                 "msk-eval = msk_node_evaluation.cli:main"):
        assert line in scripts


def test_installed_msk_node_segments_a_study_outside_the_checkout(installed, tmp_path):
    study = write_phantom("spine", tmp_path / "case", seed=TEST_SEED + 10, n_slices=5) / "dicom"
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = clean_environment()
    # The interpreter imports msk-node from the installed wheel, not from this checkout.
    where = subprocess.run([str(installed / "python"), "-c", "import msk_node, msk_node_app; "
                            "print(msk_node.__file__); print(msk_node_app.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(path).is_relative_to(installed.parent) for path in where), where

    result = subprocess.run([str(installed / "msk-node"), "run", "-i", str(study), "-o", "out", "-m", str(MODELS)],
                            cwd=work, env=env, capture_output=True, text=True, timeout=900)

    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads((work / "out" / STATUS_FILE).read_text())
    assert status["outcome"] == Outcome.RAN and status["exit_code"] == EXIT_RAN
    (seg,) = [entry["file"] for entry in status["results"] if entry["sop_class_uid"] == SEG_STORAGE]
    (series,) = json.loads((work / "out" / "report.json").read_text())["series"]
    assert series["outcome"] == "segmented" and series["seg"] == seg
    assert set(series["labels"]) == {"vertebral_body", "intervertebral_disc"}
    assert pydicom.dcmread(work / "out" / seg).Modality == "SEG"
    assert dciodvfy_errors(work / "out" / seg) == []


def test_installed_msk_node_without_models_says_how_to_pass_them(installed, tmp_path):
    study = write_phantom("spine", tmp_path / "case", seed=TEST_SEED + 11, n_slices=5) / "dicom"
    result = subprocess.run([str(installed / "msk-node"), "run", "-i", str(study), "-o", "out"],
                            cwd=tmp_path, env=clean_environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == EXIT_BAD_MODELS
    assert f"models folder not found: {tmp_path / 'models'}" in result.stderr
    assert "-m MODELS" in result.stderr
