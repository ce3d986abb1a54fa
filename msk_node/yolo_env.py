"""Keep Ultralytics offline: no DNS checks, no font download, no settings in $HOME.

Must run before ``ultralytics`` is imported; :func:`import_yolo` does both.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def configure_offline_ultralytics(config_dir: Path | None = None) -> Path:
    """Point Ultralytics at a private config dir holding a local font, and turn off online features."""
    config_dir = Path(
        config_dir or os.environ.get("YOLO_CONFIG_DIR") or Path.home() / ".cache" / "msk-node" / "ultralytics"
    )
    config_dir.mkdir(parents=True, exist_ok=True)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["YOLO_OFFLINE"] = "1"
    # Training and validation fetch Arial.ttf unless a font of that name is already there.
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    return config_dir


def import_yolo():
    """Return the ``ultralytics.YOLO`` class with online features disabled."""
    configure_offline_ultralytics()
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    # Integrations that would log or upload; the set of keys differs between releases.
    offline = {"sync": False, "raytune": False, "wandb": False, "mlflow": False, "tensorboard": False,
               "comet": False, "clearml": False, "dvc": False, "neptune": False}
    SETTINGS.update({key: value for key, value in offline.items() if key in SETTINGS})
    return YOLO
