"""MONAI Deploy operators of msk-node: thin wrappers over :mod:`msk_node.pipeline`.

Every operator receives the study's :class:`~msk_node.pipeline.StudyWork` on its
``study`` port, applies one pipeline step to each series still in play, and emits it.
"""
from msk_node_operators.detection_operator import DetectionOperator
from msk_node_operators.measure_operator import MeasureOperator
from msk_node_operators.plausibility_operator import PlausibilityOperator
from msk_node_operators.postprocess_operator import PostprocessOperator
from msk_node_operators.seg_writer_operator import SegWriterOperator
from msk_node_operators.segmentation_operator import SegmentationOperator
from msk_node_operators.series_volume_operator import SeriesVolumeOperator
from msk_node_operators.study_loader_operator import StudyLoaderOperator

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
