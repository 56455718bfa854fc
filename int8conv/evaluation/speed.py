"""Speed-aware precision: keep FP32 where INT8 does not pay, so the INT8 model is never slower than FP32.

Each quantizable layer is timed alone on the ncnn runtime, FP32 against INT8, in a two-layer model
(``Input`` of its real bottom shape, from the shape hints, then the layer). The INT8 variant quantizes its fp32
input and dequantizes its output, which is what INT8 costs next to FP32 neighbours; inside a chain of INT8
layers ncnn requantizes instead, which is cheaper, so the per-layer verdict errs towards FP32. A layer is kept
INT8 only if it is faster at every thread count timed. Then (optionally) the accuracy search (``fp32_search``)
moves more layers to FP32 until the output cosine reaches ``min_cosine``, and finally the whole INT8 model is
timed against the FP32 model, interleaved; while it is slower, the INT8 layers that gain least go to FP32
(with no INT8 layer left, the "INT8" model is the FP32 model: INT8 does not pay for that network here).

Timing on the machine that builds the model is a proxy for the device it will run on (another CPU, other SIMD,
other cache sizes). Per-layer timings measured on the device can be given instead (``load_layer_timings``):
a JSON ``{"layer": {"fp32": ms, "int8": ms}, ...}`` (or ``{"1": ms, "2": ms}`` per thread count in place of a
number), the format ``save_layer_timings`` writes. They then decide alone (no whole-model check here).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.atomic import write_text_atomic
from int8conv.errors import Int8ConvError
from int8conv.evaluation.mixed_precision import auto_fp32, without_activations
from int8conv.evaluation.results import LayerTimes
from int8conv.ncnn.model import SHAPE_HINTS, NcnnLayer, NcnnModel, write_model
from int8conv.ncnn.quantize import REQUANTIZE, int8_layers, is_int8, quantize_model, table_layers
from int8conv.ncnn.runtime import time_models
from int8conv.ncnn.shape_hints import add_shape_hints, has_shape_hints
from int8conv.progress import progress, quiet_loggers
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)

PROXY_NOTE = (
    "timed on this machine, a proxy for the target device: pass --layer-timings with timings measured "
    "there for a decision that holds on it"
)


@dataclass
class LayerTiming:
    """Median ms of one layer alone, FP32 and INT8, per thread count."""

    fp32_ms: dict[int, float]
    int8_ms: dict[int, float]

    @property
    def pays(self) -> bool:
        """INT8 is faster at every thread count measured."""
        return all(self.int8_ms[t] < self.fp32_ms[t] for t in self.fp32_ms)

    @property
    def gain_ms(self) -> float:
        """FP32 minus INT8 time, summed over the thread counts (negative: INT8 is slower)."""
        return sum(self.fp32_ms[t] - self.int8_ms[t] for t in self.fp32_ms)


@dataclass
class SpeedChoice:
    """What ``optimize_speed`` decided, and the measurements behind it."""

    table: CalibrationTable
    timings: dict[str, LayerTiming]
    slow_layers: list[str]  # FP32 because INT8 does not pay alone
    accuracy_layers: list[str] = field(default_factory=list)  # FP32 for the cosine target
    model_layers: list[str] = field(default_factory=list)  # FP32 because the whole model was still slower
    cosine: float | None = None
    model_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # "fp32"/"int8" -> threads -> ms
    source: str = PROXY_NOTE

    @property
    def fp32_layers(self) -> list[str]:
        return self.slow_layers + self.accuracy_layers + self.model_layers


# --------------------------------------------------------------------------------------------------- per layer


def _bottom_shape(model: NcnnModel, blob: str) -> list[int] | None:
    """``[dims, w, h, c]`` of ``blob`` from its producer's shape hint."""
    producer = model.producer(blob)
    if producer is None or SHAPE_HINTS not in producer.params:
        return None
    index = producer.tops.index(blob)
    return [int(v) for v in producer.params[SHAPE_HINTS][4 * index : 4 * index + 4]]


def _alone(model: NcnnModel, layer: NcnnLayer) -> tuple[NcnnModel, np.ndarray] | None:
    """The layer in a model of its own (Input of its bottom's shape -> layer), and an input for it."""
    shape = _bottom_shape(model, layer.bottoms[0]) if len(layer.bottoms) == 1 else None
    if shape is None or not 1 <= shape[0] <= 3:
        return None
    dims, w, h, c = shape
    whc = {1: {0: w}, 2: {0: w, 1: h}, 3: {0: w, 1: h, 2: c}}[dims]
    source = NcnnLayer("Input", "timing_input", [], ["timing_in"], {**whc, SHAPE_HINTS: shape})
    alone = copy.deepcopy(layer)
    alone.bottoms, alone.tops = ["timing_in"], ["timing_out"]
    array = np.random.default_rng(0).normal(size=[(w,), (h, w), (c, h, w)][dims - 1]).astype(np.float32)
    return NcnnModel([source, alone]), array


def _quiet_writes() -> contextlib.AbstractContextManager[None]:
    """The many small models written while timing are not news to the user."""
    return quiet_loggers("int8conv.ncnn.model", "int8conv.ncnn.quantize", level=logging.WARNING)


def time_layers(
    model: NcnnModel, table: CalibrationTable, threads: Sequence[int] = (1,), runs: int = 15
) -> dict[str, LayerTiming]:
    """Median ms of every layer the table quantizes, alone, FP32 and INT8, runs interleaved.

    One thread by default: a layer of tens of microseconds timed on 2 threads measures the threads' wake-up and
    barrier more than the layer (and on a loaded machine, the scheduler); the whole model is checked at every
    thread count afterwards."""
    if not has_shape_hints(model):
        model = add_shape_hints(copy.deepcopy(model))
    layers = table_layers(model, table)
    timings: dict[str, LayerTiming] = {}
    with tempfile.TemporaryDirectory(prefix="int8conv-layer-timing-") as tmp, _quiet_writes():
        for layer in progress(layers, desc="timing layers", unit="layer"):
            alone = _alone(model, layer)
            if alone is None:
                log.info("layer %s is not timed: its input shape is unknown", layer.name)
                continue
            fp32, array = alone
            single = CalibrationTable(
                {layer.name: table.weight_scales[layer.name]}, {layer.name: table.activation_scales[layer.name]}
            )
            int8 = quantize_model(fp32, single, fp16_storage=False)
            if not int8_layers(int8):
                continue
            paths = {}
            for label, variant in (("fp32", fp32), ("int8", int8)):
                paths[label] = (Path(tmp) / f"{label}.param", Path(tmp) / f"{label}.bin", label == "int8")
                write_model(variant, paths[label][0], paths[label][1])
            ms = time_models(paths, {"timing_in": array}, threads=threads, runs=runs)
            timings[layer.name] = LayerTiming(ms["fp32"], ms["int8"])
            log.debug("%s: FP32 %s ms, INT8 %s ms", layer.name, ms["fp32"], ms["int8"])
    return timings


def save_layer_timings(timings: Mapping[str, LayerTiming], path: str | Path) -> None:
    data = {
        name: {
            "fp32": {str(t): v for t, v in timing.fp32_ms.items()},
            "int8": {str(t): v for t, v in timing.int8_ms.items()},
        }
        for name, timing in timings.items()
    }
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def load_layer_timings(path: str | Path) -> dict[str, LayerTiming]:
    """Per-layer timings measured elsewhere (see the module doc); a malformed entry names the file and layer."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Int8ConvError(f"{path}: cannot read the layer timings: {exc}") from exc
    if not isinstance(data, dict):
        raise Int8ConvError(f"{path}: layer timings must be a JSON object {{layer: {{fp32: ms, int8: ms}}}}")

    def per_thread(layer: str, value) -> dict[int, float]:
        values = value if isinstance(value, dict) else {"1": value}
        try:
            result = {int(t): float(ms) for t, ms in values.items()}
        except (TypeError, ValueError):
            result = {}
        if not result or not all(math.isfinite(ms) and ms >= 0 for ms in result.values()):
            raise Int8ConvError(f"{path}: layer '{layer}': times must be non-negative numbers of ms, got {value!r}")
        return result

    timings = {}
    counts: set[int] = set()
    for layer, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"fp32", "int8"}:
            raise Int8ConvError(f"{path}: layer '{layer}' needs exactly 'fp32' and 'int8' times, got {entry!r}")
        fp32, int8 = per_thread(layer, entry["fp32"]), per_thread(layer, entry["int8"])
        if set(fp32) != set(int8):
            raise Int8ConvError(f"{path}: layer '{layer}': FP32 and INT8 times for different thread counts")
        counts = counts or set(fp32)  # the first layer's: the per-layer table has one column per count
        if set(fp32) != counts:
            raise Int8ConvError(
                f"{path}: layer '{layer}' has times for {sorted(fp32)} thread(s), the layers before it for "
                f"{sorted(counts)}: give every layer the same thread counts"
            )
        timings[layer] = LayerTiming(fp32, int8)
    return timings


def table_of(int8: NcnnModel) -> CalibrationTable:
    """The scales an INT8 model holds (weight scales, bottom scale: the arrays after the bias), as a table."""
    table = CalibrationTable()
    for layer in int8.layers:
        if is_int8(layer):
            offset = 1 if int(layer.params[8]) > REQUANTIZE else 0
            table.weight_scales[layer.name] = np.asarray(layer.weights[-2 - offset].data, np.float32)
            table.activation_scales[layer.name] = float(layer.weights[-1 - offset].data[0])
    return table


# --------------------------------------------------------------------------------------------------- whole model

#: A whole-model comparison runs at least this long per model and thread count (small nets need many runs).
MIN_TIMED_MS = 300.0


def _time_model(
    fp32: NcnnModel,
    table: CalibrationTable,
    inputs: Mapping[str, np.ndarray],
    threads: Sequence[int],
    runs: int,
    fp16_storage: bool,
    workdir: Path,
) -> dict[str, dict[int, float]]:
    pairs = {
        "fp32": (workdir / "fp32.param", workdir / "fp32.bin", False),
        "int8": (workdir / "int8.param", workdir / "int8.bin", True),
    }
    if not pairs["fp32"][0].is_file():
        write_model(fp32, pairs["fp32"][0], pairs["fp32"][1])
    write_model(quantize_model(fp32, table, fp16_storage), pairs["int8"][0], pairs["int8"][1])
    ms = time_models(pairs, inputs, threads=threads, runs=runs)
    fastest = min(ms["fp32"].values())
    if fastest * runs < MIN_TIMED_MS:
        ms = time_models(pairs, inputs, threads=threads, runs=min(500, math.ceil(MIN_TIMED_MS / max(fastest, 1e-3))))
    return ms


def optimize_speed(
    model: NcnnModel,
    table: CalibrationTable,
    inputs: Sequence[Mapping[str, np.ndarray]],
    min_cosine: float | None = None,
    timings: Mapping[str, LayerTiming] | None = None,
    threads: Sequence[int] = (1, 2),
    layer_threads: Sequence[int] = (1,),
    runs: int = 15,
    task: str = "auto",
    fp16_storage: bool = True,
) -> SpeedChoice:
    """The fastest table within ``min_cosine`` (None: speed only) on ``inputs`` (see the module doc); layers are
    timed at ``layer_threads``, the whole model is checked at ``threads``."""
    started = time.perf_counter()
    source = PROXY_NOTE
    given = timings
    if timings is None:
        timings = time_layers(model, table, layer_threads, runs)
    else:
        source = "per-layer timings given by the user"
    quantized = [name for name in table.activation_scales if name in table.weight_scales]
    slow = [name for name in quantized if name in timings and not timings[name].pays]
    log.info(
        "speed: INT8 does not pay alone for %d of %d layer(s)%s",
        len(slow),
        len(quantized),
        f": {', '.join(slow)}" if slow else "",
    )
    choice = SpeedChoice(without_activations(table, slow), dict(timings), slow, source=source)
    if min_cosine is not None:
        accuracy = auto_fp32(model, choice.table, inputs, min_cosine, task=task, fp16_storage=fp16_storage)
        choice.table, choice.accuracy_layers, choice.cosine = accuracy.table, accuracy.fp32_layers, accuracy.cosine
    with tempfile.TemporaryDirectory(prefix="int8conv-speed-") as tmp, _quiet_writes():
        choice.model_ms = _time_model(model, choice.table, inputs[0], threads, runs, fp16_storage, Path(tmp))
        # timings from the target device decide alone: this machine's whole-model time says nothing about it
        while given is None and not _no_slower(choice.model_ms) and choice.table.activation_scales:
            remaining = sorted(
                choice.table.activation_scales, key=lambda name: timings[name].gain_ms if name in timings else math.inf
            )
            moved = remaining[: max(1, len(remaining) // 4)]
            log.info(
                "speed: the INT8 model is still slower than FP32 (%s); FP32 for %s",
                _ratios(choice.model_ms),
                ", ".join(moved),
            )
            choice.model_layers += moved
            choice.table = without_activations(choice.table, moved)
            choice.model_ms = _time_model(model, choice.table, inputs[0], threads, runs, fp16_storage, Path(tmp))
        if min_cosine is not None and choice.model_layers and choice.table.activation_scales:
            # the cosine of what is shipped, not of the table before the whole-model step (and the target again)
            again = auto_fp32(model, choice.table, inputs, min_cosine, task=task, fp16_storage=fp16_storage)
            choice.cosine, choice.table = again.cosine, again.table
            if again.fp32_layers:
                choice.accuracy_layers += again.fp32_layers
                choice.model_ms = _time_model(model, choice.table, inputs[0], threads, runs, fp16_storage, Path(tmp))
    log.info(
        "speed: %d layer(s) FP32 (%d slow in INT8, %d for accuracy, %d for the whole model), INT8/FP32 %s, %.1f s",
        len(choice.fp32_layers),
        len(slow),
        len(choice.accuracy_layers),
        len(choice.model_layers),
        _ratios(choice.model_ms),
        time.perf_counter() - started,
    )
    return choice


def _no_slower(model_ms: Mapping[str, Mapping[int, float]]) -> bool:
    return all(model_ms["int8"][t] <= model_ms["fp32"][t] for t in model_ms["fp32"])


def _ratios(model_ms: Mapping[str, Mapping[int, float]]) -> str:
    return ", ".join(f"{model_ms['int8'][t] / model_ms['fp32'][t]:.3f} at {t} thread(s)" for t in model_ms["fp32"])


def format_choice(choice: SpeedChoice) -> str:
    """The per-layer timings and the decision, for the quantize summary and eval's report."""
    threads = sorted({t for timing in choice.timings.values() for t in timing.fp32_ms})
    reasons = {
        **dict.fromkeys(choice.slow_layers, "FP32: INT8 slower"),
        **dict.fromkeys(choice.accuracy_layers, "FP32: accuracy"),
        **dict.fromkeys(choice.model_layers, "FP32: whole model"),
    }
    head = "".join(f" {'FP32 ms/' + str(t):>10} {'INT8 ms/' + str(t):>10}" for t in threads)
    lines = [f"per-layer time ({choice.source})", f"{'layer':<32}{head}  choice"]
    for name, timing in choice.timings.items():
        cells = "".join(f" {timing.fp32_ms[t]:>10.3f} {timing.int8_ms[t]:>10.3f}" for t in threads)
        lines.append(f"{name:<32}{cells}  {reasons.get(name, 'INT8')}")
    if choice.model_ms:
        lines.append("whole model INT8/FP32: " + _ratios(choice.model_ms))
    if choice.cosine is not None:
        lines.append(f"output cosine {choice.cosine:.6f}")
    return "\n".join(lines)


def layer_times(fp32_param: Path, fp32_bin: Path, int8_param: Path, int8_bin: Path, runs: int = 15) -> LayerTimes:
    """``eval``/``report --layer-times``: every INT8 layer of the INT8 model timed alone against its FP32 self
    (the scales come from the INT8 files)."""
    from int8conv.ncnn.model import read_model

    timings = time_layers(read_model(fp32_param, fp32_bin), table_of(read_model(int8_param, int8_bin)), runs=runs)
    return LayerTimes(PROXY_NOTE, timings)


def format_layer_times(layer_ms: LayerTimes) -> str:
    """The table ``layer_times`` measured, with the layers where INT8 does not pay marked."""
    layers = layer_ms.layers
    slow = [n for n, t in layers.items() if not t.pays]
    threads = sorted({t for timing in layers.values() for t in timing.fp32_ms})
    head = "".join(f" {'FP32 ms/' + str(t):>10} {'INT8 ms/' + str(t):>10}" for t in threads)
    lines = [f"per-layer time of the INT8 layers ({layer_ms.source})", f"  {'layer':<32}{head}"]
    for name, timing in layers.items():
        cells = "".join(f" {timing.fp32_ms[t]:>10.3f} {timing.int8_ms[t]:>10.3f}" for t in threads)
        lines.append(f"  {name:<32}{cells}{'  INT8 slower' if name in slow else ''}")
    lines.append(
        f"  INT8 does not pay for {len(slow)} of {len(layers)} layer(s)"
        + ("; int8conv quantize --optimize speed keeps them FP32" if slow else "")
    )
    return "\n".join(lines)
