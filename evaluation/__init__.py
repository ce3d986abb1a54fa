"""Evaluation of msk-node's models: segmentation metrics, biomarker agreement, statistics, AutoLabel."""
