"""``--adaround``: learned rounding of the INT8 weights (Nagel et al. 2020, "Up or Down? Adaptive Rounding").

Rounding every weight to its nearest integer minimizes each weight's own error, not the layer's: the errors of
the weights a layer output sums do not cancel. AdaRound learns, per weight, whether ``w * scale`` rounds down or
up, so that the layer's pre-activation output on calibration data stays closest to its FP32 weights' output:

    min_V  || (W  -  (floor(W s) + h(V)) / s) x~ ||^2  +  lambda * sum(1 - |2 h(V) - 1| ** beta)

``x~`` is the input the INT8 layers before actually produce (the ncnn INT8 model of the table, with the layers
learned so far, quantized by the layer's bottom scale, as ncnn does), ``s`` the table's weight scales (unchanged),
``h`` the rectified sigmoid (initialised to the fractional part, so training starts from the FP32 weights). The
regularizer, off for the first WARMUP of the iterations, then pushes every ``h`` to 0 or 1 while ``beta`` anneals
from 20 to 2; Adam in numpy. The rounding stays inside the layer's bound (127, or ``weight_scales.winograd_levels``
where ncnn's INT8 Winograd kernel runs). The paper's asymmetric target ``W x`` (FP32 input ``x``) was measured worse
here: it lets the weights absorb the upstream activation error (res10 SSD, kl table, judged images: output cosine
0.9968 against nearest rounding's 0.9974; this objective: 0.9986).

The loss is quadratic in the rounded weights, so each layer only needs the Gram matrix ``x~' x~`` over its
sampled positions (per group), accumulated image by image: an iteration costs ``out * K**2`` whatever the number
of samples. The output channels are independent problems; each one is normalized by its input's mean square, so
one ``lambda`` fits every layer. A quarter of the images is held out: a channel keeps its learned rounding only
where that lowers the held-out error against nearest rounding.

The time budget: each layer's samples and iterations are bounded by its multiply-accumulates (GRAM_MACS,
ITERATION_MACS), and a layer whose Gram matrices alone would cost more than MAX_LAYER_GRAM_MACS keeps nearest
rounding (logged), as do layers with fewer samples than weights per output (an InnerProduct sees one per image).

Layers are learned in network order, in chunks that fit GRAM_BYTES: each chunk's inputs come from an INT8 run
with the chunks before already learned. The result is FP32 weights ``q / s`` (``CalibrationResult.weights``):
the project's INT8 writer turns them back into exactly ``q``, and the Q/DQ ONNX (with the same scales) too.
With bias correction, the corrected biases of the learned layers are recomputed for the learned integers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.calibration.calibrate import DEFAULT_RULES, CalibrationResult, TableRules
from int8conv.calibration.int8_simulation import LayerGeometry, per_output_scales, quantize_input, round_clip
from int8conv.calibration.preprocess import spread_evenly
from int8conv.calibration.scale_search import SAMPLING_SEED, layer_ends, sample_positions, table_layers
from int8conv.calibration.weight_scales import quantizable_layers, weight_levels
from int8conv.errors import ImageError
from int8conv.ncnn.model import NcnnModel, write_model
from int8conv.ncnn.quantize import grouped_outputs, quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.progress import progress
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the rectified sigmoid's stretch (Nagel et al.: zeta 1.1, gamma -0.1)
ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END = 20.0, 2.0
#: share of the iterations without the rounding regularizer
WARMUP = 0.2
REG_WEIGHT = 1.0
#: Adam's step at MAX_ITERATIONS; fewer iterations take larger steps (``* sqrt(MAX_ITERATIONS / iterations)``)
LEARNING_RATE = 0.05
#: iterations per layer: as many as ITERATION_MACS allows (``out * K**2`` each), within these bounds
MIN_ITERATIONS, MAX_ITERATIONS = 20, 300
ITERATION_MACS = 1e9
#: images the Gram matrices are accumulated over (spread over the calibration set); every HELD_OUT_EVERY-th
#: one is held out to accept or reject each channel's learned rounding
ADAROUND_IMAGES = 16
HELD_OUT_EVERY = 4
#: output positions sampled per layer over all images: as many as GRAM_MACS allows (``groups * (K/g)**2`` each),
#: at least SAMPLES_PER_WEIGHT per weight of an output (fewer samples than weights would only fit them)
GRAM_MACS = 5e8
SAMPLES_PER_WEIGHT = 1.4
#: a layer whose least Gram (SAMPLES_PER_WEIGHT samples per weight) costs more keeps nearest rounding: the cost
#: grows with (K/g)**3 (res10's and open_nsfw's 3x3 convolutions of 256 channels would take most of the time)
MAX_LAYER_GRAM_MACS = 1e10
#: float64 Gram memory one INT8 pass may accumulate (the layers are learned in chunks of this size)
GRAM_BYTES = 512 * 2**20


def adaround_images(items: Sequence[T]) -> list[T]:
    """Up to ADAROUND_IMAGES of the calibration images, spread evenly over them."""
    return spread_evenly(items, ADAROUND_IMAGES)


def rectified_sigmoid(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1) and dh/dV."""
    sig = 1 / (1 + np.exp(-v))
    raw = sig * (ZETA - GAMMA) + GAMMA
    slope = sig * (1 - sig) * (ZETA - GAMMA) * ((raw >= 0) & (raw <= 1))
    return np.clip(raw, 0, 1), slope


def initial_v(fraction: np.ndarray) -> np.ndarray:
    """V with h(V) equal to the fractional part of the scaled weights (kept off the clip's edges by 1e-6, where
    the gradient would vanish)."""
    p = (np.clip(fraction, 1e-6, 1 - 1e-6) - GAMMA) / (ZETA - GAMMA)
    return np.log(p / (1 - p))


def beta_at(step: int, iterations: int) -> float | None:
    """The regularizer's beta at ``step``: None during the warm-up, then linear from BETA_START to BETA_END."""
    start = int(WARMUP * iterations)
    if step < start:
        return None
    return BETA_END + (BETA_START - BETA_END) * (1 - (step - start) / max(iterations - start, 1))


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    """(out, K) -> (groups, out / groups, K)."""
    return a.reshape(groups, a.shape[0] // groups, a.shape[1])


def quadratic_error(d: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Per output channel ``d' C d`` (``gram`` C per group): for ``d = q - W s``, the squared output error of the
    integers ``q``."""
    dg = _grouped(d, gram.shape[0])
    return (np.matmul(dg, gram) * dg).sum(axis=2).reshape(-1)


def learn_rounding(
    scaled: np.ndarray,
    gram: np.ndarray,
    linear: np.ndarray,
    bound: float,
    iterations: int,
    normalizer: np.ndarray | None = None,
) -> np.ndarray:
    """The learned integer weights (as floats) for ``scaled`` = W * s (out, K / groups), within +-``bound``.

    ``gram`` (groups, K/g, K/g) is C = ``x~' x~``, ``linear`` (out, K/g) is b = ``C (W s)'``: the output error of
    integers ``q`` is ``q' C q - 2 q' b`` plus a constant. ``normalizer`` (per output) divides that error,
    so that every channel has the same balance against the regularizer.
    """
    groups = gram.shape[0]
    floor = np.floor(scaled)
    v = initial_v(scaled - floor).astype(np.float32)
    c = gram.astype(np.float32)
    b = _grouped(linear.astype(np.float32), groups)
    scale = (2.0 / (normalizer if normalizer is not None else np.ones(scaled.shape[0])))[:, None].astype(np.float32)
    floor32 = floor.astype(np.float32)
    m = np.zeros_like(v)
    s = np.zeros_like(v)
    beta1, beta2 = 0.9, 0.999
    base_rate = LEARNING_RATE * np.sqrt(max(MAX_ITERATIONS / max(iterations, 1), 1.0))
    for step in range(iterations):
        h, slope = rectified_sigmoid(v)
        q = floor32 + h
        inside = (q > -bound) & (q < bound)
        grad = (np.matmul(_grouped(np.clip(q, -bound, bound), groups), c) - b).reshape(q.shape)
        grad *= scale
        grad *= inside
        beta = beta_at(step, iterations)
        if beta is not None:
            centred = 2 * h - 1
            grad -= np.float32(REG_WEIGHT * beta * 2) * np.sign(centred) * np.abs(centred) ** np.float32(beta - 1)
        grad *= slope
        m *= beta1
        m += (1 - beta1) * grad
        s *= beta2
        s += (1 - beta2) * np.square(grad)
        rate = base_rate * np.sqrt(1 - beta2 ** (step + 1)) / (1 - beta1 ** (step + 1))
        v -= np.float32(rate) * m / (np.sqrt(s) + np.float32(1e-8))
    return np.clip(floor + (v >= 0), -bound, bound)


@dataclass
class LayerGram:
    """One layer's sums over its sampled positions: per group ``x~' x~`` for the training (index 0) and held-out
    (index 1) images, and the FP32 input sums bias correction needs (when given FP32 inputs)."""

    geometry: LayerGeometry
    bottom_scale: float
    weight_scales: np.ndarray  # per unit, as the table holds them
    bound: float
    scaled: np.ndarray = field(init=False)  # W * s, per output channel
    nearest: np.ndarray = field(init=False)  # nearest rounding, within the bound
    gram: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)
    sum_fp32: np.ndarray = field(init=False)
    sum_fp32_quantized: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        g = self.geometry
        width = g.weight.shape[1]
        self.scaled = g.weight * g.per_output(self.weight_scales)[:, None]
        self.nearest = np.clip(round_clip(self.scaled), -self.bound, self.bound)
        self.gram = np.zeros((2, g.group, width, width))
        self.count = np.zeros(2, dtype=np.int64)
        self.sum_fp32 = np.zeros(width * g.group)
        self.sum_fp32_quantized = np.zeros_like(self.sum_fp32)

    @staticmethod
    def nbytes(geometry: LayerGeometry) -> int:
        return 2 * geometry.group * geometry.weight.shape[1] ** 2 * 8

    def quantized(self, patches: np.ndarray) -> np.ndarray:
        """What ncnn computes with: the int8 input, in the input's units."""
        return quantize_input(patches, self.bottom_scale) / np.float32(self.bottom_scale)

    def add(self, int8_input: np.ndarray, held: bool, fp32: np.ndarray | None = None) -> None:
        """Add one image's patches: ``int8_input`` from the INT8 model and, for bias correction, ``fp32`` (the
        same positions) from the FP32 one."""
        g, part = self.geometry, int(held)
        xq_t = self.quantized(int8_input).reshape(int8_input.shape[0], g.group, -1).transpose(1, 2, 0)
        self.gram[part] += np.matmul(xq_t, xq_t.transpose(0, 2, 1))
        self.count[part] += int8_input.shape[0]
        if fp32 is not None:
            self.sum_fp32 += fp32.sum(axis=0, dtype=np.float64)
            self.sum_fp32_quantized += self.quantized(fp32).sum(axis=0, dtype=np.float64)

    def error(self, q: np.ndarray, part: int) -> np.ndarray:
        """Per output channel, ``||x~ (q - W s)||^2`` over the part's samples (in integer-weight units)."""
        return quadratic_error(q - self.scaled, self.gram[part])

    def learn(self) -> tuple[np.ndarray, float]:
        """The integer weights (learned where that lowers the held-out error, nearest elsewhere) and the held-out
        rounding error's relative change against nearest rounding (outputs weighted in their own units)."""
        g = self.geometry
        scaled, nearest = self.scaled, self.nearest
        out, width = scaled.shape
        if self.count[0] < width:  # fewer samples than weights per output: the rounding would only fit them
            log.info("adaround %s: %d samples for %d weights per output, kept nearest", g.name, self.count[0], width)
            return nearest, 0.0
        normalizer = np.repeat(np.trace(self.gram[0], axis1=1, axis2=2) / width, out // g.group)
        if not np.all(normalizer > 0):
            return nearest, 0.0
        iterations = int(np.clip(ITERATION_MACS / (out * width * width), MIN_ITERATIONS, MAX_ITERATIONS))
        linear = np.matmul(_grouped(scaled, g.group), self.gram[0]).reshape(scaled.shape)
        learned = learn_rounding(scaled, self.gram[0], linear, self.bound, iterations, normalizer)
        part = 1 if self.count[1] else 0
        before, after = self.error(nearest, part), self.error(learned, part)
        scales = g.per_output(self.weight_scales)
        keep = (after < before) & (scales > 0)
        q = np.where(keep[:, None], learned, nearest)
        units = np.where(scales > 0, scales, np.inf) ** -2.0  # integer-weight units -> output units
        total = (before * units).sum()
        change = ((np.where(keep, after, before) - before) * units).sum() / total if total > 0 else 0.0
        log.debug(
            "adaround %s: %d iterations, %d/%d channels learned, held-out rounding error %+.1f%%",
            g.name,
            iterations,
            int(keep.sum()),
            out,
            100 * change,
        )
        return q, float(change)

    def corrected_bias(self, weight: np.ndarray) -> np.ndarray:
        """The FP32 bias minus the mean (INT8 - FP32) pre-activation error with ``weight`` (the adjusted FP32
        weights), on FP32 inputs: ``scale_search``'s bias correction, for the learned integers."""
        g = self.geometry
        total = self.count.sum()
        error = g.accumulate((self.sum_fp32_quantized / total)[None], weight.astype(np.float64)) - g.accumulate(
            (self.sum_fp32 / total)[None], g.weight
        )
        return (g.bias - error[0]).astype(np.float32)


def adjusted_weights(q: np.ndarray, geometry: LayerGeometry, weight_scales: np.ndarray) -> np.ndarray:
    """``q / scale`` per output channel as float32 (0 for a dead channel): the FP32 weights that round to ``q``."""
    scales = per_output_scales(geometry.weight, weight_scales)
    safe = np.where(scales > 0, scales, 1.0)
    return np.where(scales[:, None] > 0, q / safe[:, None], 0.0).astype(np.float32)


def _learnable(model: NcnnModel, table: CalibrationTable) -> list[LayerGeometry]:
    """The layers the table quantizes and the runtime computes right in INT8, with a live weight scale, whose
    Gram matrices fit MAX_LAYER_GRAM_MACS."""
    layers = [
        g
        for g in table_layers(model, table)
        if grouped_outputs(model.layer(g.name)) is None and np.any(table.weight_scales[g.name] > 0)
    ]
    large = [g.name for g in layers if SAMPLES_PER_WEIGHT * g.group * g.weight.shape[1] ** 3 > MAX_LAYER_GRAM_MACS]
    if large:
        log.info("adaround: %d layer(s) too large for the time budget keep nearest rounding: %s", len(large), large)
    return [g for g in layers if g.name not in large]


def _chunks(layers: list[LayerGeometry]) -> list[list[LayerGeometry]]:
    """Consecutive layers whose Gram matrices fit GRAM_BYTES together (a larger layer gets a chunk alone)."""
    chunks: list[list[LayerGeometry]] = [[]]
    used = 0
    for g in layers:
        size = LayerGram.nbytes(g)
        if chunks[-1] and used + size > GRAM_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(g)
        used += size
    return [c for c in chunks if c]


def _sampled_positions(
    g: LayerGeometry, top: np.ndarray, images: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The output positions of one of ``images`` images that feed the layer's Gram matrices: the eq search's rule
    (``sample_positions``: half where the FP32 output ``top`` is largest, half uniform; all when they are few), so
    that a subsample keeps the rare large outputs that decide detections."""
    width = g.weight.shape[1]
    wanted = max(GRAM_MACS / (g.group * width**2), SAMPLES_PER_WEIGHT * width)
    return sample_positions(g, top, int(np.ceil(wanted / max(images, 1))), rng)


def learn_weights(
    model: NcnnModel,
    table: CalibrationTable,
    inputs: Sequence[np.ndarray],
    levels: Mapping[str, int] | None = None,
    biases: Mapping[str, np.ndarray] | None = None,
    bias_correction: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Learned INT8 weights for the ncnn FP32 ``model`` and ``table``, as adjusted FP32 weights per layer
    (``(out, K)`` float32, rounding to the learned integers with the table's weight scales), and the biases the
    INT8 model then gets: ``biases`` (e.g. eq's corrected ones), recomputed for the learned layers with
    ``bias_correction``. ``levels`` bounds the integers per layer (127 where not given; Winograd layers less)."""
    started = time.perf_counter()
    levels = dict(levels or {})
    images = adaround_images(inputs)
    layers = _learnable(model, table)
    weights: dict[str, np.ndarray] = {}
    new_biases = dict(biases or {})
    changes: list[float] = []
    rng = np.random.default_rng(SAMPLING_SEED)
    chunks = _chunks(layers)
    with tempfile.TemporaryDirectory(prefix="int8conv-adaround-") as tmp:
        fp32_param, fp32_bin = Path(tmp) / "fp32.param", Path(tmp) / "fp32.bin"
        write_model(model, fp32_param, fp32_bin)
        fp32 = NcnnRunner(fp32_param, fp32_bin, int8=False)
        for index, chunk in enumerate(chunks):
            param, binary = Path(tmp) / f"int8-{index}.param", Path(tmp) / f"int8-{index}.bin"
            int8_model = quantize_model(model, table, fp16_storage=False, biases=new_biases, weights=weights)
            write_model(int8_model, param, binary)
            int8 = NcnnRunner(param, binary, int8=True)
            grams = {
                g.name: LayerGram(
                    g,
                    table.activation_scales[g.name],
                    np.asarray(table.weight_scales[g.name], dtype=np.float64),
                    float(levels.get(g.name, 127)),
                )
                for g in chunk
            }
            ends = layer_ends(model, chunk)
            wanted = sorted({blob for pair in ends.values() for blob in pair})
            bottoms = sorted({bottom for bottom, _ in ends.values()})
            desc = f"adaround: inputs {index + 1}/{len(chunks)}"
            for position, x in enumerate(progress(images, desc=desc, unit="img")):
                feed = {fp32.input_names[0]: x}
                reference = fp32.extract(feed, wanted)
                quantized = int8.extract(feed, bottoms)
                held = len(images) >= HELD_OUT_EVERY and position % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
                for g in chunk:
                    blob, top = ends[g.name]
                    rows, cols = _sampled_positions(g, reference[top], len(images), rng)
                    fp32_patches = g.patches(reference[blob], rows, cols) if bias_correction else None
                    grams[g.name].add(g.patches(quantized[blob], rows, cols), held, fp32_patches)
            for g in progress(chunk, desc=f"adaround: learn {index + 1}/{len(chunks)}", unit="layer"):
                gram = grams.pop(g.name)
                q, change = gram.learn()
                weights[g.name] = adjusted_weights(q, g, gram.weight_scales)
                changes.append(change)
                if bias_correction:
                    new_biases[g.name] = gram.corrected_bias(weights[g.name])
    log.info(
        "adaround: %d layers in %d INT8 pass(es), held-out rounding error %+.1f%% (median layer) against nearest "
        "rounding, %.1f s",
        len(layers),
        len(chunks),
        100 * float(np.median(changes)) if changes else 0.0,
        time.perf_counter() - started,
    )
    return weights, (new_biases if bias_correction or biases else None)


def calibrate_adaround(
    graph: Graph, result: CalibrationResult, inputs: Sequence[np.ndarray], rules: TableRules = DEFAULT_RULES
) -> CalibrationResult:
    """``result`` (any method's table) with learned weight rounding: ``result.weights`` holds the adjusted FP32
    weights, ``result.biases`` the biases for them (recomputed with ``rules.bias_correction``)."""
    from int8conv.ncnn.convert import convert_graph

    if not inputs:
        raise ImageError(
            "--adaround learns the weight rounding on calibration images: give them with --images "
            "(saved statistics alone are not enough)"
        )
    started = time.perf_counter()
    levels = {layer.name: weight_levels(layer, rules.winograd_6bit) for layer in quantizable_layers(result.deploy)}
    result.weights, result.biases = learn_weights(
        convert_graph(graph), result.table, inputs, levels, result.biases, rules.bias_correction
    )
    result.method += "+adaround"
    result.seconds += time.perf_counter() - started
    return result
