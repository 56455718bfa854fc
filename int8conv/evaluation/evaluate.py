"""Accuracy and speed of the ncnn models: ncnn FP32 against Caffe FP32, ncnn INT8 against ncnn FP32.

The numbers that decide whether an INT8 deployment is usable:

- ncnn FP32 vs the Caffe FP32 engine (the converter's correctness): max abs / relative difference per output;
- INT8 vs FP32: cosine similarity per quantized layer (its top blob in both ncnn nets) and at the outputs,
  plus a task metric: top-1 agreement and mean |probability difference| for classifiers, precision/recall
  (same class, IoU >= 0.5, score >= threshold) and mean IoU for SSD (DetectionOutput) and host-decoded
  detectors (UltraFace ``scores``/``boxes``, RetinaFace, YOLO face heads: ``host_decoders``), and for
  segmentation maps the IoU of the maps thresholded at 0.5;
- speed: median ms per image of ncnn FP32 and INT8, side by side, for 1 and 2 threads.

For detectors the "output" cosine is taken on what feeds the box decoding, without the background class
(see ``OutputView``), since the decoded boxes of two nets cannot be compared element by element.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from int8conv.caffe.layers import types_where
from int8conv.calibration.preprocess import ImageTally, Preprocess, readable_images
from int8conv.errors import ImageError, ModelError
from int8conv.evaluation.detection import Detections, MatchTally, from_detection_output
from int8conv.evaluation.host_decoders import (
    DEFAULT_SCORES,
    HOST_TASKS,
    is_retinaface,
    make_host_decoder,
    retinaface_outputs,
)
from int8conv.evaluation.metrics import blob_cosine, cosine, lowest, worst_first
from int8conv.evaluation.results import (
    ClassifierAgreement,
    DetectionAgreement,
    Difference,
    EvalReport,
    Int8Comparison,
    MapAgreement,
    OutputComparison,
    TaskAgreement,
)
from int8conv.ncnn.model import NcnnLayer, NcnnModel, read_model
from int8conv.ncnn.quantize import QUANTIZABLE, int8_layers, is_int8
from int8conv.ncnn.runtime import NcnnRunner, time_models
from int8conv.progress import progress

log = logging.getLogger(__name__)
Compared = TypeVar("Compared", bound=OutputComparison)

TASKS = ("auto", "classifier", "ssd", *HOST_TASKS, "segmentation")
#: A segmentation map's pixel is "on" above this value (a sigmoid map).
MAP_THRESHOLD = 0.5
#: ncnn's activation_type (param 9) of a fused sigmoid.
SIGMOID_ACTIVATION = 4
#: Layers that carry values unchanged (the registry's value-preserving Caffe types keep their names in ncnn).
VALUE_PRESERVING = types_where("value_preserving")


def detect_task(model: NcnnModel) -> str:
    """From the outputs: ssd (a DetectionOutput layer), host-decoded (UltraFace ``scores`` + ``boxes``),
    retinaface (its score/box/landmark maps per stride), yoloface (raw 1x1-convolution heads of 3 anchors x
    (4 box + objectness + 1 class) channels), segmentation (one sigmoid map), else classifier."""
    outputs = model.output_names
    if any(layer.type == "DetectionOutput" for layer in model.layers):
        return "ssd"
    if {"scores", "boxes"} <= set(outputs):
        return "host-decoded"
    if is_retinaface(outputs):
        return "retinaface"
    producers = [model.producer(name) for name in outputs]
    if len(outputs) > 1 and all(
        p is not None and p.type == "Convolution" and int(p.params.get(0, 0)) == 18 and not int(p.params.get(9, 0))
        for p in producers
    ):
        return "yoloface"
    if (
        len(outputs) == 1
        and producers[0] is not None
        and (producers[0].type == "Sigmoid" or int(producers[0].params.get(9, 0)) == SIGMOID_ACTIVATION)
    ):
        return "segmentation"
    return "classifier"


def _is_prior(model: NcnnModel, blob: str) -> bool:
    """True for blobs that only depend on shapes (PriorBox outputs and their concatenations)."""
    producer = model.producer(blob)
    if producer is None:
        return False
    if producer.type == "PriorBox":
        return True
    return producer.type in VALUE_PRESERVING and all(_is_prior(model, b) for b in producer.bottoms)


@dataclass
class OutputView:
    """What "the output" is when INT8 and FP32 outputs are compared by cosine.

    Classifiers: the outputs. Detectors: what feeds the box decoding (DetectionOutput's loc and conf inputs,
    or UltraFace's ``boxes`` and ``scores``) with the background class left out of the class scores: the
    background probability is ~1 at almost every anchor, so it would dominate the norm and hide lost objects.
    """

    blobs: list[str]
    #: blob -> classes per row of its class scores (None: the array's last axis); column 0 is dropped
    class_scores: dict[str, int | None] = field(default_factory=dict)
    #: blob -> leading channels to drop (score maps whose first channels are the background, as RetinaFace's)
    background_channels: dict[str, int] = field(default_factory=dict)

    def parts(self, outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One flat array per blob, class scores without the background column or channels."""
        parts = []
        for blob in self.blobs:
            array = outputs[blob]
            if blob in self.class_scores:
                classes = self.class_scores[blob] or array.shape[-1]
                array = array.reshape(-1, classes)[:, 1:]
            if blob in self.background_channels:
                array = array.reshape(array.shape[-3], -1)[self.background_channels[blob] :]
            parts.append(array.reshape(-1))
        return parts

    def cosine(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> float:
        """The output cosine: the lowest cosine among the blobs (box regressions outweigh class scores in
        norm, so one cosine over their concatenation would hide lost objects too)."""
        return blob_cosine(self.parts(reference), self.parts(candidate))


def output_view(model: NcnnModel, task: str) -> OutputView:
    """The comparison view of ``model`` for ``task`` (one of TASKS without auto)."""
    if task == "ssd":
        detection = next(layer for layer in model.layers if layer.type == "DetectionOutput")  # resolve_task checks
        loc, conf = detection.bottoms[0], detection.bottoms[1]
        return OutputView([loc, conf], {conf: int(detection.params.get(0, 0))})
    if task == "host-decoded":
        return OutputView(["boxes", "scores"], {"scores": None})
    if task == "retinaface":
        names = [retinaface_outputs(stride) for stride in (32, 16, 8)]
        return OutputView(
            [name for triple in names for name in triple], background_channels={scores: 2 for scores, _, _ in names}
        )
    return OutputView(list(model.output_names))


def resolve_task(model: NcnnModel, task: str) -> str:
    """``auto`` -> the detected task; anything else is checked against the model."""
    if task not in TASKS:
        raise ModelError(f"--task must be one of {', '.join(TASKS)}, not '{task}'")
    task = detect_task(model) if task == "auto" else task
    detections = [name for name in model.output_names if model.producer(name).type == "DetectionOutput"]
    if detections and task != "ssd":  # its row count follows the detections: no cosine or top-1 reads it
        raise ModelError(
            f"--task {task}: output '{detections[0]}' is a DetectionOutput's detection list, whose length varies "
            "from run to run: use --task ssd (or auto)"
        )
    if task == "ssd" and not any(layer.type == "DetectionOutput" for layer in model.layers):
        raise ModelError("--task ssd needs a DetectionOutput layer; this model has none")
    if task == "host-decoded" and not {"scores", "boxes"} <= set(model.output_names):
        raise ModelError(
            f"a host-decoded detector must output 'scores' and 'boxes'; this one outputs {model.output_names}"
        )
    if task == "retinaface" and not is_retinaface(model.output_names):
        raise ModelError(
            f"--task retinaface needs the outputs {', '.join(retinaface_outputs(8))} (and strides 16, "
            f"32); this model outputs {model.output_names}"
        )
    if task == "segmentation" and len(model.output_names) != 1:
        raise ModelError(f"--task segmentation compares one output map; this model has {model.output_names}")
    return task


def score_threshold(task: str, threshold: float | None) -> float:
    """The detection score threshold: the one given, else the task's upstream default (0.5 unless noted)."""
    return threshold if threshold is not None else DEFAULT_SCORES.get(task, 0.5)


def _detection_difference(diff: Difference, reference: Detections, candidate: Detections) -> None:
    """Detections compared row by row after sorting by score; a different count is noted, not compared.

    Caffe pads DetectionOutput to keep_top_k rows and ncnn does not, so only detections above the score
    threshold are compared.
    """
    if len(reference) != len(candidate):
        diff.note = f"detection count differs ({len(reference)} vs {len(candidate)})"
        return
    order_r, order_c = np.argsort(-reference.scores), np.argsort(-candidate.scores)
    rows_r = np.column_stack([reference.scores[order_r], reference.boxes[order_r]])
    rows_c = np.column_stack([candidate.scores[order_c], candidate.boxes[order_c]])
    if rows_r.size:
        diff.add(rows_r, rows_c)


@dataclass
class Running:
    """Mean and minimum of a per-image quantity (a NaN value makes both NaN)."""

    total: float = 0.0
    count: int = 0
    low: float = math.inf

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1
        self.low = lowest((self.low, value))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass
class TaskMetric:
    """The task metric of one comparison (INT8 vs FP32, or ncnn FP32 vs Caffe)."""

    task: str
    top1_agree: int = 0
    images: int = 0
    prob_diff: Running = field(default_factory=Running)
    matches: MatchTally = field(default_factory=MatchTally)
    map_iou: Running = field(default_factory=Running)

    def summary(self) -> TaskAgreement:
        if self.task == "classifier":
            return ClassifierAgreement(self.top1_agree / self.images if self.images else math.nan, self.prob_diff.mean)
        if self.task == "segmentation":
            return MapAgreement(self.map_iou.mean, self.map_iou.low, MAP_THRESHOLD)
        m = self.matches
        return DetectionAgreement(m.precision, m.recall, m.mean_iou, m.reference, m.candidate, m.matched)


@dataclass
class EvalConfig:
    """What to evaluate and how; ``caffe_forward`` is the FP32 reference engine (``batch, values -> arrays``)."""

    fp32_param: Path
    fp32_bin: Path
    int8_param: Path
    int8_bin: Path
    preprocess: Preprocess
    images: Sequence[Path]
    caffe_forward: Callable[[np.ndarray, Sequence[str]], dict[str, np.ndarray]] | None = None
    task: str = "auto"
    score_threshold: float | None = None  # None: the task's default (``score_threshold``)
    iou_threshold: float = 0.5
    threads: Sequence[int] = (1, 2)
    timing_runs: int = 10


def task_outputs(
    task: str, model: NcnnModel, size: tuple[int, int], threshold: float
) -> Callable[[dict[str, np.ndarray]], Detections | np.ndarray]:
    """What the task metric compares, from one image's outputs: detections (thresholded), or the output
    vector (classifier) or map (segmentation)."""
    if task == "ssd":
        name = next(n for n in model.output_names if model.producer(n).type == "DetectionOutput")
        return lambda outputs: from_detection_output(outputs[name]).above(threshold)
    if task in HOST_TASKS:
        return make_host_decoder(task, model.output_names, *size, threshold)
    # a net of regressions only (MTCNN det4) has no class output: its first output, and the cosine says more
    name = class_output(model) or model.output_names[0]
    return lambda outputs: np.asarray(outputs[name]).reshape(-1)


def class_output(model: NcnnModel) -> str | None:
    """The output a classifier's top-1 is read from: a Softmax output (MTCNN's ``prob1``; its other outputs are box
    regressions), else the only output; None for several outputs and no Softmax (MTCNN det4's five landmark-offset
    pairs, whose argmax means nothing)."""
    softmax = [name for name in model.output_names if model.producer(name).type == "Softmax"]
    if softmax:
        return softmax[0]
    return model.output_names[0] if len(model.output_names) == 1 else None


def map_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = MAP_THRESHOLD) -> float:
    """IoU of two maps' pixels above ``threshold`` (1.0 when neither has any)."""
    on_r, on_c = np.asarray(reference) > threshold, np.asarray(candidate) > threshold
    union = int(np.count_nonzero(on_r | on_c))
    return int(np.count_nonzero(on_r & on_c)) / union if union else 1.0


def update_metric(metric: TaskMetric, reference, candidate, iou_threshold: float) -> None:
    """Add one image: reference and candidate as ``task_outputs`` gives them."""
    metric.images += 1
    if metric.task == "classifier":
        metric.top1_agree += int(np.argmax(reference) == np.argmax(candidate))
        metric.prob_diff.add(float(np.abs(reference - candidate).mean()))
    elif metric.task == "segmentation":
        metric.map_iou.add(map_iou(reference, candidate))
    else:
        metric.matches.add(reference, candidate, iou_threshold)


@dataclass
class Comparison:
    """A candidate net's outputs against a reference net's, image by image: the output cosine (``OutputView``),
    the task metric (on what ``decode``, a ``task_outputs`` function, makes of them) and the cosine of each
    quantized layer's top blob (``tops``: layer -> blob)."""

    task: str
    view: OutputView
    decode: Callable[[dict[str, np.ndarray]], Detections | np.ndarray]
    iou_threshold: float
    tops: dict[str, str]
    output: Running = field(default_factory=Running)

    def __post_init__(self) -> None:
        self.layers = {name: Running() for name in self.tops}
        self.metric = TaskMetric(self.task)

    def add(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Detections | np.ndarray:
        """Add one image; returns the decoded reference, for callers that compare it with more."""
        for name, top in self.tops.items():
            self.layers[name].add(cosine(reference[top], candidate[top]))
        self.output.add(self.view.cosine(reference, candidate))
        decoded = self.decode(reference)
        update_metric(self.metric, decoded, self.decode(candidate), self.iou_threshold)
        return decoded

    def summary(self, kind: type[Compared] = OutputComparison, **more) -> Compared:
        """The comparison as ``kind``: ``OutputComparison`` or a subclass whose own fields ``more`` gives."""
        layers = {name: running.mean for name, running in self.layers.items()}
        return kind(self.view.blobs, self.output.mean, self.output.low, self.metric.summary(), layers, **more)


def _compare_with_caffe(
    differences: dict[str, Difference],
    caffe: dict[str, np.ndarray],
    ncnn: dict[str, np.ndarray],
    model: NcnnModel,
    task: str,
    score_threshold: float,
) -> None:
    """Add one image's ncnn FP32 vs Caffe differences, output by output."""
    for name, diff in differences.items():
        if name not in caffe:
            diff.note = "not an output of the Caffe net"
        elif task == "ssd" and model.producer(name).type == "DetectionOutput":
            _detection_difference(
                diff,
                from_detection_output(caffe[name]).above(score_threshold),
                from_detection_output(ncnn[name]).above(score_threshold),
            )
        else:
            diff.add(caffe[name], ncnn[name])


@dataclass
class ModelPair:
    """The ncnn FP32/INT8 pair of an ``EvalConfig`` and how their outputs are compared: what the x86 evaluation
    and the ARM one (``int8conv.arm.evaluate``) both start from."""

    config: EvalConfig
    fp32: NcnnModel
    int8: NcnnModel
    task: str
    view: OutputView
    threshold: float  # the detection score threshold (``score_threshold``)
    decode: Callable[[dict[str, np.ndarray]], Detections | np.ndarray]
    int8_tops: dict[str, str]  # quantized layer -> its top blob, in execution order

    @classmethod
    def read(cls, config: EvalConfig) -> ModelPair:
        fp32, int8 = read_model(config.fp32_param, config.fp32_bin), read_model(config.int8_param, config.int8_bin)
        task = resolve_task(fp32, config.task)
        threshold = score_threshold(task, config.score_threshold)
        decode = task_outputs(task, fp32, config.preprocess.size, threshold)
        tops = {name: int8.layer(name).tops[0] for name in int8_layers(int8)}
        return cls(config, fp32, int8, task, output_view(fp32, task), threshold, decode, tops)

    def comparison(self, tops: dict[str, str]) -> Comparison:
        """A fresh comparison of a candidate net against a reference net, with the cosines of ``tops``."""
        return Comparison(self.task, self.view, self.decode, self.config.iou_threshold, tops)

    def head(self, images: int) -> dict[str, Any]:
        """The ``ModelReport`` fields of a report on ``images`` images."""
        config = self.config
        return {
            "model": str(config.fp32_param),
            "int8_model": str(config.int8_param),
            "task": self.task,
            "images": images,
            "score_threshold": self.threshold,
            "iou_threshold": config.iou_threshold,
            "int8_layers": len(self.int8_tops),
        }


def evaluate(config: EvalConfig) -> EvalReport:
    """Run every image through Caffe FP32 (if given), ncnn FP32 and ncnn INT8; return the report.

    A quantized layer's cosine compares its top blob in both nets; when the layer requantizes its output
    (fused with the next INT8 convolution) the blob is int8 and is compared after dequantization, so its
    cosine includes the clipping at the next layer's input threshold.
    """
    pair = ModelPair.read(config)
    if not pair.int8_tops:
        log.warning("%s has no INT8 layer", config.int8_param)
    task, view, threshold, decode, int8_tops = pair.task, pair.view, pair.threshold, pair.decode, pair.int8_tops

    fp32 = NcnnRunner(config.fp32_param, config.fp32_bin, int8=False)
    int8 = NcnnRunner(config.int8_param, config.int8_bin, int8=True)
    winograd_layers = winograd_int8_layers(pair.int8)
    direct = NcnnRunner(config.int8_param, config.int8_bin, int8=True, winograd=False) if winograd_layers else None
    winograd_cos = Running()
    wanted = list(dict.fromkeys(view.blobs + fp32.output_names + list(int8_tops.values())))
    quality = pair.comparison(int8_tops)
    vs_caffe = {name: Difference() for name in fp32.output_names}
    caffe_metric = TaskMetric(task)
    first_input = None
    tally = ImageTally()
    for _, image in readable_images(progress(config.images, desc="evaluating", unit="img"), tally):
        data = config.preprocess.apply(image)
        inputs = {fp32.input_names[0]: data}
        first_input = first_input or inputs
        ref = fp32.extract(inputs, wanted)
        out = int8.extract(inputs, wanted)
        ref_task = quality.add(ref, out)
        if direct is not None:
            winograd_cos.add(view.cosine(direct.extract(inputs, view.blobs), out))
        if config.caffe_forward is not None:
            caffe = config.caffe_forward(data[None], fp32.output_names)
            _compare_with_caffe(vs_caffe, caffe, ref, pair.fp32, task, threshold)
            update_metric(caffe_metric, decode({k: v[0] for k, v in caffe.items()}), ref_task, config.iou_threshold)
    if tally.used == 0:
        raise ImageError(f"none of the {len(config.images)} evaluation images could be read")

    timed = {"fp32": (config.fp32_param, config.fp32_bin, False), "int8": (config.int8_param, config.int8_bin, True)}
    speed = time_models(timed, first_input, threads=config.threads, runs=config.timing_runs)
    with_caffe = config.caffe_forward is not None
    return EvalReport(
        **pair.head(tally.used),
        fp32_layers=[layer.name for layer in pair.int8.layers if layer.type in QUANTIZABLE and not is_int8(layer)],
        fp32_vs_caffe=vs_caffe if with_caffe else None,
        fp32_vs_caffe_task=caffe_metric.summary() if with_caffe else None,
        int8_vs_fp32=quality.summary(
            Int8Comparison,
            winograd_layers=len(winograd_layers),
            winograd_vs_direct_cosine_min=winograd_cos.low if winograd_layers else None,
        ),
        speed_ms=speed,
    )


def winograd_int8_layers(model: NcnnModel) -> list[str]:
    """INT8 convolutions that ncnn runs with its INT8 Winograd kernel (3x3, stride 1, dilation 1, and more than 8
    input or output channels: ncnn's ``prefer_winograd``)."""

    def wide(layer: NcnnLayer) -> bool:
        num_output = int(layer.params.get(0, 0))
        num_input = int(layer.params.get(6, 0)) // max(9 * num_output, 1)  # weight_data_size of a 3x3 kernel
        return num_input > 8 or num_output > 8

    def geometry(layer: NcnnLayer) -> tuple[int, ...]:
        p = layer.params
        kernel_w, stride_w, dilation_w = int(p.get(1, 0)), int(p.get(3, 1)), int(p.get(2, 1))
        return (
            kernel_w,
            int(p.get(11, kernel_w)),
            stride_w,
            int(p.get(13, stride_w)),
            dilation_w,
            int(p.get(12, dilation_w)),
        )

    return [
        layer.name
        for layer in model.layers
        if layer.type == "Convolution" and is_int8(layer) and geometry(layer) == (3, 3, 1, 1, 1, 1) and wide(layer)
    ]


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric with ``digits`` decimals; "n/a" for a missing or NaN one."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_report(report: EvalReport, worst_layers: int = 10) -> str:
    """The report as aligned text tables."""
    lines = [
        f"model      {report.model}",
        f"int8       {report.int8_model} ({report.int8_layers} INT8 layers"
        + (f", FP32: {', '.join(report.fp32_layers)})" if report.fp32_layers else ")"),
        f"task       {report.task}   images {report.images}",
    ]
    if report.fp32_vs_caffe is not None:
        lines += ["", "ncnn FP32 vs Caffe FP32", f"  {'output':<28} {'max abs':>12} {'max rel':>12}"]
        for name, d in report.fp32_vs_caffe.items():
            lines.append(f"  {name:<28} {d.max_abs:>12.3e} {d.max_rel:>12.3e}  {d.note}".rstrip())
        lines.append("  task: " + task_text(report.fp32_vs_caffe_task))
    q = report.int8_vs_fp32
    lines += [
        "",
        "ncnn INT8 vs ncnn FP32",
        f"  output cosine   mean {fmt(q.output_cosine)}  min {fmt(q.output_cosine_min)}  ({', '.join(q.output_blobs)})",
        "  task: " + task_text(q.task),
    ]
    if q.winograd_layers:
        lines.append(
            f"  INT8 Winograd vs direct convolution: output cosine min {q.winograd_vs_direct_cosine_min:.6f} "
            f"({q.winograd_layers} 3x3 stride-1 INT8 layers; below 0.9999 means int32 overflow: "
            "keep the default Winograd weight bound)"
        )
    if q.layer_cosine:
        ranked = sorted(q.layer_cosine.items(), key=lambda kv: worst_first(kv[1]))[:worst_layers]
        lines.append(f"  lowest per-layer cosine ({len(ranked)} of {len(q.layer_cosine)}):")
        lines += [f"    {name:<32} {fmt(value)}" for name, value in ranked]
    lines += ["", f"speed (median ms/image)  {'threads':>7} {'FP32':>9} {'INT8':>9} {'INT8/FP32':>10}"]
    for threads, ratio in report.speed_ratio.items():
        lines.append(
            f"{'':<24} {threads:>7} {report.speed_ms['fp32'][threads]:>9.2f} "
            f"{report.speed_ms['int8'][threads]:>9.2f} {ratio:>10.3f}"
        )
    slower = [str(threads) for threads, ratio in report.speed_ratio.items() if ratio > 1.0]
    if slower:
        lines.append(
            f"  INT8 is slower than FP32 here at {', '.join(slower)} thread(s): int8conv quantize --optimize speed "
            "keeps FP32 the layers where INT8 does not pay (--layer-timings: timings from the target device)"
        )
    if report.layer_ms is not None:
        from int8conv.evaluation.speed import format_layer_times

        lines += ["", format_layer_times(report.layer_ms)]
    return "\n".join(lines)


def task_text(metric: TaskAgreement) -> str:
    """A task metric in one line."""
    if isinstance(metric, ClassifierAgreement):
        return f"top-1 agreement {fmt(metric.top1_agreement)}, mean |prob diff| {fmt(metric.mean_abs_prob_diff, 5)}"
    if isinstance(metric, MapAgreement):
        return f"IoU of the maps > {metric.map_threshold}: mean {fmt(metric.map_iou)}, min {fmt(metric.map_iou_min)}"
    return (
        f"precision {fmt(metric.precision)}, recall {fmt(metric.recall)}, mean IoU "
        f"{fmt(metric.mean_iou)} ({metric.matched} matched of {metric.reference_detections} "
        f"reference / {metric.candidate_detections} candidate detections)"
    )
