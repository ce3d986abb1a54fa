"""The msk-node MONAI Deploy application: an MSK MRI study in, DICOM-SEG out."""
from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from msk_node import __version__
from msk_node.models import load_models
from operators import (
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


class MskSegmentationApp(Application):
    """Detect MSK anatomy with YOLO, segment it with a box-prompted SAM-family model, measure, write SEG + SR.

    Paths follow the MAP contract: ``-i/-o/-m`` or HOLOSCAN_INPUT_PATH,
    HOLOSCAN_OUTPUT_PATH and HOLOSCAN_MODEL_PATH. The models folder holds the named
    models ``detector`` and ``segmenter`` (see :mod:`msk_node.models`).
    """

    name = "msk-node"
    description = __doc__
    version = __version__

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        input_folder = Path(context.input_path)
        output_folder = Path(context.output_path)
        models = load_models(Path(context.model_path))
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
