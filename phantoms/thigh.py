"""Right mid-thigh anatomy for axial phantoms.

Model frame: x patient left (medial for a right thigh), y posterior, z superior, mm;
origin at the centre of the thigh outline at mid-coverage. Muscle groups are cells
of a power diagram (weighted Voronoi partition) of seed points inside the fascia,
separated by fat septa of constant width; sartorius and gracilis are superficial
ellipses with their own fat rim. Everything drifts slowly with z.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from msk_node_phantoms.anatomy import AnatomyModel, Painter, structure_table
from msk_node_phantoms.shapes import Array, Pose, ellipse_radius

STRUCTURES = structure_table(
    ("air", "air"),
    ("skin", "skin"),
    ("subcutaneous_fat", "fat", "subcutaneous_fat"),
    ("fascia", "fascia"),
    ("septum", "fat"),
    ("quadriceps", "muscle", "quadriceps"),
    ("hamstrings", "muscle_hamstrings", "hamstrings"),
    ("adductors", "muscle_adductors", "adductors"),
    ("quadriceps_septum", "fat", "quadriceps"),
    ("hamstrings_septum", "fat", "hamstrings"),
    ("adductors_septum", "fat", "adductors"),
    ("sartorius", "muscle_sartorius", "sartorius"),
    ("gracilis", "muscle_gracilis", "gracilis"),
    ("vessel", "vessel"),
    ("nerve", "nerve"),
    ("femoral_cortex", "cortex", "femoral_cortex"),
    ("femoral_marrow", "marrow", "femoral_marrow"),
)

#: T1-weighted spin-echo intensity of each tissue (0..1).
T1_CONTRAST: dict[str, float] = {
    "air": 0.0,
    "skin": 0.5,
    "fat": 0.9,
    "fascia": 0.12,
    "muscle": 0.36,
    "muscle_hamstrings": 0.32,
    "muscle_adductors": 0.34,
    "muscle_sartorius": 0.3,
    "muscle_gracilis": 0.38,
    "vessel": 0.06,
    "nerve": 0.45,
    "cortex": 0.03,
    "marrow": 0.8,
}

#: Muscle seeds: group, (x, y) as fractions of the outline semi-axes, size weight. Each
#: muscle is the cell where distance / weight is smallest (multiplicatively weighted
#: Voronoi), which gives rounded bellies.
_SEEDS: tuple[tuple[str, float, float, float], ...] = (
    ("quadriceps", 0.02, -0.62, 0.8),  # rectus femoris
    ("quadriceps", -0.55, -0.12, 1.25),  # vastus lateralis
    ("quadriceps", -0.12, -0.3, 0.9),  # vastus intermedius
    ("quadriceps", 0.35, -0.4, 1.0),  # vastus medialis
    ("adductors", 0.5, -0.05, 0.8),  # adductor longus
    ("adductors", 0.3, 0.05, 0.6),  # adductor brevis
    ("adductors", 0.35, 0.35, 1.2),  # adductor magnus
    ("hamstrings", -0.35, 0.5, 0.95),  # biceps femoris, long head
    ("hamstrings", -0.3, 0.22, 0.6),  # biceps femoris, short head
    ("hamstrings", 0.05, 0.7, 0.8),  # semitendinosus
    ("hamstrings", 0.2, 0.55, 0.85),  # semimembranosus
)
_GROUPS = ("quadriceps", "adductors", "hamstrings")

#: Width of the fat septa between muscle groups, and between muscles of one group, mm.
SEPTUM_MM = 1.3
INNER_SEPTUM_MM = 0.8


class ThighModel(AnatomyModel):
    """Skin, subcutaneous fat, fascia, five muscle groups, vessels, nerve and femur of a right thigh."""

    structures = STRUCTURES

    def __init__(self, rng: np.random.Generator) -> None:
        def s() -> float:
            return float(rng.uniform(0.9, 1.1))

        self.axes = (78.0 * s(), 70.0 * s())
        self.harmonics = tuple((float(rng.uniform(-0.03, 0.03)), float(rng.uniform(0, 2 * np.pi))) for _ in range(3))
        self.fat = (14.0 * s(), float(rng.uniform(2.0, 4.0)), float(rng.uniform(0, 2 * np.pi)))
        self.femur = (8.0 * s(), -8.0 * s(), 14.0 * s())
        self.marrow_radius = self.femur[2] - 4.0 * s()
        self.seed_jitter = rng.uniform(-0.04, 0.04, size=(len(_SEEDS), 2))
        self.sartorius_axes = (13.0 * s(), 8.0 * s())
        self.gracilis_axes = (6.0 * s(), 12.0 * s())
        self.pose = Pose(2, float(rng.uniform(-8.0, 8.0)), tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)))

    def biomarkers(self) -> dict[str, Any]:
        """No designed biomarkers beyond the label volumes."""
        return {}

    def _local_ids(self, x: Array, y: Array, z: Array) -> npt.NDArray[np.uint8]:
        paint = Painter(self, x.shape)
        grow = 1.0 + 0.0025 * z  # the thigh widens proximally
        a, b = self.axes[0] * grow, self.axes[1] * grow
        r = np.hypot(x, y)
        theta = np.arctan2(y, x)
        outline = a * b / np.hypot(b * np.cos(theta), a * np.sin(theta))
        for k, (amplitude, phase) in enumerate(self.harmonics, start=2):
            outline = outline * (1.0 + amplitude * np.cos(k * theta + phase))
        fascia = outline - self.fat[0] - self.fat[1] * np.cos(theta - self.fat[2])
        paint.paint(r <= outline, "skin")
        paint.paint(r <= outline - 1.5, "subcutaneous_fat")
        paint.paint(r <= fascia + 1.0, "fascia")
        compartment = r <= fascia
        paint.paint(compartment, "septum")

        # Muscles: weighted Voronoi cells, fat septa where the two nearest seeds nearly tie.
        muscle = compartment & (r <= fascia - 0.5 * SEPTUM_MM)
        xs, ys, sa, sb = x[muscle], y[muscle], a[muscle], b[muscle]
        seeds = np.array([(fx + jx, fy + jy, m) for (_, fx, fy, m), (jx, jy) in zip(_SEEDS, self.seed_jitter)])
        group_of = np.array([_GROUPS.index(entry[0]) for entry in _SEEDS])
        first_score = np.full(xs.shape, np.inf, dtype=np.float32)
        second_score = first_score.copy()
        first = np.zeros(xs.shape, dtype=np.intp)
        second = first.copy()
        for index, (fx, fy, weight) in enumerate(seeds.tolist()):
            score = np.hypot(xs - fx * sa, ys - fy * sb) / weight
            better = score < first_score
            runner_up = ~better & (score < second_score)
            second_score = np.where(better, first_score, np.where(runner_up, score, second_score))
            second = np.where(better, first, np.where(runner_up, index, second))
            first_score = np.where(better, score, first_score)
            first = np.where(better, index, first)

        def unit_over_weight(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            dx, dy = xs - seeds[index, 0] * sa, ys - seeds[index, 1] * sb
            scale = (np.hypot(dx, dy) + 1e-6) * seeds[index, 2]
            return dx / scale, dy / scale

        (ux1, uy1), (ux2, uy2) = unit_over_weight(first), unit_over_weight(second)
        slope = np.hypot(ux1 - ux2, uy1 - uy2)  # |grad(score_2 - score_1)|, for a constant septum width
        same_group = group_of[first] == group_of[second]
        belly = second_score - first_score > 0.5 * np.where(same_group, INNER_SEPTUM_MM, SEPTUM_MM) * slope
        ids = paint.ids[muscle]
        for index, name in enumerate(_GROUPS):
            member = group_of[first] == index
            ids[member & belly] = self.index(name)
            # Thin fat planes between muscles of one group belong to the group's label.
            ids[member & same_group & ~belly] = self.index(f"{name}_septum")
        paint.ids[muscle] = ids

        # Superficial small muscles, each inside a fat rim; sartorius drifts medially distally.
        sart_angle = np.radians(-62.0 - 0.35 * z)
        sart_r = fascia - self.sartorius_axes[1] - 2.0
        sart_x, sart_y = sart_r * np.cos(sart_angle), sart_r * np.sin(sart_angle)
        grac_angle = np.radians(22.0)
        grac_r = fascia - self.gracilis_axes[0] - 2.0
        grac_x, grac_y = grac_r * np.cos(grac_angle), grac_r * np.sin(grac_angle)
        for name, cx, cy, axes, angle in (
            ("sartorius", sart_x, sart_y, self.sartorius_axes, sart_angle + np.pi / 2),
            ("gracilis", grac_x, grac_y, self.gracilis_axes, grac_angle + np.pi / 2),
        ):
            u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
            v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
            paint.paint(compartment & (ellipse_radius(u, v, axes[0] + SEPTUM_MM, axes[1] + SEPTUM_MM) <= 1.0), "septum")
            paint.paint(compartment & (ellipse_radius(u, v, *axes) <= 1.0), name)

        # Femoral vessels in the adductor canal (deep to sartorius), deep femoral vessels, sciatic nerve.
        fx, fy = self.femur[0] - 0.04 * z, self.femur[1]
        canal_x, canal_y = 0.55 * sart_x + 0.45 * fx, 0.55 * sart_y + 0.45 * fy
        for cx, cy, radius in ((canal_x, canal_y, 3.5), (canal_x + 4.0, canal_y + 6.0, 4.5), (fx + 12.0, fy + 19.0, 3.0)):
            paint.paint(compartment & (np.hypot(x - cx, y - cy) <= radius + 1.0), "septum")
            paint.paint(compartment & (np.hypot(x - cx, y - cy) <= radius), "vessel")
        nerve_x, nerve_y = -0.08 * a, 0.4 * b
        paint.paint(compartment & (np.hypot(x - nerve_x, y - nerve_y) <= 6.5), "septum")
        paint.paint(compartment & (ellipse_radius(x - nerve_x, y - nerve_y, 5.5, 4.0) <= 1.0), "nerve")
        mid_fat = 0.5 * (fascia + outline)  # great saphenous vein, medial in the subcutaneous fat
        saphenous = np.hypot(x - mid_fat * np.cos(0.25), y - mid_fat * np.sin(0.25))
        paint.paint((r > fascia + 1.0) & (saphenous <= 2.5), "vessel")

        # Femur: cortex ring with a posterior ridge (linea aspera) around fatty marrow.
        rf = np.hypot(x - fx, y - fy)
        tf = np.arctan2(y - fy, x - fx)
        ridge = 3.0 * np.exp(-(((tf - np.pi / 2 + np.pi) % (2 * np.pi) - np.pi) / 0.3) ** 2)
        paint.paint(rf <= self.femur[2] + ridge, "femoral_cortex")
        paint.paint(rf <= self.marrow_radius, "femoral_marrow")
        return paint.ids
