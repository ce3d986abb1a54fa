"""The main job as plain functions: study folder in, one DICOM-SEG per selected series out.

Beside each SEG go a TID 1500 SR of its measurements and a DICOM Parametric Map of every
relaxation map (T1rho, T2, DESS T2) fitted to measure it. Every relaxometry acquisition of the
study gets its Parametric Map, also where no cartilage was segmented to measure on.

Each step is a function the MONAI Deploy operators wrap one to one, and that tests,
training and evaluation call directly. A series that fails at any step is recorded
with its reason and the other series go on.
"""
from __future__ import annotations

import csv
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from msk_node import __version__
from msk_node.biomarkers.relaxometry import RelaxationMap
from msk_node.clinical_report import ReportContent, SeriesContent, patient_and_study
from msk_node.detect import Detection
from msk_node.dicom_input import Series, SkippedFile, StudyFiles, read_study_folder
from msk_node.intensity import normalise_volume
from msk_node.labels import LabelMap
from msk_node.measure import SeriesMeasurements, measure_series, report_groups, unmeasured_relaxation_maps
from msk_node.models import ModelSet
from msk_node.parametric_map_writer import build_parametric_map, write_parametric_map
from msk_node.plausibility import Finding, check_label_volume
from msk_node.postprocess import merge_labels, postprocess_masks
from msk_node.progress import progress
from msk_node.quality import StructureQuality, assess_segments, load_thresholds
from msk_node.report_writer import write_clinical_report
from msk_node.seg_writer import AlgorithmInfo, build_segmentation, write_segmentation
from msk_node.selection import SelectedSeries, SeriesRule, load_rules, select_series
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


@dataclass
class SeriesJob:
    """One selected series on its way through the pipeline."""

    selected: SelectedSeries
    volume: SeriesVolume | None = None
    normalised: np.ndarray | None = None
    detections: list[Detection] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    label_volume: np.ndarray | None = None
    plausibility: list[Finding] | None = None
    measurements: SeriesMeasurements | None = None
    output: Path | None = None
    report_output: Path | None = None
    #: Quality flags per SEG segment label, set when the SR is written.
    quality: dict[str, StructureQuality] = field(default_factory=dict)
    map_outputs: list[Path] = field(default_factory=list)
    outcome: Outcome = Outcome.PENDING
    reason: str = ""
    #: Steps that raised, ``{"step": ..., "error": ...}``, in the order they failed.
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def series_instance_uid(self) -> str:
        return self.selected.series.series_instance_uid

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


def load_and_select(
    input_dir: Path, rules: list[SeriesRule] | None = None
) -> tuple[list[SeriesJob], list[SkippedFile], list[Series]]:
    """Read a study folder and make a job per selected series; everything else is skipped with a reason.

    All readable series are returned too: relaxation maps are fitted from series that
    are not segmented themselves.
    """
    study: StudyFiles = read_study_folder(Path(input_dir))
    selected, skipped_series = select_series(study.series, rules if rules is not None else load_rules())
    for item in skipped_series:
        logger.info("not segmented: %s: %s", item.path, item.reason)
    return [SeriesJob(s) for s in selected], study.skipped + skipped_series, study.series


def build_volume(job: SeriesJob) -> None:
    """Stack the series in patient space and normalise it for the models."""
    job.volume = series_to_volume(job.selected.series.datasets)
    job.normalised = normalise_volume(job.volume.array)
    if job.volume.missing:
        logger.warning("series %s: %d slice(s) missing from the series (volume slices %s); they stay blank",
                       job.series_instance_uid, len(job.volume.missing), job.volume.missing)


def detect_anatomy(job: SeriesJob, models: ModelSet) -> None:
    labels = models.label_map.for_anatomy(job.selected.anatomy)
    job.detections = models.detector_for(job.selected.anatomy).detect(job.normalised, labels)
    if not job.detections:
        job.fail(Outcome.NOTHING_FOUND, f"the detector found no {job.selected.anatomy} anatomy")


def segment_boxes(job: SeriesJob, models: ModelSet, times: StageTimes) -> None:
    """Encode each slice that has boxes once, decode all its boxes in one batch, threshold at 0.5."""
    by_slice: dict[int, list[Detection]] = defaultdict(list)
    for detection in job.detections:
        by_slice[detection.slice_index].append(detection)
    normalised = job.normalised
    shape = normalised.shape
    segmenter = models.segmenter_for(job.selected.anatomy)
    masks: dict[str, np.ndarray] = {}
    slices = progress(sorted(by_slice), f"segmenting {job.selected.anatomy} series", "slice")
    for index in slices:
        with times.stage("encode"):
            embedding = segmenter.encode(normalised[index])
        with times.stage("decode"):
            boxes = np.array([d.box for d in by_slice[index]], dtype=np.float32)
            probabilities = segmenter.decode(embedding, boxes)
            for detection, probability in zip(by_slice[index], probabilities):
                mask = masks.setdefault(detection.label, np.zeros(shape, dtype=bool))
                mask[index] |= probability > 0.5
    job.masks = masks


def postprocess(job: SeriesJob, label_map: LabelMap) -> None:
    cleaned = postprocess_masks(job.masks, label_map, job.volume.pixel_spacing)
    if not cleaned:
        job.fail(Outcome.NOTHING_FOUND, "every segment was empty after post-processing")
        return
    job.label_volume = merge_labels(cleaned, label_map)
    job.masks, job.normalised = {}, None


def check_plausibility(job: SeriesJob, label_map: LabelMap) -> None:
    """Drop anatomically implausible components (a tibia above the femur, a disc off the column) before measuring."""
    result = check_label_volume(job.label_volume, job.volume, job.selected.anatomy, label_map)
    job.plausibility = list(result.findings)
    for finding in result.findings:
        logger.info("series %s: %s %s component (%.0f mm3): %s", job.series_instance_uid, finding.action,
                    finding.label, finding.volume_mm3, finding.reason)
    job.label_volume = result.label_volume
    if not result.label_volume.any():
        reasons = sorted({f"{f.label}: {f.reason}" for f in result.dropped})
        job.fail(Outcome.NOTHING_FOUND, f"every segment failed the plausibility checks ({'; '.join(reasons)})")


def measure(job: SeriesJob, label_map: LabelMap, study_series: list[Series]) -> None:
    """Biomarkers of the series (run under a guard that keeps the SEG when they fail)."""
    job.measurements = measure_series(job.volume, job.label_volume, job.selected.anatomy, label_map,
                                      study_series)


def algorithm_info(models: ModelSet) -> AlgorithmInfo:
    provenance = models.provenance()
    return AlgorithmInfo(
        name=f"msk-node {provenance['segmenter_family']}",
        version=(f"{__version__} (detector {provenance['detector_version']}, "
                 f"segmenter {provenance['segmenter_version']})"),
        weights_sha256=f"detector:{provenance['detector_sha256']};segmenter:{provenance['segmenter_sha256']}",
        parameters={"precision": provenance["precision"], "backend": provenance["backend"]},
    )


def write_seg(job: SeriesJob, models: ModelSet, output_dir: Path, series_number: int) -> Dataset:
    algorithm = algorithm_info(models)
    present = job.volume.present
    instances = [i.on_slices(present) for i in job.measurements.instances] if job.measurements else []
    seg = build_segmentation(job.volume.datasets, job.label_volume[present], models.label_map, algorithm,
                             series_number=series_number,
                             series_description=f"msk-node {job.selected.anatomy} segmentation",
                             instances=instances)
    output_dir.mkdir(parents=True, exist_ok=True)
    job.output = write_segmentation(seg, output_dir / f"seg-{job.series_instance_uid}.dcm")
    job.outcome = Outcome.SEGMENTED
    return seg


def write_sr(job: SeriesJob, seg: Dataset, models: ModelSet, output_dir: Path, series_number: int) -> None:
    """TID 1500 report of the series' measurements, referencing the segments of ``seg``.

    Structures below the quality thresholds are left out (report.json says why).
    """
    job.quality = assess_segments(list(job.measurements.by_segment), job.label_volume, models.label_map,
                                  job.measurements.instances, job.detections, job.plausibility or [],
                                  load_thresholds())
    groups = report_groups(job.measurements, job.quality)
    if not groups:
        return
    sr = build_measurement_report(seg, groups, models.label_map, algorithm_info(models),
                                  series_number=series_number,
                                  series_description=f"msk-node {job.selected.anatomy} measurements")
    path = output_dir / f"sr-{job.series_instance_uid}.dcm"
    sr.save_as(path, enforce_file_format=True)
    job.report_output = path  # only once written: report.json and status.json list what is there


def write_maps(job: SeriesJob, output_dir: Path, written: dict[str, Path], first_series_number: int) -> None:
    """A Parametric Map per relaxation map fitted for the series, named after the map's source series.

    Series segmented from one study fit the same maps; ``written`` (file name to path, shared
    by the study) makes each map one file, listed for every series that used it.
    """
    for relaxation in job.measurements.maps:
        with job.guard(f"{relaxation.kind} parametric map"):
            job.map_outputs.append(write_map(relaxation, output_dir, written, first_series_number))


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


@dataclass
class StudyWork:
    """A study's jobs, the files and series left out, and the time spent per stage."""

    output_dir: Path
    jobs: list[SeriesJob] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)
    report: dict | None = None
    #: Relaxation maps of acquisitions no segmented series measured on (written as Parametric Maps all the same).
    maps: list[RelaxationMap] = field(default_factory=list)
    #: Every DICOM file written (SEGs, SRs, Parametric Maps): what status.json lists for delivery.
    results: list[Path] = field(default_factory=list)

    def active_jobs(self) -> list[SeriesJob]:
        return [job for job in self.jobs if not job.failed]


def write_outputs(work: StudyWork, models: ModelSet) -> dict:
    """Write a SEG, an SR and Parametric Maps per series still in play, then the study's tables and report.json."""
    work.output_dir.mkdir(parents=True, exist_ok=True)
    maps_written: dict[str, Path] = {}
    with work.times.stage("write"):
        for number, job in enumerate(work.jobs, start=1):
            if job.failed:
                continue
            seg = None
            with job.guard("seg", "SEG not written"):
                seg = write_seg(job, models, work.output_dir, series_number=9000 + number)
            if seg is None or job.measurements is None:
                continue
            with job.guard("sr"):
                write_sr(job, seg, models, work.output_dir, series_number=9100 + number)
            write_maps(job, work.output_dir, maps_written, first_series_number=9200)
        for relaxation in work.maps:
            try:
                write_map(relaxation, work.output_dir, maps_written, first_series_number=9200)
            except ValueError as error:
                logger.warning("%s Parametric Map not written: %s", relaxation.kind, error)
        rows = [row for job in work.jobs if job.measurements is not None and job.output is not None
                for row in measurement_rows(job.selected.series.study_instance_uid, job.series_instance_uid,
                                            job.measurements)]
        write_measurement_tables(rows, work.output_dir)
        clinical_reports = write_clinical_reports(work, models)
        work.report = study_report(work.jobs, work.skipped, models, sorted(maps_written),
                                   [path.name for path in clinical_reports])
        (work.output_dir / "report.json").write_text(json.dumps(work.report, indent=2))
        work.results = sorted({path for job in work.jobs for path in (job.output, job.report_output) if path}
                              | set(maps_written.values()) | set(clinical_reports))
        write_status(work.output_dir, Outcome.RAN, work=work)
    return work.report


def write_clinical_reports(work: StudyWork, models: ModelSet) -> list[Path]:
    """One clinician report per study with an SR (Encapsulated PDF and Secondary Capture), from the SR's groups."""
    by_study: dict[str, list[SeriesJob]] = defaultdict(list)
    for job in work.jobs:
        if job.report_output is not None:
            by_study[job.selected.series.study_instance_uid].append(job)
    written = []
    for number, jobs in enumerate(by_study.values(), start=1):
        source = jobs[0].volume.datasets[0]
        with jobs[0].guard("clinical report"):
            series = [SeriesContent(job.selected.series.description, job.selected.anatomy,
                                    report_groups(job.measurements, job.quality), job.quality, job.volume.array,
                                    job.label_volume, tuple(job.volume.pixel_spacing),
                                    job.volume.datasets[0].get("SeriesNumber")) for job in jobs]
            content = ReportContent(*patient_and_study(source), series, models.provenance(), f"msk-node {__version__}")
            written += write_clinical_report(content, source, models.label_map, work.output_dir,
                                             pdf_series_number=9300 + number, sc_series_number=9400 + number)
    return written


def write_status(output_dir: Path, outcome: Outcome, reason: str = "", work: StudyWork | None = None,
                 exit_code: int = EXIT_RAN) -> dict:
    """The application's status.json: its outcome, each series' outcome and the result files to deliver."""
    status: dict = {"outcome": outcome, "exit_code": exit_code}
    if reason:
        status["reason"] = reason
    jobs = work.jobs if work is not None else []
    status["series"] = [{"series_instance_uid": job.series_instance_uid, "outcome": job.outcome,
                         **({"reason": job.reason} if job.reason else {}),
                         **({"failures": job.failures} if job.failures else {})} for job in jobs]
    if work is not None:
        status["skipped"] = len(work.skipped)
    status["results"] = [result_entry(path) for path in (work.results if work is not None else [])]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / STATUS_FILE).write_text(json.dumps(status, indent=2))
    return status


def result_entry(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    return {"file": path.name, "sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID)}


def study_report(jobs: list[SeriesJob], skipped: list[SkippedFile], models: ModelSet | None,
                 parametric_maps: list[str] | None = None, clinical_reports: list[str] | None = None) -> dict:
    """A JSON-ready account of what happened to every series and every skipped file, and the maps written."""
    series = []
    for job in jobs:
        entry = {
            "series_instance_uid": job.series_instance_uid,
            "description": job.selected.series.description,
            "anatomy": job.selected.anatomy,
            "rule": job.selected.rule.name,
            "instances": len(job.selected.series),
            "outcome": job.outcome,
        }
        if job.reason:
            entry["reason"] = job.reason
        if job.output is not None:
            entry["seg"] = job.output.name
        if job.report_output is not None:
            entry["sr"] = job.report_output.name
        if job.map_outputs:
            entry["parametric_maps"] = [path.name for path in job.map_outputs]
        if job.volume is not None and job.volume.missing:
            entry["missing_slices"] = job.volume.missing
        if job.label_volume is not None:
            present = np.unique(job.label_volume)
            entry["labels"] = [models.label_map.by_value(int(v)).name for v in present if v]
        if job.plausibility is not None:
            entry["plausibility"] = [finding.as_dict() for finding in job.plausibility]
        if job.quality:
            entry["quality"] = {segment: quality.as_dict() for segment, quality in job.quality.items()}
        if job.failures:
            entry["failures"] = job.failures
        series.append(entry)
    report = {"software": f"msk-node {__version__}", "series": series,
              "skipped": [{"source": s.path, "reason": s.reason} for s in skipped]}
    if parametric_maps:
        report["parametric_maps"] = parametric_maps
    if clinical_reports:
        report["clinical_reports"] = clinical_reports
    if models is not None:
        report["models"] = models.provenance()
    return report


def load_study(work: StudyWork, input_dir: Path, rules: list[SeriesRule] | None = None) -> None:
    with work.times.stage("load"):
        work.jobs, work.skipped, work.series = load_and_select(input_dir, rules)


def build_volumes(work: StudyWork) -> None:
    with work.times.stage("load"):
        for job in work.active_jobs():
            with job.guard("volume", "no volume"):
                build_volume(job)


def detect_all(work: StudyWork, models: ModelSet) -> None:
    with work.times.stage("detect"):
        for job in work.active_jobs():
            with job.guard("detect", "detection failed"):
                detect_anatomy(job, models)


def segment_all(work: StudyWork, models: ModelSet) -> None:
    for job in work.active_jobs():
        with job.guard("segment", "segmentation failed"):
            segment_boxes(job, models, work.times)


def postprocess_all(work: StudyWork, label_map: LabelMap) -> None:
    with work.times.stage("postprocess"):
        for job in work.active_jobs():
            with job.guard("postprocess", "post-processing failed"):
                postprocess(job, label_map)


def plausibility_all(work: StudyWork, label_map: LabelMap) -> None:
    with work.times.stage("plausibility"):
        for job in work.active_jobs():
            with job.guard("plausibility", "plausibility checks failed"):
                check_plausibility(job, label_map)


def measure_all(work: StudyWork, label_map: LabelMap) -> None:
    """Biomarkers of every segmented series, then the maps of relaxometry acquisitions none of them measured on."""
    with work.times.stage("measure"):
        for job in work.active_jobs():
            with job.guard("measure"):
                measure(job, label_map, work.series)
        fitted = [m for job in work.jobs if job.measurements is not None for m in job.measurements.maps]
        work.maps = unmeasured_relaxation_maps(work.series, fitted)


def process_study(input_dir: Path, output_dir: Path, models: ModelSet,
                  rules: list[SeriesRule] | None = None) -> StudyWork:
    """Run the whole main job in-process, in the order the application's operators run it."""
    work = StudyWork(output_dir=Path(output_dir))
    load_study(work, input_dir, rules)
    build_volumes(work)
    detect_all(work, models)
    segment_all(work, models)
    postprocess_all(work, models.label_map)
    plausibility_all(work, models.label_map)
    measure_all(work, models.label_map)
    write_outputs(work, models)
    return work
