"""Label values, tissue structures and the interface shared by the anatomy models."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from msk_node.labels import default_label_map
from msk_node_phantoms.shapes import Array, Pose

#: Voxel values of the ground-truth labels (0 = background), a view of the node's default label map.
LABEL_VALUES: dict[str, int] = {spec.name: spec.value for spec in default_label_map()}


@dataclass(frozen=True)
class Structure:
    """One region of a model with homogeneous tissue.

    Attributes
    ----------
    name : str
        Identifier of the region, e.g. ``"tibial_cartilage_medial"``.
    tissue : str
        Tissue class that sets its intensity, e.g. ``"cartilage"``.
    label : str or None
        Name of the ground-truth label (a key of :data:`LABEL_VALUES`), None for background.
    """

    name: str
    tissue: str
    label: str | None = None


def structure_table(*entries: tuple[str, str] | tuple[str, str, str]) -> tuple[Structure, ...]:
    """Build a structure tuple from ``(name, tissue[, label])`` entries."""
    return tuple(Structure(*entry) for entry in entries)


class AnatomyModel(ABC):
    """A continuous anatomy: maps patient coordinates to structure indices.

    Attributes
    ----------
    structures : tuple of Structure
        Regions of the model; a structure index is a position in this tuple.
    pose : Pose
        Placement of the model in patient coordinates.
    """

    structures: tuple[Structure, ...]
    pose: Pose

    def index(self, name: str) -> int:
        """Index of the structure called ``name``."""
        return [s.name for s in self.structures].index(name)

    def label_lut(self) -> npt.NDArray[np.uint8]:
        """Label value of each structure index."""
        return np.array([LABEL_VALUES[s.label] if s.label else 0 for s in self.structures], dtype=np.uint8)

    def structure_ids(self, x: Array, y: Array, z: Array) -> npt.NDArray[np.uint8]:
        """Structure index at patient points (LPS, mm); arrays of any equal shape."""
        return self._local_ids(*self.pose.to_local(x, y, z))

    @abstractmethod
    def _local_ids(self, x: Array, y: Array, z: Array) -> npt.NDArray[np.uint8]:
        """Structure index at model-frame points."""

    @abstractmethod
    def biomarkers(self) -> dict[str, Any]:
        """Designed biomarker values recorded in ``truth.json``."""


class Painter:
    """Assigns structure indices in increasing priority: later calls overwrite earlier ones."""

    def __init__(self, model: AnatomyModel, shape: tuple[int, ...]) -> None:
        self._model = model
        self.ids = np.zeros(shape, dtype=np.uint8)

    def paint(self, mask: npt.NDArray[np.bool_], name: str) -> None:
        """Set ``mask`` to the structure ``name``."""
        self.ids[mask] = self._model.index(name)
