"""MR-like images from real label maps, SynthSeg-style (Billot et al. 2023).

The shapes come from a real label map (bones, cartilage, menisci); everything an MR
image shows around them is drawn at random per case: a soft-tissue envelope with a
subcutaneous fat shell, muscle bellies with intermuscular fat, joint fluid along the
cartilage, a cortical rim and marrow sub-regions in the bones. Each tissue gets a random
intensity (sometimes the soft-tissue contrast inverted), texture, a bias field, blur,
Rician noise, a random slice plane (sagittal, coronal or axial, slightly oblique), thick
slices averaged from thin ones, coarse in-plane acquisition pixels, an affine and
elastic deformation with left/right mirroring, and a field of view placed at random,
so that some slices hold no target anatomy and some cut only through muscle.

Bone shafts cut by the label map's field of view are extended along the superior axis,
so that the crop never shows a bone ending in soft tissue. Truth labels are the label
map resampled (nearest neighbour) at the slice centres through the same deformation.
Everything is drawn from one seed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from msk_node.labels import LabelMap
from msk_node_phantoms.appearance import INTENSITY_SCALE
from msk_node_phantoms.dicom_series import SeriesInfo, StudyInfo, phantom_uid, slug, write_series
from msk_node_phantoms.grid import POSITION_DECIMALS, SeriesGrid

#: ImageOrientationPatient of the three planes as scanners write them.
PLANES = {
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
}

# Background tissues; label-map structures get tissue ids from FIRST_STRUCTURE_TISSUE on.
AIR, FAT, MUSCLE, FLUID, CORTEX, LOW_SIGNAL = 0, 1, 2, 3, 4, 5
MUSCLE_SUBREGIONS = 3
MARROW_SUBREGIONS = 4
FIRST_STRUCTURE_TISSUE = 8
MARROW_TISSUE = FIRST_STRUCTURE_TISSUE + 64  # above every structure id


@dataclass(frozen=True)
class LabelMapSource:
    """A real label map and what its values are.

    ``names`` maps source values to label names of the node's label map (the truth);
    ``bones`` names the source values that are bone (drawn with cortex and marrow
    sub-regions, extended where the field of view cuts them), including bones that are
    not a target, such as the fibula (in ``extra``: drawn, never labelled).
    """

    path: Path
    names: dict[int, str]
    bones: tuple[int, ...]
    extra: tuple[int, ...] = ()


@dataclass(frozen=True)
class SynthesisSettings:
    """Ranges the generator draws from (uniform unless said otherwise)."""

    plane_weights: dict[str, float] = field(
        default_factory=lambda: {"sagittal": 0.6, "coronal": 0.2, "axial": 0.2})
    oblique_deg: float = 12.0
    fov_mm: tuple[float, float] = (110.0, 180.0)
    matrix: tuple[int, int] = (192, 320)
    slice_thickness_mm: tuple[float, float] = (0.7, 4.0)
    max_slices: int = 40
    #: slab thickness as a fraction of the anatomy's extent along the slice normal
    slab_coverage: tuple[float, float] = (0.5, 1.3)
    #: slab centre offset along the slice normal, as a fraction of the anatomy's extent
    slab_offset: float = 0.6
    in_plane_offset_mm: float = 20.0
    scale: tuple[float, float] = (0.85, 1.2)
    anisotropy: float = 0.08
    rotation_deg: float = 15.0
    mirror_probability: float = 0.5
    elastic_mm: float = 3.0
    envelope_mm: tuple[float, float] = (18.0, 45.0)
    fat_mm: tuple[float, float] = (2.0, 12.0)
    muscle_fraction: tuple[float, float] = (0.5, 0.8)
    fluid_mm: tuple[float, float] = (0.3, 2.0)
    cortex_mm: tuple[float, float] = (0.6, 2.0)
    #: bone shafts are extended this far beyond the label map's superior and inferior edges
    extend_mm: float = 60.0
    pad_mm: float = 60.0
    inversion_probability: float = 0.2
    noise: tuple[float, float] = (0.005, 0.06)
    bias: float = 0.35
    blur_px: tuple[float, float] = (0.0, 1.0)
    coarse_acquisition_probability: float = 0.5


@dataclass(frozen=True)
class SyntheticImage:
    """One synthetic series: stored values, truth labels (node label values) and geometry."""

    pixels: npt.NDArray[np.uint16]
    labels: npt.NDArray[np.uint8]
    grid: SeriesGrid
    plane: str
    mirrored: bool


def synthesize(source: LabelMapSource, label_map: LabelMap, seed: int,
               settings: SynthesisSettings = SynthesisSettings()) -> SyntheticImage:
    """Draw one synthetic MR series from ``source``; the same seed gives the same series."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7211]))
    labels = _extended_label_map(source, settings)
    anatomy = sitk.GetArrayViewFromImage(labels) > 0
    centre, extent = _anatomy_box(labels, anatomy)
    plane = str(rng.choice(list(settings.plane_weights), p=_weights(settings.plane_weights)))
    grid, thin = _random_grid(plane, centre, extent, rng, settings)
    transform, mirrored = _random_transform(labels, centre, rng, settings)
    transform = _sampled_transform(transform, _reference(grid, thin))

    truth_source = _resample(labels, grid, 1, transform, sitk.sitkNearestNeighbor, 0)
    thin_source = _resample(labels, grid, thin, transform, sitk.sitkNearestNeighbor, 0)
    fields = _field_images(labels, source, rng, settings)
    sampled = {name: _resample(image, grid, thin, transform, sitk.sitkLinear, fill)
               for name, (image, fill) in fields.items()}
    tissues = _tissues(thin_source, sampled, source, rng, settings)
    image = _render(tissues, grid, thin, rng, settings)

    lut = np.zeros(256, np.uint8)
    for value, name in source.names.items():
        lut[value] = label_map.by_name(name).value
    return SyntheticImage(image, lut[truth_source], grid, plane, mirrored)


def _weights(weights: dict[str, float]) -> np.ndarray:
    values = np.asarray(list(weights.values()), float)
    return values / values.sum()


def _extended_label_map(source: LabelMapSource, settings: SynthesisSettings) -> sitk.Image:
    """The label map padded on every side; bone shafts cut by its superior/inferior edges continue."""
    image = sitk.ReadImage(str(source.path), sitk.sitkUInt8)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    si_axis = int(np.argmax(np.abs(direction[2])))  # image axis closest to the patient's S axis
    pad = [int(round(settings.pad_mm / s)) for s in spacing]
    extend = int(round(settings.extend_mm / spacing[si_axis]))
    array = sitk.GetArrayFromImage(image)  # axes reversed: array axis 2 - si_axis is image axis si_axis
    axis = 2 - si_axis
    bones = np.isin(array, source.bones)
    widths = [(0, 0)] * 3
    widths[axis] = (extend, extend)
    shafts = np.pad(np.where(bones, array, 0), widths, mode="edge")
    array = np.pad(array, widths)
    array = np.where(array > 0, array, shafts)
    array = np.pad(array, [(p, p) for p in reversed(pad)])
    padded = sitk.GetImageFromArray(array)
    padded.SetSpacing(image.GetSpacing())
    padded.SetDirection(image.GetDirection())
    shift = np.array([pad[0], pad[1], pad[2]], float)
    shift[si_axis] += extend
    origin = np.asarray(image.GetOrigin()) - direction @ (shift * spacing)
    padded.SetOrigin(tuple(float(v) for v in origin))
    return padded


def _anatomy_box(labels: sitk.Image, anatomy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and extent (mm, LPS axes) of the labelled anatomy's bounding box in patient space."""
    index = np.argwhere(anatomy)[:, ::-1]
    corners = np.array([[lo, hi] for lo, hi in zip(index.min(0), index.max(0))], float)
    points = np.array([labels.TransformContinuousIndexToPhysicalPoint((a, b, c))
                       for a in corners[0] for b in corners[1] for c in corners[2]])
    low, high = points.min(0), points.max(0)
    return (low + high) / 2, high - low


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*angles)
    return np.asarray(transform.GetMatrix()).reshape(3, 3)


def _random_grid(plane: str, centre: np.ndarray, extent: np.ndarray, rng: np.random.Generator,
                 settings: SynthesisSettings) -> tuple[SeriesGrid, int]:
    """A slightly oblique slab through the anatomy, and how many thin slices make one slice."""
    orientation = np.asarray(PLANES[plane]).reshape(2, 3)
    rotation = _rotation(rng, settings.oblique_deg)
    row_dir, col_dir = rotation @ orientation[0], rotation @ orientation[1]
    normal = np.cross(row_dir, col_dir)
    fov = rng.uniform(*settings.fov_mm)
    matrix = int(rng.integers(settings.matrix[0], settings.matrix[1] + 1))
    pixel = round(fov / matrix, 4)
    thickness = round(rng.uniform(*settings.slice_thickness_mm), 3)
    depth = abs(normal) @ extent
    coverage = rng.uniform(*settings.slab_coverage)
    n_slices = int(min(settings.max_slices, max(8, np.ceil(coverage * depth / thickness))))
    offset = (rng.uniform(-settings.slab_offset, settings.slab_offset) * depth / 2 * normal
              + rng.uniform(-settings.in_plane_offset_mm, settings.in_plane_offset_mm) * (row_dir + col_dir) / 2)
    grid = SeriesGrid.centred(centre + offset, (n_slices, matrix, matrix),
                              tuple(np.round(np.concatenate([row_dir, col_dir]), POSITION_DECIMALS)),
                              (pixel, pixel), thickness)
    return grid, int(min(4, max(1, np.ceil(thickness / 0.8))))


def _random_transform(labels: sitk.Image, centre: np.ndarray, rng: np.random.Generator,
                      settings: SynthesisSettings) -> tuple[sitk.Transform, bool]:
    """Output point -> label-map point: elastic displacement, then scale, rotation and mirroring."""
    scale = rng.uniform(*settings.scale) * (1 + rng.uniform(-settings.anisotropy, settings.anisotropy, 3))
    mirrored = bool(rng.random() < settings.mirror_probability)
    matrix = _rotation(rng, settings.rotation_deg) @ np.diag(1 / scale) @ np.diag([-1.0 if mirrored else 1.0, 1.0, 1.0])
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(float(v) for v in centre))
    affine.SetMatrix(tuple(float(v) for v in matrix.ravel()))
    elastic = sitk.BSplineTransformInitializer(labels, [4, 4, 4])
    parameters = rng.normal(0.0, settings.elastic_mm, len(elastic.GetParameters()))
    elastic.SetParameters(tuple(float(v) for v in parameters))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(elastic)  # applied first
    return composite, mirrored


def _sampled_transform(transform: sitk.Transform, reference: sitk.Image, step_mm: float = 3.0) -> sitk.Transform:
    """The smooth deformation as a displacement field on a coarse grid over ``reference``.

    Evaluating the B-spline at every voxel of every resampled field costs seconds each;
    the deformation is smooth, so a 3 mm field interpolated linearly is the same to
    well below a voxel (the affine part exactly).
    """
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    extent = np.asarray(reference.GetSize()) * np.asarray(reference.GetSpacing())
    size = [int(np.ceil(e / step_mm)) + 3 for e in extent]
    origin = np.asarray(reference.GetOrigin()) - direction @ np.full(3, step_mm)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size,
                                              tuple(float(v) for v in origin), (step_mm,) * 3,
                                              reference.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _reference(grid: SeriesGrid, thin: int) -> sitk.Image:
    """An empty image on ``grid`` with each slice split into ``thin`` slices along the normal."""
    n, rows, cols = grid.size
    reference = sitk.Image(cols, rows, n * thin, sitk.sitkUInt8)
    step = grid.slice_spacing / thin
    reference.SetSpacing((grid.pixel_spacing[1], grid.pixel_spacing[0], step))
    reference.SetDirection(grid.sitk_direction)
    origin = np.asarray(grid.origin) - (thin - 1) / 2 * step * grid.normal
    reference.SetOrigin(tuple(float(v) for v in origin))
    return reference


def _resample(image: sitk.Image, grid: SeriesGrid, thin: int, transform: sitk.Transform, interpolator: int,
              fill: float) -> np.ndarray:
    reference = _reference(grid, thin)
    out = sitk.Resample(image, reference, transform, interpolator, fill, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def _field_images(labels: sitk.Image, source: LabelMapSource, rng: np.random.Generator,
                  settings: SynthesisSettings) -> dict[str, tuple[sitk.Image, float]]:
    """Smooth fields in label-map space that the tissues are cut from, with their values outside."""
    coarse = _on_spacing(labels, 1.5)
    array = sitk.GetArrayViewFromImage(coarse)
    anatomy = sitk.GetImageFromArray((array > 0).astype(np.uint8))
    anatomy.CopyInformation(coarse)
    outside = sitk.SignedMaurerDistanceMap(anatomy, insideIsPositive=False, squaredDistance=False,
                                           useImageSpacing=True)
    fields = {"outside": (outside, 1e3)}

    fine = _on_spacing(labels, 0.7, margin_mm=8.0)
    fine_array = sitk.GetArrayViewFromImage(fine)
    bones = sitk.GetImageFromArray(np.isin(fine_array, source.bones).astype(np.uint8))
    bones.CopyInformation(fine)
    fields["bone_depth"] = (sitk.SignedMaurerDistanceMap(bones, insideIsPositive=True, squaredDistance=False,
                                                         useImageSpacing=True), -1e3)
    soft = [v for v, name in source.names.items() if v not in source.bones]
    cartilage = sitk.GetImageFromArray(np.isin(fine_array, soft).astype(np.uint8))
    cartilage.CopyInformation(fine)
    fields["cartilage_distance"] = (sitk.SignedMaurerDistanceMap(cartilage, insideIsPositive=False,
                                                                 squaredDistance=False, useImageSpacing=True), 1e3)
    for name, sigma in (("envelope", 25.0), ("fat", 20.0), ("muscle", 7.0), ("muscle_parts", 25.0), ("marrow", 10.0),
                        ("fluid", 6.0), ("low_signal", 4.0)):
        fields[name] = (_noise_like(coarse, sigma, rng), 0.0)
    return fields


def _on_spacing(labels: sitk.Image, spacing_mm: float, margin_mm: float | None = None) -> sitk.Image:
    """The label map resampled to isotropic ``spacing_mm`` (nearest), cropped to the anatomy plus a margin."""
    size = np.asarray(labels.GetSize())
    start, stop = np.zeros(3, int), size.copy()
    if margin_mm is not None:
        index = np.argwhere(sitk.GetArrayViewFromImage(labels) > 0)[:, ::-1]
        margin = np.ceil(margin_mm / np.asarray(labels.GetSpacing())).astype(int)
        start = np.maximum(index.min(0) - margin, 0)
        stop = np.minimum(index.max(0) + margin + 1, size)
    origin = labels.TransformIndexToPhysicalPoint(tuple(int(v) for v in start))
    extent = (stop - start) * np.asarray(labels.GetSpacing())
    new_size = [max(2, int(np.ceil(e / spacing_mm))) for e in extent]
    reference = sitk.Image(new_size, sitk.sitkUInt8)
    reference.SetSpacing((spacing_mm,) * 3)
    reference.SetDirection(labels.GetDirection())
    reference.SetOrigin(origin)
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def _noise_like(reference: sitk.Image, sigma_mm: float, rng: np.random.Generator) -> sitk.Image:
    """Gaussian noise smoothed to ``sigma_mm`` and scaled to unit spread, drawn on a coarse grid."""
    step = max(sigma_mm / 2, 2.0)
    spacing = np.asarray(reference.GetSpacing())
    size = [max(4, int(np.ceil(n * s / step)) + 2) for n, s in zip(reference.GetSize(), spacing)]
    values = ndimage.gaussian_filter(rng.normal(size=size[::-1]), sigma_mm / step, mode="wrap")
    values = (values - values.mean()) / (values.std() + 1e-9)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((step,) * 3)
    image.SetDirection(reference.GetDirection())
    image.SetOrigin(reference.GetOrigin())
    return image


def _tissues(structures: np.ndarray, fields: dict[str, np.ndarray], source: LabelMapSource,
             rng: np.random.Generator, settings: SynthesisSettings) -> np.ndarray:
    """Tissue id and muscle part per thin voxel: background tissues, then the label map's structures over them.

    Marrow sub-regions get ids from ``MARROW_TISSUE`` on, four per structure value.
    """
    tissue = np.full(structures.shape, AIR, np.uint8)
    # signed distance to the skin: the envelope's thickness varies smoothly around the anatomy
    skin = fields["outside"] - rng.uniform(*settings.envelope_mm) * (1 + 0.35 * fields["envelope"])
    body = skin < 0
    fat_shell = skin > -(rng.uniform(*settings.fat_mm) * (1 + 0.4 * fields["fat"]))
    threshold = np.quantile(fields["muscle"], 1 - rng.uniform(*settings.muscle_fraction))
    muscle = body & ~fat_shell & (fields["muscle"] > threshold)
    tissue[body] = FAT
    parts = np.digitize(fields["muscle_parts"], np.quantile(fields["muscle_parts"], [1 / 3, 2 / 3]))
    tissue[muscle] = MUSCLE  # its parts are shaded in _render
    tissue[body & (fields["low_signal"] > 2.2)] = LOW_SIGNAL
    fluid = (body & (fields["cartilage_distance"] > 0)
             & (fields["cartilage_distance"] < rng.uniform(*settings.fluid_mm)) & (fields["fluid"] > -0.3))
    tissue[fluid] = FLUID
    present = structures > 0
    tissue[present] = FIRST_STRUCTURE_TISSUE + structures[present]
    bone = np.isin(structures, source.bones)
    edges = np.quantile(fields["marrow"], np.linspace(0, 1, MARROW_SUBREGIONS + 1)[1:-1])
    marrow_parts = np.digitize(fields["marrow"], edges)
    marrow = bone & (rng.random() < 0.7)  # else each bone is one tissue
    tissue[marrow] = (MARROW_TISSUE + MARROW_SUBREGIONS * structures[marrow] + marrow_parts[marrow]).astype(np.uint8)
    tissue[bone & (fields["bone_depth"] < rng.uniform(*settings.cortex_mm))] = CORTEX
    return np.stack([tissue, parts.astype(np.uint8)])


def _render(tissues: np.ndarray, grid: SeriesGrid, thin: int, rng: np.random.Generator,
            settings: SynthesisSettings) -> npt.NDArray[np.uint16]:
    """Random intensity per tissue, texture, bias, thick-slice averaging, blur, coarse pixels, Rician noise."""
    tissue, parts = tissues
    means = rng.uniform(0.05, 1.0, 256)
    means[AIR] = rng.uniform(0.0, 0.03)
    means[CORTEX] = rng.uniform(0.0, 0.15)
    means[LOW_SIGNAL] = rng.uniform(0.0, 0.25)
    if rng.random() < settings.inversion_probability:
        soft = np.arange(256) != AIR
        means[soft] = 1.05 - means[soft]
    spread = rng.uniform(0.0, 0.08, 256)
    muscle_shades = 1 + rng.uniform(-0.15, 0.15, MUSCLE_SUBREGIONS)
    image = means[tissue] * np.where(tissue == MUSCLE, muscle_shades[np.minimum(parts, MUSCLE_SUBREGIONS - 1)], 1.0)
    texture = ndimage.gaussian_filter(rng.normal(size=tissue.shape).astype(np.float32), (0.5, 1.0, 1.0))
    image = image + spread[tissue] * texture / (texture.std() + 1e-9)
    image = image.reshape(grid.size[0], thin, *grid.size[1:]).mean(axis=1)
    image *= _bias(grid.size, rng, settings.bias)
    image = ndimage.gaussian_filter(image, (0, *[rng.uniform(*settings.blur_px)] * 2))
    if rng.random() < settings.coarse_acquisition_probability:
        factor = rng.uniform(1.2, 2.0)
        small = ndimage.zoom(image, (1, 1 / factor, 1 / factor), order=1)
        image = ndimage.zoom(small, np.asarray(image.shape) / np.asarray(small.shape), order=1)
    gamma = np.exp(rng.normal(0.0, 0.3))
    image = np.clip(image, 0, None) ** gamma
    sigma = rng.uniform(*settings.noise)
    noisy = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    return np.clip(noisy / max(noisy.max(), 1e-6) * INTENSITY_SCALE, 0, 65535).astype(np.uint16)


def _bias(size: tuple[int, int, int], rng: np.random.Generator, strength: float) -> np.ndarray:
    coarse = rng.normal(0.0, strength, (3, 4, 4))
    return np.exp(ndimage.zoom(coarse, np.asarray(size) / np.asarray(coarse.shape), order=3)).astype(np.float32)


def write_synthetic(source: LabelMapSource, label_map: LabelMap, out_dir: Path, seed: int,
                    settings: SynthesisSettings = SynthesisSettings()) -> Path:
    """Write one synthetic case like a phantom: ``dicom/<series>/``, ``truth_labels.nii.gz``, ``truth.json``."""
    out_dir = Path(out_dir)
    case = synthesize(source, label_map, seed, settings)
    key = ("synthetic", source.path.name, seed)
    study = StudyInfo(patient_name="Synthetic^Knee", patient_id=f"SYNTH-{slug(source.path.name)}-{seed}",
                      study_uid=phantom_uid(*key, "study"), frame_of_reference_uid=phantom_uid(*key, "frame"),
                      body_part="KNEE", patient_position="FFS", laterality=None)
    description = f"Synthetic {case.plane} knee"
    series = SeriesInfo(phantom_uid(*key, description), description, 3, 7.5, 25.0, 30.0, "GR", "3D")
    folder = Path("dicom") / slug(description)
    write_series(out_dir / folder, case.pixels, case.grid, study, series)
    labels = sitk.GetImageFromArray(case.labels)
    labels.SetSpacing(case.grid.sitk_spacing)
    labels.SetOrigin(case.grid.origin)
    labels.SetDirection(case.grid.sitk_direction)
    sitk.WriteImage(labels, str(out_dir / "truth_labels.nii.gz"), useCompression=True)
    present = sorted({int(v) for v in np.unique(case.labels) if v})
    truth = {"kind": "synthetic", "source": source.path.name, "seed": seed, "plane": case.plane,
             "mirrored": case.mirrored,
             "labels": {label_map.by_value(v).name: v for v in present},
             "series": [{"series_instance_uid": series.series_uid, "description": description,
                         "folder": folder.as_posix(), "role": "morphology"}]}
    (out_dir / "truth.json").write_text(json.dumps(truth, indent=2))
    return out_dir
