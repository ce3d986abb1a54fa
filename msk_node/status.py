"""The status contract between the application and the node (README, "Status contract").

The application writes status.json in its output folder on every run it survives; the node
reads it to decide whether the study ran and which results to deliver. Kept free of heavy
imports: the node process reads it without loading the models.
"""
from __future__ import annotations

from enum import StrEnum

#: The application's own result list beside the SEGs (see README, "Status contract").
STATUS_FILE = "status.json"
#: The application's exit codes (README, "Status contract"); any other code means it crashed or was killed.
EXIT_RAN, EXIT_INTERNAL_ERROR, EXIT_BAD_MODELS, EXIT_BAD_INPUT = 0, 1, 3, 4


class Outcome(StrEnum):
    """What happened to a series (its ``outcome`` in report.json) or to the application run (status.json)."""

    PENDING = "pending"
    SEGMENTED = "segmented"
    NOTHING_FOUND = "nothing found"
    FAILED = "failed"
    #: The application as a whole: it ran (whatever the series outcomes) or could not run at all.
    RAN = "ran"
    NOT_RUN = "could not run"


def describe_error(error: BaseException) -> str:
    """``"KeyError: 'x'"``: the exception's type names what went wrong where its message alone does not."""
    return f"{type(error).__name__}: {error}"
