"""Drop anatomically implausible components of each series' label volume before it is measured and written."""
from __future__ import annotations

from monai.deploy.core import Fragment

from msk_node.labels import LabelMap
from msk_node.pipeline import StudyWork, plausibility_all
from msk_node_operators.study_step import StudyStepOperator


class PlausibilityOperator(StudyStepOperator):
    """Input and output ``study``; the findings go to each series' entry in ``report.json``."""

    def __init__(self, fragment: Fragment, *args, label_map: LabelMap, **kwargs) -> None:
        self.label_map = label_map
        super().__init__(fragment, *args, **kwargs)

    def apply(self, work: StudyWork) -> None:
        plausibility_all(work, self.label_map)
