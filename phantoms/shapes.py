"""Vectorised geometric primitives on arrays of millimetre coordinates.

Signed distances are negative inside. Functions called "exact" return the
Euclidean distance to the surface; "approximate" ones are only used where no
biomarker depends on the distance (cortical rims, soft tissue).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.floating]


def smoothstep(edge0: float, edge1: float, x: Array) -> Array:
    """Cubic Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (edges may be descending)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def ellipse_radius(u: Array, v: Array, a: Array | float, b: Array | float) -> Array:
    """Normalised elliptic radius: 1 on the ellipse with semi-axes ``a``, ``b``."""
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def ellipse_sdf(u: Array, v: Array, a: Array | float, b: Array | float) -> Array:
    """Approximate signed distance to an ellipse (exact for circles)."""
    return (ellipse_radius(u, v, a, b) - 1.0) * np.minimum(a, b)


def rounded_cylinder_sdf(radial: Array, axial: Array, radius: float, half_length: float, rounding: float) -> Array:
    """Exact signed distance to a cylinder with rounded rims.

    Parameters
    ----------
    radial : array
        Distance of the points from the cylinder axis.
    axial : array
        Coordinate along the axis, 0 at the cylinder centre.
    radius, half_length, rounding : float
        Cylinder radius, half its length and the radius of the rounded rim.
    """
    qx = radial - (radius - rounding)
    qy = np.abs(axial) - (half_length - rounding)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - rounding


def rounded_edge_sdf(d_side: Array, d_top: Array, rounding: float) -> Array:
    """Exact intersection of a side distance and a cap distance with a rounded edge.

    Exact when both inputs are exact distances to perpendicular faces.
    """
    qx = d_side + rounding
    qy = d_top + rounding
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - rounding


def uneven_capsule_sdf(u: Array, v: Array, r1: float, r2: float, h: float) -> Array:
    """Exact 2D signed distance to the convex hull of two circles.

    The circles have radii ``r1`` at (0, 0) and ``r2`` at (0, ``h``) in the
    (``u``, ``v``) plane; the hull sides are their common tangents.
    """
    u = np.abs(u)
    b = (r1 - r2) / h
    a = np.sqrt(1.0 - b * b)
    k = a * v - b * u
    return np.where(
        k < 0.0,
        np.hypot(u, v) - r1,
        np.where(k > a * h, np.hypot(u, v - h) - r2, a * u + b * v - r1),
    )


def segment_distance_2d(u: Array, v: Array, start: tuple[float, float], end: tuple[float, float]) -> Array:
    """Exact 2D distance from points to a line segment."""
    du, dv = end[0] - start[0], end[1] - start[1]
    t = np.clip(((u - start[0]) * du + (v - start[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - start[0] - t * du, v - start[1] - t * dv)


@dataclass(frozen=True)
class Pose:
    """Rigid placement of a model: ``p = R q + t`` with R a rotation about one patient axis.

    Attributes
    ----------
    axis : int
        Rotation axis, 0, 1 or 2 for x, y, z.
    angle_deg : float
        Rotation angle in degrees (right-handed about ``axis``).
    translation : tuple of float
        Position of the model origin in patient coordinates, mm.
    """

    axis: int
    angle_deg: float
    translation: tuple[float, float, float]

    def to_local(self, x: Array, y: Array, z: Array) -> tuple[Array, Array, Array]:
        """Map patient coordinates to model coordinates, ``q = R^T (p - t)``."""
        p = [x - self.translation[0], y - self.translation[1], z - self.translation[2]]
        i, j = [(1, 2), (2, 0), (0, 1)][self.axis]
        c, s = np.cos(np.radians(self.angle_deg)), np.sin(np.radians(self.angle_deg))
        pi, pj = p[i], p[j]
        p[i] = (c * pi + s * pj).astype(pi.dtype, copy=False)
        p[j] = (-s * pi + c * pj).astype(pj.dtype, copy=False)
        return p[0], p[1], p[2]
