"""Stack each selected series into a volume in patient space."""
from __future__ import annotations

from monai.deploy.core import Operator, OperatorSpec

from msk_node.pipeline import build_volumes


class SeriesVolumeOperator(Operator):
    """Input and output ``study``; a series without usable geometry is marked failed."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        build_volumes(work)
        op_output.emit(work, "study")
