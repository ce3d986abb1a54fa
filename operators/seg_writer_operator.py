"""Write a DICOM-SEG, a TID 1500 SR and Parametric Maps per segmented series, the tables and the study report."""
from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.pipeline import WRITER_INPUTS, Resources, StudyOutputs, write_outputs


class SegWriterOperator(Operator):
    """Inputs :data:`~msk_node.pipeline.WRITER_INPUTS` (the study, the records, and per series its volume, label
    volume, plausibility findings, measurements and scores); writes ``seg-*.dcm``, ``sr-*.dcm``, ``pmap-*.dcm``,
    ``report-*.pdf.dcm`` and ``report-*.sc.dcm`` (the clinician report), ``measurements.*``, ``report.json`` and
    ``status.json``."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, resources: Resources, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.pipeline_resources = resources
        self.written: StudyOutputs | None = None
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in WRITER_INPUTS:
            spec.input(name)

    def compute(self, op_input, op_output, context) -> None:
        values = [op_input.receive(name) for name in WRITER_INPUTS]
        self.written = write_outputs(*values, resources=self.pipeline_resources, output_dir=self.output_folder)
