"""``--auto-fp32 COSINE``: keep the layers that hurt the output most in FP32, until the output cosine is met.

Each quantized layer's contribution is measured alone: the model with ONLY that layer in INT8 is run on a few
images and its output cosine against FP32 recorded (one ncnn run per layer; errors of different layers do
not mask each other, as they would when dropping one layer from an all-INT8 model). Layers are then moved
to FP32 most harmful first; the smallest such prefix that reaches the target is found with a doubling then
bisecting search over the prefix length (about 2 log2(n) more runs). A layer is kept in FP32 by omitting
its activation line, which is how ncnn2int8 falls back safely.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .evaluate import output_view, resolve_task
from .ncnn.model import NcnnModel, write_model
from .ncnn.quantize import QUANTIZABLE, quantize_model
from .ncnn.runtime import NcnnRunner
from .progress import progress
from .table import CalibrationTable

log = logging.getLogger(__name__)


@dataclass
class MixedPrecision:
    """The reduced table and how it was chosen."""

    table: CalibrationTable
    fp32_layers: list[str]
    cosine_all_int8: float
    cosine: float
    target: float
    sensitivity: dict[str, float] = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return self.cosine >= self.target


def without_activations(table: CalibrationTable, fp32_layers: Sequence[str]) -> CalibrationTable:
    """The table with the activation lines of ``fp32_layers`` removed (weight lines kept, as ncnn expects)."""
    drop = set(fp32_layers)
    return CalibrationTable(dict(table.weight_scales),
                            {k: v for k, v in table.activation_scales.items() if k not in drop})


class _Scorer:
    """Mean output cosine of an INT8 variant against the FP32 model, on fixed inputs."""

    def __init__(self, model: NcnnModel, inputs: Sequence[dict[str, np.ndarray]], workdir: Path,
                 task: str, fp16_storage: bool, threads: int) -> None:
        self.model, self.inputs, self.workdir = model, list(inputs), workdir
        self.fp16_storage, self.threads = fp16_storage, threads
        self.view = output_view(model, resolve_task(model, task))
        param, binary = workdir / "fp32.param", workdir / "fp32.bin"
        write_model(model, param, binary)
        runner = NcnnRunner(param, binary, int8=False, threads=threads)
        self.reference = [runner.extract(x, self.view.blobs) for x in self.inputs]
        self.runs = 0

    def __call__(self, table: CalibrationTable) -> float:
        param, binary = self.workdir / "int8.param", self.workdir / "int8.bin"
        write_model(quantize_model(self.model, table, self.fp16_storage), param, binary)
        runner = NcnnRunner(param, binary, int8=True, threads=self.threads)
        self.runs += 1
        return float(np.mean([self.view.cosine(ref, runner.extract(x, self.view.blobs))
                              for ref, x in zip(self.reference, self.inputs)]))


def auto_fp32(model: NcnnModel, table: CalibrationTable, inputs: Sequence[dict[str, np.ndarray]], target: float,
              task: str = "auto", fp16_storage: bool = True, threads: int = 1) -> MixedPrecision:
    """Choose the FP32 layers so that the mean output cosine over ``inputs`` reaches ``target``.

    The output cosine is ``evaluate.OutputView``'s (detectors: without the background class).
    """
    if not 0 < target <= 1:
        raise ValueError(f"--auto-fp32 takes a cosine in (0, 1], not {target}")
    candidates = [layer.name for layer in model.layers if layer.type in QUANTIZABLE
                  and layer.name in table.activation_scales and layer.name in table.weight_scales]
    with tempfile.TemporaryDirectory(prefix="int8conv-autofp32-") as tmp:
        score = _Scorer(model, inputs, Path(tmp), task, fp16_storage, threads)
        full = score(table)
        log.info("all %d layers INT8: output cosine %.6f (target %g)", len(candidates), full, target)
        if full >= target or not candidates:
            return MixedPrecision(table, [], full, full, target)
        sensitivity = {}
        for name in progress(candidates, desc="layer sensitivity", unit="layer"):
            others = [c for c in candidates if c != name]
            sensitivity[name] = score(without_activations(table, others))
        ranked = sorted(candidates, key=lambda name: sensitivity[name])
        cache: dict[int, float] = {0: full}

        def with_fp32(count: int) -> float:
            if count not in cache:
                cache[count] = score(without_activations(table, ranked[:count]))
                log.info("%d most sensitive layer(s) in FP32: output cosine %.6f", count, cache[count])
            return cache[count]

        low, high = 0, 1
        while high < len(ranked) and with_fp32(high) < target:
            low, high = high, min(2 * high, len(ranked))
        if with_fp32(high) >= target:
            while high - low > 1:
                middle = (low + high) // 2
                if with_fp32(middle) >= target:
                    high = middle
                else:
                    low = middle
        else:  # unreachable (fp16 storage alone can cost that much): keep the best prefix measured
            high = min(cache, key=lambda count: (-cache[count], count))
            log.warning("output cosine %g is out of reach (%.6f with every layer FP32); keeping the best "
                        "measured choice: %d layer(s) FP32, cosine %.6f", target, cache[len(ranked)], high,
                        cache[high])
        log.info("auto-fp32: %d ncnn runs, %d layer(s) kept FP32", score.runs, high)
        return MixedPrecision(without_activations(table, ranked[:high]), ranked[:high], full, cache[high], target,
                              sensitivity)
