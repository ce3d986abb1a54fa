"""``msk-node bench``: wall time per stage and throughput, and Dice on phantoms, as JSON.

Every ratio in the report (encoder share of peak, node turnaround against the
in-process pipeline) is measured in the same run on the same machine.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from msk_node.metrics import dice_per_label
from msk_node.models import load_models
from msk_node.parallel import usable_cores
from msk_node.pipeline import STAGES, StudyRun, process_study
from msk_node.precision import cpu_info, native_bf16
from msk_node.volume import labels_on_volume_grid

PHANTOM_KINDS = ("knee", "thigh", "spine")
#: The knee phantom the pipeline and the node are both timed on.
KNEE_SEED = 7
#: CPU flags that decide the speed of the encoder: vector width, bf16 and int8 dot products.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def _summarise(work: StudyRun, wall: float) -> dict:
    slices = sum(len(job.selected.series) for job in work.series_results if job.volume is not None)
    stages = {stage: round(work.times.seconds.get(stage, 0.0), 3) for stage in STAGES}
    encoded = max(1, sum(len({d.slice_index for d in job.detections}) for job in work.series_results))
    return {
        "slices": slices,
        "slices_encoded": encoded,
        "wall_s": round(wall, 3),
        "stages_s": stages,
        "slices_per_s": round(slices / wall, 3) if wall else None,
        "encoder_s_per_slice": round(stages["encode"] / encoded, 3),
        "outcomes": [job.outcome for job in work.series_results],
    }


def bench_phantom(kind: str, models, work_dir: Path, seed: int = KNEE_SEED) -> dict:
    from msk_node_phantoms import write_phantom

    case = write_phantom(kind, work_dir / kind, seed=seed)
    start = time.perf_counter()
    work = process_study(case / "dicom", work_dir / f"{kind}-out", models)
    result = _summarise(work, time.perf_counter() - start)
    job = work.series_results[0]
    if job.label_volume is not None:
        truth = labels_on_volume_grid(case / "truth_labels.nii.gz", job.label_volume.volume.volume)
        names = {spec.name: spec.value for spec in models.label_map.for_anatomy(kind).labels}
        result["dice"] = {k: round(v, 4) for k, v in dice_per_label(job.label_volume.labels, truth, names).items()}
    return result


def _timed_rate(operation, operations: float, min_seconds: float = 1.0) -> float:
    """Operations per second of ``operation`` (one warm-up call, then repeated for at least ``min_seconds``)."""
    operation()
    calls, start = 0, time.perf_counter()
    while True:
        operation()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return operations * calls / elapsed


def matmul_gflops(dtype: torch.dtype, size: int = 2048) -> float:
    """Sustained dense matmul rate of this machine at ``dtype`` (int8: int32-accumulating GOP/s)."""
    if dtype == torch.int8:
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        return _timed_rate(lambda: torch._int_mm(a, b), 2 * size**3) / 1e9
    if dtype == torch.bfloat16 and not native_bf16():
        size = 512  # emulated: a big product would take minutes
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    return _timed_rate(lambda: torch.mm(a, b), 2 * size**3) / 1e9


def machine_report() -> dict:
    """CPU model and speed-relevant flags, cores and threads, and the measured matmul peaks."""
    info = cpu_info()
    return {
        "cpu": info["model"],
        "flags": [flag for flag in SPEED_FLAGS if flag in info["flags"]],
        "native_bf16": native_bf16(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "peak_gflops": {name: round(matmul_gflops(dtype), 1)
                        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("int8", torch.int8))},
    }


def encoder_gflop(segmenter) -> float | None:
    """FLOPs of one encoder pass on a 256 x 256 slice, counted by torch (LiteMedSAM only)."""
    if getattr(segmenter, "family", "") != "litemedsam":
        return None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        segmenter.model.image_encoder(torch.zeros(1, 3, 256, 256))
    return counter.get_total_flops() / 1e9


def send_files(port: int, files: list[Path], called_ae: str = "MSKNODE", host: str = "127.0.0.1",
               show_progress: bool = False) -> list[int]:
    """C-STORE ``files`` in one association; the status of each."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    from msk_node.progress import progress

    sender = AE(ae_title="MSKBENCH")
    sender.requested_contexts = StoragePresentationContexts
    association = sender.associate(host, port, ae_title=called_ae)
    if not association.is_established:
        raise RuntimeError(f"{called_ae} at {host}:{port} refused the association")
    try:
        sending = progress(files, "sending", "instance") if show_progress else files
        return [int(association.send_c_store(dcmread(path)).Status) for path in sending]
    finally:
        association.release()


def node_turnaround(models_dir: Path, work_dir: Path, stable_after_s: float = 2.0, timeout_s: float = 900) -> dict:
    """Last instance received -> result delivered for the knee phantom study sent to a live node.

    Split: transfer (C-STORE of the study), waiting (last instance to job start: the
    inactivity timeout plus scheduling), processing (the warm worker, until its report
    is written) and delivery (report written to results confirmed by the local store).
    """
    from msk_node_phantoms import write_phantom
    from msk_node_service import Node, NodeConfig, status

    study = write_phantom("knee", work_dir / "node-study", seed=KNEE_SEED)
    files = sorted((study / "dicom").rglob("*.dcm"))
    config = NodeConfig.from_mapping({"ae_title": "MSKNODE", "port": 0, "stable_after_s": stable_after_s,
                                      "spool_dir": str((work_dir / "node-spool").resolve()),
                                      "models_dir": str(Path(models_dir).resolve())})
    with Node(config) as node:
        _wait_until_ready(node, timeout_s)
        start = time.time()
        statuses = send_files(node.port, files)
        received = time.time()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not any(j["state"] in ("delivered", "dead") for j in status(config)):
            time.sleep(0.2)
    (job,) = status(config)
    if job["state"] != "delivered":
        return {"state": job["state"], "reason": job["reason"]}
    processed = (Path(job["output_dir"]) / "report.json").stat().st_mtime
    return {
        "instances": len(files), "stored": statuses.count(0), "stable_after_s": stable_after_s,
        "turnaround_s": round(job["finished"] - received, 3),
        "split_s": {"transfer": round(received - start, 3), "waiting": round(job["started"] - received, 3),
                    "processing": round(processed - job["started"], 3),
                    "delivery": round(job["finished"] - processed, 3)},
    }


def _wait_until_ready(node, timeout_s: float) -> None:
    """Wait for the node's warm worker to have its models loaded: start-up is not turnaround."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and node.worker.app is not None and not node.worker.app.ready:
        time.sleep(0.2)


def app_end_to_end(study: Path, out: Path, models_dir: Path) -> float:
    """Seconds of ``python -m msk_node_app`` on ``study``: interpreter, Holoscan and model start-up included."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "msk_node_app", "-i", str(study), "-o", str(out), "-m", str(models_dir)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 3)


def default_real_knee() -> Path | None:
    """The real knee DESS (first echo): ``$MSK_NODE_REAL_KNEE``, else the shared data beside the current directory."""
    knee = Path(os.environ.get("MSK_NODE_REAL_KNEE", Path("..") / "shared" / "data" / "knee-mri-ge-3t"))
    folder = knee / "dess-echo1"
    return folder if folder.is_dir() else None


def run_benchmark(models_dir: Path, real_knee: Path | None, work_dir: Path | None = None,
                  with_node: bool = True) -> dict:
    """Benchmark the default pipeline on one phantom per kind and, if given, the real knee DESS."""
    load_start = time.perf_counter()
    models = load_models(models_dir)
    report = {
        "machine": machine_report(),
        "models": models.provenance(),
        "model_load_s": round(time.perf_counter() - load_start, 3),
        "phantoms": {},
    }
    precision = report["models"]["precision"]
    gflop = encoder_gflop(models.segmenter)
    peak = report["machine"]["peak_gflops"][precision]
    report["encoder"] = {"precision": precision, "backend": report["models"]["backend"],
                         "gflop_per_slice": round(gflop, 2) if gflop else None, "peak_gflops": peak,
                         "floor_s_per_slice": round(gflop / peak, 3) if gflop else None}
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        for kind in PHANTOM_KINDS:
            report["phantoms"][kind] = bench_phantom(kind, models, Path(scratch))
        if real_knee is not None:
            start = time.perf_counter()
            work = process_study(real_knee, Path(scratch) / "real-out", models)
            report["real_knee"] = _summarise(work, time.perf_counter() - start)
            report["real_knee"]["labels"] = [e.get("labels", []) for e in work.report["series"]]
            report["real_knee"]["app_end_to_end_s"] = app_end_to_end(real_knee, Path(scratch) / "real-app-out",
                                                                     models_dir)
        if with_node:
            del models  # the node's warm worker loads its own
            turnaround = node_turnaround(models_dir, Path(scratch))
            pipeline_s = report["phantoms"]["knee"]["wall_s"]
            if "turnaround_s" in turnaround:
                turnaround["pipeline_s"] = pipeline_s
                turnaround["turnaround_over_pipeline"] = round(turnaround["turnaround_s"] / pipeline_s, 3)
                without_wait = turnaround["turnaround_s"] - turnaround["stable_after_s"]
                turnaround["turnaround_over_pipeline_without_inactivity_wait"] = round(without_wait / pipeline_s, 3)
            report["node_turnaround"] = turnaround
    if gflop:
        for result in [*report["phantoms"].values(), report.get("real_knee")]:
            if result and result["encoder_s_per_slice"]:
                result["encoder_pct_of_peak"] = round(100 * gflop / result["encoder_s_per_slice"] / peak, 1)
    return report
