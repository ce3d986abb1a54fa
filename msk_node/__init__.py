"""msk-node: a DICOM-native PACS node for musculoskeletal MRI."""

__version__ = "0.1.0"
