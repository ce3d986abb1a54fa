"""The one-page clinician report of a study, rendered with matplotlib to PDF bytes and to an RGB image.

The page shows key images with the structures outlined and a legend, one table per segmented
series of the same measurement groups the SR holds (from :func:`msk_node.measure.report_groups`),
each structure's quality flags, the structures withheld and why, published reference values where
one can be cited, the models' provenance, and that it is a research result not for diagnosis.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from pydicom.dataset import Dataset
from skimage.segmentation import find_boundaries

from msk_node.biomarkers import Measurement
from msk_node.labels import LabelMap
from msk_node.quality import StructureQuality
from msk_node.sr_writer import MeasurementGroup

A4_INCHES = (8.27, 11.69)
HEADLINE = "RESEARCH RESULT - NOT FOR DIAGNOSIS"
DISCLAIMER = (f"{HEADLINE}. Measurements computed automatically, not reviewed by a clinician; "
              "not the output of a medical device.")
MAX_KEY_IMAGES = 3


@dataclass(frozen=True)
class Column:
    """A table column: measurements of one name (and relaxation map kind) and how to print them."""

    title: str
    unit: str
    decimals: int
    reference: str = "—"


#: Columns by (measurement name, relaxation map kind). Reference values of healthy adult knees / spines where a
#: published one applies to how the node measures; "—" where none can be cited.
#: Knee cartilage thickness: site means 1.69-2.55 mm over the knee's plates (Shepherd DE, Seedhom BB. Thickness of
#: human articular cartilage in joints of the lower limb. Ann Rheum Dis 1999;58:27-34).
#: T1rho and multi-echo T2 of knee cartilage of healthy controls at 3 T, mean ± SD: 45.5 ± 3.3 ms and
#: 34.7 ± 1.5 ms (Li X, et al. In vivo T1rho and T2 mapping of articular cartilage in osteoarthritis of the knee
#: using 3 T MRI. Osteoarthritis Cartilage 2007;15:789-97). A DESS T2 is biased against a multi-echo T2: no range.
COLUMNS: dict[tuple[str, str], Column] = {
    ("mean_thickness_2d", ""): Column("Thickness 2D", "mm", 2, "1.69–2.55 [1]"),
    ("mean_thickness_3d", ""): Column("Thickness 3D", "mm", 2, "1.69–2.55 [1]"),
    ("t2_mean", "t2"): Column("T2 (multi-echo)", "ms", 1, "34.7 ± 1.5 [2]"),
    ("t2_mean", "dess_t2"): Column("T2 (DESS)", "ms", 1),
    ("t1rho_mean", "t1rho"): Column("T1rho", "ms", 1, "45.5 ± 3.3 [2]"),
    ("disc_height", ""): Column("Disc height", "mm", 2),
    ("volume", ""): Column("Volume", "cm3", 2),
}
REFERENCES = ("[1] Shepherd DE, Seedhom BB. Ann Rheum Dis 1999;58:27-34 (knee cartilage, site means, cadaveric).",
              "[2] Li X et al. Osteoarthritis Cartilage 2007;15:789-97 (healthy controls, 3 T, mean ± SD).")
QUALITY_DECIMALS = 2
PLAUSIBILITY_SHORT = {"passed": "passed", "unchecked": "unchecked", "implausible parts removed": "parts removed"}
#: Relative widths of the structure column, a measurement column and the four quality columns.
WIDTHS = {"structure": 2.4, "value": 1.0, "quality": (0.6, 0.6, 1.0, 0.7)}


@dataclass(frozen=True)
class SeriesContent:
    """What the page shows of one segmented series."""

    description: str
    anatomy: str
    groups: list[MeasurementGroup]
    #: Every assessed segment, reported or withheld.
    quality: dict[str, StructureQuality]
    image: np.ndarray
    label_volume: np.ndarray
    #: Row and column spacing in mm (the key images keep their aspect).
    pixel_spacing: tuple[float, float]
    series_number: int | None = None
    #: Echo time in ms: tells apart the echoes of one acquisition, which share number and description.
    echo_time_ms: float | None = None

    @property
    def heading(self) -> str:
        number = f" {self.series_number}" if self.series_number is not None else ""
        echo = f", TE {self.echo_time_ms:g} ms" if self.echo_time_ms is not None else ""
        return f"Series{number}: {self.description}{echo}"


@dataclass(frozen=True)
class ReportContent:
    """The whole page: the study, its series and the provenance of the numbers."""

    patient: str
    study: str
    series: list[SeriesContent]
    provenance: dict[str, str]
    software: str


def patient_and_study(ds: Dataset) -> tuple[str, str]:
    """The page's patient and study lines, from a source instance."""
    patient = f"Patient: {ds.get('PatientName', '') or '—'} (ID {ds.get('PatientID', '') or '—'})"
    study = f"Study: {ds.get('StudyDescription', '') or '—'}, {ds.get('StudyDate', '') or 'date unknown'}"
    return patient, study


def column_of(measurement: Measurement) -> tuple[str, str]:
    return measurement.name, measurement.extra.get("map_kind", "")


def format_value(measurement: Measurement) -> str:
    """The value as the page prints it; one that could not be measured reads "n/a"."""
    if not measurement.available:
        return "n/a"
    return f"{float(measurement.value):.{COLUMNS[column_of(measurement)].decimals}f}"


def format_quality(value: float | None) -> str:
    return "—" if value is None else f"{value:.{QUALITY_DECIMALS}f}"


def structure_name(group: MeasurementGroup) -> str:
    return group.tracking_name.replace("_", " ")


def key_slices(label_volume: np.ndarray, limit: int = MAX_KEY_IMAGES) -> list[int]:
    """The slices with most of each structure, the ones holding most labelled voxels first, at most ``limit``."""
    values = [v for v in np.unique(label_volume) if v]
    best = {int(np.argmax((label_volume == v).sum(axis=(1, 2)))) for v in values}
    labelled = (label_volume > 0).sum(axis=(1, 2))
    return sorted(sorted(best, key=lambda k: -labelled[k])[:limit])


def outlined(image: np.ndarray, labels: np.ndarray, label_map: LabelMap) -> np.ndarray:
    """RGB slice (percentile-windowed grey) with every label's outline in its colour."""
    low, high = np.percentile(image, (1, 99.5))
    grey = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for value in np.unique(labels):
        if value:
            edge = find_boundaries(labels == value, mode="inner")
            rgb[edge] = np.array(label_map.by_value(int(value)).colour) / 255.0
    return rgb


def table_rows(groups: list[MeasurementGroup]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per structure, one column per measurement kind, then the quality flags."""
    present = [key for key in COLUMNS if any(column_of(m) == key for g in groups for m in g.measurements)]
    header = ["Structure", *(f"{COLUMNS[k].title}\n({COLUMNS[k].unit})" for k in present),
              "Det.\nconf.", "Pred.\nIoU", "Plausibility", "Field of\nview"]
    rows = []
    for group in groups:
        values = {column_of(m): format_value(m) for m in group.measurements}
        quality = group.quality
        flags = ["—"] * 4 if quality is None else [
            format_quality(quality.detector_confidence), format_quality(quality.predicted_iou),
            PLAUSIBILITY_SHORT[quality.plausibility], "whole" if quality.whole_in_view else "cut"]
        rows.append([structure_name(group), *(values.get(k, "") for k in present), *flags])
    rows.append(["Reference (healthy)", *(COLUMNS[k].reference for k in present), "", "", "", ""])
    return header, rows


def render_report(content: ReportContent, label_map: LabelMap) -> Figure:
    """The page as a matplotlib figure (A4 portrait)."""
    figure = Figure(figsize=A4_INCHES)
    FigureCanvasAgg(figure)  # no pyplot: nothing global, nothing to close
    figure.text(0.05, 0.975, "Musculoskeletal MRI - automated measurements", fontsize=14, weight="bold", va="top")
    figure.text(0.05, 0.953, f"{content.patient}    {content.study}", fontsize=8, va="top")
    figure.text(0.05, 0.937, HEADLINE, fontsize=9, color="firebrick", weight="bold", va="top")
    shown = next((s for s in content.series if s.label_volume.any()), None)
    top = 0.925
    if shown is not None:
        top = _key_images(figure, shown, label_map, top)
    for series in content.series:
        top = _series_table(figure, series, top)
    _footer(figure, content)
    return figure


def _key_images(figure: Figure, series: SeriesContent, label_map: LabelMap, top: float) -> float:
    slices = key_slices(series.label_volume)
    figure.text(0.05, top, f"Key images, {series.heading}", fontsize=8, va="top")
    top -= 0.012
    height = 0.25
    width = 0.9 / max(len(slices), 1)
    for index, k in enumerate(slices):
        axes = figure.add_axes((0.05 + index * width, top - height, width - 0.01, height))
        axes.imshow(outlined(series.image[k], series.label_volume[k], label_map),
                    aspect=series.pixel_spacing[0] / series.pixel_spacing[1], interpolation="nearest")
        axes.set_title(f"slice {k + 1}", fontsize=7)
        axes.axis("off")
    present = [label_map.by_value(int(v)) for v in np.unique(series.label_volume) if v]
    handles = [Patch(color=np.array(spec.colour) / 255.0, label=spec.name.replace("_", " ")) for spec in present]
    figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.05, top - height - 0.005), ncol=4,
                  fontsize=7, frameon=False)
    return top - height - 0.045


def _series_table(figure: Figure, series: SeriesContent, top: float) -> float:
    figure.text(0.05, top, f"{series.heading} ({series.anatomy})", fontsize=9, weight="bold",
                va="top")
    header, rows = table_rows(series.groups)
    row_height = 0.0165
    height = row_height * (len(rows) + 2)  # the header takes two lines
    axes = figure.add_axes((0.05, top - 0.012 - height, 0.9, height))
    axes.axis("off")
    table = axes.table(cellText=rows, colLabels=header, loc="upper left", cellLoc="center", bbox=(0, 0, 1, 1))
    table.auto_set_font_size(False)
    table.set_fontsize(6.5)
    widths = [WIDTHS["structure"], *[WIDTHS["value"]] * (len(header) - 5), *WIDTHS["quality"]]
    for (row, column), cell in table.get_celld().items():
        cell.set_width(widths[column])
        cell.set_height(2.0 if row == 0 else 1.0)
        cell.set_linewidth(0.3)
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8e8")
        elif row == len(rows):
            cell.set_text_props(style="italic")
        if column == 0:
            cell.set_text_props(ha="left")
    top -= 0.012 + height + 0.008
    withheld = [q for q in series.quality.values() if not q.reported]
    for quality in withheld:
        figure.text(0.05, top, f"Not reported: {quality.segment_label.replace('_', ' ')} - "
                               f"{'; '.join(quality.withheld)}", fontsize=7, color="darkorange", va="top")
        top -= 0.013
    return top - 0.01


def _footer(figure: Figure, content: ReportContent) -> None:
    provenance = content.provenance
    lines = [
        *REFERENCES,
        "Det. conf.: mean detector score of the structure's boxes; Pred. IoU: segmenter's predicted IoU; "
        "n/a: not measurable (the reason is in the SR and report.json).",
        "cut: the structure touches the edge of the imaged volume, so its volume is not reported.",
        f"Software: {content.software}. Detector {provenance.get('detector', '')} "
        f"{provenance.get('detector_version', '')}, sha256 {provenance.get('detector_sha256', '')}",
        f"Segmenter {provenance.get('segmenter', '')} ({provenance.get('segmenter_family', '')}) "
        f"{provenance.get('segmenter_version', '')}, sha256 {provenance.get('segmenter_sha256', '')}; "
        f"precision {provenance.get('precision', '')}, backend {provenance.get('backend', '')}",
        DISCLAIMER,
    ]
    for index, line in enumerate(reversed(lines)):
        figure.text(0.05, 0.02 + index * 0.014, line, fontsize=6, va="bottom",
                    color="firebrick" if line == DISCLAIMER else "black")


def to_pdf(figure: Figure) -> bytes:
    """The page as PDF, its fonts embedded as TrueType so that readers can search and copy the text."""
    buffer = io.BytesIO()
    with rc_context({"pdf.fonttype": 42}):
        figure.savefig(buffer, format="pdf")
    return buffer.getvalue()


def to_rgb(figure: Figure, dpi: int = 120) -> np.ndarray:
    """The page as an RGB uint8 array (rows, columns, 3)."""
    figure.set_dpi(dpi)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
