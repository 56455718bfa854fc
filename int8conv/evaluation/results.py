"""What ``eval`` reports, as dataclasses: attributes for Python callers, ``as_dict``/``to_json`` for ``--json``.

The field order is the JSON key order, so ``EvalReport.to_json()`` is the ``eval --json`` file (and
``report``'s ``<name>.json``) exactly. NaN/Inf (a mean IoU with no match) become null there.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.evaluation.speed import LayerTiming


def plain(value: Any) -> Any:
    """``value`` with every record in it as its dict (what ``json.dumps`` takes)."""
    if isinstance(value, JsonRecord):
        return value.as_dict()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def finite_json(value: Any) -> Any:
    """NaN/Inf (e.g. mean IoU with no match) as null, so the JSON is strict."""
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonRecord:
    """A dataclass whose dict is its fields in order (records inside it as their dicts)."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Strict JSON (NaN/Inf as null), indented as ``eval --json`` writes it, without the final newline."""
        return json.dumps(finite_json(self.as_dict()), indent=2)


@dataclass
class ClassifierAgreement(JsonRecord):
    """A classifier's task metric: how often the top-1 class agrees, and the mean |probability difference|."""

    top1_agreement: float
    mean_abs_prob_diff: float


@dataclass
class MapAgreement(JsonRecord):
    """A segmentation map's task metric: IoU of the maps thresholded at ``map_threshold``."""

    map_iou: float
    map_iou_min: float
    map_threshold: float


@dataclass
class DetectionAgreement(JsonRecord):
    """A detector's task metric: candidate boxes matched to the reference's (same class, IoU >= threshold)."""

    precision: float
    recall: float
    mean_iou: float
    reference_detections: int
    candidate_detections: int
    matched: int


TaskAgreement = ClassifierAgreement | MapAgreement | DetectionAgreement


@dataclass
class OutputComparison(JsonRecord):
    """A candidate net against a reference net: output cosine (mean, min over images), task metric, and the
    mean cosine of each quantized layer's top blob."""

    output_blobs: list[str]
    output_cosine: float
    output_cosine_min: float
    task: TaskAgreement
    layer_cosine: dict[str, float]


@dataclass
class Int8Comparison(OutputComparison):
    """INT8 against FP32, with the INT8 Winograd kernel checked against direct convolution (int32 overflow)."""

    winograd_layers: int
    winograd_vs_direct_cosine_min: float | None  # None without such layers


@dataclass
class Difference(JsonRecord):
    """Largest absolute and relative (to the reference's largest magnitude) difference of one output over images."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    note: str = ""  # why the values were not compared (e.g. a different detection count)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        out = np.asarray(candidate, dtype=np.float64).reshape(-1)
        if ref.size != out.size:
            raise ModelError(f"ncnn output has {out.size} values, Caffe's has {ref.size}")
        diff = float(np.abs(ref - out).max(initial=0.0))
        peak = float(np.abs(ref).max(initial=0.0))
        rel = diff / peak if peak > 0 else (0.0 if diff == 0 else math.inf)
        # np.maximum keeps a NaN (an output holding NaN); Python's max would drop it when it comes second
        self.max_abs = float(np.maximum(self.max_abs, diff))
        self.max_rel = float(np.maximum(self.max_rel, rel))

    def as_dict(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, **({"note": self.note} if self.note else {})}


@dataclass
class ModelReport(JsonRecord):
    """What was evaluated, on how many images, with which thresholds: the head of every eval report."""

    model: str
    int8_model: str
    task: str
    images: int
    score_threshold: float
    iou_threshold: float
    int8_layers: int


@dataclass
class LayerTimes(JsonRecord):
    """``--layer-times``: median ms of each INT8 layer alone, FP32 and INT8, per thread count."""

    source: str  # where they were timed (a proxy for the device)
    layers: dict[str, LayerTiming]

    def as_dict(self) -> dict[str, Any]:
        layers = {name: {"fp32": t.fp32_ms, "int8": t.int8_ms} for name, t in self.layers.items()}
        return {"source": self.source, "layers": layers}


@dataclass
class EvalReport(ModelReport):
    """``eval`` on x86: ncnn FP32 against Caffe (None without the reference), INT8 against FP32, and speed."""

    fp32_layers: list[str]  # quantizable layers the INT8 model keeps FP32
    fp32_vs_caffe: dict[str, Difference] | None  # per output; None without the Caffe reference
    fp32_vs_caffe_task: TaskAgreement | None
    int8_vs_fp32: Int8Comparison
    speed_ms: dict[str, dict[int, float]]  # "fp32"/"int8" -> threads -> median ms
    layer_ms: LayerTimes | None = None

    @property
    def speed_ratio(self) -> dict[int, float]:
        """INT8 over FP32 time per thread count (below 1: INT8 is faster)."""
        return {t: self.speed_ms["int8"][t] / ms for t, ms in self.speed_ms["fp32"].items()}

    def as_dict(self) -> dict[str, Any]:
        found = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in _TIMED}
        found["speed_ms"] = {label: {str(t): ms for t, ms in per.items()} for label, per in self.speed_ms.items()}
        found["speed_ratio_int8_over_fp32"] = {str(t): ratio for t, ratio in self.speed_ratio.items()}
        if self.layer_ms is not None:
            found["layer_ms"] = self.layer_ms.as_dict()
        return found


_TIMED = ("speed_ms", "layer_ms")


@dataclass
class ArmTarget(JsonRecord):
    """The ARM run: the emulated CPU, fp16, threads, and what the runner reports (``emulated``, ``ncnn``, ...)."""

    cpu: str
    fp16: bool
    threads: int
    runner: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "fp16": self.fp16, "threads": self.threads, **self.runner}


@dataclass
class ArmDifference(OutputComparison):
    """ARM against x86 for one precision: the comparison plus the largest differences per output."""

    difference: dict[str, Difference]


@dataclass
class ArmTiming(JsonRecord):
    """Median ms per image on ARM (emulation timings under qemu: ``note`` says which)."""

    fp32: float
    int8: float
    note: str


@dataclass
class ArmReport(ModelReport):
    """``eval --arch arm64``: INT8 against FP32 on each architecture (``arm``, ``x86``), ARM against x86 per
    precision (``fp32``, ``int8``)."""

    arm: ArmTarget
    x86_ncnn: str  # the host's ncnn version
    int8_vs_fp32: dict[str, OutputComparison]
    arm_vs_x86: dict[str, ArmDifference]
    arm_ms_per_image: ArmTiming
