"""Where the models folder is found when none is passed (kept free of heavy imports for the command lines)."""
from __future__ import annotations

import os
from pathlib import Path

#: Environment variables that name the models folder, in order (HOLOSCAN_MODEL_PATH: the MAP contract's).
MODELS_ENVIRONMENT = ("MSK_NODE_MODELS", "HOLOSCAN_MODEL_PATH")
#: How a user names the models folder, for error messages.
HOW_TO_PASS_MODELS = "pass the models folder with -m MODELS (the node: models_dir in its config) or set MSK_NODE_MODELS"


def default_models_dir() -> Path:
    """The models folder when none is passed: the first of :data:`MODELS_ENVIRONMENT` that is set, else
    ``models/`` in the current directory (a checkout). Never a folder beside the installed code."""
    for name in MODELS_ENVIRONMENT:
        if os.environ.get(name):
            return Path(os.environ[name]).absolute()
    return Path("models").absolute()
