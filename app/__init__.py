"""The msk-node MONAI Deploy application (``python -m app -i IN -o OUT -m MODELS``)."""
from app.app import MskSegmentationApp

__all__ = ["MskSegmentationApp"]
