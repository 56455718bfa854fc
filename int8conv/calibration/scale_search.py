"""``--method eq``: output-aware scale search (after EasyQuant, Wu et al. 2020), plus bias correction.

Histogram methods choose a layer's input threshold from the input alone; what matters is the layer's output.
Layer by layer, in network order, this search picks the activation threshold and then refines the per-channel
weight scales to maximize the cosine of the layer's INT8 output (``int8_simulation``, ncnn's integer
arithmetic) against its FP32 output, on sampled output positions of a few calibration images:

1. FP32 pass (ncnn FP32 model): each layer's input patches and FP32 output at the sampled positions; thresholds
   and weight scales searched with FP32 inputs.
2. Quantized pass: the INT8 model of pass 1 runs the same images, so each layer sees the input that the INT8
   layers before it actually produce (requantize fusion included); the search is repeated on those inputs
   against the FP32 outputs. (EasyQuant feeds each layer the quantized outputs of the previous ones; one
   re-run of the whole INT8 net per pass instead of per layer keeps the cost at two runs per image.)

Head layers (``calibrate.head_layers``) keep their threshold (the head rule): a head's rare large inputs decide
the result and are exactly what a cosine over sampled positions under-weights. Their weights are refined.

Bias correction (Nagel et al. 2019): per output channel, the mean of (INT8 - FP32) pre-activation output over
the samples is subtracted from the FP32 bias ncnn stores with the INT8 layer.

Candidate thresholds are ``absmax * r`` on a geometric grid of r from KL's threshold (``floors``) to 1, refined
around the best.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.calibration.calibrate import DEFAULT_RULES, CalibrationResult, TableRules, build_table, head_layers
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.int8_simulation import LayerGeometry, quantize_input
from int8conv.calibration.preprocess import spread_evenly
from int8conv.calibration.thresholds import activation_threshold
from int8conv.calibration.weight_scales import quantizable_layers, uses_int8_winograd
from int8conv.errors import ImageError
from int8conv.ncnn.model import NcnnModel, write_model
from int8conv.ncnn.quantize import quantize_model
from int8conv.ncnn.quantize import table_layers as quantized_layers
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.progress import progress
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: multiply-accumulates one candidate evaluation may cost; sets how many output positions a layer samples
MAC_BUDGET = 1e7
MIN_POSITIONS, MAX_POSITIONS = 64, 2048
#: threshold methods that search (``--method``), beside the histogram methods of ``thresholds.METHODS``
SEARCH_METHODS = ("eq",)
#: images the search runs (spread over the calibration set)
SEARCH_IMAGES = 8
#: share of each image's sampled positions taken where the FP32 output is largest (the rest: uniform)
SALIENT_SHARE = 0.5
#: the first pass's candidate thresholds: COARSE_STEPS ratios of absmax, geometric from the layer's floor (KL's
#: threshold, at least LOWEST_RATIO) to 1
LOWEST_RATIO, COARSE_STEPS = 1 / 64, 9
#: weight-scale multipliers tried per output channel: above 1 clips the largest weights (8-bit layers); Winograd
#: layers only go down, so no int8 weight exceeds the bound the Winograd kernel needs (``winograd_levels``)
WEIGHT_UP = np.linspace(1.0, 1.2, 5)
WEIGHT_DOWN = np.linspace(0.92, 1.0, 5)
#: search passes: the first on FP32 inputs, each later one on the inputs of the INT8 net the pass before chose
PASSES = 2
#: the seed of the sampled positions (the same images give the same table)
SAMPLING_SEED = 0


@dataclass
class LayerSamples:
    """One layer's data for the search: input patches at the sampled positions, FP32 output there."""

    geometry: LayerGeometry
    fp32_patches: np.ndarray
    target: np.ndarray  # FP32 output (after activation)
    target_pre: np.ndarray  # FP32 output before the activation
    positions: list[tuple[np.ndarray, np.ndarray]]
    quantized_patches: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.target_flat = self.target.reshape(-1)
        self.target_norm = float(np.linalg.norm(self.target_flat))

    def cosine(self, output: np.ndarray) -> float:
        """Cosine of an output at the samples against the FP32 one (1 when both vanish)."""
        flat = output.reshape(-1)
        norm = float(np.linalg.norm(flat))
        if norm == 0 or self.target_norm == 0:
            return 1.0 if norm == self.target_norm else 0.0
        return float(np.dot(flat, self.target_flat)) / (norm * self.target_norm)


def sample_positions(
    geometry: LayerGeometry, top: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` output positions of one image: half where the FP32 output is largest, half uniform.

    Detection evidence sits at few positions; uniform samples alone would let the search clip it away.
    """
    if geometry.inner_product:
        return np.zeros(1, int), np.zeros(1, int)
    oh, ow = top.shape[-2], top.shape[-1]
    total = oh * ow
    if count >= total:
        return np.divmod(np.arange(total), ow)
    salient = int(count * SALIENT_SHARE)
    strength = np.square(top.reshape(top.shape[0], -1), dtype=np.float32).sum(axis=0)
    top_positions = np.argpartition(-strength, salient)[:salient] if salient else np.zeros(0, int)
    rest = np.setdiff1d(np.arange(total), top_positions, assume_unique=True)
    picked = np.concatenate([top_positions, rng.choice(rest, size=count - salient, replace=False)])
    return np.divmod(np.sort(picked), ow)


def table_layers(model: NcnnModel, table: CalibrationTable) -> list[LayerGeometry]:
    """The layers the table quantizes (both lines present), in network order."""
    return [LayerGeometry.of(layer) for layer in quantized_layers(model, table)]


def layer_ends(model: NcnnModel, layers: Sequence[LayerGeometry]) -> dict[str, tuple[str, str]]:
    """Each layer's input and output blob."""
    names = {g.name for g in layers}
    return {layer.name: (layer.bottoms[0], layer.tops[0]) for layer in model.layers if layer.name in names}


def _sample(
    model: NcnnModel, layers: list[LayerGeometry], inputs: Sequence[np.ndarray], workdir: Path
) -> dict[str, LayerSamples]:
    """FP32 pass: input patches at sampled positions of every searched layer, and the FP32 output there."""
    param, binary = workdir / "fp32.param", workdir / "fp32.bin"
    write_model(model, param, binary)
    runner = NcnnRunner(param, binary, int8=False)
    ends = layer_ends(model, layers)
    wanted = sorted({blob for pair in ends.values() for blob in pair})
    per_image = {
        g.name: int(np.clip(MAC_BUDGET / g.weight.size, MIN_POSITIONS, MAX_POSITIONS)) // len(inputs) + 1
        for g in layers
    }
    rng = np.random.default_rng(SAMPLING_SEED)
    patches: dict[str, list[np.ndarray]] = {g.name: [] for g in layers}
    positions: dict[str, list] = {g.name: [] for g in layers}
    for x in progress(inputs, desc="eq: FP32 pass", unit="img"):
        blobs = runner.extract({runner.input_names[0]: x}, wanted)
        for g in layers:
            bottom, top = ends[g.name]
            rows, cols = sample_positions(g, blobs[top], per_image[g.name], rng)
            positions[g.name].append((rows, cols))
            patches[g.name].append(g.patches(blobs[bottom], rows, cols))
    samples = {}
    for g in layers:
        stacked = np.concatenate(patches[g.name])
        pre = g.accumulate(stacked, g.weight.astype(np.float32)) + g.bias.astype(np.float32)
        samples[g.name] = LayerSamples(g, stacked, g.activate(pre), pre, positions[g.name])
    return samples


def _quantized_pass(
    model: NcnnModel,
    table: CalibrationTable,
    samples: dict[str, LayerSamples],
    inputs: Sequence[np.ndarray],
    workdir: Path,
) -> None:
    """Every searched layer's input as the INT8 net of ``table`` computes it, at the same positions."""
    param, binary = workdir / "int8.param", workdir / "int8.bin"
    write_model(quantize_model(model, table, fp16_storage=False), param, binary)
    runner = NcnnRunner(param, binary, int8=True)
    bottoms = {name: model.layer(name).bottoms[0] for name in samples}
    collected: dict[str, list[np.ndarray]] = {name: [] for name in samples}
    for index, x in enumerate(progress(inputs, desc="eq: INT8 pass", unit="img")):
        blobs = runner.extract({runner.input_names[0]: x}, sorted(set(bottoms.values())))
        for name, s in samples.items():
            rows, cols = s.positions[index]
            collected[name].append(s.geometry.patches(blobs[bottoms[name]], rows, cols))
    for name, s in samples.items():
        s.quantized_patches = np.concatenate(collected[name])


def _best_threshold(
    s: LayerSamples, patches: np.ndarray, absmax: float, weight_scales: np.ndarray, ratios: np.ndarray
) -> float:
    """The best candidate threshold ``absmax * ratio``, then refined between its neighbours."""
    g = s.geometry
    weight = g.quantized_weight(weight_scales, patches.dtype)

    def score(ratio: float) -> float:
        bottom = 127.0 / (absmax * ratio)
        return s.cosine(g.dequantize(g.accumulate(quantize_input(patches, bottom), weight), bottom, weight_scales))

    scores = [score(r) for r in ratios]
    best = int(np.argmax(scores))
    if len(ratios) > 2:
        low, high = ratios[max(best - 1, 0)], ratios[min(best + 1, len(ratios) - 1)]
        fine = list(np.geomspace(low, high, 6)[1:-1])
        ratios, scores = list(ratios) + fine, scores + [score(r) for r in fine]
        best = int(np.argmax(scores))
    return absmax * float(ratios[best])


def _refine_weights(
    s: LayerSamples, patches: np.ndarray, bottom_scale: float, weight_scales: np.ndarray, six_bit: bool
) -> np.ndarray:
    """Per unit (output channel, or group for depthwise), the multiplier with the least squared output error."""
    g = s.geometry
    multipliers = WEIGHT_DOWN if six_bit else WEIGHT_UP
    units_of_output = np.repeat(np.arange(g.units), g.weight.shape[0] // g.units)
    q = quantize_input(patches, bottom_scale)
    errors = []
    for m in multipliers:
        scales = weight_scales * m
        y = g.dequantize(g.accumulate(q, g.quantized_weight(scales, patches.dtype)), bottom_scale, scales)
        per_output = np.square(y - s.target).sum(axis=0, dtype=np.float64)
        errors.append(np.bincount(units_of_output, per_output, minlength=g.units))
    best = np.argmin(np.stack(errors), axis=0)
    return (weight_scales * multipliers[best]).astype(np.float32)


def _bias_correction(s: LayerSamples, bottom_scale: float, weight_scales: np.ndarray) -> np.ndarray:
    """The FP32 bias minus the mean (INT8 - FP32) pre-activation error per output channel, on FP32 inputs."""
    g = s.geometry
    error = g.int8(s.fp32_patches, bottom_scale, weight_scales, pre_activation=True) - s.target_pre
    return g.bias - error.mean(axis=0, dtype=np.float64)


def search_images(items: Sequence[T]) -> list[T]:
    """Up to SEARCH_IMAGES of the calibration images, spread evenly over them."""
    return spread_evenly(items, SEARCH_IMAGES)


def search_scales(
    model: NcnnModel,
    table: CalibrationTable,
    absmax: Mapping[str, float],
    fixed: Iterable[str],
    six_bit: Iterable[str],
    inputs: Sequence[np.ndarray],
    bias_correction: bool = False,
    floors: Mapping[str, float] | None = None,
) -> tuple[CalibrationTable, dict[str, np.ndarray] | None]:
    """The searched table for the ncnn FP32 ``model`` and, with ``bias_correction``, the corrected biases.

    ``table`` is the starting point (weight scales; the activation scales of the ``fixed`` layers, which are
    kept); ``absmax`` the largest |input| per layer (the top candidate); ``six_bit`` the layers whose weights
    must stay within their Winograd bound; ``inputs`` preprocessed calibration images (up to SEARCH_IMAGES of
    them are used); ``floors`` the smallest threshold allowed per layer.
    """
    floors = floors or {}
    started = time.perf_counter()
    table = CalibrationTable({k: v.copy() for k, v in table.weight_scales.items()}, dict(table.activation_scales))
    chosen = search_images(inputs)
    layers = table_layers(model, table)
    fixed, six_bit = set(fixed), set(six_bit)
    start_scales = {g.name: table.weight_scales[g.name] for g in layers}
    biases: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="int8conv-eq-") as tmp:
        samples = _sample(model, layers, chosen, Path(tmp))
        for round_ in range(PASSES):
            last = round_ == PASSES - 1
            if round_:
                _quantized_pass(model, table, samples, chosen, Path(tmp))
            for g in progress(layers, desc=f"eq: search {round_ + 1}/{PASSES}", unit="layer"):
                s = samples[g.name]
                patches = s.fp32_patches if s.quantized_patches is None else s.quantized_patches
                scales = start_scales[g.name]
                if not np.any(scales):
                    continue
                if g.name not in fixed:
                    lowest = min(max(floors.get(g.name, 0.0) / absmax[g.name], LOWEST_RATIO), 1.0)
                    if round_:  # later passes: around the previous choice only
                        ratio = 127.0 / table.activation_scales[g.name] / absmax[g.name]
                        ratios = np.clip(ratio * np.geomspace(0.7, 1.4, 5), lowest, 1.0)
                    else:
                        ratios = np.geomspace(lowest, 1.0, COARSE_STEPS)
                    table.activation_scales[g.name] = 127.0 / _best_threshold(
                        s, patches, absmax[g.name], scales, ratios
                    )
                bottom = table.activation_scales[g.name]
                if last:
                    table.weight_scales[g.name] = _refine_weights(s, patches, bottom, scales, g.name in six_bit)
                    if bias_correction:
                        biases[g.name] = _bias_correction(s, bottom, table.weight_scales[g.name])
                log.debug("eq %s: threshold %.5g of absmax %.5g", g.name, 127.0 / bottom, absmax[g.name])
    table.validate()
    log.info("eq search: %d layers, %.1f s", len(layers), time.perf_counter() - started)
    return table, (biases if bias_correction else None)


def calibrate_eq(
    graph: Graph, stats: CalibrationStatistics, inputs: Sequence[np.ndarray], rules: TableRules = DEFAULT_RULES
) -> CalibrationResult:
    """``--method eq``: the histogram pass gives each input's absmax and the head thresholds, the search the rest.

    The search never clips more than KL would (KL's threshold is its smallest candidate): below it, the
    per-layer cosine traded away rare large activations that decide detections (measured: res10 precision
    0.94, ultraface recall 0.82 without the floor).

    With ``rules.head_method`` None the heads are searched too. The result's ``biases`` hold the corrected biases.
    """
    from int8conv.ncnn.convert import convert_graph

    started = time.perf_counter()
    result = build_table(graph, stats, "minmax", rules)
    if not inputs:
        raise ImageError(
            "--method eq runs the model on calibration images: give them with --images "
            "(saved statistics alone are not enough)"
        )
    absmax = {
        layer.name: stats.histograms[layer.bottoms[0]].absmax
        for layer in quantizable_layers(result.deploy)
        if layer.name in result.thresholds
    }
    fixed = head_layers(result.deploy) if rules.head_method else set()
    six_bit = [
        layer.name for layer in quantizable_layers(result.deploy) if rules.winograd_6bit and uses_int8_winograd(layer)
    ]
    floors = {
        layer.name: activation_threshold(stats.histograms[layer.bottoms[0]], "kl") or 0.0
        for layer in quantizable_layers(result.deploy)
        if layer.name in absmax
    }
    table, biases = search_scales(
        convert_graph(graph),
        result.table,
        absmax,
        fixed,
        six_bit,
        inputs,
        bias_correction=rules.bias_correction,
        floors=floors,
    )
    result.table = table
    result.thresholds = {name: 127.0 / scale for name, scale in table.activation_scales.items()}
    result.method = "eq+bc" if rules.bias_correction else "eq"
    result.biases = biases
    result.seconds = time.perf_counter() - started
    return result
