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

# the `path` values of evaluation.stats, spelled out so that msk-eval starts without importing it
PATH_CHOICES = ("auto", "parametric", "nonparametric")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="msk-eval", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_stats_command(commands)
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
    from evaluation import plots, stats

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


if __name__ == "__main__":
    raise SystemExit(main())
