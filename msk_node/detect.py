"""Per-slice anatomy detection with an Ultralytics YOLO model: boxes that prompt the segmenter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msk_node.labels import LabelMap
from msk_node.yolo_env import import_yolo


@dataclass(frozen=True)
class Detection:
    """One box on one slice, in slice pixel coordinates (x0, y0, x1, y1)."""

    slice_index: int
    label: str
    box: tuple[float, float, float, float]
    score: float


class Detector:
    """A YOLO detector whose class ids are mapped to anatomical labels by a label map.

    Parameters
    ----------
    weights
        Ultralytics ``.pt`` file.
    label_map
        Maps the model's class ids to labels; classes it does not name are ignored.
    image_size
        Inference size in pixels (the size the model was trained at).
    confidence
        Minimum box score.
    """

    def __init__(self, weights: Path, label_map: LabelMap, *, image_size: int = 256,
                 confidence: float = 0.25, batch_size: int = 16) -> None:
        YOLO = import_yolo()
        self.model = YOLO(str(weights), task="detect")
        self.label_map = label_map
        self.image_size = image_size
        self.confidence = confidence
        self.batch_size = batch_size

    def detect(self, slices: np.ndarray, labels: LabelMap | None = None) -> list[Detection]:
        """Detect on every slice of a normalised uint8 volume ``[slice, row, col]``.

        Only classes in ``labels`` (default: the whole label map) are kept; overlapping
        boxes of one class were already merged by the detector's per-class NMS.
        """
        wanted = labels or self.label_map
        detections: list[Detection] = []
        for start in range(0, len(slices), self.batch_size):
            batch = [np.repeat(s[:, :, None], 3, axis=2) for s in slices[start:start + self.batch_size]]
            results = self.model.predict(batch, imgsz=self.image_size, conf=self.confidence,
                                         verbose=False, device="cpu")
            for offset, result in enumerate(results):
                boxes = result.boxes
                for xyxy, cls, score in zip(boxes.xyxy.cpu().numpy(), boxes.cls.cpu().numpy(),
                                            boxes.conf.cpu().numpy()):
                    try:
                        label = self.label_map.by_class_id(int(cls)).name
                    except KeyError:
                        continue
                    if label in wanted.names:
                        detections.append(Detection(start + offset, label, tuple(float(v) for v in xyxy),
                                                    float(score)))
        return detections
