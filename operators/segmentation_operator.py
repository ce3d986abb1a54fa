"""Segment every detected box with the box-prompted segmenter."""
from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.models import ModelSet
from msk_node.pipeline import segment_all


class SegmentationOperator(Operator):
    """Input and output ``study``; each slice is encoded once and all its boxes decoded together."""

    def __init__(self, fragment: Fragment, *args, models: ModelSet, **kwargs) -> None:
        self.models = models
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        segment_all(work, self.models)
        op_output.emit(work, "study")
