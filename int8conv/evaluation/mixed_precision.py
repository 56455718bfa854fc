"""``--auto-fp32 COSINE`` for ncnn: the shared search (``fp32_search``) scored by the ncnn runtime.

A layer is kept in FP32 by omitting its activation line, which is how ncnn2int8 falls back safely.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from int8conv.atomic import scratch_files
from int8conv.evaluation.evaluate import output_view, resolve_task
from int8conv.evaluation.fp32_search import Fp32Choice, search_fp32_layers
from int8conv.evaluation.metrics import output_cosine
from int8conv.ncnn.model import NcnnModel, write_model
from int8conv.ncnn.quantize import quantize_model, table_layers
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.progress import quiet_loggers
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)


@dataclass
class MixedPrecision(Fp32Choice):
    """The search result and the table with the chosen layers' activation lines removed."""

    table: CalibrationTable = field(default_factory=CalibrationTable)


def without_activations(table: CalibrationTable, fp32_layers: Sequence[str]) -> CalibrationTable:
    """The table with the activation lines of ``fp32_layers`` removed (weight lines kept, as ncnn expects)."""
    drop = set(fp32_layers)
    return CalibrationTable(
        dict(table.weight_scales),
        {k: v for k, v in table.activation_scales.items() if k not in drop},
        table.fp32_layers | drop,
    )


class OutputScorer:
    """The output cosine (``metrics.output_cosine``) of an INT8 variant against the FP32 model, on fixed inputs."""

    def __init__(
        self,
        model: NcnnModel,
        inputs: Sequence[dict[str, np.ndarray]],
        workdir: Path,
        task: str,
        fp16_storage: bool,
        threads: int,
    ) -> None:
        self.model, self.inputs, self.workdir = model, list(inputs), workdir
        self.fp16_storage, self.threads = fp16_storage, threads
        self.view = output_view(model, resolve_task(model, task))
        param, binary = workdir / "fp32.param", workdir / "fp32.bin"
        with scratch_files():
            write_model(model, param, binary)
        runner = NcnnRunner(param, binary, int8=False, threads=threads)
        self.reference = [self.view.parts(runner.extract(x, self.view.blobs)) for x in self.inputs]
        self.runs = 0

    def __call__(self, table: CalibrationTable) -> float:
        param, binary = self.workdir / "int8.param", self.workdir / "int8.bin"
        with quiet_loggers("int8conv.ncnn.quantize"), scratch_files():  # the final quantization says it once
            write_model(quantize_model(self.model, table, self.fp16_storage), param, binary)
        runner = NcnnRunner(param, binary, int8=True, threads=self.threads)
        self.runs += 1
        candidate = [self.view.parts(runner.extract(x, self.view.blobs)) for x in self.inputs]
        return output_cosine(self.reference, candidate)


def auto_fp32(
    model: NcnnModel,
    table: CalibrationTable,
    inputs: Sequence[dict[str, np.ndarray]],
    target: float,
    task: str = "auto",
    fp16_storage: bool = True,
    threads: int = 1,
) -> MixedPrecision:
    """Choose the FP32 layers so that the output cosine (``metrics.output_cosine``: worst image) reaches ``target``.

    The output cosine is ``evaluate.OutputView``'s (detectors: without the background class).
    """
    candidates = [layer.name for layer in table_layers(model, table)]
    with tempfile.TemporaryDirectory(prefix="int8conv-autofp32-") as tmp:
        score = OutputScorer(model, inputs, Path(tmp), task, fp16_storage, threads)
        choice = search_fp32_layers(candidates, lambda fp32: score(without_activations(table, fp32)), target)
        log.info("auto-fp32: %d ncnn runs, %d layer(s) kept FP32", score.runs, len(choice.fp32_layers))
    found = {item.name: getattr(choice, item.name) for item in fields(Fp32Choice)}
    return MixedPrecision(**found, table=without_activations(table, choice.fp32_layers))
