"""MONAI Deploy operators of msk-node: thin wrappers over :mod:`msk_node.pipeline`.

The loader emits the study, its selected series and their records; one :class:`StepOperator`
per entry of :data:`msk_node.pipeline.STEPS` receives the values its step reads, each keyed by
series, and emits the values it makes; the writer receives what goes into the files.
"""
from msk_node_operators.seg_writer_operator import SegWriterOperator
from msk_node_operators.step_operator import StepOperator
from msk_node_operators.study_loader_operator import StudyLoaderOperator

__all__ = ["SegWriterOperator", "StepOperator", "StudyLoaderOperator"]
