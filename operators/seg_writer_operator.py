"""Write a DICOM-SEG, a TID 1500 SR and Parametric Maps per segmented series, the tables and the study report."""
from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.models import ModelSet
from msk_node.pipeline import write_outputs


class SegWriterOperator(Operator):
    """Input ``study``; writes ``seg-*.dcm``, ``sr-*.dcm``, ``pmap-*.dcm``, ``measurements.*`` and ``report.json``."""

    def __init__(self, fragment: Fragment, *args, models: ModelSet, **kwargs) -> None:
        self.models = models
        self.report: dict | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")

    def compute(self, op_input, op_output, context) -> None:
        work = op_input.receive("study")
        self.report = write_outputs(work, self.models)
