"""Compute the biomarkers that apply to each segmented series."""
from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.labels import LabelMap
from msk_node.pipeline import measure_all


class MeasureOperator(Operator):
    """Input and output ``study``; thickness, relaxation times, disc heights and volumes in real units."""

    def __init__(self, fragment: Fragment, *args, label_map: LabelMap, **kwargs) -> None:
        self.label_map = label_map
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        measure_all(work, self.label_map)
        op_output.emit(work, "study")
