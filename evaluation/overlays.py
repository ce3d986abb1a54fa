"""Overlay figures for a visual check: a slice with its prompt boxes, truth and predicted contours."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from msk_node.labels import LabelMap

DPI = 120
_FALLBACK_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:cyan", "tab:pink")


def label_colours(names: list[str], label_map: LabelMap) -> dict[str, object]:
    """The label map's display colours; matplotlib's cycle for names it does not know."""
    colours: dict[str, object] = {}
    for index, name in enumerate(names):
        if name in label_map.names:
            colours[name] = tuple(c / 255 for c in label_map.by_name(name).colour)
        else:
            colours[name] = _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)]
    return colours


def plot_overlay(image: np.ndarray, truth: dict[str, np.ndarray], prediction: dict[str, np.ndarray],
                 boxes: list[tuple[str, tuple[float, float, float, float]]], colours: dict[str, object],
                 path: Path, title: str = "") -> Path:
    """One slice: truth contours solid, predicted contours dashed, prompt boxes dotted, per label colour."""
    rows, cols = image.shape
    figure = Figure(figsize=(6, 6 * rows / cols + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    for masks, style in ((truth, "solid"), (prediction, "dashed")):
        for name, mask in masks.items():
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colours[name]], linestyles=style,
                           linewidths=1.0)
    for name, (x0, y0, x1, y1) in boxes:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colours.get(name, "white"),
                               linestyle=":", linewidth=1.0))
    shown = [name for name in colours if name in truth and (truth[name].any() or prediction[name].any())]
    handles = [Line2D([], [], color=colours[name], label=name) for name in shown]
    handles += [Line2D([], [], color="white", linestyle=style, label=what)
                for style, what in (("solid", "truth"), ("dashed", "prediction"), (":", "prompt box"))]
    ax.legend(handles=handles, loc="upper right", fontsize=6, facecolor="black", labelcolor="white", framealpha=0.6)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
