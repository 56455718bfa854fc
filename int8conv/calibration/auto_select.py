"""``--method auto``: the table chosen by measurement on held-out calibration images, layer by layer.

No single histogram method wins on every model (README, "Calibration methods, measured"), so the calibration
measures instead of guessing. The histograms are shared, so each candidate costs only its thresholds:

1. Every candidate method's whole-model table (``AUTO_CANDIDATES``, head rule and dead-channel handling of
   ``build_table``) is quantized with the project's ncnn writer and run on the ncnn runtime over validation
   images spread over the calibration set (``validation_images``); the best by the output cosine
   (``metrics.output_cosine``: the worst image, evaluate's task view: detectors without background) is kept.
2. Per-layer refinement: the layers where the candidates disagree most come first; for each, the other
   candidates' thresholds are tried for that layer only and a change is kept when the validation output cosine
   rises. The ncnn runs are bounded (``run_budget``) so that the search costs about as much as the histogram
   pass, which keeps calibration under 3x KL's time (measured by ``benchmarks/bench_quality.py``).

The validation images also feed the histograms: holding every 4th image out of them cost more than it saved
(measured on ultraface: the aciq table of 3/4 of the images lost 0.05 precision and recall on the judged images
against the table of all of them), and what is chosen is only which of the shared histograms' thresholds to use.

The chosen thresholds are an ordinary ``CalibrationResult``: the ncnn table, the TensorRT cache, the ranges
files and the Q/DQ ONNX are all written from them.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.calibration.calibrate import CalibrationResult, build_table
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.errors import ImageError, ModelError
from int8conv.progress import progress
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTO_METHOD = "auto"
#: what ``auto`` uses when it has no images to validate on (saved statistics only): the best single method
AUTO_FALLBACK = "mse"
#: the histogram methods compared (they share the histograms: only the thresholds differ)
AUTO_CANDIDATES = ("mse", "kl", "aciq", "percentile")
#: one calibration image in VALIDATION_EVERY validates, at least MIN_VALIDATION, at most MAX_VALIDATION
VALIDATION_EVERY, MIN_VALIDATION, MAX_VALIDATION = 4, 4, 12
#: ncnn validation runs allowed per histogram image per validation image: one INT8 run over the validation images
#: costs about as much as the FP32 pass over ``validation / histogram`` of the histogram images
RUN_BUDGET = 1.0
#: thresholds closer than this (relative) to the layer's current one are not tried
MIN_CHANGE = 0.02


def validation_images(items: Sequence[T]) -> list[T]:
    """Up to MAX_VALIDATION of the calibration images, spread evenly over them (at least MIN_VALIDATION when there
    are that many)."""
    picked = (
        np.linspace(
            0, len(items) - 1, min(max(len(items) // VALIDATION_EVERY, MIN_VALIDATION), MAX_VALIDATION, len(items))
        )
        .round()
        .astype(int)
    )
    return [items[i] for i in np.unique(picked)] if len(items) else []


def run_budget(histogram_images: int, validation_images: int, candidates: int) -> int:
    """ncnn INT8 runs the selection may make: every candidate once, then refinement runs in proportion to the
    cost of the histogram pass (deterministic: the same images give the same table on every machine)."""
    return candidates + max(2, int(RUN_BUDGET * histogram_images / max(validation_images, 1)))


def _with_threshold(table: CalibrationTable, layer: str, threshold: float) -> CalibrationTable:
    activations = dict(table.activation_scales)
    activations[layer] = 127.0 / threshold
    return CalibrationTable(table.weight_scales, activations, set(table.fp32_layers))


def calibrate_auto(
    graph: Graph,
    stats: CalibrationStatistics,
    inputs: Sequence[np.ndarray],
    winograd_6bit: bool = True,
    head_method: str | None = "minmax",
    percentile: float = 99.99,
    candidates: Sequence[str] = AUTO_CANDIDATES,
    task: str = "auto",
    max_runs: int | None = None,
) -> CalibrationResult:
    """The best candidate table on the validation ``inputs`` (preprocessed CHW images), refined layer by layer.

    ``result.scores`` holds each candidate's validation output cosine and the final one (``auto``);
    ``result.layer_methods`` which candidate's threshold each layer got.
    """
    from int8conv.evaluation.mixed_precision import OutputScorer
    from int8conv.ncnn.convert import convert_graph

    if not inputs:
        raise ImageError("--method auto validates on calibration images: give them with --images")
    started = time.perf_counter()
    try:
        model = convert_graph(graph)
    except ModelError as exc:  # the tables are still good for engines that run the model (TensorRT)
        log.warning(
            "--method auto measures the ncnn model, and this model does not convert (%s): using %s", exc, AUTO_FALLBACK
        )
        return build_table(
            graph, stats, AUTO_FALLBACK, percentile=percentile, winograd_6bit=winograd_6bit, head_method=head_method
        )
    results = {
        m: build_table(graph, stats, m, percentile=percentile, winograd_6bit=winograd_6bit, head_method=head_method)
        for m in dict.fromkeys(candidates)
    }
    budget = max_runs if max_runs is not None else run_budget(stats.images_used, len(inputs), len(results))
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="int8conv-auto-") as tmp:
        feeds = [{model.input_names[0]: x} for x in inputs]
        score = OutputScorer(model, feeds, Path(tmp), task, fp16_storage=False, threads=1)
        for method in progress(list(results), desc="auto: candidates", unit="table"):
            scores[method] = score(results[method].table)
        best = max(results, key=lambda m: (scores[m], -list(results).index(m)))  # ties: the earlier candidate
        result, current = results[best], scores[best]
        layer_methods = dict.fromkeys(result.thresholds, best)
        spread = {
            name: max(r.thresholds[name] for r in results.values()) / min(r.thresholds[name] for r in results.values())
            for name in result.thresholds
        }
        table, thresholds = result.table, dict(result.thresholds)
        for name in sorted(spread, key=lambda n: -spread[n]):
            if score.runs >= budget or spread[name] < 1 + MIN_CHANGE:
                break
            tried: list[float] = []
            for method, other in results.items():
                threshold = other.thresholds[name]
                if score.runs >= budget or any(
                    abs(math.log(threshold / t)) < MIN_CHANGE for t in [thresholds[name], *tried]
                ):
                    continue
                tried.append(threshold)
                trial = _with_threshold(table, name, threshold)
                cosine = score(trial)
                if cosine > current:
                    log.debug(
                        "auto %s: %s threshold %.5g raises the output cosine %.6f -> %.6f",
                        name,
                        method,
                        threshold,
                        current,
                        cosine,
                    )
                    table, current, thresholds[name], layer_methods[name] = trial, cosine, threshold, method
        runs = score.runs
    changed = sum(m != best for m in layer_methods.values())
    log.info(
        "auto: candidates %s; best %s, %d layer(s) refined -> output cosine %.6f on %d validation image(s), "
        "%d ncnn runs",
        ", ".join(f"{m} {c:.6f}" for m, c in scores.items()),
        best,
        changed,
        current,
        len(inputs),
        runs,
    )
    table.validate()
    scores["auto"] = current
    result.table, result.thresholds, result.method = table, thresholds, "auto"
    result.scores, result.layer_methods = scores, layer_methods
    result.seconds = time.perf_counter() - started
    return result
