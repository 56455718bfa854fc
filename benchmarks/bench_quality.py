"""INT8 quality per calibration method on every shared model, judged on images NOT used for calibration.

    python benchmarks/bench_quality.py [--models res10 ultraface] [--methods kl aciq eq] [--shared ../shared]
        [--qdq METHOD [--bounds]] [--equalize] [--auto-fp32 COSINE]

Each image folder is split in two: even positions calibrate, odd positions judge, so no judged image was
seen by the calibration. Per model the FP32 statistics are collected once (OpenCV engine) and shared by every
method; the calibration time of a method is that pass plus its own table time (for ``eq``: plus its search; for
``auto``: plus its ncnn runs on some of the calibration images).
Judging runs the ncnn runtime, INT8 against FP32, with ``int8conv.evaluation.evaluate``'s task metrics: detectors
precision/recall of the INT8 detections against FP32 ones (score >= 0.5, same label, IoU >= 0.5), classifiers
top-1 agreement and mean output cosine (a net without a class output, MTCNN det4's landmark regressions: the
cosine alone), maps the IoU and mean output cosine; a line below each model's row gives every column's mean /
worst-image output cosine, and for detectors another the counts behind precision and recall (FP32 detections, INT8
detections, matched: what one box is worth). No layer is kept FP32 but those ncnn's INT8 model keeps FP32 whatever
the table (the ShuffleNet's grouped convolutions). The last column is the metric's noise floor: FP32 against FP32
on the judged images moved by -1, 0 or +1 pixel level per value, an invisible change. ``--qdq METHOD`` adds that
method's Q/DQ ONNX under onnxruntime (worst and mean per-image output cosine against the FP32 ONNX, also with
ncnn's FP32 layers quantized, and the ncnn INT8 model's worst image on the same outputs; detectors: the Q/DQ
detections' precision/recall against the FP32 ONNX's); ``--equalize`` calibrates the model ``int8conv equalize``
makes, judged against the original FP32 model; ``--auto-fp32 COSINE`` runs quantize's FP32-layer search on each
table (on auto's validation images) and judges the mixed model. ``--bounds`` (with ``--qdq``) adds two experiments
that bound what any table can do: the method's table with every weight at 8 bits, run on ncnn with Winograd off
(nothing can overflow), and the Q/DQ ONNX with per-channel activation scales, which neither ncnn's table nor
TensorRT's per-tensor Q/DQ can hold.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8conv import pipeline  # noqa: E402
from int8conv.caffe.graph import load_graph  # noqa: E402
from int8conv.calibration.adaround import adaround_images, calibrate_adaround  # noqa: E402
from int8conv.calibration.auto_select import AUTO_METHOD, calibrate_auto, validation_images  # noqa: E402
from int8conv.calibration.calibrate import TableRules, all_values, build_table, calibration_values, model_identity  # noqa: E402
from int8conv.calibration.histograms import CalibrationStatistics  # noqa: E402
from int8conv.calibration.preprocess import list_images, readable_images  # noqa: E402
from int8conv.calibration.scale_search import SEARCH_METHODS, calibrate_eq  # noqa: E402
from int8conv.engines import make_engine  # noqa: E402
from int8conv.errors import Int8ConvError  # noqa: E402
from int8conv.evaluation.detection import from_detection_output  # noqa: E402
from int8conv.evaluation.evaluate import (  # noqa: E402
    HOST_TASKS,
    Running,
    TaskMetric,
    class_output,
    output_view,
    resolve_task,
    score_threshold,
    task_outputs,
    update_metric,
)
from int8conv.evaluation.metrics import blob_cosine  # noqa: E402
from int8conv.evaluation.mixed_precision import auto_fp32  # noqa: E402
from int8conv.ncnn.convert import convert_graph  # noqa: E402
from int8conv.ncnn.model import write_model  # noqa: E402
from int8conv.ncnn.quantize import quantize_model  # noqa: E402
from int8conv.ncnn.runtime import NcnnRunner  # noqa: E402
from int8conv.tensorrt.onnx_export import export_onnx  # noqa: E402
from int8conv.tensorrt.qdq import OutputCosine, insert_qdq  # noqa: E402
from int8conv.tensorrt.ranges import histogram_method, layer_input_ranges, table_ranges, tensor_ranges, value_ranges  # noqa: E402
from int8conv.tensorrt.ssd_host import detection_output  # noqa: E402
from int8conv.zoo import MODELS, model_input  # noqa: E402

FOLDERS = ("faces", "voc_coco_detection", "imagenet_samples_200", "skimage")
IOU_THRESHOLD = 0.5
DEFAULT_METHODS = ("kl", "aciq", "mse", "eq", "eq+bc", "auto", "auto+adaround", "eq+bc+adaround")
#: a method's suffix for learned weight rounding after it (``--adaround``; with ``+bc``: bias correction after it)
ADAROUND = "+adaround"
#: the column of FP32 against itself on inputs one pixel level off (``NoisyInput``)
NOISE_FLOOR = "fp32 +-1 level"


@dataclass
class Cell:
    """One model x method result."""

    metric: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


def split_images(shared: Path, imagenet: int) -> tuple[list[Path], list[Path]]:
    """Even positions of each folder calibrate, odd positions judge (ImageNet: its first ``imagenet`` images)."""
    calibration, judged = [], []
    for folder in FOLDERS:
        paths = list_images(shared / "images" / folder)
        if folder == "imagenet_samples_200":
            paths = paths[:imagenet]
        calibration += paths[0::2]
        judged += paths[1::2]
    return calibration, judged


def load_inputs(paths: list[Path], prep, channels: int) -> list[np.ndarray]:
    return [model_input(prep, image, channels) for _, image in readable_images(paths)]


def collect(graph, engine, inputs: list[np.ndarray], identity: dict, prep, values=None) -> CalibrationStatistics:
    """Histograms of the convolution inputs (or ``values``) over ``inputs`` (batches of 4, as ``calibrate`` does)."""
    stats = CalibrationStatistics(model=identity, preprocess=prep.describe())
    values = values or calibration_values(graph)
    for start in range(0, len(inputs), 4):
        stats.update(engine.forward(np.stack(inputs[start : start + 4]), values))
    stats.images_used = len(inputs)
    return stats


class NoisyInput:
    """The FP32 runner on its input plus a random one-pixel-level step (-1, 0 or +1 per value): the judged
    metric's noise floor, what an invisible change of the image does to FP32's own detections."""

    def __init__(self, runner: NcnnRunner, step: np.ndarray, seed: int = 0) -> None:
        self.runner, self.step, self.rng = runner, step, np.random.default_rng(seed)
        self.input_names, self.output_names = runner.input_names, runner.output_names

    def extract(self, feed: dict, wanted: list[str]) -> dict:
        ((name, x),) = feed.items()
        noise = self.rng.integers(-1, 2, size=x.shape) * self.step.reshape(-1, *([1] * (x.ndim - 1)))
        return self.runner.extract({name: (x + noise).astype(np.float32)}, wanted)


def pixel_step(prep, channels: int) -> np.ndarray:
    """One pixel level in network-input units per channel: ``norm / std``."""
    return np.resize(np.float32(prep.norm) / np.asarray(prep.std, np.float32), channels).astype(np.float32)


def judge(fp32: NcnnRunner, int8: NcnnRunner, model, inputs: list[np.ndarray], prep) -> dict:
    """Task metric and output cosine of INT8 against FP32 (evaluate.py's definitions)."""
    task = resolve_task(model, "auto")
    view = output_view(model, task)
    decode = task_outputs(task, model, prep.size, score_threshold(task, None))
    metric, out_cos = TaskMetric(task), Running()
    wanted = list(dict.fromkeys(view.blobs + fp32.output_names))
    judged = task != "classifier" or class_output(model) is not None  # MTCNN det4: no class, the cosine alone
    for x in inputs:
        feed = {fp32.input_names[0]: x}
        ref, out = fp32.extract(feed, wanted), int8.extract(feed, wanted)
        out_cos.add(view.cosine(ref, out))
        if judged:
            update_metric(metric, decode(ref), decode(out), IOU_THRESHOLD)
    summary = metric.summary().as_dict() if judged else {"top1_agreement": None}
    return {"task": task, **summary, "cosine": out_cos.mean, "cosine_min": out_cos.low}


def table_for(method: str, graph, stats, calib_inputs):
    """The result (table, corrected biases) of ``method``: a histogram method, ``eq`` or ``eq+bc`` (bias correction)."""
    base, _, extra = method.partition("+")
    if base in SEARCH_METHODS:
        return calibrate_eq(graph, stats, calib_inputs, TableRules(bias_correction=extra == "bc"))
    return build_table(graph, stats, method)


def bench_model(
    name: str,
    folder_model,
    shared: Path,
    methods: list[str],
    images: tuple[list[Path], list[Path]],
    workdir: Path,
    qdq_method: str | None = None,
    equalize: bool = False,
    auto_fp32_target: float | None = None,
    bounds: bool = False,
) -> dict[str, Cell]:
    proto, caffemodel = folder_model.paths(shared)
    prep = folder_model.prep
    graph = load_graph(proto, caffemodel)
    ncnn_model = convert_graph(graph)  # the FP32 reference: the original model, also with --equalize
    channels = next(iter(graph.inputs.values()))[1]
    calib_inputs = load_inputs(images[0], prep, channels)
    judged_inputs = load_inputs(images[1], prep, channels)
    started = time.perf_counter()
    if equalize:
        caffemodel = equalized_model(proto, caffemodel, prep, images[0], workdir / f"{name}-equalized.caffemodel")
        graph = load_graph(proto, caffemodel)
    quantized_model = convert_graph(graph) if equalize else ncnn_model
    engine = make_engine("opencv", graph, proto, caffemodel)
    stats = collect(graph, engine, calib_inputs, model_identity(proto, caffemodel), prep)
    stats_seconds = time.perf_counter() - started
    fp32_param, fp32_bin = workdir / f"{name}.param", workdir / f"{name}.bin"
    write_model(ncnn_model, fp32_param, fp32_bin)
    fp32 = NcnnRunner(fp32_param, fp32_bin, int8=False)
    cells = {
        NOISE_FLOOR: Cell(judge(fp32, NoisyInput(fp32, pixel_step(prep, channels)), ncnn_model, judged_inputs, prep))
    }
    for method in methods:
        cell = Cell()
        try:
            started = time.perf_counter()
            base = method.removesuffix(ADAROUND)
            if base == AUTO_METHOD:  # validated on some of the calibration images, never on judged ones
                result = calibrate_auto(graph, stats, validation_images(calib_inputs))
                cell.metric["validation"] = result.scores
            else:
                result = table_for(base, graph, stats, calib_inputs)
            if method.endswith(ADAROUND):
                result = calibrate_adaround(
                    graph, result, adaround_images(calib_inputs), TableRules(bias_correction=base.endswith("+bc"))
                )
            table, extra, weights = result.table, result.biases, result.weights
            cell.seconds = stats_seconds + time.perf_counter() - started
            int8_model = quantize_model(quantized_model, table, fp16_storage=False, biases=extra, weights=weights)
            param, binary = workdir / f"{name}.{method}.param", workdir / f"{name}.{method}.bin"
            write_model(int8_model, param, binary)
            int8 = NcnnRunner(param, binary, int8=True)
            cell.metric |= judge(fp32, int8, ncnn_model, judged_inputs, prep)
            if auto_fp32_target is not None:
                cell.metric["auto_fp32"] = auto_fp32_cell(
                    quantized_model, result, auto_fp32_target, (calib_inputs, judged_inputs), fp32, workdir / name, prep
                )
        except (Int8ConvError, ImportError) as exc:
            cell.error = str(exc)
        if method == qdq_method and not cell.error:
            every = collect(graph, engine, calib_inputs, model_identity(proto, caffemodel), prep, all_values(graph))
            cell.metric["qdq"] = qdq_cosine(
                graph,
                every,
                base,
                table,
                judged_inputs,
                (fp32, int8),
                result,
                (ncnn_model, cell.metric["task"], prep.size),
                calib_inputs if bounds else None,
            )
            if bounds:
                cell.metric["weights_8bit"] = weights_8bit_bound(
                    base, graph, stats, calib_inputs, (quantized_model, ncnn_model), fp32, judged_inputs, prep, workdir
                )
        cells[method] = cell
        logging.info("%s %s: %s %.1fs %s", name, method, cell.metric, cell.seconds, cell.error)
    return cells


def auto_fp32_cell(model, result, target: float, inputs: tuple[list, list], fp32: NcnnRunner, stem: Path, prep) -> dict:
    """``--auto-fp32 target`` on the table of ``result``, chosen on the validation images ``auto`` uses (calibration
    half), then judged on the other half: how many layers stay FP32, how many the search's final pass returned to
    INT8, and the judged metrics of the mixed model."""
    feeds = [{model.input_names[0]: x} for x in validation_images(inputs[0])]
    choice = auto_fp32(model, result.table, feeds, target, fp16_storage=False)
    mixed = quantize_model(model, choice.table, fp16_storage=False, biases=result.biases, weights=result.weights)
    param, binary = stem.with_suffix(".mixed.param"), stem.with_suffix(".mixed.bin")
    write_model(mixed, param, binary)
    judged = judge(fp32, NcnnRunner(param, binary, int8=True), model, inputs[1], prep)
    return {"fp32": len(choice.fp32_layers), "returned": len(choice.returned), "reached": choice.reached, **judged}


def auto_fp32_text(method: str, found: dict) -> str:
    metric = "/".join(f"{found[k]:.3f}" for k in ("precision", "recall", "top1_agreement") if found.get(k) is not None)
    return (
        f"{method} {found['fp32']} FP32 (+{found['returned']} returned to INT8 by the final pass"
        f"{'' if found['reached'] else ', target not reached'}): judged {metric + ' ' if metric else ''}"
        f"cosine {found['cosine']:.4f}/{found['cosine_min']:.4f}"
    )


def equalized_model(proto: Path, caffemodel: Path, prep, calibration: list[Path], path: Path) -> Path:
    """``int8conv equalize`` of the model on the calibration images; the equalized caffemodel's path."""
    listing = path.with_suffix(".images.txt")
    listing.write_text("\n".join(map(str, calibration)))
    options = pipeline.CalibrationOptions(images=listing, backend="opencv")
    result = pipeline.equalize(pipeline.ModelFiles(proto, caffemodel), pipeline.PreprocessOptions.like(prep), options)
    pipeline.write_equalized(result, path)
    return path


def onnx_decoder(export, score: OutputCosine, task: str, model, size: tuple[int, int]):
    """One image's scored ONNX outputs (batch 1) -> what ``task_outputs`` gives for ncnn's: SSD heads through the
    host DetectionOutput (the export stops before it), host-decoded nets through their decoder."""
    threshold = score_threshold(task, None)
    if task == "ssd":  # the priors depend on shapes only (constants, not scored): computed once
        (head,) = export.heads
        session = score.ort.InferenceSession(export.model.SerializeToString(), providers=["CPUExecutionProvider"])
        (priors,) = session.run([head.priors], score.feeds[0])
        return lambda out: from_detection_output(
            detection_output(out[head.loc], out[head.conf], priors, head.param)
        ).above(threshold)
    decode = task_outputs(task, model, size, threshold)
    return lambda out: decode({name: value[0] for name, value in out.items()})


def qdq_task_metric(export, score: OutputCosine, qdq_outputs: list, task_model: tuple) -> dict | None:
    """Precision/recall of the Q/DQ ONNX's detections against the FP32 ONNX's (score >= 0.5, RetinaFace 0.8,
    same label, IoU >= 0.5), from the outputs both already gave under onnxruntime (``score.reference``,
    ``qdq_outputs``): the task metric the ncnn cells report, for TensorRT users. None for classifiers (their top-1
    is the cosine's story) and maps."""
    model, task, size = task_model
    if task not in ("ssd", *HOST_TASKS):
        return None
    decode, metric = onnx_decoder(export, score, task, model, size), TaskMetric(task)
    for ref, out in zip(score.reference, qdq_outputs, strict=True):
        update_metric(metric, *(decode(dict(zip(score.outputs, o, strict=True))) for o in (ref, out)), IOU_THRESHOLD)
    return metric.summary().as_dict()


def weights_8bit_bound(base: str, graph, stats, calib_inputs, models: tuple, fp32, judged, prep, workdir) -> dict:
    """``base``'s table with every weight at 8 bits (no Winograd bound) on an INT8 model run with ncnn's Winograd
    off, so nothing can overflow, judged like the cells: what the Winograd weight bound costs at most."""
    rules = TableRules(winograd_6bit=False)
    if base == AUTO_METHOD:
        result = calibrate_auto(graph, stats, validation_images(calib_inputs), rules)
    else:
        result = build_table(graph, stats, base, rules)
    quantized_model, reference_model = models
    param, binary = workdir / "weights-8bit.param", workdir / "weights-8bit.bin"
    write_model(quantize_model(quantized_model, result.table, fp16_storage=False), param, binary)
    return judge(fp32, NcnnRunner(param, binary, int8=True, winograd=False), reference_model, judged, prep)


def per_channel_qdq(qdq, export, feeds: list[dict]):
    """``qdq`` with every activation quantizer per channel (axis 1), each channel's scale its |x| max over ``feeds``
    (FP32 ONNX, onnxruntime) / 127: an oracle that neither ncnn's table nor TensorRT's per-tensor Q/DQ can hold."""
    import onnxruntime

    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    constants = {init.name for init in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]
    tensors = sorted({q.input[0] for q in quantizers})
    probe = onnx.ModelProto()
    probe.CopyFrom(export.model)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in listed)
    session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    amax = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        for t, value in zip(tensors, session.run(tensors, feed), strict=True):
            amax[t] = np.maximum(amax[t], np.abs(value).reshape(value.shape[0], value.shape[1], -1).max(axis=(0, 2)))
    dequantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for q in quantizers:
        scale = (np.maximum(amax[q.input[0]], 1e-8) / 127).astype(np.float32)
        names = (f"{q.input[1]}/per_channel", f"{q.input[2]}/per_channel")
        model.graph.initializer.extend(
            [numpy_helper.from_array(scale, names[0]), numpy_helper.from_array(np.zeros_like(scale, np.int8), names[1])]
        )
        for node in (q, dequantizers[q.output[0]]):
            node.input[1], node.input[2] = names
            del node.attribute[:]
            node.attribute.append(onnx.helper.make_attribute("axis", 1))
    return model


def qdq_cosine(
    graph,
    stats,
    method: str,
    table,
    judged: list[np.ndarray],
    ncnn: tuple[NcnnRunner, NcnnRunner],
    result=None,
    task_model: tuple = (None, "classifier", (0, 0)),
    per_channel_inputs: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """Worst (``min``) and ``mean`` per-image output cosine of the Q/DQ ONNX (ranges as ``export-trt`` writes them
    from ``table``, ``result``'s learned weights with ``+adaround``, and the layers ncnn keeps FP32 left FP32)
    against the FP32 ONNX, under onnxruntime (``qdq.OutputCosine``, as ``--auto-fp32`` scores); the same with those
    layers quantized too (``quantized_min``/``quantized_mean``, when there are any), and the worst image of the ncnn
    INT8 model (``ncnn_min``; ``ncnn``: FP32 and INT8 runners) scored the same way; for detectors (``task_model``:
    the ncnn FP32 model, its task, the input size) the Q/DQ detections' precision/recall (``task``); with
    ``per_channel_inputs`` (calibration images) the same for ``per_channel_qdq`` (``per_channel``)."""
    export = export_onnx(graph, batch=1)
    values = value_ranges(stats, histogram_method(method))
    values.update(table_ranges(table, graph))
    learned = pipeline.qdq_weights(result) if result is not None else None
    name = next(iter(graph.inputs))
    score = OutputCosine(export, [{name: x[None]} for x in judged])
    found = {}
    mirrored = pipeline.ncnn_fp32_layers(graph)
    for prefix, fp32_layers in (("", mirrored), ("quantized_", [])) if mirrored else (("", []),):
        qdq = insert_qdq(export, tensor_ranges(export, values), fp32_layers, layer_input_ranges(table), learned)
        outputs = score.outputs_of(qdq)  # one run for the cosines and the detections
        cosines = [blob_cosine(r, c) for r, c in zip(score.reference, outputs, strict=True)]  # score.per_image's
        found |= {f"{prefix}min": min(cosines), f"{prefix}mean": float(np.mean(cosines))}
        if not prefix:
            found["task"] = qdq_task_metric(export, score, outputs, task_model)
            if per_channel_inputs is not None:
                oracle = score.outputs_of(per_channel_qdq(qdq, export, [{name: x[None]} for x in per_channel_inputs]))
                worst = [blob_cosine(r, c) for r, c in zip(score.reference, oracle, strict=True)]
                found["per_channel"] = {
                    "min": min(worst),
                    "mean": float(np.mean(worst)),
                    "task": qdq_task_metric(export, score, oracle, task_model),
                }
    fp32, int8 = ncnn
    ncnn_cosines = []
    for x in judged:
        feed = {fp32.input_names[0]: x}
        ref, out = fp32.extract(feed, score.outputs), int8.extract(feed, score.outputs)
        ncnn_cosines.append(blob_cosine([ref[o] for o in score.outputs], [out[o] for o in score.outputs]))
    return found | {"ncnn_min": min(ncnn_cosines)}


def score(cell: Cell) -> tuple[float, float]:
    """What "wins" means: detectors the lower of precision and recall (then the other); classifiers top-1
    agreement, then mean output cosine."""
    if cell.error:
        return (-1.0, -1.0)
    m = cell.metric
    if m["task"] == "classifier":
        return (round(m["top1_agreement"] or 0.0, 6), round(m["cosine"], 4))
    if m["task"] == "segmentation":
        return (round(m["map_iou"], 6), round(m["cosine"], 4))
    low, high = sorted((m["precision"], m["recall"]))
    return (round(low, 6), round(high, 6))


def meets_targets(cell: Cell) -> bool:
    """The issue's targets: detectors precision and recall >= 0.97; classifiers agreement >= 0.99, cosine >= 0.995."""
    if cell.error:
        return False
    m = cell.metric
    if m["task"] == "classifier":
        return (m["top1_agreement"] is None or m["top1_agreement"] >= 0.99) and m["cosine"] >= 0.995
    if m["task"] == "segmentation":  # issue 11 sets no target for maps
        return False
    return min(m["precision"], m["recall"]) >= 0.97


def wins(results: dict[str, dict[str, Cell]], methods: list[str]) -> dict[str, int]:
    """Per method, on how many models it is best (ties count for every tied method)."""
    count = dict.fromkeys(methods, 0)
    for cells in results.values():
        best = max(score(cells[m]) for m in methods)
        for m in methods:
            count[m] += score(cells[m]) == best
    return count


def cell_text(cell: Cell) -> str:
    if cell.error:
        return "error"
    m = cell.metric
    if m["task"] == "classifier":
        agreement = "-" if m["top1_agreement"] is None else f"{m['top1_agreement']:.3f}"
        return f"{agreement}/{m['cosine']:.4f} {cell.seconds:5.1f}s"
    if m["task"] == "segmentation":
        return f"{m['map_iou']:.3f}/{m['cosine']:.3f} {cell.seconds:5.1f}s"
    return f"{m['precision']:.3f}/{m['recall']:.3f} {cell.seconds:5.1f}s"


def detections_text(task: dict | None) -> str:
    return f", P/R {task['precision']:.3f}/{task['recall']:.3f}" if task and task.get("precision") is not None else ""


def bounds_text(weights_8bit: dict, per_channel: dict) -> str:
    """``--bounds``'s line: the two experiments' judged metrics."""
    return (
        f"8-bit weights, Winograd off: cosine {weights_8bit['cosine']:.4f}/{weights_8bit['cosine_min']:.4f}"
        f"{detections_text(weights_8bit)}; Q/DQ with per-channel activation scales: output cosine min "
        f"{per_channel['min']:.4f}, mean {per_channel['mean']:.4f}{detections_text(per_channel['task'])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--imagenet", type=int, default=100, help="ImageNet samples used (half calibrate, half judge)")
    parser.add_argument("--qdq", metavar="METHOD", help="also judge the Q/DQ ONNX of METHOD under onnxruntime")
    parser.add_argument(
        "--equalize",
        action="store_true",
        help="calibrate and quantize the model `int8conv equalize` makes on the calibration images (judged against "
        "the original FP32 model)",
    )
    parser.add_argument(
        "--auto-fp32",
        type=float,
        metavar="COSINE",
        help="also run quantize's --auto-fp32 COSINE search on each method's table (on auto's validation images) and "
        "judge the mixed model: how many layers it keeps FP32",
    )
    parser.add_argument(
        "--bounds",
        action="store_true",
        help="with --qdq METHOD (a histogram method or auto): two experiments that bound what any table can do, "
        "METHOD with every weight at 8 bits on ncnn with Winograd off, and the Q/DQ ONNX with per-channel "
        "activation scales (which neither format holds)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.bounds and (args.qdq is None or args.qdq.partition("+")[0] in SEARCH_METHODS or "+" in args.qdq):
        parser.error("--bounds needs --qdq METHOD, a histogram method or auto")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    images = split_images(args.shared, args.imagenet)
    print(f"calibration images {len(images[0])}, judged images {len(images[1])} (disjoint)")
    print(
        "cells: detectors precision/recall, classifiers top-1 agreement/mean output cosine, maps IoU/mean output "
        "cosine; calibration seconds"
    )
    width = 22
    columns = [*args.methods, NOISE_FLOOR]
    print(f"{'model':<16}" + "".join(f"{m:>{width}}" for m in columns))
    results: dict[str, dict[str, Cell]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for name in args.models:
            try:
                cells = bench_model(
                    name,
                    MODELS[name],
                    args.shared,
                    args.methods,
                    images,
                    Path(tmp),
                    args.qdq,
                    args.equalize,
                    args.auto_fp32,
                    args.bounds,
                )
            except Int8ConvError as exc:
                print(f"{name:<16} not judged: {str(exc)[:100]}")
                continue
            results[name] = cells
            print(f"{name:<16}" + "".join(f"{cell_text(cells[m]):>{width}}" for m in columns), flush=True)
            cosines = [
                f"{m} {cells[m].metric['cosine']:.4f}/{cells[m].metric['cosine_min']:.4f}"
                for m in columns
                if not cells[m].error
            ]
            print("    output cosine, mean/worst image: " + ", ".join(cosines))
            counted = [m for m in columns if not cells[m].error and "matched" in cells[m].metric]
            if counted:  # what one box is worth in the cells: precision = matched / INT8, recall = matched / FP32
                print(
                    "    detections FP32/INT8/matched: "
                    + ", ".join(
                        f"{m} {c['reference_detections']}/{c['candidate_detections']}/{c['matched']}"
                        for m in counted
                        for c in [cells[m].metric]
                    )
                )
            mixed = [auto_fp32_text(m, cells[m].metric["auto_fp32"]) for m in columns if "auto_fp32" in cells[m].metric]
            if mixed:
                print(f"    --auto-fp32 {args.auto_fp32}, mean/worst judged image: " + "; ".join(mixed))
            for method, cell in cells.items():
                if cell.error:
                    print(f"    {method}: {cell.error[:150]}")
                if "qdq" in cell.metric:
                    qdq = cell.metric["qdq"]
                    quantized = (
                        f"; with ncnn's FP32 layers quantized too: min {qdq['quantized_min']:.4f}, mean "
                        f"{qdq['quantized_mean']:.4f}"
                        if "quantized_min" in qdq
                        else ""
                    )
                    detections = (
                        f"; detections precision/recall {qdq['task']['precision']:.3f}/{qdq['task']['recall']:.3f}, "
                        f"matched boxes' mean IoU {qdq['task']['mean_iou']:.3f}"
                        if qdq.get("task")
                        else ""
                    )
                    if "weights_8bit" in cell.metric:
                        print(f"    bounds ({method}): {bounds_text(cell.metric['weights_8bit'], qdq['per_channel'])}")
                    print(
                        f"    Q/DQ ONNX ({method}, onnxruntime): output cosine min {qdq['min']:.4f}, mean "
                        f"{qdq['mean']:.4f} (ncnn INT8 on the same outputs: min {qdq['ncnn_min']:.4f}){quantized}"
                        f"{detections}"
                    )

    if results:
        count = wins(results, args.methods)
        met = {m: sum(meets_targets(cells[m]) for cells in results.values()) for m in args.methods}
        targeted = sum(cells[args.methods[0]].metric.get("task") != "segmentation" for cells in results.values())
        print(f"{f'targets met /{targeted}':<16}" + "".join(f"{met[m]:>{width}}" for m in args.methods))
        print(f"{'best on':<16}" + "".join(f"{count[m]:>{width}}" for m in args.methods))
        if "kl" in args.methods:
            total = {m: sum(cells[m].seconds for cells in results.values()) for m in args.methods}
            print(f"{'total time / kl':<16}" + "".join(f"{total[m] / total['kl']:>{width}.2f}" for m in args.methods))


if __name__ == "__main__":
    main()
