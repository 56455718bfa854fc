"""Run ncnn ``.param``/``.bin`` files on the ncnn runtime (PyPI ``ncnn`` bindings).

The runner is how this project proves its ncnn files are right: the same files a user deploys are loaded by
ncnn itself and their outputs compared with Caffe's. fp16/bf16 storage and arithmetic are off, so FP32 runs
match Caffe's float results to 1e-3 and INT8 runs differ from them by quantization only; INT8 runs turn
``use_int8_inference`` on (on x86 fp16 storage changed no timing measured here).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.errors import BackendUnavailable, ModelError

log = logging.getLogger(__name__)


def _ncnn():
    """The ncnn module, or a clear error saying it is missing."""
    try:
        import ncnn
    except ImportError as exc:  # pragma: no cover - ncnn is an install requirement
        raise BackendUnavailable("the ncnn runtime is not installed: pip install ncnn") from exc
    return ncnn


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class NcnnRunner:
    """One loaded ncnn network; ``run`` feeds named CHW inputs and returns named outputs as float32 arrays.

    ``winograd=False`` turns off ncnn's Winograd convolutions: comparing an INT8 model with and without them
    shows whether its 3x3 stride-1 layers overflow in the INT8 Winograd kernel's int32 accumulators.
    ``bin_path=None`` loads zero weights (FP32 only): for shapes, which do not depend on the weights.
    """

    def __init__(
        self, param: str | Path, bin_path: str | Path | None, int8: bool, threads: int = 1, winograd: bool = True
    ) -> None:
        ncnn = _ncnn()
        self.param = Path(param)
        self.bin = None if bin_path is None else Path(bin_path)
        if self.bin is None and int8:
            raise ValueError("an INT8 net needs its .bin: its scales are read from it")
        self.int8 = int8
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.num_threads = threads
        opt.use_int8_inference = int8
        for flag in (
            "use_fp16_storage",
            "use_fp16_packed",
            "use_fp16_arithmetic",
            "use_bf16_storage",
            "use_bf16_packed",
        ):
            setattr(opt, flag, False)
        opt.use_vulkan_compute = False
        opt.use_winograd_convolution = winograd
        if self.net.load_param(str(self.param)) != 0:
            raise ModelError(f"{self.param}: ncnn could not parse this .param file")
        if self.bin is None:
            self.net.load_model(ncnn.DataReaderFromEmpty())  # zero weights: reads nothing, cannot fail
        elif self.net.load_model(str(self.bin)) != 0:
            raise ModelError(f"{self.bin}: ncnn could not load the weights (the .bin does not match {self.param.name})")
        self.input_names: list[str] = list(self.net.input_names())
        self.output_names: list[str] = list(self.net.output_names())
        self._scales: dict[str, float] | None = None  # read from the files when an int8 blob is extracted

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The network outputs for one image (inputs are CHW float32, without the batch axis)."""
        return self.extract(inputs, self.output_names)

    def extract(
        self,
        inputs: Mapping[str, np.ndarray],
        blobs: Iterable[str],
        light: bool | None = None,
        copy: bool = True,
        packed: bool = False,
    ) -> dict[str, np.ndarray]:
        """Any blobs of the network for one image, as float32 arrays in ncnn's (C, H, W) layout.

        A blob that a requantizing INT8 convolution wrote as int8 is dequantized with that layer's top
        scale, so per-layer comparisons see real values. ``light`` (default: only for the outputs) frees each
        blob once consumed; it computes nothing twice only when ``blobs`` come in execution order.
        ``copy=False`` (FP32) returns views of ncnn's own Mats: safe, since ncnn clones a blob that someone
        else still holds before a layer computes in place on it, and the view keeps its Mat alive.
        ``packed=True`` (FP32, no copy) returns each blob's elements in ncnn's packed layout (``elempack``
        channels interleaved), for statistics that do not depend on where an element sits: unpacking every
        blob is a copy that costs about a third of a calibration forward.
        """
        blobs = list(blobs)
        ex = self._extractor(inputs, light=len(blobs) <= len(self.output_names) if light is None else light)
        out: dict[str, np.ndarray] = {}
        for name in blobs:
            view = _packed_view(self._extract(ex, name, packed=True)) if packed and not self.int8 else None
            if view is not None:
                out[name] = view
                continue
            mat = self._extract(ex, name)
            array = np.array(mat, copy=True) if copy or self.int8 else np.asarray(mat)
            if self.int8 and self._scales is None:  # the PyPI runtime hands int8 blobs out as float32
                self._scales = requantized_scales(self.param, self.bin)
            out[name] = dequantize_blob(array, name, self._scales, self.param)
        return out

    def shapes(self, inputs: Mapping[str, np.ndarray], blobs: Iterable[str]) -> dict[str, tuple[int, int, int, int]]:
        """``(dims, w, h, c)`` of blobs as ncnn computes them for these inputs (an empty result has dims 0)."""
        ex = self._extractor(inputs, light=False)
        result = {}
        for name in blobs:
            mat = self._extract(ex, name)
            result[name] = (int(mat.dims), int(mat.w), int(mat.h), int(mat.c))
        return result

    def _extractor(self, inputs: Mapping[str, np.ndarray], light: bool):
        ncnn = _ncnn()
        ex = self.net.create_extractor()
        ex.set_light_mode(light)
        for name in self.input_names:
            if name not in inputs:
                raise ModelError(f"{self.param}: input blob '{name}' was not given (given: {sorted(inputs)})")
            array = np.ascontiguousarray(inputs[name], dtype=np.float32)
            if array.ndim == 4:
                if array.shape[0] != 1:
                    raise ModelError(f"ncnn runs one image at a time; input '{name}' has batch {array.shape[0]}")
                array = array[0]
            ex.input(name, ncnn.Mat(array).clone())
        return ex

    def _extract(self, ex, name: str, packed: bool = False):
        ret, mat = ex.extract(name, 1 if packed else 0)  # type 1: no conversion of packing (or storage type)
        if ret != 0:
            raise ModelError(f"{self.param}: ncnn failed to compute blob '{name}' (error {ret})")
        return mat


def _packed_view(mat) -> np.ndarray | None:
    """A packed fp32 Mat's elements as a float32 array, without a copy: its header is rewritten to ``elempack``
    times as many 4-byte elements per row (the binding only exposes ``elempack == 1``). None when the elements are
    not fp32 (fp16/bf16 storage), which the caller then extracts unpacked."""
    pack = int(mat.elempack)
    if mat.elemsize != 4 * pack:
        return None
    if pack > 1:
        mat.elemsize, mat.cstep, mat.w, mat.elempack = 4, mat.cstep * pack, mat.w * pack, 1
    return np.asarray(mat)


@dataclass
class ValueReader:
    """Named values of an FP32 ncnn model, one image at a time, in Caffe's shapes with the batch axis.

    Picklable: a calibration worker process gets one and opens the files itself (its runner is not pickled).
    ``blobs`` maps each value to the ncnn blob that holds it, ``order`` lists those blobs in execution order
    (light mode then frees every other blob once consumed), ``shapes`` are the Caffe shapes to restore (ncnn drops
    the unit axes of a global pooling output, a 1-D Mat).
    """

    param: Path
    bin: Path
    input: str
    blobs: dict[str, str]
    order: list[str]
    shapes: dict[str, tuple[int, ...]]
    threads: int = 1
    #: what keeps the files alive in this process (a temporary folder), not pickled
    owner: object = field(default=None, repr=False, compare=False)
    _runner: NcnnRunner | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "owner": None, "_runner": None}

    def load(self) -> NcnnRunner:
        """The net, loaded on first use."""
        if self._runner is None:
            self._runner = NcnnRunner(self.param, self.bin, int8=False, threads=self.threads)
        return self._runner

    def forward(self, batch: np.ndarray, packed: bool = False) -> dict[str, np.ndarray]:
        """Run each image of the NCHW ``batch``; one image (how calibration feeds ncnn) costs no copy.

        ``packed=True``: each value's elements as ncnn holds them (``NcnnRunner.extract``), in no Caffe shape: for
        histograms, which only count values."""
        runner = self.load()
        per_image = [
            runner.extract({self.input: image}, self.order, light=True, copy=False, packed=packed) for image in batch
        ]
        result: dict[str, np.ndarray] = {}
        for value, blob in self.blobs.items():
            if blob == self.input:
                result[value] = batch
                continue
            stacked = per_image[0][blob][None] if len(per_image) == 1 else np.stack([o[blob] for o in per_image])
            shape = self.shapes.get(value)
            if not packed and shape is not None and int(np.prod(shape[1:])) == stacked[0].size:
                stacked = stacked.reshape((len(batch), *shape[1:]))
            result[value] = stacked
        return result


def dequantize_blob(array: np.ndarray, name: str, scales: Mapping[str, float] | None, param: Path) -> np.ndarray:
    """A blob as float32: one a requantizing convolution wrote (int8, or as the PyPI runtime hands it out, float32
    holding the int8 values) divided by that layer's top scale."""
    if scales and name in scales:
        return array.astype(np.float32) / scales[name]
    if array.dtype == np.int8:
        raise ModelError(f"{param}: blob '{name}' is int8 but no layer gives its scale")
    return array.astype(np.float32, copy=False)


def requantized_scales(param: Path, bin_path: Path) -> dict[str, float]:
    """Blob -> scale of every int8 blob: tops of convolutions that requantize (``int8_scale_term`` > 100) and
    the tops of the Splits they feed."""
    from int8conv.ncnn.model import read_model

    scales: dict[str, float] = {}
    model = read_model(param, bin_path)
    for layer in model.layers:
        term = layer.params.get(8, 0)
        if layer.type in ("Convolution", "ConvolutionDepthWise") and isinstance(term, int) and term > 100:
            scales[layer.tops[0]] = float(np.asarray(layer.weights[-1].data, dtype=np.float32).reshape(-1)[0])
        elif layer.type == "Split" and layer.bottoms[0] in scales:  # a Split passes the int8 blob on
            scales.update(dict.fromkeys(layer.tops, scales[layer.bottoms[0]]))
    return scales


def time_models(
    pairs: Mapping[str, tuple[Path, Path, bool]],
    inputs: Mapping[str, np.ndarray],
    threads: Iterable[int] = (1, 2),
    runs: int = 10,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[int, float]]:
    """Median ms per image of several models side by side, interleaved so that machine load hits all alike.

    ``pairs`` maps a label to (param, bin, int8). Returns ``{label: {threads: ms}}``. ``clock`` may be
    ``time.process_time`` (CPU time: blind to other processes' load, exact for one thread; with more threads it
    also counts their spinning).
    """
    result: dict[str, dict[int, float]] = {label: {} for label in pairs}
    for count in threads:
        runners = {label: NcnnRunner(p, b, int8, threads=count) for label, (p, b, int8) in pairs.items()}
        for label, ms in interleaved_ms(runners, inputs, runs, warmup, clock).items():
            result[label][count] = ms
            log.debug("%s, %d thread(s): %.2f ms", label, count, ms)
    return result


def interleaved_ms(
    runners: Mapping[str, NcnnRunner],
    inputs: Mapping[str, np.ndarray],
    runs: int,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms per run of loaded networks, their passes alternating so that machine load hits all alike."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(inputs)
    samples: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(max(1, runs)):
        for label, runner in runners.items():
            start = clock()
            runner.run(inputs)
            samples[label].append((clock() - start) * 1000.0)
    return {label: statistics.median(times) for label, times in samples.items()}
