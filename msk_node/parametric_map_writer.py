"""DICOM Parametric Maps of fitted relaxation maps (T1rho, T2), written with highdicom.

One frame per source slice of the map's grid, float32 values in ms, lying on and
referencing that source instance (same frame of reference, same plane position).
Voxels without a valid fit (NaN) are stored as :data:`NOT_FITTED_MS`; a real fit is
never below ``PLAUSIBLE_MS[0]`` (0.5 ms), so 0 cannot be mistaken for a measurement.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from msk_node import __version__
from msk_node import codes as msk_codes
from msk_node.biomarkers.relaxometry import RelaxationMap
from msk_node.seg_writer import MANUFACTURER, MANUFACTURER_MODEL_NAME, node_serial_number, with_type2_patient_attributes

#: Stored value of voxels without a valid fit.
NOT_FITTED_MS = 0.0
#: Quantity of each map kind (RelaxationMap.kind): DCM "T2"; T1rho has no standard code.
QUANTITIES: dict[str, Code] = {
    "t1rho": msk_codes.T1RHO_RELAXATION_TIME,
    "t2": msk_codes.T2_RELAXATION_TIME,
    "dess_t2": msk_codes.T2_RELAXATION_TIME,
}
#: Percentiles of the fitted values that bound the default display window.
WINDOW_PERCENTILES = (1.0, 99.0)

#: Largest distance (mm) between a source slice and the map plane it is matched to.
_POSITION_TOLERANCE_MM = 0.01


def build_parametric_map(relaxation: RelaxationMap, series_number: int, series_description: str | None = None,
                         device_serial_number: str | None = None) -> hd.pm.ParametricMap:
    """A Parametric Map of ``relaxation.t_ms`` on the slices of ``relaxation.source_datasets``.

    Parameters
    ----------
    relaxation : RelaxationMap
        Fitted map with its ``kind`` (a key of :data:`QUANTITIES`) and the source instances
        of one echo on its grid.
    series_number : int
        Series Number of the new series.
    series_description : str, optional
        Series Description; by default ``"msk-node <kind> map"``.
    device_serial_number : str, optional
        By default the host name.

    Returns
    -------
    highdicom.pm.ParametricMap
        One float32 frame per source instance, values in ms (UCUM ``ms``), the quantity
        coded in the real world value mapping, a window spanning the 1st-99th percentile
        of the fitted values.

    Raises
    ------
    ValueError
        If the kind is unknown, there are no source instances, a source instance lies off
        the map's grid, or no voxel has a valid fit.
    """
    if relaxation.kind not in QUANTITIES:
        raise ValueError(f"unknown relaxation map kind {relaxation.kind!r}; expected one of {sorted(QUANTITIES)}")
    sources = list(relaxation.source_datasets)
    if not sources:
        raise ValueError(f"{relaxation.kind} map: no source instances to reference")
    values = np.asarray(relaxation.t_ms, dtype=np.float32)
    fitted = values[np.isfinite(values)]
    if fitted.size == 0:
        raise ValueError(f"{relaxation.kind} map: no voxel has a valid fit")
    slices = source_slice_indices(relaxation.geometry, sources)
    frames = np.where(np.isfinite(values[slices]), values[slices], np.float32(NOT_FITTED_MS))

    low, high = (float(v) for v in np.percentile(fitted, WINDOW_PERCENTILES))
    quantity = QUANTITIES[relaxation.kind]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=relaxation.kind,
        lut_explanation=f"{quantity.meaning} (ms); {NOT_FITTED_MS:g} = not fitted",
        unit=msk_codes.MILLISECOND,
        value_range=(float(min(frames.min(), NOT_FITTED_MS)), float(frames.max())),
        slope=1.0,
        intercept=0.0,
        quantity_definition=quantity,
    )
    first = sources[0]
    row_spacing, column_spacing = relaxation.geometry.pixel_spacing
    spacing = float(relaxation.geometry.spacing_between_slices)
    pmap = hd.pm.ParametricMap(
        source_images=[with_type2_patient_attributes(ds) for ds in sources],
        pixel_array=frames,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER_MODEL_NAME,
        software_versions=__version__,
        device_serial_number=node_serial_number() if device_serial_number is None else device_serial_number,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=(low + high) / 2,
                                                         window_width=max(high - low, 1.0))],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[float(row_spacing), float(column_spacing)],
            slice_thickness=float(first.get("SliceThickness") or spacing),
            spacing_between_slices=spacing,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=[float(v) for v in first.ImageOrientationPatient]),
        plane_positions=[hd.PlanePositionSequence(coordinate_system="PATIENT",
                                                  image_position=[float(v) for v in ds.ImagePositionPatient])
                         for ds in sources],
        content_label=relaxation.kind.upper(),
        content_description=f"{quantity.meaning}, mono-exponential fit",
        series_description=series_description or f"msk-node {relaxation.kind} map",
    )
    # Type 2C for a paired body part (a knee): carried over from the source, empty when unknown.
    pmap.Laterality = first.get("Laterality") or first.get("ImageLaterality") or ""
    if quantity.scheme_designator == msk_codes.MSK_NODE_SCHEME:
        pmap.CodingSchemeIdentificationSequence = [private_scheme_item()]
    return pmap


def source_slice_indices(geometry: hd.Volume, sources: Sequence[Dataset]) -> list[int]:
    """Slice index on ``geometry`` of each source instance, found from its position in patient space.

    Raises
    ------
    ValueError
        If an instance lies off the grid's slice planes or outside the grid.
    """
    to_index = np.linalg.inv(geometry.affine)
    indices = []
    for ds in sources:
        position = np.array([*(float(v) for v in ds.ImagePositionPatient), 1.0])
        index = (to_index @ position)[:3]
        nearest = np.rint(index)
        off_mm = np.linalg.norm(geometry.affine[:3, :3] @ (index - nearest))
        k = int(nearest[0])
        if off_mm > _POSITION_TOLERANCE_MM or nearest[1:].any() or not 0 <= k < geometry.spatial_shape[0]:
            raise ValueError(f"source instance {ds.get('SOPInstanceUID', '?')} does not lie on a slice of the map")
        indices.append(k)
    return indices


def private_scheme_item() -> Dataset:
    """CodingSchemeIdentificationSequence item declaring msk-node's private coding scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = msk_codes.MSK_NODE_SCHEME
    item.CodingSchemeName = "msk-node private concepts"
    item.CodingSchemeResponsibleOrganization = "msk-node"
    return item


def write_parametric_map(pmap: hd.pm.ParametricMap, path: Path) -> Path:
    """Write ``pmap`` as a DICOM Part 10 file at ``path`` (its folder must exist)."""
    path = Path(path)
    pmap.save_as(path, enforce_file_format=True)
    return path
