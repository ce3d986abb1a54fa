"""The main job as typed steps: study folder in, one DICOM-SEG per selected series out.

Beside each SEG go a TID 1500 SR of its measurements and a DICOM Parametric Map of every
relaxation map (T1rho, T2, DESS T2) fitted to measure it. Every relaxometry acquisition of the
study gets its Parametric Map, also where no cartilage was segmented to measure on.

Each step is a plain function from immutable values to a new value. :data:`STEPS` declares
them once, in order, with the named values each reads and makes: :func:`process_study` runs
that declaration in-process and the MONAI Deploy application turns it into operators and
flows. Values travel per study as mappings keyed by SeriesInstanceUID; a series that fails
at any step is recorded with its reason, has no entry downstream, and the other series go on.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from msk_node import __version__
from msk_node.biomarkers.relaxometry import RelaxationMap
from msk_node.detect import Detection
from msk_node.dicom_input import Series, SkippedFile, StudyFiles, read_study_folder
from msk_node.intensity import normalise_volume
from msk_node.labels import LabelMap
from msk_node.clinical_report import ReportContent, SeriesContent, patient_and_study
from msk_node.measure import SeriesMeasurements, measure_series, report_groups, unmeasured_relaxation_maps
from msk_node.models import ModelSet
from msk_node.parametric_map_writer import build_parametric_map, write_parametric_map
from msk_node.plausibility import Finding, check_label_volume
from msk_node.postprocess import merge_labels, postprocess_masks
from msk_node.progress import progress
from msk_node.quality import LabelScores, StructureQuality, assess_segments, load_thresholds
from msk_node.report_writer import write_clinical_report
from msk_node.seg_writer import AlgorithmInfo, build_segmentation, write_segmentation
from msk_node.selection import (RelaxometryRule, SelectedSeries, SeriesRule, load_relaxometry_rules, load_rules,
                                select_series)
from msk_node.status import EXIT_RAN, STATUS_FILE, Outcome, describe_error
from msk_node.sr_writer import build_measurement_report
from msk_node.volume import SeriesVolume, series_to_volume

logger = logging.getLogger(__name__)

STAGES = ("load", "detect", "encode", "decode", "postprocess", "plausibility", "measure", "write")
#: Columns of measurements.csv, one row per measured value.
MEASUREMENT_COLUMNS = ("study_instance_uid", "series_instance_uid", "segment", "structure", "measurement", "value",
                       "unit", "method", "reason")


@dataclass
class StageTimes:
    """Wall time per pipeline stage, summed over series."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


# --- The values steps pass on -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """The loaded series rules file: what to segment, and which series form each relaxometry acquisition."""

    series: tuple[SeriesRule, ...]
    relaxometry: tuple[RelaxometryRule, ...]


def load_study_rules(path: str | Path | None = None) -> Rules:
    """The rules file at ``path`` (the packaged one by default), read once for selection and measurement alike."""
    return Rules(tuple(load_rules(path)), tuple(load_relaxometry_rules(path)))


@dataclass(frozen=True)
class LoadedStudy:
    """A study folder as read: the selected series in order, every readable series, and what was left out."""

    selected: Mapping[str, SelectedSeries]
    #: All readable series: relaxation maps are fitted from series that are not segmented themselves.
    series: tuple[Series, ...]
    skipped: tuple[SkippedFile, ...]


@dataclass(frozen=True)
class NormalisedVolume:
    """The model input of a series: its volume's intensities normalised to uint8, on that volume's grid."""

    volume: SeriesVolume
    array: np.ndarray


#: Per label name, the scores of the boxes that made its mask.
SeriesScores = Mapping[str, LabelScores]


@dataclass(frozen=True)
class Segmentation:
    """Raw per-label masks of a series (thresholded decoder output, on the volume's grid) and their scores."""

    masks: Mapping[str, np.ndarray]
    scores: SeriesScores


@dataclass(frozen=True)
class LabelVolume:
    """Label values on the grid of ``volume``, the one volume it can be written and measured with."""

    volume: SeriesVolume
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.labels.shape != self.volume.array.shape:
            raise ValueError(f"label volume {self.labels.shape} is not on its volume's grid {self.volume.array.shape}")


@dataclass(frozen=True)
class SeriesOutputs:
    """The DICOM files written for one series: its SEG, its SR if any, and the Parametric Maps it used.

    ``quality`` holds the flags per SEG segment that decided what the SR reports.
    """

    seg: Path
    sr: Path | None = None
    maps: tuple[Path, ...] = ()
    quality: Mapping[str, StructureQuality] = field(default_factory=dict)


class NothingFound(Exception):
    """A step found nothing to go on with: the series ends as "nothing found" with ``reason``.

    ``outputs`` are the step's values all the same (what the report shows of it), or None.
    """

    def __init__(self, reason: str, outputs: Any = None) -> None:
        super().__init__(reason)
        self.reason, self.outputs = reason, outputs


# --- Where each series got to ------------------------------------------------------------------------------------


@dataclass
class SeriesRecord:
    """Where one selected series got to: its outcome, the reason, and every step that raised."""

    series_instance_uid: str
    outcome: Outcome = Outcome.PENDING
    reason: str = ""
    #: Steps that raised, ``{"step": ..., "error": ...}``, in the order they failed.
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.outcome in (Outcome.FAILED, Outcome.NOTHING_FOUND)

    def fail(self, outcome: Outcome, reason: str) -> None:
        self.outcome, self.reason = outcome, reason
        logger.warning("series %s: %s: %s", self.series_instance_uid, outcome, reason)

    @contextmanager
    def guard(self, step: str, reason: str | None = None) -> Iterator[None]:
        """Any exception of ``step`` ends here, recorded as a failure of this series alone.

        With ``reason`` (e.g. ``"no volume"``) the series fails with it; without, the series
        keeps what it has (a failed measurement or SR keeps the SEG) and lists the failure.
        A ValueError is the code's own account of unusable input, so its message stands alone
        in the reason; any other exception is named by its type.
        """
        try:
            yield
        except Exception as error:  # noqa: BLE001 - one series' failure must not stop the study
            logger.debug("series %s: %s failed", self.series_instance_uid, step, exc_info=True)
            self.failures.append({"step": step, "error": describe_error(error)})
            message = str(error) if isinstance(error, ValueError) else describe_error(error)
            if reason is None:
                logger.warning("series %s: %s failed: %s", self.series_instance_uid, step, message)
            else:
                self.fail(Outcome.FAILED, f"{reason}: {message}")


#: The study's series records by SeriesInstanceUID, in selection order; steps update them as series fail.
Records = Mapping[str, SeriesRecord]


@dataclass(frozen=True)
class Resources:
    """What steps use besides values: the models, the rules and the clock."""

    models: ModelSet
    rules: Rules
    times: StageTimes = field(default_factory=StageTimes)

    @property
    def label_map(self) -> LabelMap:
        return self.models.label_map


# --- The steps ----------------------------------------------------------------------------------------------------


def load_study(input_dir: Path, rules: Rules) -> LoadedStudy:
    """Read a study folder and select the series to segment; everything else is skipped with a reason."""
    study: StudyFiles = read_study_folder(Path(input_dir))
    selected, skipped_series = select_series(study.series, list(rules.series))
    for item in skipped_series:
        logger.info("not segmented: %s: %s", item.path, item.reason)
    return LoadedStudy({s.series.series_instance_uid: s for s in selected}, tuple(study.series),
                       tuple(study.skipped + skipped_series))


def new_records(study: LoadedStudy) -> dict[str, SeriesRecord]:
    return {uid: SeriesRecord(uid) for uid in study.selected}


def build_volume(selected: SelectedSeries) -> tuple[SeriesVolume, NormalisedVolume]:
    """Stack the series in patient space and normalise it for the models."""
    volume = series_to_volume(selected.series.datasets)
    normalised = NormalisedVolume(volume, normalise_volume(volume.array))
    if volume.missing:
        logger.warning("series %s: %d slice(s) missing from the series (volume slices %s); they stay blank",
                       selected.series.series_instance_uid, len(volume.missing), volume.missing)
    return volume, normalised


def detect_anatomy(selected: SelectedSeries, normalised: NormalisedVolume, *, models: ModelSet
                   ) -> tuple[Detection, ...]:
    labels = models.label_map.for_anatomy(selected.anatomy)
    detections = tuple(models.detector_for(selected.anatomy).detect(normalised.array, labels))
    if not detections:
        raise NothingFound(f"the detector found no {selected.anatomy} anatomy")
    return detections


def segment_boxes(selected: SelectedSeries, normalised: NormalisedVolume, detections: tuple[Detection, ...], *,
                  models: ModelSet, times: StageTimes) -> Segmentation:
    """Encode each slice that has boxes once, decode all its boxes in one batch, threshold at 0.5.

    Each label's scores list its boxes slice by slice, in the detector's order within a slice.
    """
    by_slice: dict[int, list[Detection]] = defaultdict(list)
    for detection in detections:
        by_slice[detection.slice_index].append(detection)
    shape = normalised.array.shape
    segmenter = models.segmenter_for(selected.anatomy)
    masks: dict[str, np.ndarray] = {}
    detector_scores: dict[str, list[float]] = defaultdict(list)
    predicted_iou: dict[str, list[float]] = defaultdict(list)
    slices = progress(sorted(by_slice), f"segmenting {selected.anatomy} series", "slice")
    for index in slices:
        with times.stage("encode"):
            embedding = segmenter.encode(normalised.array[index])
        with times.stage("decode"):
            boxes = np.array([d.box for d in by_slice[index]], dtype=np.float32)
            decoded = segmenter.decode(embedding, boxes)
            for detection, probability, iou in zip(by_slice[index], decoded.probabilities, decoded.predicted_iou,
                                                  strict=True):
                mask = masks.setdefault(detection.label, np.zeros(shape, dtype=bool))
                mask[index] |= probability > 0.5
                detector_scores[detection.label].append(float(detection.score))
                predicted_iou[detection.label].append(float(iou))
    scores = {label: LabelScores(tuple(detector_scores[label]), tuple(predicted_iou[label])) for label in masks}
    return Segmentation(masks, scores)


def postprocess(volume: SeriesVolume, segmentation: Segmentation, *, label_map: LabelMap
                ) -> tuple[LabelVolume, SeriesScores]:
    """Clean the masks and merge them into one label volume; the scores go on beside it."""
    cleaned = postprocess_masks(dict(segmentation.masks), label_map, volume.pixel_spacing)
    if not cleaned:
        raise NothingFound("every segment was empty after post-processing")
    return LabelVolume(volume, merge_labels(cleaned, label_map)), segmentation.scores


def check_plausibility(selected: SelectedSeries, label_volume: LabelVolume, *, label_map: LabelMap
                       ) -> tuple[LabelVolume, tuple[Finding, ...]]:
    """Drop anatomically implausible components (a tibia above the femur, a disc off the column) before measuring."""
    result = check_label_volume(label_volume.labels, label_volume.volume, selected.anatomy, label_map)
    for finding in result.findings:
        logger.info("series %s: %s %s component (%.0f mm3): %s", selected.series.series_instance_uid,
                    finding.action, finding.label, finding.volume_mm3, finding.reason)
    checked = LabelVolume(label_volume.volume, result.label_volume), tuple(result.findings)
    if not result.label_volume.any():
        reasons = sorted({f"{f.label}: {f.reason}" for f in result.dropped})
        raise NothingFound(f"every segment failed the plausibility checks ({'; '.join(reasons)})", checked)
    return checked


def measure(selected: SelectedSeries, label_volume: LabelVolume, study: LoadedStudy, *, label_map: LabelMap,
            rules: Rules) -> SeriesMeasurements:
    """Biomarkers of the series (a failure keeps the SEG); relaxometry acquisitions as ``rules`` group them."""
    return measure_series(label_volume.volume, label_volume.labels, selected.anatomy, label_map,
                          list(study.series), relaxometry=rules.relaxometry)


# --- The step list, declared once -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step: ``function(*inputs, **uses)`` per series still in play, its result named by ``outputs``.

    ``inputs`` name values keyed by series, or study-wide ones (:data:`STUDY_VALUES`); ``uses``
    name :class:`Resources` attributes. A function with several outputs returns a tuple of them.
    """

    name: str
    function: Callable[..., Any]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: The reason an exception ends the series with; None keeps the series with what it has.
    failure: str | None
    #: The stage of :data:`STAGES` its time counts to; None where the function times itself.
    stage: str | None = None
    uses: tuple[str, ...] = ()


#: Values with one instance per study; every other value is a mapping keyed by SeriesInstanceUID.
STUDY_VALUES = ("study", "records")
#: What the loader makes: the study, its selected series and their records.
LOADER_OUTPUTS = ("study", "series", "records")
STEPS: tuple[Step, ...] = (
    Step("volume", build_volume, ("series",), ("volumes", "normalised"), "no volume", "load"),
    Step("detect", detect_anatomy, ("series", "normalised"), ("detections",), "detection failed", "detect",
         ("models",)),
    Step("segment", segment_boxes, ("series", "normalised", "detections"), ("segmentations",),
         "segmentation failed", None, ("models", "times")),
    Step("postprocess", postprocess, ("volumes", "segmentations"), ("label_volumes", "scores"),
         "post-processing failed", "postprocess", ("label_map",)),
    Step("plausibility", check_plausibility, ("series", "label_volumes"), ("label_volumes", "plausibility"),
         "plausibility checks failed", "plausibility", ("label_map",)),
    Step("measure", measure, ("series", "label_volumes", "study"), ("measurements",), None, "measure",
         ("label_map", "rules")),
)
#: What the writer reads, in the order of :func:`write_outputs`' parameters.
WRITER_INPUTS = ("study", "records", "volumes", "label_volumes", "plausibility", "measurements", "scores")


def run_step(step: Step, values: Mapping[str, Any], resources: Resources) -> dict[str, dict[str, Any]]:
    """``step`` on every series still in play; its outputs keyed by series.

    A series that fails has no entry in them, except that a step refining a value it reads
    (plausibility's label volumes) leaves other series' entries as they were.
    """
    records: Records = values["records"]
    made: dict[str, dict[str, Any]] = {name: {} for name in step.outputs}
    uses = {name: getattr(resources, name) for name in step.uses}
    with resources.times.stage(step.stage) if step.stage else nullcontext():
        for uid, record in records.items():
            if record.failed:
                continue
            result = None
            with record.guard(step.name, step.failure):
                args = [values[name] if name in STUDY_VALUES else values[name][uid] for name in step.inputs]
                try:
                    result = step.function(*args, **uses)
                except NothingFound as found:
                    record.fail(Outcome.NOTHING_FOUND, found.reason)
                    result = found.outputs
            if result is not None:
                for name, value in zip(step.outputs, result if len(step.outputs) > 1 else (result,)):
                    made[name][uid] = value
    return {name: {**values[name], **made[name]} if name in step.inputs else made[name] for name in step.outputs}


# --- Writing ------------------------------------------------------------------------------------------------------


def algorithm_info(models: ModelSet) -> AlgorithmInfo:
    provenance = models.provenance()
    return AlgorithmInfo(
        name=f"msk-node {provenance['segmenter_family']}",
        version=(f"{__version__} (detector {provenance['detector_version']}, "
                 f"segmenter {provenance['segmenter_version']})"),
        weights_sha256=f"detector:{provenance['detector_sha256']};segmenter:{provenance['segmenter_sha256']}",
        parameters={"precision": provenance["precision"], "backend": provenance["backend"]},
    )


def write_seg(selected: SelectedSeries, label_volume: LabelVolume, measurements: SeriesMeasurements | None,
              models: ModelSet, output_dir: Path, series_number: int) -> tuple[Dataset, Path]:
    """The series' SEG on the slices that have a source instance, with the segment instances measured on."""
    volume = label_volume.volume
    present = volume.present
    instances = [i.on_slices(present) for i in measurements.instances] if measurements else []
    seg = build_segmentation(volume.datasets, label_volume.labels[present], models.label_map, algorithm_info(models),
                             series_number=series_number,
                             series_description=f"msk-node {selected.anatomy} segmentation",
                             instances=instances)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = write_segmentation(seg, output_dir / f"seg-{selected.series.series_instance_uid}.dcm")
    return seg, path


def write_sr(selected: SelectedSeries, measurements: SeriesMeasurements, quality: Mapping[str, StructureQuality],
             seg: Dataset, models: ModelSet, output_dir: Path, series_number: int) -> Path | None:
    """TID 1500 report of the series' measurements, referencing the segments of ``seg``; None without any.

    Structures below the quality thresholds are left out (report.json says why).
    """
    groups = report_groups(measurements, quality)
    if not groups:
        return None
    sr = build_measurement_report(seg, groups, models.label_map, algorithm_info(models),
                                  series_number=series_number,
                                  series_description=f"msk-node {selected.anatomy} measurements")
    path = output_dir / f"sr-{selected.series.series_instance_uid}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def write_maps(record: SeriesRecord, measurements: SeriesMeasurements, output_dir: Path, written: dict[str, Path],
               first_series_number: int) -> tuple[Path, ...]:
    """A Parametric Map per relaxation map fitted for the series, named after the map's source series.

    Series segmented from one study fit the same maps; ``written`` (file name to path, shared
    by the study) makes each map one file, listed for every series that used it.
    """
    paths = []
    for relaxation in measurements.maps:
        with record.guard(f"{relaxation.kind} parametric map"):
            paths.append(write_map(relaxation, output_dir, written, first_series_number))
    return tuple(paths)


def write_map(relaxation: RelaxationMap, output_dir: Path, written: dict[str, Path], first_series_number: int) -> Path:
    """The Parametric Map of ``relaxation``, written once per study (``written``: file name to path)."""
    if not relaxation.source_datasets:
        raise ValueError("no source instances")
    name = f"pmap-{relaxation.kind}-{relaxation.source_datasets[0].SeriesInstanceUID}.dcm"
    if name not in written:
        pmap = build_parametric_map(relaxation, series_number=first_series_number + len(written),
                                    series_description=f"msk-node {relaxation.kind} map")
        output_dir.mkdir(parents=True, exist_ok=True)
        written[name] = write_parametric_map(pmap, output_dir / name)
    return written[name]


def measurement_rows(study_uid: str, series_uid: str, measurements: SeriesMeasurements) -> list[dict]:
    """One series' measurements as flat rows (the CSV/JSON tables); NaN values carry their reason."""
    return [{"study_instance_uid": study_uid, "series_instance_uid": series_uid, "segment": segment,
             "structure": m.label, "measurement": m.name,
             "value": round(float(m.value), 4) if m.available else None,
             "unit": m.unit, "method": m.method, "reason": m.reason}
            for segment, items in measurements.by_segment.items() for m in items]


def write_measurement_tables(rows: list[dict], output_dir: Path) -> None:
    with (output_dir / "measurements.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MEASUREMENT_COLUMNS)
        writer.writeheader()
        writer.writerows({**row, "value": "" if row["value"] is None else row["value"]} for row in rows)
    (output_dir / "measurements.json").write_text(json.dumps(rows, indent=2))


@dataclass(frozen=True)
class StudyOutputs:
    """What the writer made: each written series' files, the study report and every DICOM file written."""

    series: Mapping[str, SeriesOutputs]
    report: dict
    #: Every DICOM file written (SEGs, SRs, Parametric Maps): what status.json lists for delivery.
    results: tuple[Path, ...]


def write_series(number: int, selected: SelectedSeries, record: SeriesRecord, label_volume: LabelVolume,
                 measurements: SeriesMeasurements | None, findings: tuple[Finding, ...], scores: SeriesScores,
                 models: ModelSet, output_dir: Path, maps_written: dict[str, Path]) -> SeriesOutputs | None:
    """The SEG of a series still in play, then its quality flags, SR and Parametric Maps when it was measured."""
    written = None
    with record.guard("seg", "SEG not written"):
        written = write_seg(selected, label_volume, measurements, models, output_dir, series_number=9000 + number)
        record.outcome = Outcome.SEGMENTED
    if written is None:
        return None
    seg, seg_path = written
    if measurements is None:
        return SeriesOutputs(seg_path)
    sr_path, quality = None, {}
    with record.guard("sr"):
        quality = assess_segments(list(measurements.by_segment), label_volume.labels, models.label_map,
                                  measurements.instances, scores, list(findings), load_thresholds())
        sr_path = write_sr(selected, measurements, quality, seg, models, output_dir, series_number=9100 + number)
    maps = write_maps(record, measurements, output_dir, maps_written, 9200)
    return SeriesOutputs(seg_path, sr_path, maps, quality)


def write_outputs(study: LoadedStudy, records: Records, volumes: Mapping[str, SeriesVolume],
                  label_volumes: Mapping[str, LabelVolume], plausibility: Mapping[str, tuple[Finding, ...]],
                  measurements: Mapping[str, SeriesMeasurements], scores: Mapping[str, SeriesScores], *,
                  resources: Resources, output_dir: Path) -> StudyOutputs:
    """Write a SEG, an SR and Parametric Maps per series still in play, then the study's tables and report.json.

    ``scores`` are each series' detector scores and predicted IoUs per label: with the plausibility
    findings and the field of view they make the quality flags that decide what is reported.
    """
    models = resources.models
    output_dir = Path(output_dir)
    study_failures: list[dict[str, str]] = []
    unmeasured: list[RelaxationMap] = []
    with resources.times.stage("measure"), study_guard(study_failures, "relaxation maps"):
        fitted = [m for series in measurements.values() for m in series.maps]
        unmeasured = unmeasured_relaxation_maps(list(study.series), fitted, relaxometry=resources.rules.relaxometry)
    output_dir.mkdir(parents=True, exist_ok=True)
    maps_written: dict[str, Path] = {}
    outputs: dict[str, SeriesOutputs] = {}
    with resources.times.stage("write"):
        for number, (uid, selected) in enumerate(study.selected.items(), start=1):
            if records[uid].failed:
                continue
            written = write_series(number, selected, records[uid], label_volumes.get(uid), measurements.get(uid),
                                   plausibility.get(uid, ()), scores.get(uid, {}), models, output_dir, maps_written)
            if written is not None:
                outputs[uid] = written
        for relaxation in unmeasured:
            with study_guard(study_failures, f"{relaxation.kind} parametric map"):
                write_map(relaxation, output_dir, maps_written, first_series_number=9200)
        rows = [row for uid, selected in study.selected.items() if uid in measurements and uid in outputs
                for row in measurement_rows(selected.series.study_instance_uid, uid, measurements[uid])]
        write_measurement_tables(rows, output_dir)
        clinical_reports = write_clinical_reports(study, label_volumes, measurements, outputs, models, output_dir,
                                                  study_failures)
        report = study_report(study, records, volumes, label_volumes, plausibility, outputs, models,
                              sorted(maps_written), [path.name for path in clinical_reports])
        if study_failures:
            report["failures"] = study_failures
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        results = tuple(sorted({path for written in outputs.values() for path in (written.seg, written.sr) if path}
                               | set(maps_written.values()) | set(clinical_reports)))
        write_status(output_dir, Outcome.RAN, records=records, skipped=len(study.skipped), results=results)
    return StudyOutputs(outputs, report, results)


@contextmanager
def study_guard(failures: list[dict[str, str]], step: str) -> Iterator[None]:
    """A step of the study rather than of one series: its exception is listed in ``failures``, the rest goes on."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the series' results must still be written
        logger.debug("%s failed", step, exc_info=True)
        logger.warning("%s failed: %s", step, describe_error(error))
        failures.append({"step": step, "error": describe_error(error)})


def write_clinical_reports(study: LoadedStudy, label_volumes: Mapping[str, LabelVolume],
                           measurements: Mapping[str, SeriesMeasurements], outputs: Mapping[str, SeriesOutputs],
                           models: ModelSet, output_dir: Path, failures: list[dict[str, str]]) -> list[Path]:
    """One clinician report per study with an SR (Encapsulated PDF and Secondary Capture), from the SR's groups.

    A report that cannot be made is a failure of the study (listed in ``failures``); the series keep their results.
    """
    by_study: dict[str, list[str]] = defaultdict(list)
    for uid, selected in study.selected.items():
        if uid in outputs and outputs[uid].sr is not None:
            by_study[selected.series.study_instance_uid].append(uid)
    written: list[Path] = []
    for number, uids in enumerate(by_study.values(), start=1):
        source = label_volumes[uids[0]].volume.datasets[0]
        with study_guard(failures, "clinical report"):
            series = [series_content(study.selected[uid], label_volumes[uid], measurements[uid], outputs[uid])
                      for uid in uids]
            content = ReportContent(*patient_and_study(source), series, models.provenance(), f"msk-node {__version__}")
            written += write_clinical_report(content, source, models.label_map, output_dir,
                                             pdf_series_number=9300 + number, sc_series_number=9400 + number)
    return written


def series_content(selected: SelectedSeries, label_volume: LabelVolume, measurements: SeriesMeasurements,
                   outputs: SeriesOutputs) -> SeriesContent:
    """One series' part of the clinician report: the SR's groups, its quality flags and its key images."""
    volume = label_volume.volume
    source = volume.datasets[0]
    echo_time = source.get("EchoTime")
    return SeriesContent(selected.series.description, selected.anatomy, report_groups(measurements, outputs.quality),
                         dict(outputs.quality), volume.array, label_volume.labels, tuple(volume.pixel_spacing),
                         source.get("SeriesNumber"), float(echo_time) if echo_time not in (None, "") else None)


def write_status(output_dir: Path, outcome: Outcome, reason: str = "", records: Records | None = None,
                 skipped: int | None = None, results: tuple[Path, ...] = (), exit_code: int = EXIT_RAN) -> dict:
    """The application's status.json: its outcome, each series' outcome and the result files to deliver."""
    status: dict = {"outcome": outcome, "exit_code": exit_code}
    if reason:
        status["reason"] = reason
    status["series"] = [{"series_instance_uid": record.series_instance_uid, "outcome": record.outcome,
                         **({"reason": record.reason} if record.reason else {}),
                         **({"failures": record.failures} if record.failures else {})}
                        for record in (records or {}).values()]
    if skipped is not None:
        status["skipped"] = skipped
    status["results"] = [result_entry(path) for path in results]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))
    return status


def result_entry(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    return {"file": path.name, "sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID)}


def study_report(study: LoadedStudy, records: Records, volumes: Mapping[str, SeriesVolume],
                 label_volumes: Mapping[str, LabelVolume], plausibility: Mapping[str, tuple[Finding, ...]],
                 outputs: Mapping[str, SeriesOutputs], models: ModelSet | None,
                 parametric_maps: list[str] | None = None, clinical_reports: list[str] | None = None) -> dict:
    """A JSON-ready account of what happened to every series and every skipped file, and the maps written."""
    series = []
    for uid, selected in study.selected.items():
        record = records[uid]
        entry = {
            "series_instance_uid": uid,
            "description": selected.series.description,
            "anatomy": selected.anatomy,
            "rule": selected.rule.name,
            "instances": len(selected.series),
            "outcome": record.outcome,
        }
        if record.reason:
            entry["reason"] = record.reason
        written = outputs.get(uid)
        if written is not None:
            entry["seg"] = written.seg.name
            if written.sr is not None:
                entry["sr"] = written.sr.name
            if written.maps:
                entry["parametric_maps"] = [path.name for path in written.maps]
            if written.quality:
                entry["quality"] = {segment: quality.as_dict() for segment, quality in written.quality.items()}
        if uid in volumes and volumes[uid].missing:
            entry["missing_slices"] = volumes[uid].missing
        if uid in label_volumes:
            present = np.unique(label_volumes[uid].labels)
            entry["labels"] = [models.label_map.by_value(int(v)).name for v in present if v]
        if uid in plausibility:
            entry["plausibility"] = [finding.as_dict() for finding in plausibility[uid]]
        if record.failures:
            entry["failures"] = record.failures
        series.append(entry)
    report = {"software": f"msk-node {__version__}", "series": series,
              "skipped": [{"source": s.path, "reason": s.reason} for s in study.skipped]}
    if parametric_maps:
        report["parametric_maps"] = parametric_maps
    if clinical_reports:
        report["clinical_reports"] = clinical_reports
    if models is not None:
        report["models"] = models.provenance()
    return report


# --- Running the declaration in-process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesResult:
    """What became of one selected series: its record and the values it got as far as (None where it did not)."""

    selected: SelectedSeries
    record: SeriesRecord
    volume: SeriesVolume | None
    detections: tuple[Detection, ...]
    label_volume: LabelVolume | None
    plausibility: tuple[Finding, ...] | None
    measurements: SeriesMeasurements | None
    scores: SeriesScores | None
    outputs: SeriesOutputs | None

    @property
    def series_instance_uid(self) -> str:
        return self.record.series_instance_uid

    @property
    def outcome(self) -> Outcome:
        return self.record.outcome

    @property
    def reason(self) -> str:
        return self.record.reason

    @property
    def output(self) -> Path | None:
        return self.outputs.seg if self.outputs else None

    @property
    def report_output(self) -> Path | None:
        return self.outputs.sr if self.outputs else None


@dataclass(frozen=True)
class StudyRun:
    """A study run in-process: every selected series' result, the files left out, the report and the time spent."""

    output_dir: Path
    series_results: tuple[SeriesResult, ...]
    skipped: tuple[SkippedFile, ...]
    times: StageTimes
    report: dict
    results: tuple[Path, ...]


#: Values :func:`process_study` keeps to the end for its :class:`SeriesResult` (the rest go once read).
RESULT_VALUES = ("volumes", "detections", "label_volumes", "plausibility", "measurements", "scores")


def run_steps(values: Mapping[str, Any], resources: Resources, steps: tuple[Step, ...]) -> dict[str, Any]:
    """``steps`` in order over ``values`` (the loader's, and any a test supplies in place of earlier steps)."""
    values = dict(values)
    for index, step in enumerate(steps):
        values.update(run_step(step, values, resources))
        # Free what no later step, nor the writer, nor the result reads (normalised images, raw masks).
        needed = {name for later in steps[index + 1:] for name in later.inputs}
        needed |= {*LOADER_OUTPUTS, *WRITER_INPUTS, *RESULT_VALUES}
        values = {name: value for name, value in values.items() if name in needed}
    return values


def loaded_values(study: LoadedStudy) -> dict[str, Any]:
    """What the loader emits: the study, its selected series and a fresh record per series."""
    return {"study": study, "series": study.selected, "records": new_records(study)}


def write_values(values: Mapping[str, Any], resources: Resources, output_dir: Path) -> StudyOutputs:
    """:func:`write_outputs` on ``values``; a value no step made (none of its series got so far) is empty."""
    return write_outputs(*(values.get(name, {}) for name in WRITER_INPUTS), resources=resources,
                         output_dir=output_dir)


def process_study(input_dir: Path, output_dir: Path, models: ModelSet, rules: Rules | None = None) -> StudyRun:
    """Run :data:`STEPS` in-process, as the application's operators run them, then write the outputs."""
    resources = Resources(models, rules if rules is not None else load_study_rules())
    with resources.times.stage("load"):
        study = load_study(input_dir, resources.rules)
    values = run_steps(loaded_values(study), resources, STEPS)
    written = write_values(values, resources, Path(output_dir))
    results = tuple(
        SeriesResult(selected, values["records"][uid], values["volumes"].get(uid),
                     values["detections"].get(uid, ()), values["label_volumes"].get(uid),
                     values["plausibility"].get(uid), values["measurements"].get(uid), values["scores"].get(uid),
                     written.series.get(uid))
        for uid, selected in study.selected.items())
    return StudyRun(Path(output_dir), results, study.skipped, resources.times, written.report, written.results)
