"""Stack each selected series into a volume in patient space."""
from __future__ import annotations

from msk_node.pipeline import StudyWork, build_volumes
from msk_node_operators.study_step import StudyStepOperator


class SeriesVolumeOperator(StudyStepOperator):
    """Input and output ``study``; a series without usable geometry is marked failed."""

    def apply(self, work: StudyWork) -> None:
        build_volumes(work)
