"""Runs of the default pipeline shared by the test modules that check their outputs (each run costs minutes),
and the node fixtures of the service and dashboard tests."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from msk_node.models import ModelSet, load_models
from msk_node_phantoms import write_phantom
from msk_node.pipeline import StudyRun, process_study

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
REAL_KNEE = Path(os.environ.get("MSK_NODE_REAL_KNEE", REPO.parent / "shared" / "data" / "knee-mri-ge-3t"))
#: Phantom seed never used to train the default models.
TEST_SEED = 424242
#: PyTorch's thread count before any test changes it: every shared run uses it, so results do not depend on
#: which tests ran before (the reduction order of a thread pool follows its size).
DEFAULT_THREADS = torch.get_num_threads()


def real_knee_as_one_study(folder: Path) -> Path:
    """Copies of the real knee's series under one StudyInstanceUID (the first DESS echo's), as on the scanner:
    the anonymisation gave each series a study of its own. The user's files are never altered."""
    import pydicom

    study_uid = str(pydicom.dcmread(next(iter(sorted((REAL_KNEE / "dess-echo1").rglob("*.dcm")))),
                                    stop_before_pixels=True).StudyInstanceUID)
    for path in sorted(REAL_KNEE.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        target = folder / path.relative_to(REAL_KNEE)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
    return folder


def run_pipeline(input_dir: Path, output_dir: Path, models: ModelSet) -> StudyRun:
    """``process_study`` with PyTorch's default thread count."""
    torch.set_num_threads(DEFAULT_THREADS)
    return process_study(input_dir, output_dir, models)


@pytest.fixture(scope="session")
def models() -> ModelSet:
    return load_models(MODELS)


@pytest.fixture(scope="session")
def phantom_run(tmp_path_factory, models) -> Callable[[str], tuple[Path, Path, StudyRun]]:
    """``run(kind)``: the phantom of ``kind`` (seed TEST_SEED) through the default pipeline, once per session.
    Returns the phantom folder, the output folder and the study's work."""
    done: dict[str, tuple[Path, Path, StudyRun]] = {}

    def run(kind: str) -> tuple[Path, Path, StudyRun]:
        if kind not in done:
            root = tmp_path_factory.mktemp(f"pipeline-{kind}")
            case = write_phantom(kind, root / "case", seed=TEST_SEED)
            done[kind] = (case, root / "out", run_pipeline(case / "dicom", root / "out", models))
        return done[kind]

    return run


@pytest.fixture(scope="session")
def real_knee_run(tmp_path_factory, models) -> tuple[Path, StudyRun]:
    """The real knee study (DESS echoes and CubeQuant series, one StudyInstanceUID) through the default pipeline:
    output folder, work."""
    if not (REAL_KNEE / "dess-echo1").is_dir():
        pytest.skip(f"real knee data not found at {REAL_KNEE}")
    root = tmp_path_factory.mktemp("real-knee")
    study = real_knee_as_one_study(root / "study")
    return root / "out", run_pipeline(study, root / "out", models)


@pytest.fixture
def dest():
    """A pynetdicom storage SCP ("DEST") on loopback that keeps what it receives."""
    from tests.service_helpers import StoreSCP

    scp = StoreSCP("DEST")
    yield scp
    scp.stop()


@pytest.fixture
def nodes():
    """Start nodes through this function; every one is stopped at the end."""
    from msk_node_service import Node, NodeConfig

    started: list[Node] = []

    def start(config: NodeConfig) -> Node:
        node = Node(config).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
