"""Calibration, end to end: images -> FP32 forward -> histograms -> thresholds -> CalibrationTable."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.caffe.layers import types_where
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.preprocess import ImageTally, Preprocess, iter_batches
from int8conv.calibration.thresholds import activation_threshold
from int8conv.calibration.weight_scales import quantizable_layers, weight_scales
from int8conv.calibration.workers import chunked_statistics, stream_statistics
from int8conv.engines import Engine
from int8conv.errors import ImageError
from int8conv.progress import progress
from int8conv.tables.ncnn_table import CalibrationTable, format_legacy_table

log = logging.getLogger(__name__)


def file_sha256(path: str | Path) -> str:
    """Identity of a model file, so statistics of different models are never merged."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_identity(prototxt: str | Path, caffemodel: str | Path) -> dict[str, str]:
    return {
        "prototxt": Path(prototxt).name,
        "prototxt_sha256": file_sha256(prototxt),
        "caffemodel": Path(caffemodel).name,
        "caffemodel_sha256": file_sha256(caffemodel),
    }


def calibration_values(graph: Graph) -> list[str]:
    """The values INT8 layers read: the bottom of every Convolution/InnerProduct (each once)."""
    values: list[str] = []
    for layer in quantizable_layers(graph):
        if layer.bottoms[0] not in values:
            values.append(layer.bottoms[0])
    return values


def all_values(graph: Graph) -> list[str]:
    """Every network input and layer output (TensorRT needs a range for each)."""
    return list(graph.inputs) + [top for layer in graph.layers for top in layer.tops]


def collect_statistics(
    graph: Graph,
    engine: Engine,
    images: Sequence[Path],
    prep: Preprocess,
    identity: dict[str, str],
    values: Sequence[str] | None = None,
    batch_size: int = 4,
    jobs: int = 1,
) -> CalibrationStatistics:
    """One streaming pass over the images: chunk by chunk, in up to ``jobs`` worker processes, for an engine with
    a picklable ``reader`` (ncnn), else in this process with decoding overlapped (``workers``); memory does not
    grow with the number of images."""
    values = list(values) if values is not None else calibration_values(graph)
    tally = ImageTally()
    # a picklable forward (ncnn): worker processes can run it; images then go one at a time, whatever --batch-size
    reader = getattr(engine, "reader", None)

    def new_statistics() -> CalibrationStatistics:
        return CalibrationStatistics(model=identity, preprocess=prep.describe())

    with progress(total=len(images), desc="calibrating", unit="img") as bar:
        if reader is not None:
            stats = chunked_statistics(
                reader(values, (prep.channels, *prep.size)),
                images,
                prep,
                new_statistics,
                jobs,
                tally,
                on_images=bar.update,
            )
        else:  # one process whatever ``jobs``: worker processes need a picklable forward
            stats = stream_statistics(
                engine, iter_batches(images, prep, batch_size, tally), values, new_statistics(), on_images=bar.update
            )
        bar.update(len(images) - bar.n)
    stats.images_used += tally.used
    stats.images_skipped += len(tally.skipped)
    stats.unreadable += [path for path, _ in tally.skipped]
    if tally.skipped:
        log.warning(
            "skipped %d unreadable image(s): %s",
            len(tally.skipped),
            ", ".join(str(p) for p, _ in tally.skipped[:5]) + (" ..." if len(tally.skipped) > 5 else ""),
        )
    if tally.used == 0:
        raise ImageError(f"none of the {len(images)} calibration images could be read")
    return stats


@dataclass
class CalibrationResult:
    """The table plus what a summary or a report needs to explain it."""

    table: CalibrationTable
    thresholds: dict[str, float]
    method: str
    statistics: CalibrationStatistics
    deploy: Graph  # the BatchNorm-folded graph the weight scales were computed on
    skipped_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    biases: dict[str, np.ndarray] | None = None  # bias correction: layer -> FP32 bias of its INT8 layer
    weights: dict[str, np.ndarray] | None = None  # --adaround: layer -> FP32 weights rounding to the learned int8
    scores: dict[str, float] = field(default_factory=dict)  # --method auto: validation output cosines
    validation_images: int = 0  # --method auto: how many calibration images scored the candidates


#: Layers that only move, reshape or normalise a head's output on its way to the network outputs (registry flag).
HEAD_PASSTHROUGH = types_where("head_passthrough")


def head_layers(graph: Graph) -> set[str]:
    """Quantizable layers whose output reaches only network outputs (or DetectionOutput) unchanged in value.

    A head's input carries rare, large activations that decide the result (ultraface: the face evidence at
    the few positions with a face sits above the KL threshold that fits the many empty positions), and its
    error goes straight to the output. Heads therefore keep their input's full range.
    """
    heads: set[str] = set()
    for layer in quantizable_layers(graph):
        frontier, reaches_output_only = list(layer.tops), True
        while frontier and reaches_output_only:
            for consumer in graph.consumers(frontier.pop()):
                if consumer.type in HEAD_PASSTHROUGH:
                    frontier.extend(consumer.tops)
                elif consumer.type != "DetectionOutput":
                    reaches_output_only = False
                    break
        if reaches_output_only:
            heads.add(layer.name)
    return heads


@dataclass(frozen=True)
class TableRules:
    """The choices a table is made with besides its method, each method reading those that apply to it: the
    percentile of ``--method percentile``, the fewer weight levels of ncnn's INT8 Winograd convolutions
    (``winograd_6bit``, see ``weight_levels``), the threshold rule of the head layers (``head_layers``;
    ``head_method`` None: the table's own method) and, for eq and AdaRound, FP32 biases corrected for the mean
    output error of the quantized weights (``bias_correction``)."""

    percentile: float = 99.99
    winograd_6bit: bool = True
    head_method: str | None = "minmax"
    bias_correction: bool = False


DEFAULT_RULES = TableRules()


def build_table(
    graph: Graph, stats: CalibrationStatistics, method: str = "kl", rules: TableRules = DEFAULT_RULES
) -> CalibrationResult:
    """Thresholds from the histograms, weight scales from the folded weights, combined per layer.

    Head layers (see ``head_layers``) use ``rules.head_method`` (default minmax; None = the same as ``method``).
    A layer whose input was all zeros on every image gets no activation line and stays FP32 in ncnn.
    """
    started = time.perf_counter()
    deploy = graph.folded()
    table = CalibrationTable(weight_scales=weight_scales(deploy, rules.winograd_6bit))
    head_method = rules.head_method
    heads = head_layers(deploy) if head_method else set()
    thresholds: dict[str, float] = {}
    skipped: list[str] = []
    cache: dict[tuple[str, str], float | None] = {}
    for layer in quantizable_layers(deploy):
        value = layer.bottoms[0]
        if value not in stats.histograms:
            raise ImageError(
                f"the statistics have no histogram for blob '{graph.blob_of(value)}' "
                f"(input of layer '{layer.name}'): they were collected for another model"
            )
        layer_method = head_method if layer.name in heads else method
        key = (value, layer_method)
        if key not in cache:
            cache[key] = activation_threshold(stats.histograms[value], layer_method, percentile=rules.percentile)
        threshold = cache[key]
        if threshold is None:
            log.warning(
                "layer %s: its input '%s' was zero on every calibration image; keeping it FP32",
                layer.name,
                graph.blob_of(value),
            )
            skipped.append(layer.name)
            continue
        thresholds[layer.name] = threshold
        table.activation_scales[layer.name] = 127.0 / threshold
    if heads:
        log.info("head layers with %s thresholds: %s", head_method, ", ".join(sorted(heads)))
    table.validate()
    table.fp32_layers.update(skipped)
    return CalibrationResult(table, thresholds, method, stats, deploy, skipped, time.perf_counter() - started)


def legacy_table(graph: Graph, result: CalibrationResult) -> str:
    """The original tool's format: one 127/max|W| per weight tensor, activation scales keyed by Caffe blob."""
    weights: dict[str, float] = {}
    blobs: dict[str, float] = {}
    for layer in quantizable_layers(result.deploy):
        absmax = float(abs(layer.blobs[0]).max())
        weights[layer.name] = 127.0 / absmax if absmax > 0 else 0.0
        if layer.name in result.table.activation_scales:
            blobs.setdefault(graph.blob_of(layer.bottoms[0]), result.table.activation_scales[layer.name])
    return format_legacy_table(weights, blobs)
