"""Right-knee anatomy for sagittal phantoms.

Model frame: x patient left (medial for a right knee), y posterior, z superior, in
mm; the origin is the axis of the femoral condyles. The articular surfaces carrying
cartilage have exact distance functions (a cylinder along x, the planar tibial
plateau, the planar patellar facet), so every cartilage plate has its designed
thickness along the surface normal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from msk_node_phantoms.anatomy import AnatomyModel, Painter, structure_table
from msk_node_phantoms.shapes import (
    Array,
    Pose,
    ellipse_radius,
    ellipse_sdf,
    rounded_cylinder_sdf,
    rounded_edge_sdf,
    segment_distance_2d,
    smoothstep,
    uneven_capsule_sdf,
)

STRUCTURES = structure_table(
    ("air", "air"),
    ("skin", "skin"),
    ("subcutaneous_fat", "fat"),
    ("fat", "fat"),
    ("muscle", "muscle"),
    ("vessel", "vessel"),
    ("tendon", "tendon"),
    ("fluid", "fluid"),
    ("meniscus", "meniscus", "meniscus"),
    ("femoral_cartilage", "cartilage", "femoral_cartilage"),
    ("tibial_cartilage_medial", "cartilage", "tibial_cartilage"),
    ("tibial_cartilage_lateral", "cartilage", "tibial_cartilage"),
    ("patellar_cartilage", "cartilage", "patellar_cartilage"),
    ("fibula_cortex", "cortex"),
    ("fibula_marrow", "marrow"),
    ("tibia_cortex", "cortex", "tibia"),
    ("tibia_marrow", "marrow", "tibia"),
    ("femur_cortex", "cortex", "femur"),
    ("femur_marrow", "marrow", "femur"),
    ("patella_cortex", "cortex", "patella"),
    ("patella_marrow", "marrow", "patella"),
)

#: DESS-like intensity of each tissue (0..1).
DESS_CONTRAST: dict[str, float] = {
    "air": 0.0,
    "skin": 0.45,
    "fat": 0.55,
    "muscle": 0.3,
    "vessel": 0.65,
    "tendon": 0.06,
    "fluid": 1.0,
    "meniscus": 0.08,
    "cartilage": 0.8,
    "cortex": 0.05,
    "marrow": 0.35,
}

#: Joint fluid film between opposing cartilage plates, mm.
FILM_MM = 1.0

#: Rounding of the edges between the femoral metaphysis and its medial/lateral faces, mm.
SIDE_ROUNDING_MM = 5.0


@dataclass(frozen=True)
class KneeParams:
    """Seeded dimensions of the knee model (mm, degrees)."""

    condyle_radius: float
    condyle_half_length: float
    shaft_radius: float
    shaft_y: float
    t_fc: float
    t_tc: float
    t_pc: float
    slope_deg: float
    plateau_a: float
    plateau_b: float
    meniscus_height: float
    patella_axes: tuple[float, float, float]
    patella_height: float
    limb_half_width: float
    limb_posterior: float
    subcutaneous: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> KneeParams:
        """Draw dimensions: sizes and thicknesses vary by +-10 %."""

        def s() -> float:
            return float(rng.uniform(0.9, 1.1))

        return cls(
            condyle_radius=22.0 * s(),
            condyle_half_length=35.0 * s(),
            shaft_radius=13.0 * s(),
            shaft_y=1.0 * s(),
            t_fc=2.4 * s(),
            t_tc=2.0 * s(),
            t_pc=2.8 * s(),
            slope_deg=float(rng.uniform(7.0, 10.0)),
            plateau_a=39.0 * s(),
            plateau_b=25.0 * s(),
            meniscus_height=6.0 * s(),
            patella_axes=(12.0 * s(), 20.0 * s(), 22.0 * s()),
            patella_height=22.0 * s(),
            limb_half_width=60.0 * s(),
            limb_posterior=62.0 * s(),
            subcutaneous=6.0 * s(),
        )


@dataclass(frozen=True)
class _Frames:
    """Coordinates of the evaluated points in the frames the knee is built in."""

    x: Array
    y: Array
    z: Array
    h: Array  # height above the tibial plateau plane
    w: Array  # posterior position along the plateau plane
    s: Array  # distance from the condyle axis along the trochlear normal
    tau: Array  # position up the trochlear line


@dataclass(frozen=True)
class _Bones:
    """Signed distances (negative inside) of the bones and of the femoral articular surface."""

    femur: Array
    tibia: Array
    fibula: Array
    patella: Array
    articular: Array  # femoral condyles and trochlea only (exact where cartilage is)
    condyle: Array
    metaphysis_half_width: Array


class KneeModel(AnatomyModel):
    """Femur, tibia, fibula, patella, cartilage, menisci and soft tissue of a right knee."""

    structures = STRUCTURES

    def __init__(self, rng: np.random.Generator) -> None:
        self.p = p = KneeParams.draw(rng)
        self.pose = Pose(0, float(rng.uniform(-2.5, 2.5)), tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)))
        # Femoral metaphysis: hull of the condyle circle and the shaft circle at (shaft_y, shaft_z).
        self.shaft_z = 70.0
        self.cap_h = float(np.hypot(p.shaft_y, self.shaft_z))
        self.cap_e = (p.shaft_y / self.cap_h, self.shaft_z / self.cap_h)
        b = (p.condyle_radius - p.shaft_radius) / self.cap_h
        a = float(np.sqrt(1.0 - b * b))
        ey, ez = self.cap_e
        # Outward normal and upward direction of the anterior (trochlear) tangent line, (y, z).
        self.n_ant = (-a * ez + b * ey, a * ey + b * ez)
        self.t_ant = (b * ez + a * ey, -b * ey + a * ez)
        # Tibial plateau: plane with posterior slope, at the joint gap below the condyles.
        beta = np.radians(p.slope_deg)
        self.n_tib = (float(np.sin(beta)), float(np.cos(beta)))
        self.w_tib = (float(np.cos(beta)), float(-np.sin(beta)))
        self.tib_offset = p.condyle_radius + p.t_fc + FILM_MM + p.t_tc
        self.comp_x = 19.0 * p.plateau_a / 39.0
        self.men_axes = (17.0 * p.plateau_a / 39.0, 21.5 * p.plateau_b / 25.0)
        _, cw, _, cb = self._tibia_section(np.float64(-35.0))
        self.tuberosity_w = float(cw - cb) + 1.0
        # Patellar facet plane (distance from the condyle axis along n_ant) and facet size.
        self.s_facet = p.condyle_radius + p.t_fc + FILM_MM + p.t_pc
        a_s, a_t, a_x = p.patella_axes
        self.patella_depth = 0.6 * a_s  # ellipsoid centre in front of the facet plane
        cut = np.sqrt(1.0 - (self.patella_depth / a_s) ** 2)
        self.facet_axes = (0.9 * a_t * cut, 0.9 * a_x * cut)
        self.trochlea_top = p.patella_height + self.facet_axes[0] + 3.0
        patella_front = self.s_facet + self.patella_depth + a_s
        self.limb_anterior = patella_front * self.n_ant[0] - 7.0

    def biomarkers(self) -> dict[str, Any]:
        """Designed cartilage thicknesses and the medial/lateral tibial split plane."""
        p = self.p
        return {
            "cartilage_thickness_mm": {
                "femoral_cartilage": p.t_fc,
                "tibial_cartilage": p.t_tc,
                "patellar_cartilage": p.t_pc,
            },
            "medial_lateral_split_x_mm": self.pose.translation[0],
            "medial_side": "+x",
        }

    def _local_ids(self, x: Array, y: Array, z: Array) -> npt.NDArray[np.uint8]:
        f = _Frames(
            x, y, z,
            h=self.n_tib[0] * y + self.n_tib[1] * z + self.tib_offset,
            w=self.w_tib[0] * y + self.w_tib[1] * z,
            s=self.n_ant[0] * y + self.n_ant[1] * z,
            tau=self.t_ant[0] * y + self.t_ant[1] * z,
        )
        paint = Painter(self, x.shape)
        interior = self._paint_soft_tissue(paint, f)
        bones = self._bones(f)
        self._paint_joint(paint, f, bones, interior)
        cortex = {
            "fibula": 1.2,
            "tibia": 1.2 + 2.3 * smoothstep(-25.0, -60.0, f.h),
            "femur": 1.2 + 2.3 * smoothstep(25.0, 60.0, z),
            "patella": 1.0,
        }
        for bone, thickness in cortex.items():
            d = getattr(bones, bone)
            paint.paint(d <= 0.0, f"{bone}_cortex")
            paint.paint(d <= -thickness, f"{bone}_marrow")
        return paint.ids

    def _paint_soft_tissue(self, paint: Painter, f: _Frames) -> Array:
        """Skin, fat, muscle bellies, popliteal vessels and tendons; returns the limb interior."""
        p = self.p
        limb_cy = 0.5 * (self.limb_anterior + p.limb_posterior)
        limb_b = 0.5 * (p.limb_posterior - self.limb_anterior)
        d_limb = ellipse_sdf(f.x, f.y - limb_cy, p.limb_half_width, limb_b)
        paint.paint(d_limb <= 0.0, "skin")
        paint.paint(d_limb <= -1.5, "subcutaneous_fat")
        interior = d_limb <= -1.5 - p.subcutaneous
        paint.paint(interior, "fat")
        muscle = np.zeros(f.x.shape, dtype=bool)
        for centre, axes in self._muscles():
            muscle |= sum(((c - c0) / a) ** 2 for c, c0, a in zip((f.x, f.y, f.z), centre, axes)) < 1.0
        paint.paint(interior & muscle, "muscle")
        rc = p.condyle_radius
        vessels = (np.hypot(f.x - 2.0, f.y - rc - 9.0) < 3.0) | (np.hypot(f.x + 4.0, f.y - rc - 13.0) < 4.0)
        paint.paint(interior & vessels, "vessel")

        # Patellar tendon from the lower pole to the tibial tuberosity, quadriceps tendon upwards.
        a_s, a_t, _ = p.patella_axes
        s_mid = self.s_facet + self.patella_depth
        ty, tz = self._tibia_point(-35.0, self.tuberosity_w - 3.0)
        tuberosity = (self.n_ant[0] * ty + self.n_ant[1] * tz, self.t_ant[0] * ty + self.t_ant[1] * tz)
        lower_pole = (s_mid - 2.0, p.patella_height - a_t + 3.0)
        upper_pole = (s_mid + 2.0, p.patella_height + a_t - 3.0)
        above = (upper_pole[0] - 4.0, upper_pole[1] + 70.0)
        ax = np.abs(f.x)
        tendon = ((segment_distance_2d(f.s, f.tau, lower_pole, tuberosity) < 2.5) & (ax < 13.0)) | (
            (segment_distance_2d(f.s, f.tau, upper_pole, above) < 3.0) & (ax < 16.0)
        )
        paint.paint(interior & tendon, "tendon")
        return interior

    def _bones(self, f: _Frames) -> _Bones:
        """Signed distances of femur, tibia, fibula and patella."""
        p = self.p
        x, y, z = f.x, f.y, f.z
        ax = np.abs(x)
        rc = p.condyle_radius
        condyle = rounded_cylinder_sdf(np.hypot(y, z), x, rc, p.condyle_half_length, 9.0)
        ey, ez = self.cap_e
        u = y * ez - z * ey
        d_cap = uneven_capsule_sdf(u, y * ey + z * ez, rc, p.shaft_radius, self.cap_h)
        # Medial/lateral faces of the metaphysis narrow upwards; the u**2 term domes their top edge.
        straight = p.condyle_half_length - 9.0
        half_width = straight - (straight - p.shaft_radius) * smoothstep(0.0, self.shaft_z, z + 0.04 * u * u)
        articular = np.minimum(condyle, rounded_edge_sdf(d_cap, ax - half_width, SIDE_ROUNDING_MM))
        shaft = np.sqrt(x * x + (y - p.shaft_y) ** 2 + np.maximum(self.shaft_z - z, 0.0) ** 2) - p.shaft_radius

        h, w = f.h, f.w
        cx, cw, ca, cb = self._tibia_section(h)
        tibia = rounded_edge_sdf(ellipse_sdf(x - cx, w - cw, ca, cb), h, 2.5)
        tuberosity = (np.sqrt((x / 12.0) ** 2 + ((w - self.tuberosity_w) / 5.0) ** 2 + ((h + 35.0) / 12.0) ** 2)
                      - 1.0) * 5.0
        fx, fw, fh = -0.87 * p.plateau_a, 0.72 * p.plateau_b, -30.0
        radial = (x - fx) ** 2 + (w - fw) ** 2
        fibula = np.minimum(np.sqrt(radial + (h - fh) ** 2) - 9.0, np.sqrt(radial + np.maximum(h - fh, 0.0) ** 2) - 6.0)

        a_s, a_t, a_x = p.patella_axes
        rho = np.sqrt(((f.s - self.s_facet - self.patella_depth) / a_s) ** 2
                      + ((f.tau - p.patella_height) / a_t) ** 2 + (x / a_x) ** 2)
        patella = np.maximum((rho - 1.0) * a_s, self.s_facet - f.s)
        return _Bones(np.minimum(articular, shaft), np.minimum(tibia, tuberosity), fibula, patella, articular,
                      condyle, half_width)

    def _paint_joint(self, paint: Painter, f: _Frames, bones: _Bones, interior: Array) -> None:
        """Joint fluid, menisci and the three cartilage plates."""
        p = self.p
        x, h, s, tau = f.x, f.h, f.s, f.tau
        ax = np.abs(x)
        d_art = bones.articular
        femoral = (
            (np.degrees(np.arctan2(f.y, -f.z)) <= 105.0)  # angle around the condyle axis from inferior
            & (tau <= self.trochlea_top)
            & (ax <= p.condyle_half_length - 3.0)
            & ((ax <= bones.metaphysis_half_width - SIDE_ROUNDING_MM) | (bones.condyle <= p.t_fc))
        )
        # Compartments: medial (x > 0) and lateral; rho is the radius normalised to the meniscal rim.
        outward = (np.where(x >= 0.0, x, -x) - self.comp_x) / self.men_axes[0]
        rho = np.hypot(outward, (f.w - 1.0) / self.men_axes[1])
        plate = rho < 0.55
        facet = ellipse_radius(tau - p.patella_height, x, *self.facet_axes) < 1.0
        near_facet = ellipse_radius(tau - p.patella_height, x, *(a + 2.0 for a in self.facet_axes)) < 1.0

        # Joint fluid: films over the cartilage plates and the suprapatellar recess.
        fluid = (
            (femoral & (d_art > 0.0) & (d_art <= p.t_fc + FILM_MM))
            | (plate & (h > 0.0) & (h <= p.t_tc + FILM_MM))
            | (near_facet & (s >= self.s_facet - p.t_pc - FILM_MM) & (s < self.s_facet))
            | ((bones.femur > 0.0) & (bones.femur <= 2.5) & (f.y < p.shaft_y)
               & (tau > self.trochlea_top - 5.0) & (tau < self.trochlea_top + 25.0)
               & (ax < np.minimum(12.0, bones.metaphysis_half_width - SIDE_ROUNDING_MM)))
        )
        paint.paint(interior & fluid, "fluid")

        wedge = p.meniscus_height * np.clip((rho - 0.55) / 0.35, 0.0, 1.0)
        meniscus = (rho >= 0.55) & (rho <= 1.0) & (h > 0.0) & (h <= wedge) & (outward > -0.45) & (d_art > p.t_fc + 0.6)
        paint.paint(meniscus, "meniscus")
        paint.paint(femoral & (d_art > 0.0) & (d_art <= p.t_fc), "femoral_cartilage")
        tibial = plate & (h > 0.0) & (h <= p.t_tc)
        paint.paint(tibial & (x >= 0.0), "tibial_cartilage_medial")
        paint.paint(tibial & (x < 0.0), "tibial_cartilage_lateral")
        paint.paint(facet & (s >= self.s_facet - p.t_pc) & (s < self.s_facet), "patellar_cartilage")

    def _tibia_point(self, h: float, w: float) -> tuple[float, float]:
        """(y, z) of a point given in the tibial plateau frame."""
        y = -self.n_tib[0] * self.tib_offset + h * self.n_tib[0] + w * self.w_tib[0]
        z = -self.n_tib[1] * self.tib_offset + h * self.n_tib[1] + w * self.w_tib[1]
        return y, z

    def _muscles(self) -> list[tuple[tuple[float, float, float], tuple[float, float, float]]]:
        """Ellipsoids (centre, semi-axes) of the muscle bellies around the knee."""
        p = self.p
        rc = p.condyle_radius
        return [
            ((0.0, p.shaft_y - 6.0, 95.0), (62.0, 46.0, 68.0)),  # vastus muscles
            ((0.0, rc + 30.0, 85.0), (56.0, 28.0, 68.0)),  # hamstrings
            ((21.0, rc + 19.0, -62.0), (16.0, 19.0, 70.0)),  # gastrocnemius, medial head
            ((-21.0, rc + 19.0, -65.0), (15.0, 18.0, 68.0)),  # gastrocnemius, lateral head
            ((0.0, 24.0, -85.0), (40.0, 16.0, 50.0)),  # popliteus and soleus
            ((-25.0, -5.0, -100.0), (18.0, 18.0, 60.0)),  # extensors of the leg
        ]

    def _tibia_section(self, h: Array) -> tuple[Array, Array, Array, Array]:
        """Centre (x, w) and semi-axes (x, w) of the tibia cross-section at height ``h``."""
        p = self.p
        taper = smoothstep(-18.0, -55.0, h)
        return (
            -3.0 * taper,
            1.0 - 4.0 * taper,
            p.plateau_a + (15.0 - p.plateau_a) * taper,
            p.plateau_b + (15.0 - p.plateau_b) * taper,
        )
