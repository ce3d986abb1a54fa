"""Lumbar spine anatomy (T12 to S1) for sagittal phantoms.

Model frame: x patient left, y posterior, z superior, mm; origin at the centre of
L3. Each disc is a slab between two parallel planes (its designed height apart)
tilted to follow a gentle lordosis; each vertebral body fills the space between
the facing planes of its two neighbouring discs, so bodies and discs are flush.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from msk_node_phantoms.anatomy import AnatomyModel, Painter, structure_table
from msk_node_phantoms.appearance import Texture
from msk_node_phantoms.shapes import Array, Pose, ellipse_radius

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
DISC_LEVELS = tuple(f"{a}-{b}" for a, b in zip(LEVELS, LEVELS[1:]))

STRUCTURES = structure_table(
    ("air", "air"),
    ("skin", "skin"),
    ("fat", "fat"),
    ("bowel", "bowel"),
    ("bowel_gas", "air"),
    ("muscle", "muscle"),
    ("vessel", "vessel"),
    ("ligament", "ligament"),
    ("csf", "csf"),
    ("cord", "cord"),
    ("posterior_cortex", "cortex"),
    ("posterior_marrow", "marrow"),
    ("vertebral_cortex", "cortex", "vertebral_body"),
    ("vertebral_marrow", "marrow", "vertebral_body"),
    ("annulus", "disc", "intervertebral_disc"),
    ("nucleus", "nucleus", "intervertebral_disc"),
)

#: T1-weighted spin-echo intensity of each tissue (0..1).
T1_CONTRAST: dict[str, float] = {
    "air": 0.0,
    "skin": 0.5,
    "fat": 0.9,
    "bowel": 0.45,
    "muscle": 0.3,
    "vessel": 0.1,
    "ligament": 0.15,
    "csf": 0.15,
    "cord": 0.38,
    "cortex": 0.05,
    "marrow": 0.6,
    "disc": 0.33,
    "nucleus": 0.38,
}

_BODY_HEIGHTS = (24.0, 25.0, 26.0, 27.0, 27.0, 26.0, 30.0)
_DISC_HEIGHTS = (7.0, 8.0, 9.0, 9.5, 10.5, 11.0)
#: Disc tilts in degrees (anterior edge lower): a lordosis whose discs stay >= 3 deg away
#: from the image axes after the pose rotation, so their pixelated faces sample all offsets.
_DISC_TILTS = (-9.0, -5.0, 4.0, 8.0, 14.0, 22.0)
_BODY_WIDTHS = (21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 26.0)  # half LR width
_BODY_DEPTHS = (15.0, 15.5, 16.0, 16.5, 17.0, 17.0, 17.0)  # half AP depth
_SUPERELLIPSE = 2.5


def _axis(tilt_deg: float) -> np.ndarray:
    """Unit (y, z) vector of a disc axis tilted anteriorly by ``tilt_deg``."""
    t = np.radians(tilt_deg)
    return np.array([-np.sin(t), np.cos(t)])


@dataclass(frozen=True)
class Element:
    """A body or disc in the sagittal plane: centre, axis (superior) and posterior direction."""

    centre: np.ndarray
    axis: np.ndarray
    half_width: float
    half_depth: float

    @property
    def posterior(self) -> np.ndarray:
        """Unit (y, z) vector perpendicular to the axis, pointing posteriorly."""
        return np.array([self.axis[1], -self.axis[0]])

    def frame(self, y: Array, z: Array) -> tuple[Array, Array]:
        """(height along the axis, posterior offset) of points relative to the centre."""
        (cy, cz), (ay, az), (py, pz) = self.centre.tolist(), self.axis.tolist(), self.posterior.tolist()
        dy, dz = y - cy, z - cz
        return dy * ay + dz * az, dy * py + dz * pz


class SpineModel(AnatomyModel):
    """Vertebral bodies, discs, canal, posterior elements and soft tissue of the lumbar spine."""

    structures = STRUCTURES

    def __init__(self, rng: np.random.Generator) -> None:
        scale = float(rng.uniform(0.93, 1.07))
        bodies_h = [h * scale * rng.uniform(0.96, 1.04) for h in _BODY_HEIGHTS]
        self.disc_heights = [float(h * rng.uniform(0.9, 1.1)) for h in _DISC_HEIGHTS]
        widths = [w * scale for w in _BODY_WIDTHS]
        depths = [d * scale for d in _BODY_DEPTHS]
        axes = [_axis(t) for t in _DISC_TILTS]
        # Chain the discs from T12-L1 downwards; each body fills the gap between disc planes.
        discs_c = [np.zeros(2)]
        for d in range(len(axes) - 1):
            body_axis = (axes[d] + axes[d + 1]) / np.linalg.norm(axes[d] + axes[d + 1])
            discs_c.append(discs_c[d] - self.disc_heights[d] / 2 * axes[d] - bodies_h[d + 1] * body_axis
                           - self.disc_heights[d + 1] / 2 * axes[d + 1])
        top_axis, bottom_axis = _axis(_DISC_TILTS[0] - 4.0), _axis(_DISC_TILTS[-1] + 12.0)
        planes = [(discs_c[0] + self.disc_heights[0] / 2 * axes[0] + bodies_h[0] * top_axis, top_axis)]
        for c, a, h in zip(discs_c, axes, self.disc_heights):
            planes += [(c + h / 2 * a, a), (c - h / 2 * a, a)]
        planes.append((discs_c[-1] - self.disc_heights[-1] / 2 * axes[-1] - bodies_h[-1] * bottom_axis, bottom_axis))
        # Body i lies between planes[2i] (its top) and planes[2i+1] (its bottom).
        self.body_planes = [(planes[2 * i], planes[2 * i + 1]) for i in range(len(LEVELS))]
        shift = -0.5 * (self.body_planes[3][0][0] + self.body_planes[3][1][0])
        self.body_planes = [((t[0] + shift, t[1]), (b[0] + shift, b[1])) for t, b in self.body_planes]
        self.bodies = []
        for (top, bottom), w, dpt in zip(self.body_planes, widths, depths):
            axis = (top[1] + bottom[1]) / np.linalg.norm(top[1] + bottom[1])
            self.bodies.append(Element(0.5 * (top[0] + bottom[0]), axis, w, dpt))
        self.discs = [
            Element(c + shift, a, 0.5 * (widths[d] + widths[d + 1]), 0.5 * (depths[d] + depths[d + 1]))
            for d, (c, a) in enumerate(zip(discs_c, axes))
        ]
        # Posterior wall of the bodies as a function of height: the canal follows it.
        wall = [e.centre + 0.85 * e.half_depth * e.posterior for e in self.bodies + self.discs]
        wall.sort(key=lambda point: point[1])
        self.wall_z = np.array([point[1] for point in wall])
        self.wall_y = np.array([point[0] for point in wall])
        self.conus_z = float(self.discs[1].centre[1])
        self.pose = Pose(0, float(rng.uniform(-1.0, 1.0)), (float(rng.uniform(-2.0, 2.0)), *rng.uniform(-5.0, 5.0, 2)))
        self.bowel = Texture.draw(rng, n=14, wavelengths_mm=(15.0, 45.0))

    def biomarkers(self) -> dict[str, Any]:
        """Designed disc heights, superior to inferior."""
        return {"disc_height_mm": {name: h for name, h in zip(DISC_LEVELS, self.disc_heights)}}

    def _local_ids(self, x: Array, y: Array, z: Array) -> npt.NDArray[np.uint8]:
        paint = Painter(self, x.shape)
        ax = np.abs(x)
        wall = np.interp(z, self.wall_z, self.wall_y).astype(np.float32)
        behind = y - wall  # mm posterior of the posterior vertebral line

        # Trunk: posterior skin follows the lordosis; abdomen anteriorly fills the field of view.
        paint.paint(behind <= 80.0, "skin")
        paint.paint(behind <= 78.0, "fat")
        paint.paint((behind <= 62.0) & (behind > 14.0), "muscle")
        # Bowel loops, mesenteric fat and gas: level sets of a smooth random field.
        abdomen = behind < -2.0 * 16.0 - 18.0
        loops = self.bowel(x[abdomen], y[abdomen], z[abdomen])
        paint.ids[abdomen] = np.where(loops > 1.7, self.index("bowel_gas"),
                                      np.where(loops > -0.3, self.index("bowel"), paint.ids[abdomen]))
        psoas = ellipse_radius(ax - 32.0, behind + 22.0, 14.0 * np.clip((40.0 - z) / 80.0, 0.3, 1.0), 16.0) < 1.0
        paint.paint(psoas, "muscle")
        front = behind + 2.0 * 16.0 + 10.0
        paint.paint(np.hypot(x - 14.0, front) < 10.0, "vessel")  # aorta
        paint.paint(np.hypot(x + 17.0, front - 2.0) < 9.0, "vessel")  # inferior vena cava

        # Canal: epidural fat, thecal sac with CSF, conus medullaris above L1-L2.
        paint.paint(ellipse_radius(x, behind - 10.0, 12.0, 9.5) < 1.0, "fat")
        paint.paint(ellipse_radius(x, behind - 9.0, 10.0, 7.5) < 1.0, "csf")
        cord = np.clip((z - self.conus_z) / 15.0, 0.0, 1.0)
        paint.paint(ellipse_radius(x, behind - 9.0, 4.5 * cord + 1e-3, 3.5 * cord + 1e-3) < 1.0, "cord")
        paint.paint((ax < 2.0) & (behind > 26.0) & (behind < 58.0), "ligament")

        # Vertebral column, evaluated only near the posterior vertebral line.
        zone = (behind > -50.0) & (behind < 62.0)
        column = Painter(self, (int(zone.sum()),))
        column.ids = paint.ids[zone]
        self._paint_column(column, x[zone], y[zone], z[zone], behind[zone])
        paint.ids[zone] = column.ids
        return paint.ids

    def _paint_column(self, column: Painter, x: Array, y: Array, z: Array, behind: Array) -> None:
        """Posterior elements, vertebral bodies and discs at the given points."""
        ax = np.abs(x)
        # Posterior elements of each vertebra: pedicles, laminae, facets, spinous process.
        for body, planes in zip(self.bodies, self.body_planes):
            h, _ = body.frame(y, z)
            half = 0.5 * _body_height(body, planes)
            near = np.abs(h) < half + 12.0
            if not near.any():
                continue
            hb, bb, xb = h[near], behind[near], ax[near]
            pedicle = _box(xb, 13.0, 19.0, bb, -2.0, 18.0, hb, -0.1 * half, 0.8 * half)
            lamina = _box(xb, 0.0, 16.0, bb, 20.5, 26.0, hb, -0.5 * half, 0.8 * half)
            facet = _box(xb, 13.0, 23.0, bb, 17.0, 28.0, hb, -1.0 * half - 3.0, 0.7 * half)
            spine_h = hb + 0.1 * half + 0.35 * (bb - 26.0)
            spinous = _box(xb, 0.0, 3.5, bb, 24.0, 55.0, spine_h, -9.5, 9.5)
            d = np.minimum.reduce([pedicle, lamina, facet, spinous]) - 1.5
            ids = column.ids[near]
            ids[d <= 0.0] = self.index("posterior_cortex")
            ids[d <= -1.2] = self.index("posterior_marrow")
            column.ids[near] = ids

        # Vertebral bodies with a cortical shell, then discs (annulus and nucleus).
        for body, (top, bottom) in zip(self.bodies, self.body_planes):
            (ty, tz), (tny, tnz) = top[0].tolist(), top[1].tolist()
            (by, bz), (bny, bnz) = bottom[0].tolist(), bottom[1].tolist()
            to_top = (ty - y) * tny + (tz - z) * tnz
            from_bottom = (y - by) * bny + (z - bz) * bnz
            h, v = body.frame(y, z)
            rel = np.clip(h / _body_height(body, (top, bottom)), -0.5, 0.5)
            waist = 1.0 - 0.06 * (1.0 - 4.0 * rel * rel)
            radius = _superellipse(x, v, body.half_width * waist, body.half_depth * waist)
            inside = (to_top >= 0.0) & (from_bottom >= 0.0) & (radius <= 1.0) & (v <= 0.85 * body.half_depth)
            shell = np.minimum.reduce([to_top, from_bottom, (1.0 - radius) * body.half_depth,
                                       0.85 * body.half_depth - v])
            column.paint(inside, "vertebral_cortex")
            column.paint(inside & (shell > 1.0), "vertebral_marrow")
        for disc, height in zip(self.discs, self.disc_heights):
            h, v = disc.frame(y, z)
            radius = _superellipse(x, v, disc.half_width, disc.half_depth)
            slab = (np.abs(h) <= height / 2) & (radius <= 1.0) & (v <= 0.85 * disc.half_depth)
            column.paint(slab, "annulus")
            nucleus = ((x / (0.55 * disc.half_width)) ** 2 + ((v + 0.1 * disc.half_depth) / (0.5 * disc.half_depth)) ** 2
                       + (h / (0.35 * height)) ** 2) < 1.0
            column.paint(slab & nucleus, "nucleus")


def _body_height(body: Element, planes: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> float:
    """Height of a vertebral body along its axis at its centre."""
    (top_point, _), (bottom_point, _) = planes
    return float(np.dot(top_point - bottom_point, body.axis))


def _superellipse(x: Array, v: Array, a: Array | float, b: Array | float) -> Array:
    """Normalised superellipse radius (1 on the boundary) of the vertebral cross-section."""
    return (np.abs(x / a) ** _SUPERELLIPSE + np.abs(v / b) ** _SUPERELLIPSE) ** (1.0 / _SUPERELLIPSE)


def _box(*ranges: Array | float) -> Array:
    """Approximate signed distance to an axis-aligned box given (coord, low, high) triples."""
    d = None
    for k in range(0, len(ranges), 3):
        coord, low, high = ranges[k], ranges[k + 1], ranges[k + 2]
        face = np.maximum(low - coord, coord - high)
        d = face if d is None else np.maximum(d, face)
    return d
