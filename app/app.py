"""The msk-node MONAI Deploy application: an MSK MRI study in, DICOM-SEG out."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.core.runtime_env import RuntimeEnv

from msk_node import __version__
from msk_node.models import load_models
from msk_node.status import EXIT_BAD_INPUT, EXIT_BAD_MODELS, describe_error
from msk_node_operators import (
    DetectionOperator,
    MeasureOperator,
    PlausibilityOperator,
    PostprocessOperator,
    SegmentationOperator,
    SegWriterOperator,
    SeriesVolumeOperator,
    StudyLoaderOperator,
)

logger = logging.getLogger(__name__)


class CannotRun(Exception):
    """The application cannot run the study at all; ``exit_code`` says why (see README, "Status contract")."""

    def __init__(self, exit_code: int, reason: str) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


def requested_paths(argv: list[str]) -> tuple[Path, Path, Path]:
    """Input, output and model paths as the MAP contract gives them (``-i/-o/-m``, else the environment).

    Read before MONAI Deploy's own parser, which exits on a missing path before the
    output folder is known, so that status.json can still say why.
    """
    parser = argparse.ArgumentParser(add_help=False)
    for short, long in (("-i", "--input"), ("-o", "--output"), ("-m", "--model")):
        parser.add_argument(short, long)
    args, _ = parser.parse_known_args(argv[1:])
    env = RuntimeEnv()
    return Path(args.input or env.input), Path(args.output or env.output), Path(args.model or env.model)


def check_input_folder(folder: Path) -> None:
    """A folder the application can list and read, or :class:`CannotRun` with the reason."""
    if not folder.is_dir():
        raise CannotRun(EXIT_BAD_INPUT, f"input folder {folder} is not a folder")
    try:
        next(folder.iterdir(), None)
    except OSError as error:
        raise CannotRun(EXIT_BAD_INPUT, f"input folder {folder} cannot be read: {describe_error(error)}") from error
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CannotRun(EXIT_BAD_INPUT, f"input folder {folder} cannot be read")


class MskSegmentationApp(Application):
    """Detect MSK anatomy with YOLO, segment it with a box-prompted SAM-family model, measure, write SEG + SR.

    Paths follow the MAP contract: ``-i/-o/-m`` or HOLOSCAN_INPUT_PATH,
    HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH. The models folder holds the named
    models ``detector`` and ``segmenter`` (see :mod:`msk_node.models`).
    """

    name = "msk-node"
    description = __doc__
    version = __version__
    #: Where status.json goes; known once compose has read the paths.
    output_folder: Path | None = None

    def compose(self) -> None:
        input_folder, self.output_folder, model_folder = requested_paths(self.argv)
        check_input_folder(input_folder)
        if not model_folder.exists():
            raise CannotRun(EXIT_BAD_MODELS, f"model folder {model_folder} does not exist")
        context = Application.init_app_context(self.argv)
        input_folder, output_folder = Path(context.input_path), Path(context.output_path)
        try:
            models = load_models(Path(context.model_path))
        except Exception as error:  # noqa: BLE001 - any failure to load the models means the study cannot run
            raise CannotRun(EXIT_BAD_MODELS, f"models not loaded: {describe_error(error)}") from error
        logger.info("models: %s", models.provenance())

        loader = StudyLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder,
                                     output_folder=output_folder, name="study_loader")
        volumes = SeriesVolumeOperator(self, name="series_to_volume")
        detection = DetectionOperator(self, models=models, name="detect")
        segmentation = SegmentationOperator(self, models=models, name="segment")
        postprocess = PostprocessOperator(self, label_map=models.label_map, name="postprocess")
        plausibility = PlausibilityOperator(self, label_map=models.label_map, name="plausibility")
        measure = MeasureOperator(self, label_map=models.label_map, name="measure")
        writer = SegWriterOperator(self, models=models, name="seg_sr_writer")

        self.add_flow(loader, volumes, {("study", "study")})
        self.add_flow(volumes, detection, {("study", "study")})
        self.add_flow(detection, segmentation, {("study", "study")})
        self.add_flow(segmentation, postprocess, {("study", "study")})
        self.add_flow(postprocess, plausibility, {("study", "study")})
        self.add_flow(plausibility, measure, {("study", "study")})
        self.add_flow(measure, writer, {("study", "study")})
