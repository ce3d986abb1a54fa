"""Read the input folder and select the series to segment."""
from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.pipeline import LOADER_OUTPUTS, Resources, load_study, loaded_values


class StudyLoaderOperator(Operator):
    """Source operator. Outputs ``study`` (:class:`~msk_node.pipeline.LoadedStudy`), ``series`` (the selected
    series keyed by SeriesInstanceUID) and ``records`` (each selected series' record)."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, resources: Resources, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        self.pipeline_resources = resources
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in LOADER_OUTPUTS:
            spec.output(name)

    def compute(self, op_input, op_output, context) -> None:
        with self.pipeline_resources.times.stage("load"):
            study = load_study(self.input_folder, self.pipeline_resources.rules)
        values = loaded_values(study)
        for name in LOADER_OUTPUTS:
            op_output.emit(values[name], name)
