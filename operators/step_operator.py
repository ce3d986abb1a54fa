"""One pipeline step as an operator: a named input port per value the step reads, an output port per value it makes."""
from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.pipeline import Resources, Step, run_step


class StepOperator(Operator):
    """Runs ``step`` on every series still in play.

    Inputs: the step's ``inputs`` (values keyed by SeriesInstanceUID, or the study-wide
    ``study``) and ``records``, where failures are recorded. Outputs: the step's ``outputs``,
    keyed by series; a series that failed has no entry.
    """

    def __init__(self, fragment: Fragment, *args, step: Step, resources: Resources, **kwargs) -> None:
        self.step = step
        self.pipeline_resources = resources
        super().__init__(fragment, *args, **kwargs)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.step.inputs, "records")))

    def setup(self, spec: OperatorSpec) -> None:
        for name in self.input_names:
            spec.input(name)
        for name in self.step.outputs:
            spec.output(name)

    def compute(self, op_input, op_output, context) -> None:
        values = {name: op_input.receive(name) for name in self.input_names}
        for name, value in run_step(self.step, values, self.pipeline_resources).items():
            op_output.emit(value, name)
