"""Clean the raw masks and merge them into one label volume per series."""
from __future__ import annotations

from monai.deploy.core import Fragment

from msk_node.labels import LabelMap
from msk_node.pipeline import StudyWork, postprocess_all
from msk_node_operators.study_step import StudyStepOperator


class PostprocessOperator(StudyStepOperator):
    """Input and output ``study``; kernel sizes and priorities come from the label map."""

    def __init__(self, fragment: Fragment, *args, label_map: LabelMap, **kwargs) -> None:
        self.label_map = label_map
        super().__init__(fragment, *args, **kwargs)

    def apply(self, work: StudyWork) -> None:
        postprocess_all(work, self.label_map)
