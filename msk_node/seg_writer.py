"""DICOM Segmentation objects from label volumes, written with highdicom.

One BINARY segment per label present in the volume, numbered 1..n in label-map
order; every source slice gets a frame for every segment (empty frames are kept),
so frame ``k`` of a segment lies on, and references, source instance ``k``.

A label can instead be split into instance segments (:class:`SegmentInstance`): one
segment per disc level or per thigh side, each with its own label and codes, so a
viewer shows which disc or side a measurement belongs to. Their segment labels start
with the label's name (underscores as spaces), which is how readers map them back
(:func:`label_of_segment`).
"""
from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from msk_node import __version__
from msk_node.codes import ALGORITHM_FAMILY, anatomic_region
from msk_node.labels import LabelMap, LabelSpec

MANUFACTURER = "msk-node"
MANUFACTURER_MODEL_NAME = "msk-node"

#: Type-2 Patient / General Study attributes: they must be present, but may be empty.
TYPE2_PATIENT_STUDY_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

_MAX_LO_LENGTH = 64
_GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class AlgorithmInfo:
    """Provenance of the algorithm that produced a segmentation.

    Attributes
    ----------
    name : str
        Algorithm name (DICOM LO, at most 64 characters).
    version : str
        Algorithm version (DICOM LO, at most 64 characters).
    weights_sha256 : str
        SHA-256 of the model weights (or a ``;``-joined list of named hashes),
        recorded as an algorithm parameter.
    parameters : dict of str to str
        How the algorithm ran (numeric precision, encoder backend), recorded as algorithm
        parameters beside the weights hash.
    """

    name: str
    version: str
    weights_sha256: str
    parameters: dict[str, str] = field(default_factory=dict)

    def parameter_items(self) -> dict[str, str]:
        return {"weights_sha256": self.weights_sha256, **self.parameters}


@dataclass(frozen=True)
class SegmentInstance:
    """Part of one label written as a segment of its own: a disc level, a thigh side.

    Attributes
    ----------
    label : str
        Label-map name of the voxels, e.g. ``"intervertebral_disc"``.
    name : str
        What tells this part apart, e.g. ``"L4-L5"`` or ``"right"``.
    mask : numpy.ndarray of bool
        Where the part lies, on the label volume's grid; voxels of other labels in it are
        not part of it, so one side mask can serve every label of that side.
    anatomic_region : pydicom.sr.coding.Code or None
        Anatomic region of the segment, e.g. the SNOMED CT disc level.
    laterality : pydicom.sr.coding.Code or None
        SNOMED CT Left or Right, written as the segmented property type modifier.
    """

    label: str
    name: str
    mask: np.ndarray
    anatomic_region: Code | None = None
    laterality: Code | None = None

    @property
    def segment_label(self) -> str:
        """SegmentLabel, e.g. ``"intervertebral disc L4-L5"``."""
        return f"{self.label.replace('_', ' ')} {self.name}"

    def on_slices(self, keep: np.ndarray) -> SegmentInstance:
        """The same part on a subset of the slices (``keep`` indexes the first axis)."""
        return replace(self, mask=self.mask[keep])


@dataclass(frozen=True)
class Segment:
    """One segment to write: its label, the label-map entry it belongs to and its own codes."""

    segment_label: str
    spec: LabelSpec
    anatomic_region: Code | None
    laterality: Code | None


def segment_layout(label_volume: np.ndarray, label_map: LabelMap,
                   instances: Sequence[SegmentInstance] = ()) -> tuple[np.ndarray, list[Segment]]:
    """Segments of a label volume and an array of their numbers (1..n, 0 = background).

    Labels in label-map order; a label with instances gives one segment per non-empty
    instance (in the given order; where instances overlap the first wins), then one
    segment under the label's own name for its voxels outside every instance.

    Raises
    ------
    ValueError
        If an instance names a label the map lacks, its mask does not match the volume's
        shape, or two segments would get the same label.
    """
    for instance in instances:
        label_map.by_name(instance.label)
        if instance.mask.shape != label_volume.shape:
            raise ValueError(f"instances: mask of {instance.segment_label!r} has shape {instance.mask.shape}, "
                             f"the label volume {label_volume.shape}")
    numbers = np.zeros(label_volume.shape, dtype=np.uint16)
    segments: list[Segment] = []
    for spec in label_map.labels:
        rest = label_volume == spec.value
        parts = [(i.segment_label, i.mask, i.anatomic_region, i.laterality)
                 for i in instances if i.label == spec.name]
        for segment_label, mask, region, laterality in [*parts, (spec.name, rest, anatomic_region(spec.name), None)]:
            voxels = rest & mask
            if voxels.any():
                segments.append(Segment(segment_label, spec, region, laterality))
                numbers[voxels] = len(segments)
                rest &= ~voxels
    labels = [segment.segment_label for segment in segments]
    if len(set(labels)) != len(labels):
        raise ValueError(f"instances: segment labels repeat: {labels}")
    return numbers, segments


def label_of_segment(segment_label: str, label_map: LabelMap) -> str:
    """Label-map name of a segment written here: its own label, or that of an instance segment.

    Raises
    ------
    KeyError
        If no label of ``label_map`` matches.
    """
    if segment_label in label_map.names:
        return segment_label
    matches = [name for name in label_map.names if segment_label.startswith(name.replace("_", " ") + " ")]
    if not matches:
        raise KeyError(f"segment {segment_label!r} matches no label of the label map")
    return max(matches, key=len)


def node_serial_number() -> str:
    """DeviceSerialNumber of the objects this node writes: the host name (an LO, at most 64 characters)."""
    return (platform.node() or "unknown")[:_MAX_LO_LENGTH]


def with_type2_patient_attributes(ds: Dataset) -> Dataset:
    """Shallow copy of ``ds`` in which every type-2 patient/study attribute exists.

    Our knee data lacks PatientID and PatientName; they are type 2 (required, may be
    empty), and highdicom reads them from the source to build derived objects. The
    copy gets the missing ones as empty elements; ``ds`` itself is not changed.

    Parameters
    ----------
    ds : pydicom.Dataset
        A source instance.

    Returns
    -------
    pydicom.Dataset
        New dataset sharing ``ds``'s data elements, plus empty elements for the
        missing keywords of :data:`TYPE2_PATIENT_STUDY_ATTRIBUTES`.
    """
    # Dataset.copy() shares the element mapping with the original, so adding an
    # element to it would add it to ``ds`` too; build a new mapping instead.
    copied = Dataset()
    copied.update(ds)
    if hasattr(ds, "file_meta"):
        copied.file_meta = ds.file_meta
    for keyword in TYPE2_PATIENT_STUDY_ATTRIBUTES:
        if keyword not in copied:
            setattr(copied, keyword, None)
    return copied


def build_segmentation(
    source_images: Sequence[Dataset],
    label_volume: np.ndarray,
    label_map: LabelMap,
    algorithm: AlgorithmInfo,
    *,
    series_number: int = 300,
    series_description: str = "msk-node segmentation",
    software_version: str = __version__,
    device_serial_number: str | None = None,
    instances: Sequence[SegmentInstance] = (),
) -> hd.seg.Segmentation:
    """Build a BINARY DICOM Segmentation of one series from a label volume.

    Parameters
    ----------
    source_images : sequence of pydicom.Dataset
        Single-frame instances of one series, in volume order: ``source_images[k]``
        is slice ``k`` of ``label_volume``. Pixel data need not be loaded.
    label_volume : numpy.ndarray
        ``uint8`` array ``[slice, row, column]`` of label-map values (0 = background),
        shape ``(len(source_images), Rows, Columns)``.
    label_map : LabelMap
        Names, codes and colours of the values in ``label_volume``.
    algorithm : AlgorithmInfo
        Provenance written into every segment's algorithm identification.
    series_number : int, optional
        Series Number of the new segmentation series.
    series_description : str, optional
        Series Description of the new segmentation series.
    software_version : str, optional
        Software Versions of the writing equipment (msk-node's version).
    device_serial_number : str or None, optional
        Device Serial Number of the writing equipment; defaults to the host name.
    instances : sequence of SegmentInstance, optional
        Labels to split into instance segments (see :func:`segment_layout`).

    Returns
    -------
    highdicom.seg.Segmentation
        One segment per label present in ``label_volume``, or per instance (numbers
        1..n in label-map order, see :func:`segment_number_map`), each with one frame
        per source instance, uncompressed (Explicit VR Little Endian).

    Raises
    ------
    TypeError
        If an argument has the wrong type or ``label_volume`` is not ``uint8``.
    ValueError
        If the sources are not single-frame images of one series with one geometry,
        ``label_volume`` has the wrong shape or values the label map does not know,
        or the volume holds no segment at all (only background), or an instance
        does not fit (see :func:`segment_layout`).
    """
    _validate(source_images, label_volume, label_map, algorithm, series_number)
    # Segment numbers 1..n: highdicom reads a label-map style array as "value v is
    # segment v", and segment numbers must be consecutive.
    segment_array, segments = segment_layout(label_volume, label_map, instances)

    algorithm_identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=ALGORITHM_FAMILY,
        version=algorithm.version,
        parameters=algorithm.parameter_items(),
    )
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.segment_label,
            segmented_property_category=segment.spec.category,
            segmented_property_type=segment.spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification,
            tracking_uid=hd.UID(),
            tracking_id=segment.segment_label,
            anatomic_regions=[segment.anatomic_region] if segment.anatomic_region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*segment.spec.colour),
        )
        if segment.laterality is not None:
            # DICOM CID 244 (Laterality) modifies the segmented property type.
            description.SegmentedPropertyTypeModifierCodeSequence = [hd.sr.CodedConcept.from_code(segment.laterality)]
        descriptions.append(description)

    # highdicom copies the patient and study attributes from the first source, so the
    # filled-in empty type-2 elements are carried into the SEG as empty elements too.
    return hd.seg.Segmentation(
        source_images=[with_type2_patient_attributes(ds) for ds in source_images],
        pixel_array=segment_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=software_version,
        device_serial_number=node_serial_number() if device_serial_number is None else device_serial_number,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        series_description=series_description,
    )


def segment_number_map(seg: Dataset) -> dict[str, int]:
    """Label name to segment number of a segmentation written by this module.

    Parameters
    ----------
    seg : pydicom.Dataset
        A Segmentation (built here or read back from a file).

    Returns
    -------
    dict of str to int
        ``{SegmentLabel: SegmentNumber}`` in segment order.
    """
    return {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}


def write_segmentation(seg: hd.seg.Segmentation, path: Path) -> Path:
    """Write a segmentation as a DICOM Part 10 file.

    Parameters
    ----------
    seg : highdicom.seg.Segmentation
        The object to write.
    path : pathlib.Path
        Destination file; its folder must exist.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    seg.save_as(path, enforce_file_format=True)
    return path


def _validate(
    source_images: Sequence[Dataset],
    label_volume: np.ndarray,
    label_map: LabelMap,
    algorithm: AlgorithmInfo,
    series_number: int,
) -> None:
    """Check the arguments of :func:`build_segmentation`."""
    if isinstance(source_images, Dataset) or not isinstance(source_images, Sequence):
        raise TypeError("source_images: expected a sequence of pydicom.Dataset")
    if len(source_images) == 0:
        raise ValueError("source_images: no instances")
    for index, ds in enumerate(source_images):
        if not isinstance(ds, Dataset):
            raise TypeError(f"source_images[{index}]: expected pydicom.Dataset, got {type(ds).__name__}")
        missing = [
            keyword
            for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
                            "Rows", "Columns", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
            if keyword not in ds
        ]
        if missing:
            raise ValueError(f"source_images[{index}]: missing {', '.join(missing)}")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"source_images[{index}]: multi-frame images are not supported")
    first = source_images[0]
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
        values = {str(ds[keyword].value) for ds in source_images}
        if len(values) > 1:
            raise ValueError(f"source_images: instances differ in {keyword} ({len(values)} values); "
                             "they must be one series")
    if len({str(ds.SOPInstanceUID) for ds in source_images}) != len(source_images):
        raise ValueError("source_images: an instance appears more than once")
    for keyword in ("ImageOrientationPatient", "PixelSpacing"):
        reference = np.asarray(first[keyword].value, dtype=float)
        for index, ds in enumerate(source_images):
            if not np.allclose(np.asarray(ds[keyword].value, dtype=float), reference, atol=_GEOMETRY_TOLERANCE):
                raise ValueError(f"source_images[{index}]: {keyword} differs from source_images[0]")

    if not isinstance(label_volume, np.ndarray):
        raise TypeError(f"label_volume: expected numpy.ndarray, got {type(label_volume).__name__}")
    if label_volume.dtype != np.uint8:
        raise TypeError(f"label_volume: dtype must be uint8, got {label_volume.dtype}")
    expected = (len(source_images), int(first.Rows), int(first.Columns))
    if label_volume.shape != expected:
        raise ValueError(f"label_volume: shape {label_volume.shape} does not match the sources {expected} "
                         "(slices, Rows, Columns)")
    if not isinstance(label_map, LabelMap):
        raise TypeError(f"label_map: expected LabelMap, got {type(label_map).__name__}")
    present = {int(v) for v in np.unique(label_volume)} - {0}
    unknown = sorted(present - set(label_map.values))
    if unknown:
        raise ValueError(f"label_volume: values {unknown} are not in label_map")
    if not present:
        raise ValueError("label_volume: no segment to write, the volume holds only background (0)")

    if not isinstance(algorithm, AlgorithmInfo):
        raise TypeError(f"algorithm: expected AlgorithmInfo, got {type(algorithm).__name__}")
    for field_name in ("name", "version"):
        text = getattr(algorithm, field_name)
        if not isinstance(text, str) or not text or len(text) > _MAX_LO_LENGTH:
            raise ValueError(f"algorithm.{field_name}: must be 1..{_MAX_LO_LENGTH} characters, got {text!r}")
    if not isinstance(algorithm.weights_sha256, str) or not algorithm.weights_sha256:
        raise ValueError("algorithm.weights_sha256: must be a non-empty string")
    if not isinstance(series_number, int) or isinstance(series_number, bool) or series_number < 1:
        raise ValueError(f"series_number: must be a positive integer, got {series_number!r}")


def label_volume_from_seg(seg: hd.seg.Segmentation, source_uids: Sequence[str], label_map: LabelMap) -> np.ndarray:
    """Read a SEG back as a label volume ``[k, row, col]`` on its sources, in the order of ``source_uids``.

    Instance segments go back to their label (:func:`label_of_segment`). Where segments
    overlap (not the case for SEGs we write) the later segment wins.
    """
    stacked = seg.get_pixels_by_source_instance([str(uid) for uid in source_uids])
    volume = np.zeros(stacked.shape[:3], dtype=np.uint8)
    for name, number in segment_number_map(seg).items():
        volume[stacked[..., number - 1] > 0] = label_map.by_name(label_of_segment(name, label_map)).value
    return volume
