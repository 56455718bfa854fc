"""Tensor ranges (``amax``) for TensorRT: from calibration statistics or an ncnn table, spread over the ONNX tensors.

The file formats that carry them are in :mod:`int8conv.tables.tensorrt_files`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from int8conv.caffe.graph import Graph
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.thresholds import METHODS, activation_threshold
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.errors import Int8ConvError, some_names
from int8conv.tables.ncnn_table import CalibrationTable
from int8conv.tables.tensorrt_files import LEVELS, MIN_AMAX, check_amax
from int8conv.tensorrt.onnx_export import OnnxExport

log = logging.getLogger(__name__)


def value_ranges(stats: CalibrationStatistics, method: str = "kl", percentile: float = 99.99) -> dict[str, float]:
    """amax of every value in the statistics by the threshold method; all-zero values get MIN_AMAX."""
    ranges = {}
    for name, histogram in stats.histograms.items():
        threshold = activation_threshold(histogram, method, percentile=percentile)
        ranges[name] = MIN_AMAX if threshold is None else max(float(threshold), MIN_AMAX)
    return ranges


def histogram_method(method: str) -> str:
    """The histogram method for the tensors a search method (eq) does not choose: kl, else ``method`` itself."""
    return "kl" if method not in METHODS else method


def layer_input_ranges(table: CalibrationTable) -> dict[str, float]:
    """amax of each quantized layer's input as the ncnn table gives it (``127 / scale``), by layer name."""
    return {name: max(LEVELS / float(scale), MIN_AMAX) for name, scale in table.activation_scales.items()}


def table_ranges(table: CalibrationTable, graph: Graph) -> dict[str, float]:
    """amax of each quantized layer's input value from an ncnn table; other values are absent.

    Layers that read one value may have different thresholds (a head keeps the full range, the backbone
    layer beside it clips): one range per tensor, as the TensorRT cache holds, is then the largest of them.
    The Q/DQ ONNX keeps each layer's own (``layer_input_ranges``).
    """
    layers = {layer.name: layer for layer in quantizable_layers(graph)}
    ranges: dict[str, float] = {}
    for name, amax in layer_input_ranges(table).items():
        if name not in layers:
            raise Int8ConvError(
                f"the calibration table names layer '{name}', which is not a Convolution or "
                f"InnerProduct of network '{graph.name}'"
            )
        value = layers[name].bottoms[0]
        ranges[value] = max(amax, ranges.get(value, 0.0))
    return ranges


def tensor_ranges(export: OnnxExport, values: Mapping[str, float]) -> dict[str, float]:
    """amax of every activation tensor of the exported ONNX that a range is known for, in graph order.

    Constant tensors (PriorBox) get none: TensorRT computes them at build time. A tensor with neither a
    value range nor a derivation is left out, and TensorRT keeps its layer in higher precision.
    """

    def amax_of(name: str, depth: int = 0) -> float | None:
        if name in values:
            return float(values[name])
        rule = export.derived.get(name)
        if rule is None or depth > 32:
            return None
        if rule.source is None:
            return rule.amax
        base = amax_of(rule.source, depth + 1)
        return None if base is None else base * rule.factor

    ranges: dict[str, float] = {}
    missing = []
    for name in export.activations():
        amax = amax_of(name)
        if amax is None:
            missing.append(name)
            continue
        ranges[name] = check_amax(name, max(amax, MIN_AMAX) if math.isfinite(amax) else amax)
    if missing:
        log.info(
            "no range for %d tensor(s) (TensorRT keeps them in higher precision): %s",
            len(missing),
            some_names(missing, 8),
        )
    return ranges
