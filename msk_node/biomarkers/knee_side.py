"""Which side of a knee is medial, from its anatomy, and the planes that split its cartilage.

Three cues, each a signed distance in mm whose sign says on which side of patient x the
lateral compartment lies (positive: lateral is +x, a left knee in LPS):

patella       the patella sits lateral to the centre of the tibial plateau;
condyle       the medial femoral condyle reaches further distally than the lateral one;
fibula        the fibular head, posterolateral below the plateau, has the tibia's marrow
              signal where the mirrored medial spot holds muscle or fat (image cue).

A cue votes only beyond its threshold; the side is known when the votes agree. One vote
may come from a structure the field of view cuts, so a single vote names the side only
where no Laterality tag does (see ``msk_node.measure``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from msk_node.biomarkers.cartilage import SplitPlane

#: Minimum |cue| in mm (image cue: in tibial marrow intensity SDs) for a vote.
THRESHOLDS = {"patella": 2.0, "condyle": 1.5, "fibula": 0.5}
#: Fibular head relative to the tibial plateau: fraction of the tibial head's half-width laterally, mm
#: posterior and mm below (the real knee with a fibula label: 33 mm lateral, 17 posterior, 31 below).
FIBULA_OFFSET = (0.85, 15.0, 30.0)
FIBULA_RADIUS_MM = 5.0


@dataclass(frozen=True)
class KneeSide:
    """Knee side from anatomy: ``lateral_sign`` +1 (lateral is +x, left knee), -1 (right knee) or 0 (unknown),
    from ``votes`` agreeing cues."""

    lateral_sign: int
    cues: dict[str, float]
    votes: int = 0

    @property
    def laterality(self) -> str:
        return {1: "L", -1: "R"}.get(self.lateral_sign, "")

    def describe(self) -> str:
        votes = ", ".join(f"{name} {value:+.1f}" for name, value in self.cues.items())
        return f"{self.laterality or 'unknown'} knee from anatomy ({votes})"


def _points(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask)
    return index @ affine[:3, :3].T + affine[:3, 3]


def knee_side(label_volume: npt.ArrayLike, affine: npt.ArrayLike, values: dict[str, int],
              image: npt.ArrayLike | None = None) -> KneeSide:
    """Side of the knee from the tibial cartilage, patella, femur and (optionally) the image.

    ``values`` maps label names (``tibial_cartilage``, ``patella``, ``femur``, ``tibia``) to label
    values; missing labels skip their cue. ``image`` shares the label volume's grid.
    """
    labels = np.asarray(label_volume)
    affine = np.asarray(affine, dtype=float)
    cues: dict[str, float] = {}
    if "tibial_cartilage" not in values or not (labels == values["tibial_cartilage"]).any():
        return KneeSide(0, cues)
    plateau = _points(labels == values["tibial_cartilage"], affine)
    centre = plateau.mean(axis=0)
    if "patella" in values and (labels == values["patella"]).any():
        cues["patella"] = float(_points(labels == values["patella"], affine)[:, 0].mean() - centre[0])
    if "femur" in values and (labels == values["femur"]).any():
        femur = _points(labels == values["femur"], affine)
        side = femur[:, 0] - centre[0]
        if (side > 5).sum() > 100 and (side < -5).sum() > 100:
            lowest = [np.percentile(femur[part, 2], 0.5) for part in (side > 5, side < -5)]
            cues["condyle"] = float(lowest[0] - lowest[1])  # +x condyle higher: +x is lateral
    if image is not None and "tibia" in values and (labels == values["tibia"]).any():
        cue = _fibula_cue(np.asarray(image, dtype=float), labels, affine, plateau, values["tibia"])
        if cue is not None:
            cues["fibula"] = cue
    votes = [int(np.sign(v)) for name, v in cues.items() if abs(v) >= THRESHOLDS[name]]
    if len(set(votes)) != 1:
        return KneeSide(0, cues)
    return KneeSide(votes[0], cues, len(votes))


def _fibula_cue(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, plateau: np.ndarray,
                tibia_value: int) -> float | None:
    """How much more the +x spot than the -x spot looks like tibial marrow, in marrow SDs."""
    centre = plateau.mean(axis=0)
    fraction, posterior, below = FIBULA_OFFSET
    tibia = labels == tibia_value
    bone = _points(tibia, affine)
    head = bone[(bone[:, 2] < centre[2]) & (bone[:, 2] > centre[2] - 10.0), 0]
    if len(head) < 100:
        return None
    half_width = 0.5 * float(np.percentile(head, 99) - np.percentile(head, 1))
    marrow = image[tibia]
    reference, spread = float(np.median(marrow)), float(np.std(marrow)) or 1.0
    inverse = np.linalg.inv(affine)
    distances = []
    for sign in (1, -1):
        spot = centre + np.array([sign * fraction * half_width, posterior, -below])
        inside = _ball(image.shape, inverse, spot, FIBULA_RADIUS_MM, affine) & ~tibia
        if inside.sum() < 10:
            return None
        distances.append(abs(float(np.median(image[inside])) - reference) / spread)
    return distances[1] - distances[0]  # positive: the +x spot is closer to marrow, so +x is lateral


def _ball(shape: tuple[int, ...], inverse: np.ndarray, centre: np.ndarray, radius: float,
          affine: np.ndarray) -> np.ndarray:
    steps = np.linalg.norm(affine[:3, :3], axis=0)
    middle = inverse[:3, :3] @ centre + inverse[:3, 3]
    low = np.maximum(np.floor(middle - radius / steps), 0).astype(int)
    high = np.minimum(np.ceil(middle + radius / steps) + 1, shape).astype(int)
    mask = np.zeros(shape, dtype=bool)
    if np.any(high <= low):
        return mask
    grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(low, high)), indexing="ij"), axis=-1)
    near = np.linalg.norm((grid - middle) * steps, axis=-1) <= radius
    mask[tuple(slice(a, b) for a, b in zip(low, high))] = near
    return mask


def cartilage_split_planes(label_volume: npt.ArrayLike, affine: npt.ArrayLike, values: dict[str, int],
                           lateral_sign: int) -> dict[str, tuple[SplitPlane, ...]]:
    """Medial/lateral planes of tibial and femoral cartilage, and the trochlear plane of the femoral plate.

    Medial/lateral: the sagittal plane through the tibial cartilage centroid. Trochlea: femoral
    cartilage anterior to the coronal plane through the anterior edge of the tibial cartilage
    (2nd percentile of its anterior-posterior extent), which stands in for the anterior horns of
    the menisci, the usual boundary of the weight-bearing femoral condyles.
    """
    labels = np.asarray(label_volume)
    affine = np.asarray(affine, dtype=float)
    if lateral_sign == 0 or "tibial_cartilage" not in values or not (labels == values["tibial_cartilage"]).any():
        return {}
    plateau = _points(labels == values["tibial_cartilage"], affine)
    medial_lateral = SplitPlane.knee_medial_lateral(float(plateau[:, 0].mean()), "-x" if lateral_sign > 0 else "+x")
    planes: dict[str, tuple[SplitPlane, ...]] = {"tibial_cartilage": (medial_lateral,)}
    if "femoral_cartilage" in values:
        anterior_edge = float(np.percentile(plateau[:, 1], 2))
        trochlea = SplitPlane((0.0, anterior_edge, 0.0), (0.0, -1.0, 0.0), ("trochlear", "condylar"))
        planes["femoral_cartilage"] = (trochlea, medial_lateral)
    return planes
