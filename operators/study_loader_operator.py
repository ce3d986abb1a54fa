"""Read the input folder and select the series to segment."""
from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from msk_node.pipeline import StudyWork, load_study
from msk_node.selection import load_rules


class StudyLoaderOperator(Operator):
    """Source operator. Output ``study``: a :class:`StudyWork` with one job per selected series."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, output_folder: Path,
                 rules_path: Path | None = None, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        self.output_folder = Path(output_folder)
        self.rules = load_rules(rules_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("study")

    def compute(self, op_input, op_output, context) -> None:
        work = StudyWork(output_dir=self.output_folder)
        load_study(work, self.input_folder, self.rules)
        op_output.emit(work, "study")
