"""Per-layer calibration report: the pictures that explain why a layer's INT8 is good or bad.

For every quantizable layer: the |x| histogram of its input with the chosen clipping threshold, the KL
divergence over every candidate threshold (the curve whose minimum the KL method picks), the spread of its
per-channel weight scales, and its INT8-vs-FP32 cosine. One HTML page per model, PNGs next to it.

The accuracy numbers are not computed here: they are ``evaluate.evaluate``'s report, the one ``int8conv eval``
prints, rendered with ``evaluate.format_report``, so the page and ``eval`` can never disagree.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8conv.atomic import atomic_write, write_text_atomic
from int8conv.caffe.graph import Graph
from int8conv.calibration.histograms import BlobHistogram, CalibrationStatistics
from int8conv.calibration.thresholds import kl_divergences, select_candidate
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.evaluation.results import EvalReport
from int8conv.progress import progress
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)

KL_LEVELS = 128
KL_START_BIN = 128


def _plain_log_y(ax, values: np.ndarray) -> None:
    """A log y axis with a few plain-text labels when ``values`` span more than a decade, else linear.

    matplotlib's default log minor ticks and mathtext labels made up most of a figure's drawing time.
    """
    from matplotlib import ticker

    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0 or values.max() < 10 * values.min():
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(numticks=6))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.3g}"))


def _pyplot():
    """matplotlib's pyplot on the Agg backend: reports are rendered on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass
class KlCurve:
    """KL(P || Q) for every candidate threshold of one histogram, and the candidate KL picks.

    ``chosen`` is a bin edge; ``activation_threshold`` then clamps it to max |x|.
    """

    thresholds: np.ndarray
    divergences: np.ndarray
    chosen: float


def kl_divergence_curve(hist: BlobHistogram) -> KlCurve | None:
    """The KL curve ``thresholds.kl_threshold`` minimizes, through the same vectorized code.

    Same preparation as ``kl_threshold``: bin 0 takes bin 1's count (the zero spike), and a histogram with
    fewer non-empty bins than quantized levels has no curve (KL does not clip it): ``None``.
    """
    counts = hist.counts
    if hist.nonzero == 0 or np.count_nonzero(counts) < KL_LEVELS:
        return None
    counts = counts.copy()
    counts[0] = counts[1]
    kept, divergences = kl_divergences(counts, KL_LEVELS, KL_START_BIN)
    width = hist.bin_width
    return KlCurve(kept * width, divergences, float(kept[select_candidate(divergences)]) * width)


@dataclass
class LayerReport:
    """What the report shows about one quantizable layer."""

    name: str
    type: str
    blob: str  # the Caffe blob the layer reads
    histogram: BlobHistogram
    threshold: float | None  # the clipping point in use (127 / table scale); None = stays FP32
    kl: KlCurve | None
    weight_scales: np.ndarray
    weight_levels: int  # 127 (8-bit), 31-125 (Winograd weight bound), as the table's scales show
    cosine: float | None  # INT8 vs FP32, from the evaluation; None when not INT8 there

    @property
    def clipped_fraction(self) -> float:
        """Share of the non-zero |x| above the threshold (what clipping saturates)."""
        if self.threshold is None or self.histogram.nonzero == 0:
            return 0.0
        edges = np.arange(1, self.histogram.bins + 1) * self.histogram.bin_width
        return float(self.histogram.counts[edges > self.threshold * (1 + 1e-12)].sum()) / self.histogram.nonzero


def _levels(layer, scales: np.ndarray) -> int:
    """The weight levels a table used for a layer (127 for 8-bit, fewer under the Winograd bound), read back from
    its scales.

    A table may come from anywhere (ncnn2table, an older run), so scale x per-channel |w| max is measured
    rather than assumed.
    """
    live = scales > 0
    if not live.any():
        return 0
    absmax = np.abs(layer.blobs[0].reshape(scales.size, -1)).max(axis=1).astype(np.float64)
    return int(round(float(np.median(scales[live] * absmax[live]))))


def layer_reports(
    graph: Graph, stats: CalibrationStatistics, table: CalibrationTable, evaluation: EvalReport | None
) -> list[LayerReport]:
    """One entry per quantizable layer of the BatchNorm-folded graph (``Graph.folded``), in execution order."""
    cosines = evaluation.int8_vs_fp32.layer_cosine if evaluation else {}
    reports = []
    for layer in quantizable_layers(graph.folded()):
        value = layer.bottoms[0]
        hist = stats.histograms.get(value)
        if hist is None:
            log.warning("layer %s: no histogram of its input '%s'; left out of the report", layer.name, value)
            continue
        scale = table.activation_scales.get(layer.name)
        scales = np.asarray(table.weight_scales.get(layer.name, np.zeros(0)), dtype=np.float64).reshape(-1)
        reports.append(
            LayerReport(
                name=layer.name,
                type=layer.type,
                blob=graph.blob_of(value),
                histogram=hist,
                threshold=127.0 / scale if scale else None,
                kl=kl_divergence_curve(hist),
                weight_scales=scales,
                weight_levels=_levels(layer, scales),
                cosine=cosines.get(layer.name),
            )
        )
    return reports


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_layer(layer: LayerReport, path: Path) -> None:
    """Three panels: |x| histogram + threshold, KL curve, per-channel weight scales (sorted)."""
    plt = _pyplot()
    fig, (ax_hist, ax_kl, ax_w) = plt.subplots(1, 3, figsize=(15, 3.6))
    hist = layer.histogram
    if hist.nonzero:
        used = int(np.flatnonzero(hist.counts)[-1]) + 1  # bins above max |x| are empty
        edges = np.arange(used + 1) * hist.bin_width
        # a filled step outline as one polygon: Axes.stairs is 10x slower on 2048 bins
        ax_hist.fill_between(
            np.repeat(edges, 2)[1:-1],
            np.repeat(np.maximum(hist.counts[:used], 0.8), 2),
            0.8,
            color="#7799cc",
            linewidth=0,
        )
        _plain_log_y(ax_hist, np.array([0.8, float(hist.counts.max())]))
        ax_hist.set_xlim(0, hist.absmax * 1.02)
    ax_hist.axvline(hist.absmax, color="gray", linestyle=":", label=f"max |x| {hist.absmax:.4g}")
    if layer.threshold is not None:
        ax_hist.axvline(
            layer.threshold,
            color="crimson",
            label=f"threshold {layer.threshold:.4g} ({layer.clipped_fraction:.2%} clipped)",
        )
    ax_hist.set_title(f"input '{layer.blob}': |x|, {hist.zeros / max(hist.count, 1):.0%} exact zeros", fontsize=9)
    ax_hist.set_xlabel("|x|")
    ax_hist.set_ylabel("count")
    ax_hist.legend(fontsize=7, loc="upper right")

    if layer.kl is not None:
        finite = np.isfinite(layer.kl.divergences)
        ax_kl.plot(layer.kl.thresholds[finite], layer.kl.divergences[finite], color="#335")
        ax_kl.axvline(layer.kl.chosen, color="darkorange", linestyle="--", label=f"KL minimum {layer.kl.chosen:.4g}")
        if layer.threshold is not None:
            ax_kl.axvline(layer.threshold, color="crimson", label=f"in use {layer.threshold:.4g}")
        _plain_log_y(ax_kl, layer.kl.divergences)
        ax_kl.legend(fontsize=7)
    else:
        ax_kl.text(
            0.5,
            0.5,
            "fewer than 128 non-empty bins:\nKL does not clip this input",
            ha="center",
            va="center",
            transform=ax_kl.transAxes,
            fontsize=9,
        )
    ax_kl.set_title("KL(P||Q) per candidate threshold", fontsize=9)
    ax_kl.set_xlabel("threshold")

    scales = layer.weight_scales
    live = np.sort(scales[scales > 0])[::-1]
    if live.size:
        ax_w.plot(np.arange(live.size), live, marker="." if live.size < 200 else None, color="#384")
        ax_w.axhline(live.min(), color="gray", linestyle=":", label=f"per-tensor scale {live.min():.4g}")
        _plain_log_y(ax_w, live)
        ax_w.legend(fontsize=7)
    dead = int(np.count_nonzero(scales == 0))
    spread = live.max() / live.min() if live.size else math.nan
    ax_w.set_title(
        f"weight scales ({layer.weight_levels} levels): {scales.size} channels, spread {spread:.3g}x"
        + (f", {dead} dead" if dead else ""),
        fontsize=9,
    )
    ax_w.set_xlabel("channel (sorted)")
    cos = f"cosine INT8/FP32 {layer.cosine:.5f}" if layer.cosine is not None else "FP32 (not quantized)"
    fig.suptitle(f"{layer.name} ({layer.type}): {cos}", fontsize=11)
    fig.subplots_adjust(
        left=0.05, right=0.99, bottom=0.15, top=0.83, wspace=0.2
    )  # tight_layout doubled the drawing time
    _save(fig, path)


def plot_cosines(layers: Sequence[LayerReport], path: Path) -> None:
    """Horizontal bars of per-layer INT8-vs-FP32 cosine, in execution order, worst highlighted."""
    plt = _pyplot()
    shown = [layer for layer in layers if layer.cosine is not None]
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.22 * max(len(shown), 1)))
    if shown:
        values = np.array([layer.cosine for layer in shown])
        drawn = np.where(np.isnan(values), -1.0, values)  # a NaN cosine (NaN/Inf in the output) as the worst
        colors = np.where(drawn < 0.99, "crimson", np.where(drawn < 0.999, "darkorange", "#4a7"))
        y = np.arange(len(shown))
        loss = np.maximum(1.0 - drawn, 1e-7)  # log axis: an exact 1.0 still gets a visible stub
        ax.barh(y, loss, color=colors)
        ax.set_yticks(y, [layer.name for layer in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(right=float(loss.max()) * 4)  # room for the value labels
        ax.set_xlabel("1 - cosine (INT8 vs FP32 on the layer's output; shorter is better)")
        for yy, value, width in zip(y, values, loss, strict=True):
            ax.text(width, yy, f" {value:.5f}", va="center", fontsize=6)
    ax.set_title("per-layer cosine similarity, INT8 vs FP32")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=80)
    _pyplot().close(fig)


def _row(layer: LayerReport) -> str:
    live = layer.weight_scales[layer.weight_scales > 0]
    cells = [
        layer.name,
        layer.type,
        layer.blob,
        f"{layer.histogram.absmax:.4g}",
        "FP32" if layer.threshold is None else f"{layer.threshold:.4g}",
        # an input that was all zeros here (a given table's scale for it) has no ratio
        ""
        if layer.threshold is None or not layer.histogram.absmax
        else f"{layer.threshold / layer.histogram.absmax:.3f}",
        f"{layer.clipped_fraction:.3%}",
        f"{live.max() / live.min():.3g}" if live.size else "",
        "" if layer.cosine is None else f"{layer.cosine:.5f}",
    ]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1250px}} pre{{background:#f4f4f4;padding:.8em}}
table{{border-collapse:collapse;font-size:12px}} td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
td:first-child,td:nth-child(2),td:nth-child(3){{text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>{title}</h1>
<p>{intro}</p>
<h2>Evaluation (<code>int8conv eval</code>)</h2>
<pre>{evaluation}</pre>
<h2>Per-layer cosine</h2>
<img src="{cosines}" alt="per-layer cosine">
<h2>Layers</h2>
<table><tr><th>layer</th><th>type</th><th>input blob</th><th>max |x|</th><th>threshold</th><th>threshold / max</th>
<th>clipped</th><th>weight-scale spread</th><th>cosine</th></tr>
{rows}
</table>
{figures}
</body></html>
"""


def write_report(
    out_dir: Path,
    name: str,
    layers: Sequence[LayerReport],
    evaluation: EvalReport | None,
    evaluation_text: str,
    intro: str,
) -> Path:
    """Render every figure and the page ``out_dir/<name>.html`` (figures in ``out_dir/<name>_files``)."""
    out_dir = Path(out_dir)
    figures_dir = out_dir / f"{name}_files"
    figures_dir.mkdir(parents=True, exist_ok=True)
    plot_cosines(layers, figures_dir / "cosines.png")
    blocks = []
    for index, layer in enumerate(progress(layers, desc="plotting", unit="layer")):
        png = figures_dir / f"{index:03d}_{_safe(layer.name)}.png"
        plot_layer(layer, png)
        blocks.append(
            f'<h3 id="{html.escape(_safe(layer.name))}">{html.escape(layer.name)}</h3>\n'
            f'<img src="{figures_dir.name}/{png.name}" alt="{html.escape(layer.name)}">'
        )
    page = PAGE.format(
        title=html.escape(f"INT8 calibration report: {name}"),
        intro=intro,
        evaluation=html.escape(evaluation_text),
        cosines=f"{figures_dir.name}/cosines.png",
        rows="\n".join(_row(layer) for layer in layers),
        figures="\n".join(blocks),
    )
    path = out_dir / f"{name}.html"
    write_text_atomic(path, page)
    if evaluation is not None:
        write_text_atomic(out_dir / f"{name}.json", evaluation.to_json() + "\n")
    log.info("report written to %s (%d layers)", path, len(layers))
    return path
