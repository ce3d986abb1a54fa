"""Find the anatomy of each series: per-slice boxes with labels."""
from __future__ import annotations

from monai.deploy.core import Fragment

from msk_node.models import ModelSet
from msk_node.pipeline import StudyWork, detect_all
from msk_node_operators.study_step import StudyStepOperator


class DetectionOperator(StudyStepOperator):
    """Input and output ``study``; uses the detector of the loaded models."""

    def __init__(self, fragment: Fragment, *args, models: ModelSet, **kwargs) -> None:
        self.models = models
        super().__init__(fragment, *args, **kwargs)

    def apply(self, work: StudyWork) -> None:
        detect_all(work, self.models)
