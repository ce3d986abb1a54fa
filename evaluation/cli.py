"""``msk-eval``: evaluation commands.

Each command adds its parser in ``add_<command>_command`` and sets ``run`` to the function that
executes it; heavy libraries are imported inside ``run`` so that every command starts fast.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from msk_node.cli import DEFAULT_MODELS
from msk_node.precision import PRECISIONS
from msk_node.segmenters.registry import FAMILIES

# the `path` values of msk_node_evaluation.stats, spelled out so that msk-eval starts without importing it
PATH_CHOICES = ("auto", "parametric", "nonparametric")
# msk_node_evaluation.config's prompt sources, spelled out for the same reason
PROMPT_CHOICES = ("gt", "shifted", "detector")
#: Zero-shot segmenter families, and the truth labels themselves
MODEL_CHOICES = (*FAMILIES, "truth")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msk-eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_stats_command(commands)
    add_segment_command(commands)
    add_experiment_command(commands)
    add_biomarkers_command(commands)
    add_autolabel_command(commands)
    add_bench_autolabel_command(commands)
    add_check_command(commands)
    args = parser.parse_args(argv)
    return args.run(args)


# --- msk-eval stats --------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsConfig:
    """Settings of ``msk-eval stats``; the YAML keys and the option names (``-`` for ``_``)."""

    subject: str = "subject"
    model: str = "model"
    dataset: str = "dataset"
    value: str = "value"
    reference: str | None = None
    predictors: tuple[str, ...] = ()
    alpha: float = 0.05
    path: str = "auto"
    n_boot: int = 10_000
    vif_threshold: float = 10.0
    seed: int = 0
    units: str = ""

    def __post_init__(self) -> None:
        for key in ("subject", "model", "dataset", "value"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ValueError(f"'{key}' must be a column name, got {getattr(self, key)!r}")
        if self.reference is not None and not isinstance(self.reference, str):
            raise ValueError(f"'reference' must be a {self.model!r} value, got {self.reference!r}")
        if not all(isinstance(name, str) for name in self.predictors):
            raise ValueError(f"'predictors' must be a list of column names, got {list(self.predictors)}")
        if not _is_number(self.alpha) or not 0 < self.alpha < 1:
            raise ValueError(f"'alpha' must be a number between 0 and 1, got {self.alpha!r}")
        if self.path not in PATH_CHOICES:
            raise ValueError(f"'path' must be one of {PATH_CHOICES}, got {self.path!r}")
        if not _is_integer(self.n_boot) or self.n_boot < 1:
            raise ValueError(f"'n_boot' must be a positive integer, got {self.n_boot!r}")
        if not _is_number(self.vif_threshold) or self.vif_threshold <= 1:
            raise ValueError(f"'vif_threshold' must be a number above 1, got {self.vif_threshold!r}")
        if not _is_integer(self.seed) or self.seed < 0:
            raise ValueError(f"'seed' must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.units, str):
            raise ValueError(f"'units' must be text, got {self.units!r}")


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_stats_config(path: Path) -> StatsConfig:
    """Read a stats YAML; an unknown key or a bad value raises ValueError naming the key."""
    entries = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values")
    unknown = set(entries) - {field.name for field in fields(StatsConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    if "predictors" in entries:
        if not isinstance(entries["predictors"], list):
            raise ValueError(f"{path}: 'predictors' must be a list of column names")
        entries["predictors"] = tuple(entries["predictors"])
    try:
        return StatsConfig(**entries)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def add_stats_command(commands: argparse._SubParsersAction) -> None:
    stats = commands.add_parser(
        "stats", help="model comparison, agreement with a reference, mixed model of Dice",
        description="Statistics of a long-format CSV (one row per subject, model and dataset); "
                    "writes CSV tables and PNG figures. Options override the --config YAML.")
    stats.add_argument("table", type=Path, help="long-format CSV")
    stats.add_argument("--out", type=Path, required=True, help="output folder")
    stats.add_argument("--config", type=Path, help="YAML with any of the keys below (option names, '_' for '-')")
    for key in ("subject", "model", "dataset", "value"):
        stats.add_argument(f"--{key}", help=f"name of the {key} column (default '{key}')")
    stats.add_argument("--reference", help="the model value that is the reference (e.g. manual): "
                                           "enables agreement statistics")
    stats.add_argument("--predictors", nargs="+", help="columns for the mixed-effects model of the value")
    stats.add_argument("--alpha", type=float, help="significance level (default 0.05)")
    stats.add_argument("--path", choices=PATH_CHOICES,
                       help="auto: Shapiro-Wilk and Levene decide (default); or force one path")
    stats.add_argument("--n-boot", type=int, help="bootstrap resamples (default 10000)")
    stats.add_argument("--vif-threshold", type=float, help="drop predictors above this VIF (default 10)")
    stats.add_argument("--seed", type=int, help="seed of bootstraps and imputation (default 0)")
    stats.add_argument("--units", help="unit of the value, for figure labels")
    stats.set_defaults(run=run_stats)


def _stats_config(args: argparse.Namespace) -> StatsConfig:
    config = load_stats_config(args.config) if args.config else StatsConfig()
    overrides = {field.name: getattr(args, field.name) for field in fields(StatsConfig)
                 if getattr(args, field.name) is not None}
    if "predictors" in overrides:
        overrides["predictors"] = tuple(overrides["predictors"])
    return replace(config, **overrides)


def _read_table(path: Path, config: StatsConfig):
    import pandas as pd

    names = {key: getattr(config, key) for key in ("subject", "model", "dataset")}
    table = pd.read_csv(path, dtype={column: str for column in names.values()})
    for key, column in [*names.items(), ("value", config.value), *(("predictors", p) for p in config.predictors)]:
        if column not in table.columns:
            raise ValueError(f"{path}: column {column!r} (key '{key}') not found; columns are {list(table.columns)}")
    if not pd.api.types.is_numeric_dtype(table[config.value]):
        raise ValueError(f"{path}: column {config.value!r} (key 'value') is not numeric")
    return table


def _slug(*parts: object) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", str(part)).strip("-") for part in parts)


def run_stats(args: argparse.Namespace) -> int:
    try:
        config = _stats_config(args)
        table = _read_table(args.table, config)
    except ValueError as error:
        print(f"msk-eval stats: error: {error}", file=sys.stderr)
        return 2
    from msk_node_evaluation import plots, stats

    columns = stats.Columns(config.subject, config.model, config.dataset, config.value)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({**asdict(config), "predictors": list(config.predictors)},
                                                    sort_keys=False))
    written = [out / "config.yaml"]

    omnibus, pairwise = stats.compare_models(table, columns, config.alpha, config.path)
    written += [_write_csv(omnibus, out / "comparison.csv"), _write_csv(pairwise, out / "pairwise.csv"),
                plots.plot_metric_by_model(table, out / f"{_slug(config.value)}_by_model.png", columns)]
    print("model comparison:")
    for row in omnibus.itertuples(index=False):
        row = row._asdict()
        pairs = pairwise[pairwise[config.dataset] == row[config.dataset]]
        print(f"  {row[config.dataset]}: {row['test']} ({row['path']}) p = {row['p']:.3g}, "
              f"{int(pairs['significant'].sum())}/{len(pairs)} pairs significant after Benjamini-Hochberg")

    if config.reference is not None:
        results = stats.agreement(table, config.reference, columns, config.alpha, config.path,
                                  config.n_boot, config.seed)
        written.append(_write_csv(stats.agreement_table(results, columns), out / "agreement.csv"))
        print(f"agreement with {config.reference}:")
        for result in results:
            name = _slug(result.dataset, result.model)
            title = f"{result.dataset}: {result.model} vs {config.reference}"
            pairs = result.pairs
            written.append(plots.plot_bland_altman(pairs["reference"], pairs["candidate"], result.bland_altman,
                                                   out / f"bland_altman_{name}.png", title, config.units))
            unit = f" [{config.units}]" if config.units else ""
            written.append(plots.plot_regression(pairs["reference"], pairs["candidate"], result.regression,
                                                 out / f"regression_{name}.png", title,
                                                 f"{config.reference}{unit}", f"{result.model}{unit}"))
            icc, ba = result.icc, result.bland_altman
            print(f"  {result.dataset} / {result.model}: {icc.method} {icc.icc:.3f} "
                  f"[{icc.ci_low:.3f}, {icc.ci_high:.3f}], bias {ba.bias:.3g} "
                  f"(LoA {ba.loa_low:.3g}, {ba.loa_high:.3g}), rho {result.spearman_rho:.3f}")

    if config.predictors:
        model = stats.dice_mixed_model(table, config.predictors, columns, config.vif_threshold, config.seed)
        written += [_write_csv(model.coefficients, out / "mixed_model.csv"), _write_csv(model.vif, out / "vif.csv")]
        dropped = ", ".join(model.dropped) or "none"
        print(f"mixed model of {config.value} (random intercepts: {model.random_effects}, "
              f"{model.n_imputed} values imputed): dropped for VIF > {config.vif_threshold:g}: {dropped}"
              + ("" if model.converged else "; the fit did NOT converge"))

    print(f"wrote {len(written)} files to {out}")
    return 0


def _write_csv(frame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


# --- msk-eval segment / experiment / biomarkers ---------------------------------------------

# run-wide options that override the config's key of the same name ('-' for '_')
RUN_OPTIONS = ("prompts", "shift_px", "seed", "postprocess", "slice_step", "detector_models", "label_map",
               "overlay_every")
CASE_OPTIONS = ("image", "labels", "label_names", "series", "anatomy", "model", "models_dir", "checkpoint",
                "model_config", "precision")


def _add_evaluation_options(parser: argparse.ArgumentParser, postprocess_default: str) -> None:
    case = parser.add_argument_group("one case, without --config")
    case.add_argument("--image", type=Path, help="NIfTI image (sliced along its third axis) or a DICOM series folder")
    case.add_argument("--labels", type=Path, help="truth label volume (NIfTI) on the image's voxel grid")
    case.add_argument("--label-names", type=Path,
                      help="YAML mapping voxel value -> label name (default: the label map's values)")
    case.add_argument("--series", help="DICOM: part of the SeriesDescription when the folder holds several series")
    case.add_argument("--anatomy", help="anatomy of the labels for the biomarkers (default: from the label map)")
    case.add_argument("--model", choices=MODEL_CHOICES,
                      help="zero-shot family through the segmenter registry, or 'truth' (default litemedsam)")
    case.add_argument("--models-dir", type=Path, help="a node models folder (finetuned segmenter, detector) instead")
    case.add_argument("--checkpoint", type=Path, help="weights of sam2, sam or medsam")
    case.add_argument("--model-config", help="sam2 config (hiera_b+) or sam variant (vit_b)")
    case.add_argument("--precision", choices=PRECISIONS,
                      help="litemedsam precision (default auto: bf16 where the CPU has it natively, else fp32)")
    run = parser.add_argument_group("run settings (override the --config keys)")
    run.add_argument("--prompts", nargs="+", choices=PROMPT_CHOICES, help="prompt sources (default gt)")
    run.add_argument("--shift-px", type=float,
                     help="largest shift of a box corner for 'shifted', in pixels of the model's input (default 20)")
    run.add_argument("--seed", type=int, help="seed of the box shifts (default 0)")
    run.add_argument("--postprocess", nargs="+", choices=("off", "on"),
                     help=f"the node's post-processing (default {postprocess_default})")
    run.add_argument("--slice-step", type=int, help="evaluate every Nth slice (default 1)")
    run.add_argument("--detector-models", type=Path, help="models folder whose detector gives 'detector' boxes")
    run.add_argument("--label-map", type=Path, help="label map for post-processing (default: the node's)")
    run.add_argument("--overlay-every", type=int, help="overlay PNG of every Nth evaluated slice (default 0: none)")
    parser.add_argument("--out", type=Path, help="run folder (default: the config's 'output')")


def add_segment_command(commands: argparse._SubParsersAction) -> None:
    segment = commands.add_parser(
        "segment", help="segmentation metrics of box-prompted models (one case, or a --config experiment)",
        description="Segment with box prompts and score per label: Dice, IoU, HD95 and MSD in mm, per slice, "
                    "subject and dataset; CSV, JSON, box plots and overlays in the run folder.")
    segment.add_argument("--config", type=Path, help="experiment YAML (evaluation/config.py); same as "
                                                     "'msk-eval experiment'")
    _add_evaluation_options(segment, "off")
    segment.set_defaults(run=run_segment, postprocess_default="off")


def add_experiment_command(commands: argparse._SubParsersAction) -> None:
    experiment = commands.add_parser(
        "experiment", help="models x prompt sources x datasets from a YAML config: tables, box plots, tests",
        description="Run a segmentation experiment from its YAML config (evaluation/config.py).")
    experiment.add_argument("config", type=Path, help="experiment YAML")
    experiment.add_argument("--out", type=Path, help="run folder (default: the config's 'output')")
    experiment.set_defaults(run=run_segment)


def add_biomarkers_command(commands: argparse._SubParsersAction) -> None:
    biomarkers = commands.add_parser(
        "biomarkers", help="biomarkers from the truth labels and from a model's, per subject",
        description="Measure the node's biomarkers on the manual (truth) and the model label volumes of DICOM "
                    "cases; writes biomarkers.csv and biomarkers_long.csv (msk-eval stats --reference manual).")
    biomarkers.add_argument("--config", type=Path, help="experiment YAML (evaluation/config.py)")
    _add_evaluation_options(biomarkers, "on")
    biomarkers.set_defaults(run=run_biomarkers, postprocess_default="on")


def _evaluation_config(args: argparse.Namespace):
    """The experiment config of the command line: the --config file with overrides, or one case."""
    from msk_node_evaluation.config import load_experiment_config, parse_experiment_config

    overrides = {key: getattr(args, key, None) for key in RUN_OPTIONS}
    overrides = {key: str(value) if isinstance(value, Path) else value
                 for key, value in overrides.items() if value is not None}
    if "postprocess" in overrides:
        overrides["postprocess"] = [choice == "on" for choice in overrides["postprocess"]]
    if args.config is not None:
        given = [f"--{key.replace('_', '-')}" for key in CASE_OPTIONS if getattr(args, key, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: give the case and model in the --config file instead")
        config = load_experiment_config(args.config)
        return parse_experiment_config({**config.raw, **overrides}) if overrides else config
    if args.image is None or args.labels is None:
        raise ValueError("give --config, or --image and --labels")
    if args.models_dir is not None and args.model is not None:
        raise ValueError("--model and --models-dir: give one model")
    subject = _slug(re.sub(r"\.nii(\.gz)?$", "", args.image.resolve().name)) or "case"
    dataset = {"name": subject, "format": "dicom" if args.image.is_dir() else "nifti",
               "subjects": [{"id": subject, "image": str(args.image), "labels": str(args.labels)}]}
    dataset.update({key: str(value) for key, value in (("label_names", args.label_names), ("series", args.series),
                                                        ("anatomy", args.anatomy)) if value is not None})
    if args.models_dir is not None:
        model = {"name": args.models_dir.resolve().name, "models_dir": str(args.models_dir)}
    else:
        model = {"name": args.model or "litemedsam", "family": args.model or "litemedsam"}
        model.update({key: str(value) for key, value in (("checkpoint", args.checkpoint),
                                                          ("config", args.model_config),
                                                          ("precision", args.precision)) if value is not None})
    raw = {"models": [model], "datasets": [dataset],
           "postprocess": [args.postprocess_default == "on"], **overrides}
    if args.out is not None:
        raw["output"] = str(args.out)
    return parse_experiment_config(raw)


def _prepare(args: argparse.Namespace, command: str):
    """(config, run folder), or None after printing why not."""
    try:
        config = _evaluation_config(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"msk-eval {command}: error: {error}", file=sys.stderr)
        return None
    out = args.out or config.output
    out.mkdir(parents=True, exist_ok=True)
    return config, out


def run_segment(args: argparse.Namespace) -> int:
    prepared = _prepare(args, args.command)
    if prepared is None:
        return 2
    config, out = prepared
    from msk_node_evaluation.experiment import evaluate_segmentation, summarise, write_segmentation_outputs
    from msk_node.models import ModelError

    try:
        results = evaluate_segmentation(config, out, progress=print)
    except (ValueError, FileNotFoundError, ModelError) as error:
        print(f"msk-eval {args.command}: error: {error}", file=sys.stderr)
        return 2
    written = write_segmentation_outputs(config, results, out) + results.overlays
    pd_options = {"index": False, "float_format": lambda v: f"{v:.3f}"}
    if results.labels["subject"].nunique() == 1:
        columns = ["model", "prompts", "postprocess", "label", "dice", "iou", "hd95_mm", "msd_mm", "counted_slices",
                   "missed_slices", "false_positive_slices", "dice_3d"]
        print("per label (means over the counted slices; dice_3d over the evaluated volume):")
        print(results.labels[columns].to_string(**pd_options))
    print("mean Dice per slice (over slices, labels, then subjects), datasets x models:")
    print(summarise(results)["table"].to_string(**pd_options))
    print(f"wrote {len(written)} files to {out}")
    return 0


def run_biomarkers(args: argparse.Namespace) -> int:
    prepared = _prepare(args, "biomarkers")
    if prepared is None:
        return 2
    config, out = prepared
    from msk_node_evaluation.biomarkers import evaluate_biomarkers, write_biomarker_outputs
    from msk_node.models import ModelError

    try:
        table = evaluate_biomarkers(config, out, progress=print)
    except (ValueError, FileNotFoundError, ModelError) as error:
        print(f"msk-eval biomarkers: error: {error}", file=sys.stderr)
        return 2
    written = write_biomarker_outputs(config, table, out)
    columns = ["subject", "model", "prompts", "postprocess", "structure", "measurement", "truth_value", "model_value",
               "unit"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {len(written)} files to {out}")
    return 0


# --- msk-eval autolabel / bench-autolabel ----------------------------------------------------


def add_autolabel_command(commands: argparse._SubParsersAction) -> None:
    autolabel = commands.add_parser(
        "autolabel", help="the node's detector, segmenter and post-processing over a folder of studies",
        description="Label every study (subfolder) of INPUT with the node's pipeline, on this machine's cores or "
                    "a Ray cluster: OUT/<study>/ gets the SEGs as the node writes them; a progress bar, then a "
                    "summary (OUT/autolabel-summary.csv/.json). Studies done by an earlier run are skipped. "
                    "Exit status 1 when a study failed.")
    autolabel.add_argument("input", type=Path, help="one subfolder per study: DICOM files, or one NIfTI image")
    autolabel.add_argument("--out", type=Path, required=True, help="output folder, outside INPUT")
    autolabel.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS, help="node models folder")
    autolabel.add_argument("--nifti", action="store_true",
                           help="also write labels-<SeriesInstanceUID>.nii.gz per SEG, on the series' grid")
    autolabel.add_argument("--anatomy", help="anatomy of the NIfTI studies (a label-map anatomy: knee, thigh, "
                                             "spine); they have no headers to choose it by")
    autolabel.add_argument("--workers", type=int, help="worker processes or Ray actors, one model instance each "
                                                       "(default: the cores, or the cluster's CPUs / --threads)")
    autolabel.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers, at "
                                                       "least 1); give the same value for identical outputs")
    autolabel.add_argument("--ray", metavar="ADDRESS", help="run on this existing Ray cluster (host:port of its "
                                                            "head); paths must be the same on every node")
    autolabel.set_defaults(run=run_autolabel)


def add_bench_autolabel_command(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench-autolabel", help="studies per hour of autolabel: local processes and a local 2-worker Ray cluster",
        description="Run autolabel on one cohort locally and on a Ray cluster started on 127.0.0.1; print JSON "
                    "with studies per hour and whether the SEG pixel data of both runs are identical.")
    bench.add_argument("--studies", type=Path, help="cohort folder (default: phantom studies made for the run)")
    bench.add_argument("--phantoms", type=int, default=4, help="number of phantom studies (default 4)")
    bench.add_argument("--kind", default="spine", choices=("knee", "thigh", "spine"), help="phantom kind")
    bench.add_argument("--n-slices", type=int, default=8, help="slices per phantom study (default 8)")
    bench.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS, help="node models folder")
    bench.add_argument("--workers", type=int, help="local worker processes (default: the cores)")
    bench.add_argument("--ray-workers", type=int, default=2, help="Ray actors (default 2)")
    bench.add_argument("--work", type=Path, help="folder for the scratch data (default: the system's temp)")
    bench.add_argument("--out", type=Path, help="also write the JSON here")
    bench.set_defaults(run=run_bench_autolabel)


def _autolabel_workers(args: argparse.Namespace, cpus: int) -> tuple[int, int]:
    """(workers, threads per worker) on ``cpus`` cores: what is given, the rest shared out."""
    for name in ("workers", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    threads = args.threads or max(1, cpus // (args.workers or cpus))
    return args.workers or max(1, cpus // threads), threads


def run_autolabel(args: argparse.Namespace) -> int:
    from msk_node_evaluation.autolabel import AutolabelSettings, autolabel_cohort, available_cores, format_summary
    from msk_node.models import ModelError

    try:
        if args.ray is None:
            workers, threads = _autolabel_workers(args, available_cores())
            settings = AutolabelSettings(args.models.resolve(), args.nifti, args.anatomy, threads)
            result = autolabel_cohort(args.input, args.out, settings, workers)
        else:
            result = _autolabel_on_ray(args)
    except (ValueError, ModelError) as error:
        print(f"msk-eval autolabel: error: {error}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"summary: {args.out / 'autolabel-summary.csv'}")
    return 1 if result.count("failed") else 0


def _autolabel_on_ray(args: argparse.Namespace):
    from msk_node_evaluation.autolabel import AutolabelSettings, autolabel_cohort, connected_ray, ray_cpus

    with connected_ray(args.ray):
        cpus = ray_cpus()
        workers, threads = _autolabel_workers(args, cpus)
        if workers * threads > cpus:
            raise ValueError(f"--ray {args.ray}: {workers} workers x {threads} threads need {workers * threads} "
                             f"CPUs; the cluster has {cpus}")
        settings = AutolabelSettings(args.models.resolve(), args.nifti, args.anatomy, threads)
        return autolabel_cohort(args.input, args.out, settings, workers, ray_connected=True)


def run_bench_autolabel(args: argparse.Namespace) -> int:
    import json

    from msk_node_evaluation.autolabel import benchmark

    report = benchmark(args.models, args.studies, args.phantoms, args.kind, args.n_slices, args.workers,
                       args.ray_workers, args.work)
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


# --- msk-eval check --------------------------------------------------------------------------


def add_check_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser(
        "check", help="plausibility figures and overlays of the node's labels on studies without truth",
        description="Run the node's pipeline on each DICOM study folder; OUT/<study>/ gets the node's outputs "
                    "(SEG, SR, report.json) and, per segmented series, figures.json and figures.csv (per label: "
                    "volume, 3D components, slices covered, centroid in patient LPS mm, plausibility findings) "
                    "and overlay PNGs of evenly spaced slices. Prints a summary table.")
    check.add_argument("studies", type=Path, nargs="+", help="DICOM study folders (series in any subfolders)")
    check.add_argument("-m", "--models", type=Path, default=DEFAULT_MODELS, help="node models folder")
    check.add_argument("--out", type=Path, required=True, help="output folder")
    check.add_argument("--overlays", type=int, default=5, help="overlay PNGs per series (default 5)")
    check.set_defaults(run=run_check)


def run_check(args: argparse.Namespace) -> int:
    missing = [str(study) for study in args.studies if not study.is_dir()]
    if missing or args.overlays < 0:
        reason = f"not a folder: {', '.join(missing)}" if missing else "--overlays must be 0 or more"
        print(f"msk-eval check: error: {reason}", file=sys.stderr)
        return 2
    from msk_node_evaluation.check import check_study, format_summary, study_names
    from msk_node.models import ModelError, load_models

    try:
        models = load_models(args.models)
    except ModelError as error:
        print(f"msk-eval check: error: {error}", file=sys.stderr)
        return 2
    results = [check_study(study, args.out / name, models, args.overlays)
               for study, name in zip(args.studies, study_names(args.studies))]
    print(format_summary(results))
    print(f"wrote {sum(len(result.written) for result in results)} files to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
