"""``msk-node``: make phantoms, run the application on a study, benchmark it."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from msk_node.model_paths import HOW_TO_PASS_MODELS, default_models_dir
from msk_node.status import EXIT_BAD_MODELS, EXIT_RAN, STATUS_FILE

if TYPE_CHECKING:
    from msk_node_service import NodeConfig

T = TypeVar("T")

#: -m's default: $MSK_NODE_MODELS, $HOLOSCAN_MODEL_PATH, else models/ in the current directory (a checkout).
DEFAULT_MODELS = default_models_dir()


def run_application(input_dir: Path, output_dir: Path, models_dir: Path) -> dict:
    """Run the MONAI Deploy application as its entry point does (status.json included) and return its report.

    A study that cannot run exits with the contract's code and the reason from status.json.
    """
    from msk_node_app.__main__ import main as application_main

    argv = [sys.executable, "msk_node_app", "-i", str(input_dir), "-o", str(output_dir), "-m", str(models_dir)]
    exit_code = application_main(argv)
    if exit_code != EXIT_RAN:
        status = json.loads((Path(output_dir) / STATUS_FILE).read_text())
        print(f"msk-node: could not run: {status.get('reason', status['outcome'])}", file=sys.stderr)
        raise SystemExit(exit_code)
    return json.loads((Path(output_dir) / "report.json").read_text())


def _phantom(args: argparse.Namespace) -> None:
    from msk_node_phantoms import write_phantom

    out = write_phantom(args.kind, args.out, seed=args.seed, randomize_appearance=args.randomize)
    print(f"wrote {args.kind} phantom to {out}")


def existing_models(models: Path) -> Path:
    """``models`` if it is a folder; otherwise exit (code EXIT_BAD_MODELS) saying how to name one."""
    if not models.is_dir():
        print(f"msk-node: models folder not found: {models}; {HOW_TO_PASS_MODELS}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_MODELS)
    return models


def _run(args: argparse.Namespace) -> None:
    report = run_application(args.input, args.output, existing_models(args.models))
    print(json.dumps(report, indent=2))


def _demo(args: argparse.Namespace) -> None:
    """Start the node with its local store, C-STORE a knee phantom study to it, show the results."""
    from pydicom import dcmread

    from msk_node.bench import send_files
    from msk_node_phantoms import write_phantom
    from msk_node_service import Node, NodeConfig, status

    existing_models(args.models)
    study = write_phantom("knee", args.out / "study", seed=args.seed)
    config = NodeConfig.from_mapping({
        "ae_title": "MSKNODE", "port": 0, "stable_after_s": 2,
        "spool_dir": str((args.out / "spool").resolve()), "models_dir": str(args.models.resolve()),
    })
    with Node(config) as node:
        print(f"node MSKNODE listening on 127.0.0.1:{node.port}; results go to {config.spool_dir / 'results'}")
        files = sorted((study / "dicom").rglob("*.dcm"))
        statuses = send_files(node.port, files, show_progress=True)
        print(f"sent {len(files)} instances, {statuses.count(0)} stored")
        follow_jobs(config, args.timeout)
    for job in status(config):
        print(f"job {job['id']}: {job['state']} {job.get('reason') or ''}".rstrip())
    for path in sorted((config.spool_dir / "results").rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        print(f"{ds.Modality} {path}")
        for segment in ds.get("SegmentSequence", []):
            print(f"  segment {segment.SegmentNumber}: {segment.SegmentLabel}")


def follow_jobs(config, timeout_s: float) -> None:
    """Print each job's state as it changes, with the time since the study was sent, until all are done."""
    import time

    from msk_node_service import status
    from msk_node_service.jobs import FINISHED_STATES

    start, seen = time.monotonic(), {}
    while time.monotonic() - start < timeout_s:
        jobs = status(config)
        for job in jobs:
            if seen.get(job["id"]) != job["state"]:
                seen[job["id"]] = job["state"]
                print(f"  {time.monotonic() - start:6.1f} s  job {job['id']}: {job['state']}", flush=True)
        # held jobs wait for an operator, not for this loop
        if jobs and all(job["state"] in (*FINISHED_STATES, "held") for job in jobs):
            return
        time.sleep(0.5)
    print(f"gave up waiting after {timeout_s:g} s")


def _overlay(args: argparse.Namespace) -> None:
    from msk_node.overlay import render_seg_overlays

    try:
        paths = render_seg_overlays(args.seg, args.series, args.models / "detector" / "label_map.yaml", args.out,
                                    every=args.every)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    print(f"wrote {len(paths)} overlays to {args.out}")


def _bench(args: argparse.Namespace) -> None:
    from msk_node.bench import default_real_knee, run_benchmark

    real_knee = args.real_knee if args.real_knee is not None else default_real_knee()
    report = run_benchmark(existing_models(args.models), real_knee, args.work, with_node=not args.no_node)
    print(json.dumps(report, indent=2))


def _node_config(path: Path):
    from msk_node_service import ConfigError, NodeConfig

    try:
        return NodeConfig.load(path)
    except (ConfigError, FileNotFoundError) as error:
        raise SystemExit(f"msk-node: {error}") from None


def _serve(args: argparse.Namespace) -> None:
    from msk_node_service import Node

    Node(serve_config(args)).run_forever()


def serve_config(args: argparse.Namespace):
    """The node configuration with the dashboard options of the command line and the environment applied.

    Without a token in the file, ``MSK_NODE_DASHBOARD_TOKEN`` gives it (an empty one counts as none).
    """
    import dataclasses
    import os

    config = _node_config(args.config)
    overrides = {"enabled": args.dashboard, "host": args.dashboard_host, "port": args.dashboard_port,
                 "token": config.dashboard.token or os.environ.get("MSK_NODE_DASHBOARD_TOKEN", "").strip() or None}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    try:
        dashboard = dataclasses.replace(config.dashboard, **overrides)
    except ValueError as error:
        raise SystemExit(f"msk-node serve: {error}") from None
    if dashboard.refusal() is not None:
        raise SystemExit(f"msk-node serve: {dashboard.refusal()}")
    return dataclasses.replace(config, dashboard=dashboard)


#: History lines ``msk-node status`` prints under each job (the most recent).
STATUS_HISTORY_LINES = 3


def _status(args: argparse.Namespace) -> None:
    from msk_node_service import association_health, status

    config = _node_config(args.config)
    rows, health = status(config), association_health(config)
    if args.json:
        print(json.dumps({"jobs": rows, "associations": health}, indent=2))
        return
    header = ("id", "study uid", "state", "attempts", "reason")
    table = [tuple(str(row[key]) for key in ("id", "study_uid", "state", "attempts")) + (row["reason"] or "",)
             for row in rows]
    widths = [max([len(header[i])] + [len(line[i]) for line in table]) for i in range(4)]
    print("  ".join(value.ljust(width) for value, width in zip(header[:4], widths)) + "  " + header[4])
    for line, row in zip(table, rows):
        print("  ".join(value.ljust(width) for value, width in zip(line[:4], widths)) + "  " + line[4])
        history = row["history"]
        if len(history) > STATUS_HISTORY_LINES:
            print(f"      ({len(history) - STATUS_HISTORY_LINES} earlier history line(s); --json has all)")
        for event in history[-STATUS_HISTORY_LINES:]:
            print(f"      {event}")
    print(association_summary(health))


def association_summary(health: dict | None) -> str:
    """One line: how the associations of the latest node run ended, by outcome and reason."""
    import time

    if health is None:
        return "associations: no node has run on this job store"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(health["started"]))
    state = "running" if health["stopped"] is None else \
        "stopped " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(health["stopped"]))
    parts = []
    for outcome in ("accepted", "refused", "aborted", "dropped"):
        details = health["counts"].get(outcome, {})
        text = f"{sum(details.values())} {outcome}"
        named = [f"{detail} {count}" for detail, count in details.items() if detail]
        parts.append(text + (f" ({', '.join(named)})" if named else ""))
    return f"associations since {when} ({health['ae_title']}, {state}): " + "; ".join(parts)


def _job_command(args: argparse.Namespace, name: str, action: Callable[[NodeConfig, int], T]) -> T:
    """``action(config, job)`` for ``msk-node <name> JOB``; an unknown job or a wrong state exits with its reason."""
    try:
        return action(_node_config(args.config), args.job)
    except (KeyError, ValueError) as error:
        raise SystemExit(f"msk-node {name}: {error.args[0] if error.args else error}") from None


def _retry(args: argparse.Namespace) -> None:
    from msk_node_service import retry

    print(f"job {args.job}: {_job_command(args, 'retry', retry)}")


def _cancel(args: argparse.Namespace) -> None:
    from msk_node_service import cancel

    print(f"job {args.job}: {_job_command(args, 'cancel', cancel)}")


def _release(args: argparse.Namespace) -> None:
    from msk_node_service import release

    missing = _job_command(args, "release", release)
    print(f"job {args.job}: stable (runs without {missing} refused instance(s))")


def _rules(args: argparse.Namespace) -> None:
    from msk_node.selection import rules_json

    try:
        text = rules_json(args.rules)
    except ValueError as error:
        raise SystemExit(f"msk-node rules: {error}") from None
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msk-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    phantom = commands.add_parser("phantom", help="write a synthetic MSK MRI study with exact ground truth")
    phantom.add_argument("kind", choices=["knee", "thigh", "spine", "knee-t1rho"])
    phantom.add_argument("--out", type=Path, required=True)
    phantom.add_argument("--seed", type=int, default=0)
    phantom.add_argument("--randomize", action="store_true", help="random tissue contrasts (training data)")
    phantom.set_defaults(handler=_phantom)

    run = commands.add_parser("run", help="segment one study folder (the MONAI Deploy application)")
    run.add_argument("-i", "--input", type=Path, required=True)
    run.add_argument("-o", "--output", type=Path, required=True)
    run.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS)
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="start the node, C-STORE a knee phantom study to it, show the SEG/SR")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--timeout", type=float, default=900, help="seconds to wait for the result")
    demo.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS)
    demo.set_defaults(handler=_demo)

    overlay = commands.add_parser("overlay", help="draw a SEG's outlines on its source slices (PNG)")
    overlay.add_argument("--series", type=Path, required=True, help="folder holding the SEG's source series")
    overlay.add_argument("--seg", type=Path, required=True)
    overlay.add_argument("--out", type=Path, required=True)
    overlay.add_argument("--every", type=int, default=10, help="draw every Nth labelled slice")
    overlay.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS)
    overlay.set_defaults(handler=_overlay)

    bench = commands.add_parser("bench", help="time every pipeline stage; prints JSON")
    bench.add_argument("--real-knee", type=Path, help="folder with the real knee DESS series (default: "
                       "dess-echo1 under $MSK_NODE_REAL_KNEE or ../shared/data/knee-mri-ge-3t, where present)")
    bench.add_argument("--work", type=Path, default=Path("runs/bench"))
    bench.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS)
    bench.add_argument("--no-node", action="store_true", help="skip the end-to-end node turnaround")
    bench.set_defaults(handler=_bench)

    serve = commands.add_parser("serve", help="run the PACS node: DICOM listener, job queue, result delivery")
    serve.add_argument("--config", type=Path, required=True, help="node YAML (see node.example.yaml)")
    serve.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=None,
                       help="serve the web dashboard (default: the config's dashboard.enabled); its token, when "
                            "not in the config, comes from $MSK_NODE_DASHBOARD_TOKEN")
    serve.add_argument("--dashboard-host", help="address the dashboard binds (default: dashboard.host, 127.0.0.1)")
    serve.add_argument("--dashboard-port", type=int, help="dashboard port (default: dashboard.port, 8080)")
    serve.set_defaults(handler=_serve)

    status = commands.add_parser("status", help="list the node's jobs (id, study, state, attempts, reason, "
                                 "history) and how its associations ended")
    status.add_argument("--config", type=Path, required=True)
    status.add_argument("--json", action="store_true", help="print every field as JSON")
    status.set_defaults(handler=_status)

    retry = commands.add_parser("retry", help="requeue a dead, failed, skipped, cancelled or delivered job, or "
                                "deliver a pending one now")
    retry.add_argument("job", type=int, help="job id (from msk-node status)")
    retry.add_argument("--config", type=Path, required=True)
    retry.set_defaults(handler=_retry)

    cancel = commands.add_parser("cancel", help="cancel a received, stable, held or failed job (it never runs)")
    cancel.add_argument("job", type=int, help="job id (from msk-node status)")
    cancel.add_argument("--config", type=Path, required=True)
    cancel.set_defaults(handler=_cancel)

    release = commands.add_parser("release", help="run a held job without the instances refused for lack of "
                                  "resources")
    release.add_argument("job", type=int, help="job id (from msk-node status)")
    release.add_argument("--config", type=Path, required=True)
    release.set_defaults(handler=_release)

    rules = commands.add_parser("rules", help="validate the series rules and write them as JSON (the Orthanc "
                                              "plugin reads that rendering)")
    rules.add_argument("--json", action="store_true", required=True, help="write the rules as JSON")
    rules.add_argument("--rules", help="rules file (default: the packaged msk_node/config/series_rules.yaml)")
    rules.add_argument("--output", "-o", help="file to write (default: standard output)")
    rules.set_defaults(handler=_rules)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # pynetdicom logs every DIMSE message at INFO; the node logs one line per association instead.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    args.handler(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
