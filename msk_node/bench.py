"""``msk-node bench``: wall time per stage and throughput, and Dice on phantoms, as JSON."""
from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

from msk_node.metrics import dice_per_label
from msk_node.models import load_models
from msk_node.pipeline import STAGES, StudyWork, process_study
from msk_node.volume import labels_on_volume_grid

PHANTOM_KINDS = ("knee", "thigh", "spine")


def _summarise(work: StudyWork, wall: float) -> dict:
    slices = sum(len(job.selected.series) for job in work.jobs if job.volume is not None)
    stages = {stage: round(work.times.seconds.get(stage, 0.0), 3) for stage in STAGES}
    encoded = max(1, sum(len({d.slice_index for d in job.detections}) for job in work.jobs))
    return {
        "slices": slices,
        "slices_encoded": encoded,
        "wall_s": round(wall, 3),
        "stages_s": stages,
        "slices_per_s": round(slices / wall, 3) if wall else None,
        "encoder_s_per_slice": round(stages["encode"] / encoded, 3),
        "outcomes": [job.outcome for job in work.jobs],
    }


def bench_phantom(kind: str, models, work_dir: Path, seed: int = 7) -> dict:
    from msk_node.phantoms import write_phantom

    case = write_phantom(kind, work_dir / kind, seed=seed)
    start = time.perf_counter()
    work = process_study(case / "dicom", work_dir / f"{kind}-out", models)
    result = _summarise(work, time.perf_counter() - start)
    job = work.jobs[0]
    if job.label_volume is not None:
        truth = labels_on_volume_grid(case / "truth_labels.nii.gz", job.volume.volume)
        names = {spec.name: spec.value for spec in models.label_map.for_anatomy(kind).labels}
        result["dice"] = {k: round(v, 4) for k, v in dice_per_label(job.label_volume, truth, names).items()}
    return result


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Sustained dense matmul rate of this machine at ``dtype``: the peak the encoder is compared with."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def encoder_gflop(segmenter) -> float | None:
    """FLOPs of one encoder pass on a 256 x 256 slice, counted by torch (LiteMedSAM only)."""
    if getattr(segmenter, "family", "") != "litemedsam":
        return None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        segmenter.model.image_encoder(torch.zeros(1, 3, 256, 256))
    return counter.get_total_flops() / 1e9


def send_files(port: int, files: list[Path], called_ae: str = "MSKNODE", host: str = "127.0.0.1") -> list[int]:
    """C-STORE ``files`` in one association; the status of each."""
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts

    sender = AE(ae_title="MSKBENCH")
    sender.requested_contexts = StoragePresentationContexts
    association = sender.associate(host, port, ae_title=called_ae)
    if not association.is_established:
        raise RuntimeError(f"{called_ae} at {host}:{port} refused the association")
    try:
        return [int(association.send_c_store(dcmread(path)).Status) for path in files]
    finally:
        association.release()


def node_turnaround(models_dir: Path, work_dir: Path, stable_after_s: float = 2.0, timeout_s: float = 900) -> dict:
    """Last instance received -> result delivered for one knee phantom study sent to a live node.

    Split: transfer (C-STORE of the study), waiting (last instance to job start: the
    inactivity timeout plus scheduling), processing (the application, until its report
    is written) and delivery (report written to results confirmed by the local store).
    """
    from msk_node.phantoms import write_phantom
    from msk_node.service import Node, NodeConfig, status

    study = write_phantom("knee", work_dir / "node-study", seed=11)
    files = sorted((study / "dicom").rglob("*.dcm"))
    config = NodeConfig.from_mapping({"ae_title": "MSKNODE", "port": 0, "stable_after_s": stable_after_s,
                                      "spool_dir": str((work_dir / "node-spool").resolve()),
                                      "models_dir": str(Path(models_dir).resolve())})
    with Node(config) as node:
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


def run_benchmark(models_dir: Path, real_knee: Path | None, work_dir: Path | None = None,
                  with_node: bool = True) -> dict:
    """Benchmark the default pipeline on one phantom per kind and, if given, the real knee DESS."""
    load_start = time.perf_counter()
    models = load_models(models_dir)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
        "models": models.provenance(),
        "model_load_s": round(time.perf_counter() - load_start, 3),
        "phantoms": {},
    }
    gflop = encoder_gflop(models.segmenter)
    precision = getattr(models.segmenter, "precision", "fp32")
    peak = matmul_gflops(torch.bfloat16 if precision == "bf16" else torch.float32)
    report["encoder"] = {"precision": precision, "gflop_per_slice": round(gflop, 2) if gflop else None,
                         "matmul_peak_gflops": round(peak, 1)}
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
        if with_node:
            report["node_turnaround"] = node_turnaround(models_dir, Path(scratch))
    if gflop:
        for result in [*report["phantoms"].values(), report.get("real_knee")]:
            if result and result["encoder_s_per_slice"]:
                result["encoder_pct_of_peak"] = round(100 * gflop / result["encoder_s_per_slice"] / peak, 1)
    return report
