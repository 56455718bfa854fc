"""``--method auto``: the table chosen by measurement on held-out calibration images.

No single histogram method wins on every model (README, "Calibration methods, measured"), so the calibration
measures instead of guessing. The histograms are shared, so each candidate costs only its thresholds: every
candidate method's whole-model table (``AUTO_CANDIDATES``, head rule and dead-channel handling of ``build_table``)
is quantized with the project's ncnn writer and run on the ncnn runtime over validation images spread over the
calibration set (``validation_images``); the best by the output cosine (``metrics.output_cosine``: the worst
image, evaluate's task view: detectors without background) is kept; within ``TIE`` of the best, the earliest.

There is no layer-by-layer mixing of the candidates' thresholds: it was tried (the layers where the candidates
disagree most first, a change kept when the validation cosine rose) and it fitted the 12 validation images, not
the model. On images the calibration never saw it lowered MTCNN det1's output cosine 0.9955 -> 0.9946, det3's
0.9972 -> 0.9955 and RetinaFace's precision 1.000 -> 0.949 against the whole-model pick (``bench_quality.py``).

The validation images also feed the histograms: holding every 4th image out of them cost more than it saved
(measured on ultraface: the aciq table of 3/4 of the images lost 0.05 precision and recall on the judged images
against the table of all of them), and what is chosen is only which of the shared histograms' thresholds to use.

The chosen thresholds are an ordinary ``CalibrationResult``: the ncnn table, the TensorRT cache, the ranges
files and the Q/DQ ONNX are all written from them.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.calibration.calibrate import DEFAULT_RULES, CalibrationResult, TableRules, build_table
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.preprocess import spread_evenly
from int8conv.errors import ImageError, ModelError
from int8conv.progress import progress, quiet_loggers

log = logging.getLogger(__name__)
T = TypeVar("T")

AUTO_METHOD = "auto"
#: what ``auto`` uses when it has no images to validate on (saved statistics only): the best single method
AUTO_FALLBACK = "mse"
#: the histogram methods compared (they share the histograms: only the thresholds differ)
AUTO_CANDIDATES = ("mse", "kl", "aciq", "percentile")
#: candidates whose validation cosines are this close count as tied, and the earlier one wins: the FP32 engines'
#: float differences alone move a candidate's score by up to 7e-6 (open_nsfw, pycaffe vs OpenCV statistics), and
#: a near-tie must not pick another table on another engine
TIE = 5e-5
#: below this worst-image output cosine of the chosen table, the commands that write the ncnn INT8 model warn that it
#: is not as accurate as FP32 and name the remedies (``pipeline.warn_inaccurate_int8``; export-trt does the same for
#: its Q/DQ model); the Q/DQ bar of the project's benchmark: 0.99 on every image
WARN_BELOW = 0.99
#: one calibration image in VALIDATION_EVERY validates, at least MIN_VALIDATION, at most MAX_VALIDATION
VALIDATION_EVERY, MIN_VALIDATION, MAX_VALIDATION = 4, 4, 12


def validation_images(items: Sequence[T]) -> list[T]:
    """Up to MAX_VALIDATION of the calibration images, spread evenly over them (at least MIN_VALIDATION when there
    are that many)."""
    return spread_evenly(items, min(max(len(items) // VALIDATION_EVERY, MIN_VALIDATION), MAX_VALIDATION))


def calibrate_auto(
    graph: Graph, stats: CalibrationStatistics, inputs: Sequence[np.ndarray], rules: TableRules = DEFAULT_RULES
) -> CalibrationResult:
    """The best candidate table on the validation ``inputs`` (preprocessed CHW images).

    ``result.scores`` holds each candidate's validation output cosine and the chosen one's (``auto``).
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
        return build_table(graph, stats, AUTO_FALLBACK, rules)
    first, *others = AUTO_CANDIDATES
    results = {first: build_table(graph, stats, first, rules)}
    with quiet_loggers("int8conv.calibration.calibrate"):  # the same head and all-zero notes for every candidate
        results |= {m: build_table(graph, stats, m, rules) for m in others}
    scores: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="int8conv-auto-") as tmp:
        feeds = [{model.input_names[0]: x} for x in inputs]
        score = OutputScorer(model, feeds, Path(tmp), "auto", fp16_storage=False, threads=1)  # the model's task
        for method in progress(list(results), desc="auto: candidates", unit="table"):
            scores[method] = score(results[method].table)
    top = max(scores.values())
    best = next(m for m in results if scores[m] >= top - TIE)  # near-ties: the earlier candidate
    result = results[best]
    log.info(
        "auto: candidates %s; best %s -> output cosine %.6f on %d validation image(s)",
        ", ".join(f"{m} {c:.6f}" for m, c in scores.items()),
        best,
        scores[best],
        len(inputs),
    )
    scores["auto"] = scores[best]
    result.method, result.scores, result.validation_images = "auto", scores, len(inputs)
    result.seconds = time.perf_counter() - started
    return result
