"""The clinician report as DICOM: an Encapsulated PDF and an RGB Secondary Capture in the source's study.

Both copy the patient and study modules of a source instance, so PACS files them with the study
they describe, and each gets a series of its own.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from msk_node import __version__
from msk_node.clinical_report import ReportContent, render_report, to_pdf, to_rgb
from msk_node.labels import LabelMap
from msk_node.seg_writer import TYPE2_PATIENT_STUDY_ATTRIBUTES, node_serial_number, with_type2_patient_attributes

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
TITLE = "msk-node clinician report"
#: Patient and study attributes copied from the source instance when it has them (beyond the type-2 ones).
COPIED_ATTRIBUTES = (*TYPE2_PATIENT_STUDY_ATTRIBUTES, "StudyInstanceUID", "StudyDescription", "IssuerOfPatientID",
                     "PatientAge", "PatientWeight", "PatientSize")


def build_encapsulated_pdf(pdf: bytes, source: Dataset, *, series_number: int,
                           series_description: str = TITLE) -> Dataset:
    """Encapsulated PDF Storage instance holding ``pdf``, in the study of ``source``."""
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    source = with_type2_patient_attributes(source)
    for keyword in COPIED_ATTRIBUTES:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Manufacturer = "msk-node"
    ds.ManufacturerModelName = "msk-node"
    ds.DeviceSerialNumber = node_serial_number()
    ds.SoftwareVersions = __version__
    ds.ConversionType = "SYN"
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = TITLE
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values are padded to even length; the length attribute keeps the document's own.
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + b"\0" * (len(pdf) % 2)
    return ds


def build_secondary_capture(rgb: np.ndarray, source: Dataset, *, series_number: int,
                            series_description: str = TITLE) -> hd.sc.SCImage:
    """RGB Secondary Capture of the rendered page, in the study of ``source``.

    Its patient orientation is that of the key images, which show the source slices as they lie.
    """
    laterality = str(source.get("Laterality", "") or "")
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_type2_patient_attributes(source), pixel_array=rgb, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1, manufacturer="msk-node",
        patient_orientation=slice_orientation(source), transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description, software_versions=__version__,
        laterality=laterality if laterality in ("R", "L") else None)
    if "Laterality" not in image:
        image.Laterality = None  # type 2C for a paired body part: present, empty when the side is unknown
    return image


def slice_orientation(source: Dataset) -> tuple[str, str]:
    """Patient orientation of the page's key images: the directions of the source slices' rows and columns."""
    orientation = np.asarray(source.ImageOrientationPatient, dtype=float).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # LPS: +x is left, +y posterior, +z head
    return tuple(letters[int(np.argmax(np.abs(v)))][0 if v[np.argmax(np.abs(v))] > 0 else 1] for v in orientation)


def write_clinical_report(content: ReportContent, source: Dataset, label_map: LabelMap, output_dir: Path, *,
                          pdf_series_number: int, sc_series_number: int) -> list[Path]:
    """Render the page and write it as ``report-<study>.pdf.dcm`` and ``report-<study>.sc.dcm``."""
    figure = render_report(content, label_map)
    pdf, rgb = to_pdf(figure), to_rgb(figure)
    output_dir.mkdir(parents=True, exist_ok=True)
    study = str(source.StudyInstanceUID)
    pdf_path, sc_path = output_dir / f"report-{study}.pdf.dcm", output_dir / f"report-{study}.sc.dcm"
    # Both are built before either is written, and a failed write removes both: the report is sent whole or not at all.
    documents = {pdf_path: build_encapsulated_pdf(pdf, source, series_number=pdf_series_number),
                 sc_path: build_secondary_capture(rgb, source, series_number=sc_series_number)}
    try:
        for path, dataset in documents.items():
            dataset.save_as(path, enforce_file_format=True)
    except BaseException:
        for path in documents:
            path.unlink(missing_ok=True)
        raise
    return list(documents)
