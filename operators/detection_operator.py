"""Find the anatomy of each series: per-slice boxes with labels."""
from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.models import ModelSet
from msk_node.pipeline import detect_all


class DetectionOperator(Operator):
    """Input and output ``study``; uses the detector of the loaded models."""

    def __init__(self, fragment: Fragment, *args, models: ModelSet, **kwargs) -> None:
        self.models = models
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        detect_all(work, self.models)
        op_output.emit(work, "study")
