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

from msk_node.phantoms.anatomy import AnatomyModel, Painter, structure_table
from msk_node.phantoms.shapes import (
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
    "vessel": 0.2,
    "tendon": 0.06,
    "fluid": 1.0,
    "meniscus": 0.08,
    "cartilage": 0.8,
    "cortex": 0.05,
    "marrow": 0.35,
}

#: Joint fluid film between opposing cartilage plates, mm.
FILM_MM = 1.0


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
            shaft_y=-4.0 * s(),
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


class KneeModel(AnatomyModel):
    """Femur, tibia, fibula, patella, cartilage, menisci and soft tissue of a right knee."""

    structures = STRUCTURES

    def __init__(self, rng: np.random.Generator) -> None:
        self.p = p = KneeParams.draw(rng)
        self.pose = Pose(0, float(rng.uniform(-4.0, 4.0)), tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)))
        # Femoral metaphysis: hull of the condyle circle and the shaft circle at (shaft_y, shaft_z).
        self.shaft_z = 50.0
        self.cap_h = float(np.hypot(p.shaft_y, self.shaft_z))
        self.cap_e = (p.shaft_y / self.cap_h, self.shaft_z / self.cap_h)
        b = (p.condyle_radius - p.shaft_radius) / self.cap_h
        a = np.sqrt(1.0 - b * b)
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
                "femoral_cartilage": round(p.t_fc, 4),
                "tibial_cartilage": round(p.t_tc, 4),
                "patellar_cartilage": round(p.t_pc, 4),
            },
            "medial_lateral_split_x_mm": round(self.pose.translation[0], 4),
            "medial_side": "+x",
        }

    def _tibia_point(self, h: float, w: float) -> tuple[float, float]:
        """(y, z) of a point given in the tibial plateau frame."""
        y = -self.n_tib[0] * self.tib_offset + h * self.n_tib[0] + w * self.w_tib[0]
        z = -self.n_tib[1] * self.tib_offset + h * self.n_tib[1] + w * self.w_tib[1]
        return y, z

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

    def _local_ids(self, x: Array, y: Array, z: Array) -> npt.NDArray[np.uint8]:
        p = self.p
        paint = Painter(self, x.shape)
        ax = np.abs(x)

        # Soft tissue: a cylindrical limb with skin, subcutaneous fat, fat and muscle.
        limb_cy = 0.5 * (self.limb_anterior + p.limb_posterior)
        limb_b = 0.5 * (p.limb_posterior - self.limb_anterior)
        d_limb = ellipse_sdf(x, y - limb_cy, p.limb_half_width, limb_b)
        paint.paint(d_limb <= 0.0, "skin")
        paint.paint(d_limb <= -1.5, "subcutaneous_fat")
        interior = d_limb <= -1.5 - p.subcutaneous
        paint.paint(interior, "fat")

        # Tibial plateau frame: h up along the plateau normal, w posterior along it.
        h = self.n_tib[0] * y + self.n_tib[1] * z + self.tib_offset
        w = self.w_tib[0] * y + self.w_tib[1] * z
        popliteal = ellipse_radius(x, y - p.condyle_radius - 12.0, 16.0, 10.0) < 1.0
        muscle = interior & ((z > 40.0) | (y > 8.0) | (h < -45.0)) & ~(popliteal & (z > -45.0) & (z < 25.0))
        paint.paint(muscle, "muscle")
        vessels = (np.hypot(x - 2.0, y - p.condyle_radius - 8.0) < 3.0) | (
            np.hypot(x + 3.0, y - p.condyle_radius - 13.0) < 4.0
        )
        paint.paint(vessels & interior, "vessel")

        # Anterior frame: s along the trochlear normal, tau up the trochlear line.
        s = self.n_ant[0] * y + self.n_ant[1] * z
        tau = self.t_ant[0] * y + self.t_ant[1] * z
        a_s, a_t, a_x = p.patella_axes
        s_mid = self.s_facet + self.patella_depth
        lower_pole = (s_mid - 2.0, p.patella_height - a_t + 3.0)
        _, cw, _, cb = self._tibia_section(np.float64(-35.0))
        tub_w = float(cw - cb) + 1.0
        tuberosity = self._tibia_point(-35.0, tub_w - 3.0)
        tub_s = self.n_ant[0] * tuberosity[0] + self.n_ant[1] * tuberosity[1]
        tub_t = self.t_ant[0] * tuberosity[0] + self.t_ant[1] * tuberosity[1]
        patellar_tendon = (segment_distance_2d(s, tau, lower_pole, (tub_s, tub_t)) < 2.5) & (ax < 13.0)
        upper_pole = (s_mid + 2.0, p.patella_height + a_t - 3.0)
        quad_tendon = (segment_distance_2d(s, tau, upper_pole, (upper_pole[0] - 4.0, upper_pole[1] + 70.0)) < 3.0) & (
            ax < 16.0
        )
        paint.paint(interior & (patellar_tendon | quad_tendon), "tendon")

        # Bones (signed distances, negative inside).
        rc = p.condyle_radius
        d_cond = rounded_cylinder_sdf(np.hypot(y, z), x, rc, p.condyle_half_length, 9.0)
        ey, ez = self.cap_e
        d_cap = uneven_capsule_sdf(y * ez - z * ey, y * ey + z * ez, rc, p.shaft_radius, self.cap_h)
        straight = p.condyle_half_length - 9.0
        half_width = straight - (straight - p.shaft_radius) * smoothstep(0.0, self.shaft_z, z)
        d_art = np.minimum(d_cond, np.maximum(d_cap, ax - half_width))
        d_shaft = np.sqrt(x * x + (y - p.shaft_y) ** 2 + np.maximum(self.shaft_z - z, 0.0) ** 2) - p.shaft_radius
        d_femur = np.minimum(d_art, d_shaft)

        cx, cw, ca, cb = self._tibia_section(h)
        d_tibia = rounded_edge_sdf(ellipse_sdf(x - cx, w - cw, ca, cb), h, 2.5)
        d_tub = (np.sqrt((x / 12.0) ** 2 + ((w - tub_w) / 5.0) ** 2 + ((h + 35.0) / 12.0) ** 2) - 1.0) * 5.0
        d_tibia = np.minimum(d_tibia, d_tub)
        fib = (-0.87 * p.plateau_a, 0.72 * p.plateau_b, -30.0)
        d_fibula = np.minimum(
            np.sqrt((x - fib[0]) ** 2 + (w - fib[1]) ** 2 + (h - fib[2]) ** 2) - 9.0,
            np.sqrt((x - fib[0]) ** 2 + (w - fib[1]) ** 2 + np.maximum(h - fib[2], 0.0) ** 2) - 6.0,
        )
        rho_patella = np.sqrt(((s - s_mid) / a_s) ** 2 + ((tau - p.patella_height) / a_t) ** 2 + (x / a_x) ** 2)
        d_patella = np.maximum((rho_patella - 1.0) * a_s, self.s_facet - s)

        # Articular regions.
        phi = np.degrees(np.arctan2(y, -z))
        femoral_region = (
            (phi <= 105.0)
            & (tau <= self.trochlea_top)
            & (ax <= p.condyle_half_length - 3.0)
            & ((ax <= half_width - 2.0 * p.t_fc) | (d_cond <= p.t_fc))
        )
        plate_r = []
        for side in (1.0, -1.0):
            plate_r.append(ellipse_radius(x - side * self.comp_x, w - 1.0, *self.men_axes))
        rho = np.minimum(*plate_r)
        plate = rho < 0.55
        facet = ellipse_radius(tau - p.patella_height, x, *self.facet_axes) < 1.0
        fa, fb = self.facet_axes

        # Joint fluid: films over the cartilage plates and the suprapatellar recess.
        femoral_film = femoral_region & (d_art > 0.0) & (d_art <= p.t_fc + FILM_MM)
        tibial_film = plate & (h > 0.0) & (h <= p.t_tc + FILM_MM)
        patellar_film = (
            (ellipse_radius(tau - p.patella_height, x, fa + 2.0, fb + 2.0) < 1.0)
            & (s >= self.s_facet - p.t_pc - FILM_MM)
            & (s < self.s_facet)
        )
        recess = (
            (d_femur > 0.0)
            & (d_femur <= 2.5)
            & (y < p.shaft_y)
            & (tau > self.trochlea_top - 5.0)
            & (tau < self.trochlea_top + 25.0)
            & (ax < 16.0)
        )
        paint.paint(interior & (femoral_film | tibial_film | patellar_film | recess), "fluid")

        wedge = p.meniscus_height * np.clip((rho - 0.55) / 0.35, 0.0, 1.0)
        meniscus = (rho >= 0.55) & (rho <= 1.0) & (h > 0.0) & (h <= wedge) & (ax > 6.0) & (d_art > p.t_fc + 0.6)
        paint.paint(meniscus, "meniscus")
        paint.paint(femoral_region & (d_art > 0.0) & (d_art <= p.t_fc), "femoral_cartilage")
        tibial = plate & (h > 0.0) & (h <= p.t_tc)
        paint.paint(tibial & (x >= 0.0), "tibial_cartilage_medial")
        paint.paint(tibial & (x < 0.0), "tibial_cartilage_lateral")
        paint.paint(facet & (s >= self.s_facet - p.t_pc) & (s < self.s_facet), "patellar_cartilage")

        cortex_femur = 1.2 + 2.3 * smoothstep(25.0, 60.0, z)
        cortex_tibia = 1.2 + 2.3 * smoothstep(-25.0, -60.0, h)
        for d, thickness, bone in (
            (d_fibula, 1.2, "fibula"),
            (d_tibia, cortex_tibia, "tibia"),
            (d_femur, cortex_femur, "femur"),
            (d_patella, 1.0, "patella"),
        ):
            paint.paint(d <= 0.0, f"{bone}_cortex")
            paint.paint(d <= -thickness, f"{bone}_marrow")
        return paint.ids
