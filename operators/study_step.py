"""The shape every pipeline operator after the loader shares: a study in, the same study out."""
from __future__ import annotations

from monai.deploy.core import Operator, OperatorSpec

from msk_node.pipeline import StudyWork


class StudyStepOperator(Operator):
    """Receives :class:`StudyWork` on ``study``, applies :meth:`apply`, emits it on ``study``."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        self.apply(work)
        op_output.emit(work, "study")

    def apply(self, work: StudyWork) -> None:
        raise NotImplementedError
