"""PNG figures of ``msk-eval stats``.

Figures are drawn on their own Agg canvases, not through pyplot: no display is needed and no
global figure state is left behind by a long evaluation run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from msk_node_evaluation.stats import BlandAltman, Columns, RegressionFit

DPI = 150


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def plot_metric_by_model(data: pd.DataFrame, path: Path, columns: Columns = Columns()) -> Path:
    """Raincloud-style panel per dataset: half violin, box and jittered points per model."""
    datasets = sorted(data[columns.dataset].unique())
    panel_width = max(3.5, 1.1 * data[columns.model].nunique())
    figure = _figure(panel_width * len(datasets), 4.5)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]  # own scales: datasets differ in units
    jitter = np.random.default_rng(0)  # fixed, so the same table gives the same figure
    for ax, dataset in zip(axes, datasets):
        frame = data[data[columns.dataset] == dataset]
        models = sorted(frame[columns.model].unique())
        values = [frame.loc[frame[columns.model] == model, columns.value].dropna().to_numpy() for model in models]
        positions = np.arange(1, len(models) + 1)
        # a kernel density needs spread: constant or single-value groups get no violin
        spread = [i for i, group in enumerate(values) if np.unique(group).size > 1]
        if spread:
            ax.violinplot([values[i] for i in spread], positions[spread], side="low", showextrema=False)
        ax.boxplot(values, positions=positions, widths=0.15, showfliers=False)
        for position, group in zip(positions, values):
            ax.scatter(position + 0.15 + jitter.uniform(0, 0.15, group.size), group, s=10, alpha=0.6)
        ax.set_xticks(positions, [str(model) for model in models], rotation=30, ha="right")
        ax.set_title(str(dataset))
        ax.set_ylabel(columns.value)
    return _save(figure, path)


def plot_bland_altman(reference: np.ndarray, candidate: np.ndarray, result: BlandAltman, path: Path,
                      title: str = "", units: str = "") -> Path:
    """Differences (candidate - reference) against pair means, with bias, limits and their CIs."""
    reference, candidate = np.asarray(reference, dtype=float), np.asarray(candidate, dtype=float)
    figure = _figure(6, 4.5)
    ax = figure.subplots()
    ax.scatter((reference + candidate) / 2, candidate - reference, s=14, alpha=0.7)
    lines = [("bias", result.bias, result.bias_ci, "-"), ("lower LoA", result.loa_low, result.loa_low_ci, "--"),
             ("upper LoA", result.loa_high, result.loa_high_ci, "--")]
    for label, value, (low, high), style in lines:
        ax.axhline(value, color="tab:red", linestyle=style, linewidth=1)
        ax.axhspan(low, high, color="tab:red", alpha=0.12)
        ax.annotate(f"{label} {value:.3g}", (1.0, value), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=8)
    unit = f" [{units}]" if units else ""
    ax.set_xlabel(f"mean of reference and model{unit}")
    ax.set_ylabel(f"model - reference{unit}")
    ax.set_title(f"{title}\n{result.method}" if title else result.method, fontsize=10)
    return _save(figure, path)


def plot_regression(x: np.ndarray, y: np.ndarray, fit: RegressionFit, path: Path, title: str = "",
                    x_label: str = "reference", y_label: str = "model") -> Path:
    """Scatter of ``y`` on ``x`` with the fitted curve and the identity line."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    figure = _figure(5, 5)
    ax = figure.subplots()
    ax.scatter(x, y, s=14, alpha=0.7)
    grid = np.linspace(x.min(), x.max(), 200)
    label = f"{fit.method}, R² = {fit.r2:.3f}"
    if fit.method == "linear":
        label += f"\ny = {fit.slope:.3g} x {fit.intercept:+.3g}"
    ax.plot(grid, fit.predict(grid), color="tab:orange", label=label)
    low, high = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([low, high], [low, high], color="grey", linestyle=":", linewidth=1, label="identity")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(figure, path)
