"""Writing phantom images as MR Image Storage series (one file per slice)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

from msk_node_phantoms.grid import POSITION_DECIMALS, SeriesGrid

#: Fixed acquisition date and time of all phantom studies.
STUDY_DATE, STUDY_TIME = "20240101", "120000"


def phantom_uid(*parts: object) -> str:
    """Deterministic UID derived from ``parts`` (kind, seed, flags, series, slice)."""
    return generate_uid(entropy_srcs=["msk-node-phantom", *(str(p) for p in parts)])


def slug(text: str) -> str:
    """Folder name for a series description, e.g. ``"Sag 3D DESS"`` -> ``"sag_3d_dess"``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass(frozen=True)
class StudyInfo:
    """Patient- and study-level attributes shared by the series of one phantom."""

    patient_name: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    body_part: str
    patient_position: str
    laterality: str | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """Series-level attributes of one phantom series."""

    series_uid: str
    description: str
    series_number: int
    echo_time: float
    repetition_time: float
    flip_angle: float
    scanning_sequence: str
    acquisition_type: str
    echo_train_length: int = 1


def _ds(value: float) -> float:
    """A float that prints as a valid DS (at most 16 characters)."""
    return float(round(value, POSITION_DECIMALS))


def write_series(
    folder: Path, pixels: npt.NDArray[np.uint16], grid: SeriesGrid, study: StudyInfo, series: SeriesInfo
) -> list[Path]:
    """Write one file per slice, ``IM_0001.dcm`` ..., in order along the slice normal.

    Parameters
    ----------
    folder : pathlib.Path
        Output folder, created if missing.
    pixels : numpy.ndarray
        uint16 (slices, rows, columns) stored values.
    grid : SeriesGrid
        Geometry of ``pixels``.
    study, series : StudyInfo, SeriesInfo
        Attributes of the study and the series.

    Returns
    -------
    list of pathlib.Path
        Written files, slice 0 first.
    """
    folder.mkdir(parents=True, exist_ok=True)
    low, high = np.percentile(pixels, [1.0, 99.5])
    normal = grid.normal
    paths = []
    for k in range(grid.size[0]):
        position = grid.slice_position(k)
        sop_uid = phantom_uid(series.series_uid, k)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = STUDY_TIME
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = "msk-node phantom"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series.description
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = study.body_part
        ds.ScanningSequence = series.scanning_sequence
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = series.acquisition_type
        ds.SliceThickness = _ds(grid.slice_thickness)
        ds.RepetitionTime = _ds(series.repetition_time)
        ds.EchoTime = _ds(series.echo_time)
        ds.EchoTrainLength = series.echo_train_length
        ds.MagneticFieldStrength = 3.0
        ds.SpacingBetweenSlices = _ds(grid.slice_spacing)
        ds.FlipAngle = _ds(series.flip_angle)
        ds.PatientPosition = study.patient_position
        ds.StudyInstanceUID = study.study_uid
        ds.SeriesInstanceUID = series.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series.series_number
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in grid.orientation]
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        if study.laterality:
            ds.Laterality = study.laterality
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(position @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = grid.size[1], grid.size[2]
        ds.PixelSpacing = [_ds(grid.pixel_spacing[0]), _ds(grid.pixel_spacing[1])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds((low + high) / 2.0)
        ds.WindowWidth = _ds(max(high - low, 1.0))
        ds.PixelData = np.ascontiguousarray(pixels[k], dtype="<u2").tobytes()
        path = folder / f"IM_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
