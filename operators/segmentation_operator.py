"""Segment every detected box with the box-prompted segmenter."""
from __future__ import annotations

from monai.deploy.core import Fragment

from msk_node.models import ModelSet
from msk_node.pipeline import StudyWork, segment_all
from msk_node_operators.study_step import StudyStepOperator


class SegmentationOperator(StudyStepOperator):
    """Input and output ``study``; each slice is encoded once and all its boxes decoded together."""

    def __init__(self, fragment: Fragment, *args, models: ModelSet, **kwargs) -> None:
        self.models = models
        super().__init__(fragment, *args, **kwargs)

    def apply(self, work: StudyWork) -> None:
        segment_all(work, self.models)
