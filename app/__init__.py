"""The msk-node MONAI Deploy application (``python -m msk_node_app -i IN -o OUT -m MODELS``)."""
from msk_node_app.app import MskSegmentationApp

__all__ = ["MskSegmentationApp"]
