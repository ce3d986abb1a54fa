"""Every coded concept (SNOMED CT, DCM, UCUM) that msk-node writes into DICOM.

Codes come from pydicom's code dictionaries (``codes.SCT``, ``codes.cidNNNN``)
wherever the concept is listed there, so scheme, value and meaning match the
DICOM standard. The few SNOMED CT body structures that pydicom does not list
(thigh muscles, vertebral body, intervertebral disc) are written out below with
their SNOMED CT concept ids; each was cross-checked against at least one
published segmentation or FHIR terminology mapping.

Segmented property categories follow DICOM CID 7150: bones, muscles and spinal
structures are ``Anatomical Structure``; cartilage, meniscus, subcutaneous tissue
and bone tissue (femoral cortex) are ``Tissue`` because DICOM lists their property
types in CID 7166 "Segmentation Property Types: Tissue".

Several labels share a property type (three cartilages are all ``Cartilage``;
femoral cortex, femoral marrow and femur all concern the femur). They are told
apart by their segment label and by the anatomic region from
:func:`anatomic_region`.
"""
from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Segmented property categories (DICOM CID 7150).
ANATOMICAL_STRUCTURE: Code = codes.cid7150.AnatomicalStructure
TISSUE: Code = codes.cid7150.Tissue

#: Algorithm family of every segment msk-node produces (DICOM CID 7162).
ALGORITHM_FAMILY: Code = codes.cid7162.ArtificialIntelligence

#: Measurement units (UCUM) for lengths, areas and volumes derived from segments.
MILLIMETER: Code = codes.UCUM.Millimeter
SQUARE_MILLIMETER: Code = codes.UCUM.SquareMillimeter
CUBIC_MILLIMETER: Code = codes.UCUM.CubicMillimeter

# SNOMED CT body structures missing from pydicom's dictionary.
QUADRICEPS_FEMORIS_MUSCLE = Code("21989003", "SCT", "Quadriceps femoris muscle")
HAMSTRING_MUSCLES = Code("128511007", "SCT", "Hamstring muscle")
HIP_ADDUCTOR_MUSCLES = Code("303803003", "SCT", "Adductor muscle of hip joint")
SARTORIUS_MUSCLE = Code("12595009", "SCT", "Sartorius muscle")
GRACILIS_MUSCLE = Code("2577006", "SCT", "Gracilis muscle")
VERTEBRAL_BODY = Code("3572006", "SCT", "Vertebral body")
INTERVERTEBRAL_DISC = Code("360499006", "SCT", "Intervertebral disc")

_ANATOMY: dict[str, tuple[Code, Code]] = {
    # knee
    "femur": (ANATOMICAL_STRUCTURE, codes.SCT.Femur),
    "tibia": (ANATOMICAL_STRUCTURE, codes.SCT.Tibia),
    "patella": (ANATOMICAL_STRUCTURE, codes.SCT.Patella),
    "femoral_cartilage": (TISSUE, codes.cid7166.Cartilage),
    "tibial_cartilage": (TISSUE, codes.cid7166.Cartilage),
    "patellar_cartilage": (TISSUE, codes.cid7166.Cartilage),
    "meniscus": (TISSUE, codes.cid7166.Meniscus),
    # thigh
    "subcutaneous_fat": (TISSUE, codes.cid7166.SubcutaneousTissue),
    "quadriceps": (ANATOMICAL_STRUCTURE, QUADRICEPS_FEMORIS_MUSCLE),
    "hamstrings": (ANATOMICAL_STRUCTURE, HAMSTRING_MUSCLES),
    "adductors": (ANATOMICAL_STRUCTURE, HIP_ADDUCTOR_MUSCLES),
    "sartorius": (ANATOMICAL_STRUCTURE, SARTORIUS_MUSCLE),
    "gracilis": (ANATOMICAL_STRUCTURE, GRACILIS_MUSCLE),
    "femoral_cortex": (TISSUE, codes.cid7166.BoneTissue),
    "femoral_marrow": (ANATOMICAL_STRUCTURE, codes.SCT.BoneMarrow),
    # spine
    "vertebral_body": (ANATOMICAL_STRUCTURE, VERTEBRAL_BODY),
    "intervertebral_disc": (ANATOMICAL_STRUCTURE, INTERVERTEBRAL_DISC),
}

# Where a property type alone does not say which structure is meant.
_ANATOMIC_REGION: dict[str, Code] = {
    "femoral_cartilage": codes.SCT.Femur,
    "tibial_cartilage": codes.SCT.Tibia,
    "patellar_cartilage": codes.SCT.Patella,
    "femoral_cortex": codes.SCT.Femur,
    "femoral_marrow": codes.SCT.Femur,
}


def known_anatomy() -> tuple[str, ...]:
    """Label names that have built-in codes.

    Returns
    -------
    tuple of str
        The names :func:`anatomy_codes` accepts, in definition order.
    """
    return tuple(_ANATOMY)


def anatomy_codes(name: str) -> tuple[Code, Code]:
    """Segmented property category and type of a label.

    Parameters
    ----------
    name : str
        Label name, e.g. ``"femoral_cartilage"``.

    Returns
    -------
    tuple of pydicom.sr.coding.Code
        ``(category, property_type)``.

    Raises
    ------
    KeyError
        If ``name`` has no built-in codes.
    """
    try:
        return _ANATOMY[name]
    except KeyError:
        raise KeyError(
            f"no built-in SNOMED CT codes for label {name!r}; known labels: {', '.join(_ANATOMY)}. "
            "Give 'category' and 'type' explicitly in the label map."
        ) from None


def anatomic_region(name: str) -> Code | None:
    """Anatomic region that disambiguates a label's property type, if it needs one.

    Parameters
    ----------
    name : str
        Label name.

    Returns
    -------
    pydicom.sr.coding.Code or None
        E.g. ``Femur`` for ``"femoral_cartilage"``; ``None`` when the property
        type is specific on its own or the label is unknown.
    """
    return _ANATOMIC_REGION.get(name)


# Measurement concepts written into TID 1500 reports. Cartilage thickness and T1rho
# have no code in DICOM or the SNOMED subset pydicom lists; they use this private
# scheme, declared in every report's CodingSchemeIdentificationSequence.
MSK_NODE_SCHEME = "99MSKNODE"
MSK_NODE_SCHEME_NAME = "msk-node measurement concepts"
MSK_NODE_SCHEME_RESPONSIBLE_ORGANIZATION = "msk-node"
CARTILAGE_THICKNESS_2D = Code("CART_THICK_2D", MSK_NODE_SCHEME, "Cartilage thickness, per-slice medial axis")
CARTILAGE_THICKNESS_3D = Code("CART_THICK_3D", MSK_NODE_SCHEME, "Cartilage thickness, 3D mid-surface normal")
T1RHO_RELAXATION_TIME = Code("T1RHO", MSK_NODE_SCHEME, "T1rho relaxation time")
T2_RELAXATION_TIME: Code = codes.DCM.T2
DISC_HEIGHT: Code = codes.DCM.Height
VOLUME: Code = codes.SCT.Volume
MEAN: Code = codes.SCT.Mean
CUBIC_CENTIMETER: Code = codes.UCUM.CubicCentimeter
MILLISECOND: Code = codes.UCUM.Millisecond
#: DICOM CID 42 qualifier written instead of a number when a measurement is not available.
MEASUREMENT_FAILURE = Code("114006", "DCM", "Measurement failure")
#: Concept of the free-text reason attached to a failed measurement.
COMMENT: Code = codes.DCM.Comment

#: Laterality of a finding site (DICOM CID 244) by knee side.
LATERALITY: dict[str, Code] = {"R": codes.SCT.Right, "L": codes.SCT.Left}
#: Topographical modifiers (DICOM CID 2) of cartilage sub-regions, by the suffix of their name.
#: The trochlea is the anterior (patellar) surface of the femur; no SNOMED CT concept of the
#: trochlea is in the DICOM dictionaries, so it is the femur qualified as anterior.
SUB_REGION_MODIFIERS: dict[str, Code] = {
    "medial": codes.SCT.Medial,
    "lateral": codes.SCT.Lateral,
    "trochlear": codes.SCT.Anterior,
}
#: Procedure reported in every measurement report: the MR entry of DICOM CID 100
#: "Quantitative Diagnostic Imaging Procedures" (TID 1500 draws the procedure from it).
MAGNETIC_RESONANCE_IMAGING = Code("25056-3", "LN", "MRI unspecified body region")

#: Laterality (DICOM CID 244) of paired structures, e.g. the left and right thigh segments.
LEFT: Code = codes.SCT.Left
RIGHT: Code = codes.SCT.Right

#: Disc levels (names as the biomarkers give them) to their SNOMED CT level concepts, written as the
#: anatomic region of a disc's segment and as the finding site of its measurements. A disc whose level
#: is uncertain gets none of them.
DISC_LEVELS: dict[str, Code] = {
    "T12-L1": codes.SCT.LevelOfT12L1IntervertebralDisc,
    "L1-L2": codes.SCT.LevelOfL1L2IntervertebralDisc,
    "L2-L3": codes.SCT.LevelOfL2L3IntervertebralDisc,
    "L3-L4": codes.SCT.LevelOfL3L4IntervertebralDisc,
    "L4-L5": codes.SCT.LevelOfL4L5IntervertebralDisc,
    "L5-S1": codes.SCT.LevelOfL5S1IntervertebralDisc,
}
