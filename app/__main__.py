"""``python -m msk_node_app``: run the application and keep the status contract (README, "Status contract").

Whatever happens, status.json is in the output folder when the process exits on its own,
and the exit code says whether the study ran (0) or why it could not.
"""
import logging
import sys

from msk_node_app.app import CannotRun, MskSegmentationApp
from msk_node.pipeline import write_status
from msk_node.status import EXIT_INTERNAL_ERROR, EXIT_RAN, STATUS_FILE, Outcome, describe_error

logger = logging.getLogger("msk_node_app")


def main(argv: list[str] | None = None) -> int:
    """Run the application on ``argv`` (``sys.argv`` by default) and return the exit code of the contract."""
    app = MskSegmentationApp(argv) if argv is not None else MskSegmentationApp()
    try:
        app.run()
    except CannotRun as error:
        exit_code, reason = error.exit_code, str(error)
    except Exception as error:  # noqa: BLE001 - reported in status.json and by the exit code
        logger.exception("the application failed")
        exit_code, reason = EXIT_INTERNAL_ERROR, f"internal error: {describe_error(error)}"
    else:
        if app.output_folder is not None and (app.output_folder / STATUS_FILE).is_file():
            return EXIT_RAN
        # The graph ended without its writer running: an operator failed and the executor carried on.
        exit_code, reason = EXIT_INTERNAL_ERROR, "internal error: the study ended before its results were written"
    logger.error("could not run: %s", reason)
    if app.output_folder is not None:
        write_status(app.output_folder, Outcome.NOT_RUN, reason, exit_code=exit_code)
    return exit_code


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    sys.exit(main())
