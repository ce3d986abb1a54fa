"""Read a folder of DICOM files into series, keeping a reason for every file left out.

A study arrives as loose files. One unreadable, non-image or undecodable file must
never stop the others, so every file is either part of a :class:`Series` or listed
in :attr:`StudyFiles.skipped` with the reason.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

#: SOP classes that carry no image to segment (our own outputs, reports, states).
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF Storage",
}


@dataclass(frozen=True)
class SkippedFile:
    """A file, or a whole series, that was not used, and why."""

    path: str
    reason: str


@dataclass
class Series:
    """The decoded instances of one series, in the order they were read."""

    series_instance_uid: str
    datasets: list[pydicom.Dataset] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    @property
    def first(self) -> pydicom.Dataset:
        return self.datasets[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", ""))

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", ""))

    @property
    def study_instance_uid(self) -> str:
        return str(self.first.get("StudyInstanceUID", ""))

    def __len__(self) -> int:
        return len(self.datasets)


@dataclass
class StudyFiles:
    """Everything found in an input folder."""

    series: list[Series]
    skipped: list[SkippedFile]


def read_instance(path: Path) -> pydicom.Dataset:
    """Read one DICOM file and decode its pixel data.

    Raises
    ------
    ValueError
        If the file is not DICOM, is not an image, or its pixel data cannot be decoded
        (for example a compressed transfer syntax without a decoder).
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError) as error:
        raise ValueError(f"not a readable DICOM file: {error}") from error
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in NON_IMAGE_SOP_CLASSES:
        raise ValueError(f"not an image ({NON_IMAGE_SOP_CLASSES[sop_class]})")
    if "PixelData" not in ds:
        raise ValueError("no pixel data")
    if "SeriesInstanceUID" not in ds:
        raise ValueError("no SeriesInstanceUID")
    try:
        # Decode now so a broken or undecodable frame is caught per file, not mid-pipeline.
        ds.pixel_array  # noqa: B018
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, TypeError) as error:
        # The decoder plugins raise these for missing decoders and damaged data.
        syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise ValueError(f"pixel data cannot be decoded ({name}): {error}") from error
    return ds


def read_study_folder(folder: Path) -> StudyFiles:
    """Read every file below ``folder`` (recursively) and group the images by series."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder does not exist: {folder}")
    by_series: dict[str, Series] = defaultdict(lambda: Series(series_instance_uid=""))
    skipped: list[SkippedFile] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = read_instance(path)
        except ValueError as error:
            logger.warning("skipped file %s: %s", path.name, error)
            skipped.append(SkippedFile(str(path), str(error)))
            continue
        series = by_series[str(ds.SeriesInstanceUID)]
        series.series_instance_uid = str(ds.SeriesInstanceUID)
        series.datasets.append(ds)
        series.paths.append(path)
    return StudyFiles(series=list(by_series.values()), skipped=skipped)
