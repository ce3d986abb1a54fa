"""Synthetic musculoskeletal MRI phantoms written as DICOM series with exact ground truth.

``write_phantom(kind, out_dir, seed)`` renders a knee (sagittal 3D DESS-like), thigh
(axial T1), lumbar spine (sagittal T1) or knee with CubeQuant-like T1rho spin-lock
series, and writes the label volume on the DICOM grid plus the designed biomarkers.
"""
from msk_node_phantoms.anatomy import LABEL_VALUES
from msk_node_phantoms.api import PHANTOM_KINDS, phantom_model, write_phantom

__all__ = ["LABEL_VALUES", "PHANTOM_KINDS", "phantom_model", "write_phantom"]
