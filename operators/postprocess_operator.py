"""Clean the raw masks and merge them into one label volume per series."""
from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.labels import LabelMap
from msk_node.pipeline import postprocess_all


class PostprocessOperator(Operator):
    """Input and output ``study``; kernel sizes and priorities come from the label map."""

    def __init__(self, fragment: Fragment, *args, label_map: LabelMap, **kwargs) -> None:
        self.label_map = label_map
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        postprocess_all(work, self.label_map)
        op_output.emit(work, "study")
