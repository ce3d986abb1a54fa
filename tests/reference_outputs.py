"""A digest of what the node writes for a study, to hold its results fixed while the code around them changes.

The digest keeps what a change of structure must not change: SEG pixel data and segments, every
content item of the SR, Parametric Map values, the measurements table and the outcome of each series
in ``report.json``. It leaves out what differs by run: UIDs, dates, output file names.

Exact equality only holds on the machine (CPU, precision, encoder backend, thread count) that made the
reference; elsewhere the tests compare the decisions only. To record a new reference, on purpose:

    .venv/bin/python -m tests.reference_outputs [phantom-knee phantom-thigh phantom-spine real-knee]
"""
from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

REFERENCE = Path(__file__).resolve().parent / "reference" / "outputs.json"
#: Phantom kinds in the reference (the phantoms of the Dice tests).
PHANTOM_KINDS = ("knee", "thigh", "spine")


def machine() -> dict[str, Any]:
    """What decides the floating-point path of inference on this machine."""
    import torch

    from msk_node.precision import resolve_precision

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    from tests.conftest import DEFAULT_THREADS

    # the thread count the shared runs use (run_pipeline sets it), not the one the last step left behind
    return {"cpu": cpu, "precision": resolve_precision("auto"), "torch": torch.__version__,
            "threads": DEFAULT_THREADS, "python": platform.python_version()}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _content_items(items, path: str = "") -> list[str]:
    """Every content item of an SR tree as ``path > concept = value`` lines, in document order."""
    lines = []
    for item in items:
        concept = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        here = f"{path} > {concept}" if path else concept
        kind = item.ValueType
        if kind == "NUM":
            measured = item.get("MeasuredValueSequence")
            value = (f"{measured[0].NumericValue} {measured[0].MeasurementUnitsCodeSequence[0].CodeValue}"
                     if measured else "no value")
        elif kind == "CODE":
            value = f"{item.ConceptCodeSequence[0].CodeValue}:{item.ConceptCodeSequence[0].CodeMeaning}"
        elif kind in ("TEXT", "UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
            value = str(item.get("TextValue", "")) if kind == "TEXT" else kind  # UIDs and dates vary by run
        else:
            value = kind
        lines.append(f"{here} = {value}")
        if "ContentSequence" in item:
            lines += _content_items(item.ContentSequence, here)
    return lines


def _series_key(ds) -> str:
    return f"{ds.get('SeriesDescription', '')} / {ds.Modality} / {ds.SOPClassUID}"


def output_digest(out_dir: Path) -> dict[str, Any]:
    """The digest of one study's output folder (``report.json``, ``measurements.json``, DICOM results)."""
    report = json.loads((out_dir / "report.json").read_text())
    series = [{key: entry.get(key) for key in ("description", "anatomy", "rule", "instances", "outcome", "reason",
                                               "labels", "plausibility")} for entry in report["series"]]
    skipped = sorted(entry["reason"] for entry in report["skipped"])
    described = {entry["series_instance_uid"]: entry.get("description", "") for entry in report["series"]}
    rows = json.loads((out_dir / "measurements.json").read_text())
    measurements = sorted(((described.get(row["series_instance_uid"], "?"), row["segment"], row["structure"],
                            row["measurement"], row["value"], row["unit"], row["method"], row.get("reason") or "")
                           for row in rows), key=json.dumps)
    objects = []
    for path in sorted(out_dir.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        entry: dict[str, Any] = {"series": _series_key(ds)}
        if ds.Modality == "SEG":
            entry["segments"] = [s.SegmentLabel for s in ds.SegmentSequence]
            entry["frames"] = int(ds.NumberOfFrames)
            entry["pixels_sha256"] = _sha(ds.PixelData)
            entry["foreground"] = int(np.count_nonzero(ds.pixel_array))
        elif ds.Modality == "SR":
            entry["content"] = _content_items(ds.ContentSequence)
        elif "FloatPixelData" in ds:
            values = ds.pixel_array.astype(np.float64)
            entry["pixels_sha256"] = _sha(ds.FloatPixelData)
            entry["finite_mean"] = float(np.nanmean(values[np.isfinite(values) & (values != 0)]))
        objects.append(entry)
    objects.sort(key=lambda entry: (entry["series"], json.dumps(entry, sort_keys=True)))
    return {"series": series, "skipped": skipped, "measurements": [list(row) for row in measurements],
            "objects": objects}


def main(argv: list[str] | None = None) -> int:
    """Run the reference studies (all, or those named: phantom-knee, ..., real-knee) through the default pipeline
    and write :data:`REFERENCE`; studies not named keep their recorded digest."""
    import tempfile

    from msk_node.models import load_models
    from msk_node_phantoms import write_phantom
    from tests.conftest import MODELS, REAL_KNEE, TEST_SEED, real_knee_as_one_study, run_pipeline

    names = [f"phantom-{kind}" for kind in PHANTOM_KINDS] + ["real-knee"]
    wanted = (argv if argv is not None else sys.argv[1:]) or names
    unknown = set(wanted) - set(names)
    if unknown:
        raise SystemExit(f"unknown reference studies {sorted(unknown)} (known: {', '.join(names)})")
    recorded = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {"studies": {}}
    if set(wanted) != set(names) and recorded.get("machine") != machine():
        raise SystemExit("the recorded digest is from another machine: record every study")
    models = load_models(MODELS)
    studies: dict[str, Any] = dict(recorded["studies"])
    with tempfile.TemporaryDirectory() as temp:
        for name in wanted:
            if name == "real-knee":
                if not (REAL_KNEE / "dess-echo1").is_dir():
                    studies.pop(name, None)
                    continue
                study = real_knee_as_one_study(Path(temp) / "real-knee-study")
            else:
                kind = name.removeprefix("phantom-")
                study = write_phantom(kind, Path(temp) / name / "case", seed=TEST_SEED) / "dicom"
            run_pipeline(study, Path(temp) / name / "out", models)
            studies[name] = output_digest(Path(temp) / name / "out")
            print(f"{name}: done", file=sys.stderr)
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps({"machine": machine(), "studies": studies}, indent=1) + "\n")
    print(f"wrote {REFERENCE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
