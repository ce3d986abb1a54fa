"""MONAI Deploy operators of msk-node: thin wrappers over :mod:`msk_node.pipeline`.

Every operator receives the study's :class:`~msk_node.pipeline.StudyWork` on its
``study`` port, applies one pipeline step to each series still in play, and emits it.
"""
from operators.detection_operator import DetectionOperator
from operators.measure_operator import MeasureOperator
from operators.plausibility_operator import PlausibilityOperator
from operators.postprocess_operator import PostprocessOperator
from operators.seg_writer_operator import SegWriterOperator
from operators.segmentation_operator import SegmentationOperator
from operators.series_volume_operator import SeriesVolumeOperator
from operators.study_loader_operator import StudyLoaderOperator

__all__ = [
    "DetectionOperator",
    "MeasureOperator",
    "PlausibilityOperator",
    "PostprocessOperator",
    "SegWriterOperator",
    "SegmentationOperator",
    "SeriesVolumeOperator",
    "StudyLoaderOperator",
]
