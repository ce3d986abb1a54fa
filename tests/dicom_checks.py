"""Shared test helpers: DICOM validator wrappers and a synthetic MR series writer.

The series writer uses pydicom only, so tests of DICOM writers do not depend on the
product's own readers.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid


def dciodvfy_errors(path: str | Path) -> list[str]:
    """Run ``dciodvfy`` on one file and return its error lines.

    Parameters
    ----------
    path : str or pathlib.Path
        DICOM file to check.

    Returns
    -------
    list of str
        Output lines that contain ``"Error"``; empty when the object is valid.

    Raises
    ------
    FileNotFoundError
        If ``dciodvfy`` (dicom3tools) is not on PATH.
    """
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise FileNotFoundError("dciodvfy (dicom3tools) is not on PATH")
    result = subprocess.run([executable, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def sr_validator_errors(path: str | Path) -> list[str]:
    """Run PixelMed's ``DicomSRValidator`` (content item order and template checks) on one SR.

    Returns
    -------
    list of str
        Its ``Error`` lines; empty when the report is valid.

    Raises
    ------
    FileNotFoundError
        If ``DicomSRValidator`` (Debian pixelmed-apps) is not on PATH.
    """
    executable = shutil.which("DicomSRValidator")
    if executable is None:
        raise FileNotFoundError("DicomSRValidator (pixelmed-apps) is not on PATH")
    # The template rules exceed the JDK's default XPath size limits.
    limits = "-Djdk.xml.xpathExprOpLimit=0 -Djdk.xml.xpathExprGrpLimit=0 -Djdk.xml.xpathTotalOpLimit=0"
    env = {**os.environ, "JDK_JAVA_OPTIONS": limits}
    result = subprocess.run([executable, "-checkcontentitemorder", "-checktemplateid", str(path)],
                            capture_output=True, text=True, check=False, env=env)
    output = result.stdout + result.stderr
    if "Root Template Validation Complete" not in output:
        return [f"DicomSRValidator did not complete: {output[-500:]}"]
    return [line for line in output.splitlines() if line.startswith("Error")]


def tid1500_read(path: str | Path) -> dict:
    """The measurement report as dcmqi's ``tid1500reader`` (3D Slicer's reader) reads it: its JSON.

    Raises
    ------
    FileNotFoundError
        If ``tid1500reader`` (PyPI dcmqi) is not on PATH.
    subprocess.CalledProcessError
        If the reader fails.
    """
    # dcmqi installs into the virtual environment, which need not be on PATH.
    executable = shutil.which("tid1500reader") or shutil.which("tid1500reader", path=str(Path(sys.executable).parent))
    if executable is None:
        raise FileNotFoundError("tid1500reader (dcmqi) is not on PATH")
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "report.json"
        subprocess.run([executable, "--inputDICOM", str(path), "--outputMetadata", str(output)],
                       capture_output=True, text=True, check=True)
        return json.loads(output.read_text())


def tid1500_values(report: dict) -> dict[tuple[str, str], float]:
    """``{(tracking identifier, quantity [+ " (derivation)"]): value}`` of a ``tid1500reader`` JSON."""
    values = {}
    for group in report["Measurements"]:
        for item in group["measurementItems"]:
            key = item["quantity"]["CodeMeaning"]
            if "derivationModifier" in item:
                key += f" ({item['derivationModifier']['CodeMeaning']})"
            values[(group["TrackingIdentifier"], key)] = float(item["value"])
    return values


def make_mr_series(
    tmp_path: Path,
    n: int = 6,
    rows: int = 32,
    cols: int = 40,
    iop: Sequence[float] = (0, 1, 0, 0, 0, -1),
    spacing: tuple[float, float] = (0.5, 0.6),
    slice_step: float = 1.5,
    drop: Sequence[str] = ("PatientID",),
) -> list[Path]:
    """Write a small, valid single-frame MR Image Storage series.

    Parameters
    ----------
    tmp_path : pathlib.Path
        Folder to write into (created if needed).
    n : int
        Number of slices.
    rows, cols : int
        Matrix size.
    iop : sequence of float
        ImageOrientationPatient (row direction, then column direction); the default
        is sagittal. Slices advance along row x column.
    spacing : tuple of float
        PixelSpacing: (row spacing, column spacing) in mm.
    slice_step : float
        Distance between slice origins along the slice normal, in mm.
    drop : sequence of str
        Keywords of type-2 attributes to leave out (the default mimics our knee
        data, which has no PatientID).

    Returns
    -------
    list of pathlib.Path
        One file per slice, in slice order (slice ``k`` at origin + k * step * normal).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    row_dir = np.asarray(iop[:3], dtype=float)
    col_dir = np.asarray(iop[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-12.5, 30.25, 41.0])
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName = "Test^Knee"
        ds.PatientID = "MSK0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 5
        ds.SeriesDescription = "synthetic PD"
        ds.BodyPartExamined = "KNEE"
        ds.Laterality = "R"
        ds.PatientPosition = "FFS"
        ds.Manufacturer = "msk-node tests"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 30.0
        ds.RepetitionTime = 3000.0
        ds.EchoTrainLength = 8
        ds.MagneticFieldStrength = 3.0
        ds.SliceThickness = slice_step
        ds.SpacingBetweenSlices = slice_step
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + k * slice_step * normal]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceLocation = round(float(k * slice_step), 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16).tobytes()
        for keyword in drop:
            delattr(ds, keyword)
        path = tmp_path / f"mr_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def assert_frames_on_sources(seg: Dataset, sources: Sequence[Dataset]) -> None:
    """Every SEG frame references one source instance and lies exactly at its position;
    every segment covers every source instance."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    frames_per_segment: dict[int, set[str]] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        referenced = by_uid[str(source.ReferencedSOPInstanceUID)]
        frame_position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert frame_position == [float(v) for v in referenced.ImagePositionPatient]
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames_per_segment.setdefault(number, set()).add(str(source.ReferencedSOPInstanceUID))
    assert frames_per_segment and all(uids == set(by_uid) for uids in frames_per_segment.values())


def seg_label_volume(seg, sources: Sequence[Dataset], label_map) -> np.ndarray:
    """Label volume in source order, rebuilt from the stored segments only."""
    from msk_node.seg_writer import label_volume_from_seg

    return label_volume_from_seg(seg, [ds.SOPInstanceUID for ds in sources], label_map)
