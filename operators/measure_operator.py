"""Compute the biomarkers that apply to each segmented series."""
from __future__ import annotations

from monai.deploy.core import Fragment

from msk_node.labels import LabelMap
from msk_node.pipeline import StudyWork, measure_all
from msk_node_operators.study_step import StudyStepOperator


class MeasureOperator(StudyStepOperator):
    """Input and output ``study``; thickness, relaxation times, disc heights and volumes in real units."""

    def __init__(self, fragment: Fragment, *args, label_map: LabelMap, **kwargs) -> None:
        self.label_map = label_map
        super().__init__(fragment, *args, **kwargs)

    def apply(self, work: StudyWork) -> None:
        measure_all(work, self.label_map)
