"""The library pipeline: what every command does, callable from Python with typed options.

Options travel one way: a command turns its flags into these dataclasses and calls one function here; the
stages below never see argparse. ``convert_tool.py``, the demos, ``report`` and ``scripts/`` call the same
functions, so calibrate -> convert -> quantize is written once (``build_ncnn``).

    from int8conv import pipeline
    model = pipeline.ModelFiles("deploy.prototxt", "m.caffemodel")
    build = pipeline.build_ncnn(model, pipeline.PreprocessOptions(mean=(104, 177, 123)),
                                pipeline.CalibrationOptions(images="calib/"))
    pipeline.write_ncnn_build(build, "out/", "m")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import json
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from int8conv.arm.evaluate import evaluate_arm
from int8conv.arm.runtime import ArmOptions
from int8conv.atomic import OutputSet, output_set, scratch_files, write_bytes_atomic, write_text_atomic
from int8conv.caffe.graph import Graph, load_graph
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.reader import read_caffemodel
from int8conv.caffe.shapes import check_input_size
from int8conv.calibration.adaround import adaround_images, calibrate_adaround
from int8conv.calibration.auto_select import AUTO_FALLBACK, AUTO_METHOD, WARN_BELOW, calibrate_auto, validation_images
from int8conv.calibration.calibrate import (
    CalibrationResult,
    TableRules,
    all_values,
    build_table,
    collect_statistics,
    legacy_table,
    model_identity,
)
from int8conv.calibration.equalize import EqualizedPair, channel_ranges, equalization_pairs, equalize_caffemodel
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.int8_simulation import per_output_scales
from int8conv.calibration.preprocess import Preprocess, list_images, network_inputs, spread_evenly
from int8conv.calibration.scale_search import SEARCH_METHODS, calibrate_eq, search_images
from int8conv.calibration.thresholds import DEFAULT_METHOD
from int8conv.calibration.workers import default_jobs
from int8conv.engines import make_engine
from int8conv.errors import ImageError, Int8ConvError, ModelError
from int8conv.evaluation.evaluate import EvalConfig, evaluate, format_report
from int8conv.evaluation.fp32_search import Fp32Choice
from int8conv.evaluation.mixed_precision import MixedPrecision, auto_fp32
from int8conv.evaluation.report import layer_reports, write_report
from int8conv.evaluation.results import ArmReport, EvalReport
from int8conv.evaluation.speed import (
    LayerTiming,
    SpeedChoice,
    layer_times,
    load_layer_timings,
    optimize_speed,
    save_layer_timings,
)
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import NcnnModel, read_param, write_model
from int8conv.ncnn.quantize import quantize_model, runtime_fp32_layers
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.progress import quiet_loggers
from int8conv.tables.ncnn_table import CalibrationTable, format_ncnn_table, read_ncnn_table
from int8conv.tables.tensorrt_files import (
    DEFAULT_TRT_VERSION,
    algorithm_for,
    cache_version,
    write_calibration_cache,
    write_dynamic_ranges,
    write_ranges_json,
)
from int8conv.tensorrt.onnx_export import OnnxExport, export_onnx
from int8conv.tensorrt.qdq import OutputCosine, QdqCheck, check_fp32_layers, choose_fp32_layers, insert_qdq
from int8conv.tensorrt.ranges import histogram_method, layer_input_ranges, table_ranges, tensor_ranges, value_ranges

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """A Caffe deploy prototxt and its caffemodel."""

    proto: Path
    caffemodel: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "proto", Path(self.proto))
        object.__setattr__(self, "caffemodel", Path(self.caffemodel))

    @property
    def stem(self) -> str:
        """Output files are named after the caffemodel, as the original tool did."""
        return self.caffemodel.stem

    def load(self) -> Graph:
        return load_graph(self.proto, self.caffemodel)


@dataclass(frozen=True)
class PreprocessOptions:
    """What the user says about preprocessing; the input size defaults to the model's."""

    mean: tuple[float, ...] = (0.0,)
    norm: float = 1.0
    std: tuple[float, ...] = (1.0,)
    size: tuple[int, int] | None = None
    resize: tuple[int, int] | None = None
    color: str = "bgr"
    swap_hw: bool = False
    letterbox: bool = False

    @classmethod
    def like(cls, prep: Preprocess) -> PreprocessOptions:
        """The options that give ``prep`` on its model (the size is left to the model's input)."""
        return cls(**{**dataclasses.asdict(prep), "size": None})

    def with_size(self, size: tuple[int, int]) -> Preprocess:
        """The ``Preprocess`` of these options (their fields are its fields) at ``size`` unless one is set."""
        fields = dataclasses.asdict(self)
        return Preprocess(**{**fields, "size": self.size or size, "mean": tuple(self.mean), "std": tuple(self.std)})

    def for_graph(self, graph: Graph, source: Path) -> Preprocess:
        """The ``Preprocess`` of a Caffe graph: its input's NCHW shape gives the size and checks the channels."""
        name, shape = next(iter(graph.inputs.items()))
        if len(shape) != 4:
            raise ImageError(f"input '{name}' has shape {shape}, not NCHW: images cannot feed it")
        prep = self.with_size((shape[2], shape[3]))
        if prep.size != tuple(shape[2:]):
            check_input_size(graph, prep.size)
        return self._check_channels(prep, name, source, shape[1])

    def for_ncnn(self, model: NcnnModel, source: Path, any_color: bool = False) -> Preprocess:
        """The ``Preprocess`` of an ncnn model: its Input layer (0=w 1=h) gives the size unless one is set, and its
        channels (2=) must be the images' (a 1-channel model fed BGR would measure noise); ``any_color``: the
        color that gives them (random pixels to time the model on: only their shape matters)."""
        inputs = [layer for layer in model.layers if layer.type == "Input"]
        if self.size:
            prep = self.with_size(self.size)
        elif not inputs or not inputs[0].params.get(0) or not inputs[0].params.get(1):
            raise ImageError(f"{source}: the Input layer gives no width/height (0= and 1=); pass --size H W")
        else:
            prep = self.with_size((int(inputs[0].params[1]), int(inputs[0].params[0])))
        if not inputs or not inputs[0].params.get(2):
            return prep
        channels = int(inputs[0].params[2])
        if any_color and channels != prep.channels:
            prep = dataclasses.replace(prep, color="gray" if channels == 1 else "bgr")
        return self._check_channels(prep, inputs[0].name, source, channels)

    def _check_channels(self, prep: Preprocess, name: str, source: Path, channels: int) -> Preprocess:
        if prep.channels != channels:
            remedy = {1: "pass --color gray", 3: "pass --color bgr or --color rgb (the model's channel order)"}
            raise ImageError(
                f"input '{name}' of {source} has {channels} channels, but --color {self.color} gives "
                f"{prep.channels}: " + remedy.get(channels, "this model cannot be calibrated from plain images")
            )
        return prep


@dataclass(frozen=True)
class CalibrationOptions:
    """Where the histograms come from and how thresholds and weight scales are chosen."""

    images: Path | None = None
    max_images: int = 0
    batch_size: int = 4
    backend: str = "auto"
    gpu: int | None = None
    method: str = DEFAULT_METHOD
    percentile: float = 99.99
    head_method: str | None = "minmax"  # None: heads use ``method`` too
    weights_8bit: bool = False
    bias_correction: bool = False  # --method eq (or --adaround): corrected FP32 biases in the INT8 model
    adaround: bool = False  # learned weight rounding: adjusted FP32 weights for the INT8 model and the Q/DQ ONNX
    save_stats: Path | None = None
    load_stats: tuple[Path, ...] = ()
    jobs: int | None = None  # forward+histogram worker processes (calibration.workers); None: one per core

    def __post_init__(self) -> None:
        """Refuse a combination that has nothing to work on here, before the images are forwarded."""
        if self.bias_correction and not self.adaround and self.method not in SEARCH_METHODS:
            raise Int8ConvError(
                "--bias-correction needs --method eq or --adaround (it corrects the biases of the quantized weights)"
            )

    @functools.cached_property
    def statistics(self) -> CalibrationStatistics | None:
        """The ``load_stats`` files merged, read once for every step that needs them (``saved_preprocessing`` the
        preprocessing they fix, ``collect`` the histograms); None without them."""
        return CalibrationStatistics.load_and_merge(self.load_stats) if self.load_stats else None

    @property
    def table_rules(self) -> TableRules:
        """``--percentile``, ``--weights-8bit``, ``--head-method`` and ``--bias-correction``, as methods take them."""
        return TableRules(self.percentile, not self.weights_8bit, self.head_method, self.bias_correction)


@dataclass(frozen=True)
class AutoFp32Options:
    """``--auto-fp32``: keep the most sensitive layers FP32 until the output cosine reaches ``target``."""

    target: float
    images: Path | None
    max_images: int = 8
    task: str = "auto"


def collect(
    model: ModelFiles,
    graph: Graph,
    prep: PreprocessOptions,
    options: CalibrationOptions,
    values: Sequence[str] | None = None,
) -> CalibrationStatistics:
    """Forward the images (or merge saved statistics), and save them when asked."""
    identity = model_identity(model.proto, model.caffemodel)
    if options.load_stats:
        stats = options.statistics
        if stats.model.get("caffemodel_sha256") != identity["caffemodel_sha256"]:
            raise Int8ConvError(
                f"{options.load_stats[0]}: these statistics were collected for "
                f"{stats.model.get('caffemodel', '?')}, not for {model.caffemodel}"
            )
        log.info("merged statistics of %d file(s): %d images", len(options.load_stats), stats.images_used)
        _check_saved_preprocessing(stats, prep, options, graph, model.proto)
    else:
        if options.images is None:
            raise Int8ConvError("give calibration images with --images DIR (or saved statistics with --load-stats)")
        images = calibration_images(options)
        engine = make_engine(
            options.backend, graph, model.proto, model.caffemodel, gpu=options.gpu, calibration=True, values=values
        )
        jobs = default_jobs() if options.jobs is None else options.jobs
        if jobs < 1:
            raise Int8ConvError(f"--jobs must be 1 or more, not {jobs}")
        if getattr(engine, "reader", None) is None:  # worker processes need a picklable forward (ncnn)
            if options.jobs is not None and options.jobs > 1:
                log.info("--jobs %d: the %s engine runs in one process (worker processes need ncnn)", jobs, engine.name)
            jobs = 1
        log.info(
            "calibrating %s on %d images with %s (%s, %s)",
            model.caffemodel.name,
            len(images),
            engine.name,
            options.method,
            f"up to {jobs} processes" if jobs > 1 else "one process",
        )
        stats = collect_statistics(
            graph,
            engine,
            images,
            prep.for_graph(graph, model.proto),
            identity,
            values=values,
            batch_size=options.batch_size,
            jobs=jobs,
        )
    if options.save_stats:
        stats.save(options.save_stats)
        log.info("statistics saved to %s", options.save_stats)
    return stats


#: the flag of each preprocessing option, for messages
PREPROCESS_FLAGS = {
    "mean": "--mean",
    "norm": "--norm",
    "std": "--std",
    "size": "--size",
    "resize": "--resize-then-crop",
    "color": "--color",
    "swap_hw": "--swap-hw",
    "letterbox": "--letterbox",
}


def saved_preprocessing(prep: PreprocessOptions, options: CalibrationOptions) -> PreprocessOptions:
    """With ``--load-stats`` and no preprocessing flag, the preprocessing the statistics were collected with: the
    steps after the histograms (the channel check, auto's and eq's images, report's evaluation, ``--auto-fp32``)
    must not run with the defaults (``--color bgr`` on a gray model). Given flags stay, checked by ``collect``."""
    if not options.load_stats or prep != PreprocessOptions():
        return prep
    saved = options.statistics.preprocess
    if not saved:
        return prep
    fields = {f.name for f in dataclasses.fields(PreprocessOptions)}
    return PreprocessOptions(
        **{key: tuple(value) if isinstance(value, list) else value for key, value in saved.items() if key in fields}
    )


def _check_saved_preprocessing(
    stats: CalibrationStatistics, prep: PreprocessOptions, options: CalibrationOptions, graph: Graph, source: Path
) -> None:
    """Saved statistics fix the preprocessing. Options that repeat it are fine (the same command line with
    --load-stats added); options that differ would be silently ignored, so they are an error. Images that no later
    step decodes (auto's validation, eq's search, AdaRound): a warning."""
    if options.images is not None:
        searches = options.method == AUTO_METHOD or options.method in SEARCH_METHODS
        user = f"--method {options.method}" if searches else "--adaround" if options.adaround else None
        if user is not None:
            log.info("the histograms come from --load-stats; %s runs on --images", user)
        else:
            log.warning("--images %s is not used: the histograms come from --load-stats", options.images)
    default = PreprocessOptions()
    given = [
        PREPROCESS_FLAGS[f.name] for f in dataclasses.fields(prep) if getattr(prep, f.name) != getattr(default, f.name)
    ]
    if not given or not stats.preprocess:
        return
    # ``Preprocess.describe`` leaves letterbox out when it is off
    flagged = {"letterbox": False, **json.loads(json.dumps(prep.for_graph(graph, source).describe()))}
    saved = {"letterbox": False, **stats.preprocess}
    differ = [
        f"{key} {saved[key]} (statistics) vs {value} (flags)"
        for key, value in flagged.items()
        if key in saved and saved[key] != value
    ]
    if differ:
        raise Int8ConvError(
            f"{options.load_stats[0]}: {', '.join(given)} disagree with the preprocessing these "
            f"statistics were collected with: {'; '.join(differ)}; drop the flags or collect new "
            "statistics"
        )


def first_images(images: Path, max_images: int) -> list[Path]:
    """The first ``max_images`` images of ``images`` (0 = all): what every ``--max-images`` flag means."""
    paths = list_images(images)
    return paths[:max_images] if max_images > 0 else paths


def calibration_images(options: CalibrationOptions, stats: CalibrationStatistics | None = None) -> list[Path]:
    """The calibration images of ``options`` (``--max-images`` applied), less those the statistics pass of
    ``stats`` could not read: the subsets that later steps decode (auto's validation, eq's search, AdaRound) are
    then as large as asked, and a bad image is reported once."""
    skipped = set(stats.unreadable) if stats is not None else set()
    return [path for path in first_images(options.images, options.max_images) if path not in skipped]


def table_from_statistics(
    graph: Graph, stats: CalibrationStatistics, options: CalibrationOptions, prep: Preprocess | None = None
) -> CalibrationResult:
    """The table of ``options.method``; the output-aware search (eq) and the selection (auto) also run the model
    on the images (auto: on some of the calibration images), and so does ``--adaround`` after them."""
    result = _method_table(graph, stats, options, prep)
    if not options.adaround:
        return result
    if options.images is None or prep is None:
        raise Int8ConvError(
            "--adaround learns the weight rounding on calibration images: give them with --images "
            "(saved statistics alone are not enough)"
        )
    inputs = _image_inputs(graph, adaround_images(calibration_images(options, stats)), prep)
    return calibrate_adaround(graph, result, inputs, options.table_rules)


def _method_table(
    graph: Graph, stats: CalibrationStatistics, options: CalibrationOptions, prep: Preprocess | None
) -> CalibrationResult:
    """The table of ``options.method`` alone (bias correction: eq's, or --adaround's after it)."""
    method = options.method
    if method == AUTO_METHOD and (options.images is None or prep is None):
        log.warning("--method auto validates on images and none were given (statistics only): using %s", AUTO_FALLBACK)
        method = AUTO_FALLBACK
    if method == AUTO_METHOD:
        validation = _image_inputs(graph, validation_images(calibration_images(options, stats)), prep)
        return calibrate_auto(graph, stats, validation, options.table_rules)
    if method in SEARCH_METHODS:
        if options.images is None or prep is None:
            raise Int8ConvError(
                "--method eq runs the model on calibration images: give them with --images "
                "(saved statistics alone are not enough)"
            )
        return calibrate_eq(
            graph,
            stats,
            _image_inputs(graph, search_images(calibration_images(options, stats)), prep),
            options.table_rules,
        )
    return build_table(graph, stats, method, options.table_rules)


def _image_inputs(graph: Graph, paths: Sequence[Path], prep: Preprocess) -> list[np.ndarray]:
    """The CHW inputs of ``graph``'s first input from the readable ones of ``paths``."""
    name = next(iter(graph.inputs))
    return [feed[name] for feed in network_inputs(paths, prep, name)]


def calibrate(
    model: ModelFiles, prep: PreprocessOptions, options: CalibrationOptions, graph: Graph | None = None
) -> CalibrationResult:
    """Caffe model + images -> the calibration table and what explains it (``result.seconds``: all of it)."""
    started = time.perf_counter()
    graph = graph if graph is not None else model.load()
    result = table_from_statistics(
        graph, collect(model, graph, prep, options), options, prep.for_graph(graph, model.proto)
    )
    result.seconds = time.perf_counter() - started
    return result


def table_text(result: CalibrationResult, legacy: bool = False) -> str:
    """The ncnn table (layer-keyed, per-channel) or the original tool's blob-keyed, per-tensor format."""
    return legacy_table(result.deploy, result) if legacy else format_ncnn_table(result.table)


def write_table(result: CalibrationResult, path: Path, legacy: bool = False) -> None:
    write_text_atomic(path, table_text(result, legacy))


#: calibration images the equalization measures channel ranges on (spread over the set)
EQUALIZE_IMAGES = 32
#: the largest relative difference allowed between the FP32 outputs of the original and the equalized model
EQUALIZE_TOLERANCE = 1e-3


@dataclass
class Equalization:
    """``int8conv equalize``'s result: the new caffemodel and what changed."""

    weights: caffe_pb2.NetParameter
    pairs: list[EqualizedPair]
    images: int
    fp32_max_rel: float  # largest |difference| / largest |output| of the FP32 outputs, original vs equalized


def equalize(model: ModelFiles, prep: PreprocessOptions, options: CalibrationOptions) -> Equalization:
    """Cross-layer equalization (``calibration.equalize``) of ``model``, with the channel ranges measured on up to
    EQUALIZE_IMAGES of the calibration images, checked: the FP32 outputs of both models on the ncnn runtime agree."""
    if options.images is None:
        raise ImageError("equalize measures channel ranges on images: give them with --images")
    graph = model.load()
    pairs = equalization_pairs(graph)
    if not pairs:
        raise Int8ConvError(
            f"{model.proto}: no depthwise convolution reads a convolution's or a Scale's output (through ReLU/PReLU "
            "only): nothing to equalize"
        )
    values = list(dict.fromkeys(depthwise.bottoms[0] for _, depthwise in pairs))
    inputs = _image_inputs(
        graph, spread_evenly(calibration_images(options), EQUALIZE_IMAGES), prep.for_graph(graph, model.proto)
    )
    engine = make_engine(
        options.backend, graph, model.proto, model.caffemodel, gpu=options.gpu, calibration=True, values=values
    )
    step = max(1, options.batch_size)
    batches = (engine.forward(np.stack(inputs[i : i + step]), values) for i in range(0, len(inputs), step))
    weights, done = equalize_caffemodel(read_caffemodel(model.caffemodel), pairs, channel_ranges(batches, values))
    with tempfile.TemporaryDirectory(prefix="int8conv-equalize-") as tmp:
        path = Path(tmp) / model.caffemodel.name
        path.write_bytes(weights.SerializeToString())
        worst = _fp32_difference(graph, load_graph(model.proto, path), inputs[:2], Path(tmp))
    if worst > EQUALIZE_TOLERANCE:
        raise Int8ConvError(
            f"equalizing {model.caffemodel} changed its FP32 outputs by {worst:.3g} (relative); this is a bug"
        )
    return Equalization(weights, done, len(inputs), worst)


def _fp32_difference(original: Graph, changed: Graph, inputs: Sequence[np.ndarray], workdir: Path) -> float:
    """The largest relative difference of the two graphs' ncnn FP32 outputs on ``inputs``."""
    runners = []
    for stem, graph in (("original", original), ("changed", changed)):
        with scratch_files():
            write_model(convert_graph(graph), workdir / f"{stem}.param", workdir / f"{stem}.bin")
        runners.append(NcnnRunner(workdir / f"{stem}.param", workdir / f"{stem}.bin", int8=False))
    worst = 0.0
    for x in inputs:
        feed = {runners[0].input_names[0]: x}
        a, b = runners[0].run(feed), runners[1].run(feed)
        for name in a:
            peak = float(np.abs(a[name]).max(initial=0.0))
            worst = max(worst, float(np.abs(a[name] - b[name]).max(initial=0.0)) / (peak or 1.0))
    return worst


def write_equalized(result: Equalization, path: Path) -> None:
    write_bytes_atomic(path, result.weights.SerializeToString())


@contextlib.contextmanager
def run_model(
    model: ModelFiles, prep: PreprocessOptions, options: CalibrationOptions, equalized: bool
) -> Iterator[tuple[ModelFiles, Equalization | None]]:
    """The files the rest of a run reads: ``model`` itself, or with ``equalized`` its equalized caffemodel in a
    scratch folder that lives as long as the ``with`` block (and the ``Equalization``, to write it beside)."""
    if not equalized:
        yield model, None
        return
    with quiet_loggers("int8conv.calibration.preprocess"):  # the calibration after it reports each unreadable image
        result = equalize(model, prep, options)
    with tempfile.TemporaryDirectory(prefix="int8conv-equalized-") as tmp:
        files = ModelFiles(model.proto, Path(tmp) / model.caffemodel.name)
        write_equalized(result, files.caffemodel)
        yield files, result


def convert(model: ModelFiles) -> NcnnModel:
    """The ncnn FP32 model of a Caffe model (BatchNorm/Scale folded, activations fused)."""
    return convert_graph(model.load())


def auto_fp32_table(
    fp32: NcnnModel,
    table: CalibrationTable,
    prep: PreprocessOptions,
    options: AutoFp32Options,
    source: Path,
    fp16_storage: bool = True,
) -> MixedPrecision:
    """The table with the activation lines of the layers kept FP32 removed, chosen on ``options.images``."""
    if options.images is None:
        raise Int8ConvError("--auto-fp32 needs images to measure the output cosine on")
    inputs = load_inputs(options.images, prep.for_ncnn(fp32, source), fp32.input_names[0], max(options.max_images, 1))
    choice = auto_fp32(fp32, table, inputs, options.target, task=options.task, fp16_storage=fp16_storage)
    if not choice.reached:
        log.warning("--auto-fp32 %s not reached on these images (best: %.6f)", options.target, choice.cosine)
    return choice


@dataclass(frozen=True)
class SpeedOptions:
    """``--optimize speed``: FP32 where INT8 does not pay (timed here, or ``layer_timings`` from the device), then
    (with ``min_cosine``) the accuracy search on the rest; ``images`` feed the cosine and the whole-model check."""

    min_cosine: float | None = None
    images: Path | None = None
    max_images: int = 8
    task: str = "auto"
    layer_timings: Path | None = None
    save_layer_timings: Path | None = None


def speed_table(
    fp32: NcnnModel,
    table: CalibrationTable,
    prep: PreprocessOptions,
    options: SpeedOptions,
    source: Path,
    fp16_storage: bool = True,
) -> SpeedChoice:
    """The table with the layers where INT8 does not pay (or that fail ``min_cosine``) left FP32."""
    if options.images is not None:
        inputs = load_inputs(
            options.images, prep.for_ncnn(fp32, source), fp32.input_names[0], max(options.max_images, 1)
        )
    elif options.min_cosine is not None:
        raise Int8ConvError("--min-cosine needs images to measure the output cosine on (--images)")
    else:  # speed only: any image will do to time the whole model
        ncnn_prep = prep.for_ncnn(fp32, source, any_color=True)
        noise = np.random.default_rng(0).integers(0, 256, (*ncnn_prep.size, 3), np.uint8)
        inputs = [{fp32.input_names[0]: ncnn_prep.apply(noise)}]
    timings: dict[str, LayerTiming] | None = None
    if options.layer_timings is not None:
        timings = load_layer_timings(options.layer_timings)
    choice = optimize_speed(
        fp32,
        table,
        inputs,
        min_cosine=options.min_cosine,
        timings=timings,
        task=options.task,
        fp16_storage=fp16_storage,
    )
    if options.save_layer_timings is not None:
        save_layer_timings(choice.timings, options.save_layer_timings)
    return choice


@dataclass
class NcnnBuild:
    """One calibration and the ncnn FP32/INT8 pair made from it."""

    result: CalibrationResult
    fp32: NcnnModel
    int8: NcnnModel
    mixed: MixedPrecision | None = None

    @property
    def table(self) -> CalibrationTable:
        """The table the INT8 model was made with: ``--auto-fp32``'s (the chosen layers' activation lines
        removed), else the calibration's."""
        return self.mixed.table if self.mixed is not None else self.result.table


def build_ncnn(
    model: ModelFiles,
    prep: PreprocessOptions,
    options: CalibrationOptions,
    auto: AutoFp32Options | None = None,
    fp16_storage: bool = True,
    result: CalibrationResult | None = None,
    graph: Graph | None = None,
) -> NcnnBuild:
    """Calibrate (unless ``result`` is given), convert to ncnn FP32, optionally choose FP32 layers, quantize."""
    graph = graph if graph is not None else model.load()
    result = result if result is not None else calibrate(model, prep, options, graph)
    fp32 = convert_graph(graph)
    mixed = None if auto is None else auto_fp32_table(fp32, result.table, prep, auto, model.proto, fp16_storage)
    table = result.table if mixed is None else mixed.table
    int8 = quantize_model(fp32, table, fp16_storage=fp16_storage, biases=result.biases, weights=result.weights)
    return NcnnBuild(result, fp32, int8, mixed)


def ncnn_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """The files of an ncnn build: ``<stem>.param/.bin`` (FP32), ``<stem>-int8.param/.bin``, ``<stem>.table``."""
    out_dir = Path(out_dir)
    return {
        "fp32_param": out_dir / f"{stem}.param",
        "fp32_bin": out_dir / f"{stem}.bin",
        "int8_param": out_dir / f"{stem}-int8.param",
        "int8_bin": out_dir / f"{stem}-int8.bin",
        "table": out_dir / f"{stem}.table",
    }


def write_ncnn_models(fp32: NcnnModel, int8: NcnnModel, paths: dict[str, Path]) -> None:
    write_model(fp32, paths["fp32_param"], paths["fp32_bin"])
    write_model(int8, paths["int8_param"], paths["int8_bin"])


def write_ncnn_build(
    build: NcnnBuild, out_dir: Path, stem: str, legacy_table: bool = False, equalized: Equalization | None = None
) -> dict[str, Path]:
    """The build's files (``ncnn_paths``), and with ``equalized`` the caffemodel they were made from,
    ``<stem>-equalized.caffemodel``: the table and the models fit it, not the original."""
    paths = ncnn_paths(out_dir, stem)
    if equalized is not None:
        paths["equalized"] = Path(out_dir) / f"{stem}-equalized.caffemodel"
    text = table_text(dataclasses.replace(build.result, table=build.table), legacy_table)
    with output_set():  # the table, both models (and the equalized caffemodel) land together, or none of them
        write_ncnn_models(build.fp32, build.int8, paths)
        write_text_atomic(paths["table"], text)
        if equalized is not None:
            write_equalized(equalized, paths["equalized"])
    return paths


@dataclass(frozen=True)
class TrtOptions:
    """``export-trt``: the ONNX batch, the cache's TensorRT version, the layers left FP32, the ranges' source."""

    batch: int = 1
    trt_version: str = DEFAULT_TRT_VERSION
    table: Path | None = None  # take the ranges from an ncnn table instead of statistics
    fp32_layers: tuple[str, ...] = ()
    auto_fp32: float | None = None
    auto_fp32_images: int = 4
    equalized: bool = False  # the model is --equalize's (run_model): the accuracy warning does not suggest it


@dataclass
class TrtExport:
    """The FP32 and Q/DQ ONNX models and the tensor ranges TensorRT's files are written from."""

    onnx: OnnxExport
    qdq: onnx.ModelProto
    ranges: dict[str, float]
    method: str  # what the ranges came from: a threshold method or "table"
    source: str
    fp32_layers: list[str]
    choice: Fp32Choice | None = None
    layer_ranges: dict[str, float] = dataclasses.field(default_factory=dict)  # Q/DQ input amax per layer
    check: QdqCheck | None = None  # the Q/DQ model against FP32 on calibration images; None: no images


def _trt_value_ranges(
    model: ModelFiles,
    graph: Graph,
    export: OnnxExport,
    prep: PreprocessOptions,
    options: CalibrationOptions,
    trt: TrtOptions,
) -> tuple[dict[str, float], dict[str, float], str, dict[str, tuple[np.ndarray, np.ndarray]], list[Path]]:
    """amax per Caffe value, amax per quantized layer's input, a description of where they came from, the
    ``--adaround`` weights (``qdq_weights``) and the calibration images to check the Q/DQ model on
    (``auto_select.validation_images``, as ``--method auto`` validates; none without ``--images``).

    The layer inputs are the ncnn table's thresholds (``table_from_statistics``: the head rule and the eq
    search included), so the ncnn table, the TensorRT cache, the ranges files and the Q/DQ ONNX agree.
    The other tensors (TensorRT's implicit quantization needs every one) get the histogram method's range.
    """
    if trt.table:
        table = read_ncnn_table(trt.table)
        return (
            table_ranges(table, graph),
            layer_input_ranges(table),
            f"ncnn table {trt.table}",
            {},
            _check_images(options),
        )
    stats = collect(model, graph, prep, options, values=all_values(graph))
    needed = [v for v in export.activations() if v in graph.blob_names and v not in export.constants]
    missing = [v for v in needed if v not in stats.histograms]
    if missing:
        raise Int8ConvError(
            f"the statistics hold no histogram for {len(missing)} of the {len(needed)} tensors "
            f"TensorRT needs (e.g. {', '.join(missing[:4])}); statistics saved by 'calibrate' "
            "cover only convolution inputs: collect them with 'int8conv export-trt --images DIR "
            "--save-stats FILE'"
        )
    result = table_from_statistics(graph, stats, options, prep.for_graph(graph, model.proto))
    values = value_ranges(stats, histogram_method(options.method), options.percentile)
    values.update(table_ranges(result.table, graph))
    source = f"{stats.images_used} images, method {result.method}"
    return values, layer_input_ranges(result.table), source, qdq_weights(result), _check_images(options, stats)


def _check_images(options: CalibrationOptions, stats: CalibrationStatistics | None = None) -> list[Path]:
    """The calibration images export-trt checks its Q/DQ model on: the ones ``--method auto`` validates on."""
    return validation_images(calibration_images(options, stats)) if options.images is not None else []


def _onnx_feeds(graph: Graph, paths: Sequence[Path], prep: Preprocess, batch: int = 1) -> list[dict[str, np.ndarray]]:
    """onnxruntime feeds of the readable ones of ``paths``: each image ``batch`` times (NCHW), so a model with a
    fixed batch N runs as written."""
    name = next(iter(graph.inputs))
    return [{name: np.repeat(x[None], batch, axis=0)} for x in _image_inputs(graph, paths, prep)]


def _warn_inaccurate(model: str, worst: float, images: int, runtime: str, remedies: Sequence[str]) -> None:
    """The accuracy warning of the ncnn INT8 model and of the Q/DQ ONNX, one wording, with the remedies this tool
    has and the run did not use (the callers check the bar: ``not worst >= WARN_BELOW``, so NaN warns)."""
    log.warning(
        "the %s's output cosine against FP32 is %.4f on the worst of %d calibration image(s) (%s), below %g: "
        "the %s is not as accurate as FP32 on this model%s",
        model,
        worst,
        images,
        runtime,
        WARN_BELOW,
        model,
        "".join(f"; {remedy}" for remedy in remedies),
    )


def warn_inaccurate_int8(result: CalibrationResult, equalized: bool = False) -> None:
    """After ``--method auto`` (its validation score), for the commands whose product is the ncnn INT8 model
    (calibrate, convert_tool.py, report); ``equalized``: the model is already ``--equalize``'s."""
    if not result.validation_images or result.scores[AUTO_METHOD] >= WARN_BELOW:
        return
    remedies = [
        "measure it on other images (int8conv eval)",
        f"keep its most sensitive layers FP32 with int8conv quantize --auto-fp32 {WARN_BELOW:g}",
    ]
    pairs = len(equalization_pairs(result.deploy))
    if pairs and not equalized:
        remedies.append(
            f"equalize the inputs of its {pairs} conv->depthwise pair(s) first (convert_tool.py --ncnn-dir OUT "
            "--equalize, or int8conv equalize: the table then fits the equalized caffemodel)"
        )
    _warn_inaccurate("INT8 model", result.scores[AUTO_METHOD], result.validation_images, "ncnn runtime", remedies)


def warn_inaccurate_qdq(check: QdqCheck, graph: Graph, trt: TrtOptions) -> None:
    """export-trt's warning for the Q/DQ ONNX it wrote (``check``)."""
    if check.worst >= WARN_BELOW:
        return
    remedies = []
    if trt.auto_fp32 is None or trt.auto_fp32 < WARN_BELOW:
        remedies.append(f"keep its most sensitive layers FP32 with --auto-fp32 {WARN_BELOW:g}")
    pairs = len(equalization_pairs(graph))
    if pairs and not trt.equalized and trt.table is None:
        remedies.append(f"equalize the inputs of its {pairs} conv->depthwise pair(s) with --equalize")
    _warn_inaccurate("Q/DQ model", check.worst, len(check.cosines), "onnxruntime", remedies)


def _refuse_adaround_with_table(table: Path | None, options: CalibrationOptions) -> None:
    """A given table holds no learned weights: ``--adaround`` needs the calibration done here."""
    if table is not None and options.adaround:
        raise Int8ConvError(
            f"--adaround learns weights, which the table {table} cannot hold: drop --table to calibrate here"
        )


def qdq_weights(result: CalibrationResult) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``--adaround``'s adjusted FP32 weights with their per-output-channel scales, for ``insert_qdq``: the Q/DQ
    ONNX quantizes them with ncnn's scales, so TensorRT gets the learned integers too."""
    return {
        name: (weight, per_output_scales(weight, result.table.weight_scales[name]))
        for name, weight in (result.weights or {}).items()
    }


def ncnn_fp32_layers(graph: Graph) -> list[str]:
    """The quantizable layers ncnn's INT8 model of ``graph`` keeps FP32 (none when ncnn cannot run the model)."""
    try:
        return runtime_fp32_layers(convert_graph(graph))
    except ModelError:  # a layer ncnn cannot run (an LSTM): there is no ncnn INT8 model to mirror
        return []


def export_trt(model: ModelFiles, prep: PreprocessOptions, options: CalibrationOptions, trt: TrtOptions) -> TrtExport:
    """FP32 ONNX, tensor ranges and the Q/DQ ONNX (with ``--auto-fp32``'s layers left FP32)."""
    if trt.batch == 0 or trt.batch < -1:
        raise Int8ConvError(f"--batch must be a positive number or -1 (dynamic), not {trt.batch}")
    cache_version(trt.trt_version)  # a bad version fails before any work
    _refuse_adaround_with_table(trt.table, options)
    graph = model.load()
    export = export_onnx(graph, batch=trt.batch)
    check_fp32_layers(export, trt.fp32_layers)  # a misspelt layer: before the calibration, not after it
    values, layer_ranges, source, weights, check_images = _trt_value_ranges(model, graph, export, prep, options, trt)
    ranges = tensor_ranges(export, values)
    # what the ncnn INT8 model keeps FP32 stays FP32 here too: no calibration step validates those thresholds
    # (the ShuffleNet's grouped convolutions: Q/DQ worst held-out image 0.716 quantized, 0.879 FP32)
    mirrored = [name for name in ncnn_fp32_layers(graph) if name not in trt.fp32_layers]
    if mirrored:
        log.info("Q/DQ: %d layer(s) stay FP32, as in the ncnn INT8 model: %s", len(mirrored), ", ".join(mirrored))
    fp32_layers = list(trt.fp32_layers) + mirrored
    choice = check = None
    graph_prep = prep.for_graph(graph, model.proto) if options.images is not None else None
    if trt.auto_fp32 is not None:
        if options.images is None:
            raise Int8ConvError("--auto-fp32 scores the Q/DQ model on images: give them with --images")
        feeds = _onnx_feeds(graph, first_images(options.images, max(trt.auto_fp32_images, 1)), graph_prep)
        scoring = export if trt.batch in (1, -1) else export_onnx(graph, batch=1)
        choice, check = choose_fp32_layers(scoring, ranges, feeds, trt.auto_fp32, layer_ranges, weights, fp32_layers)
        fp32_layers += [name for name in choice.fp32_layers if name not in fp32_layers]
    qdq = insert_qdq(export, ranges, fp32_layers, layer_ranges, weights)
    if check is None and check_images:  # the written model, at its batch (a dynamic one runs batch 1)
        check = OutputCosine(export, _onnx_feeds(graph, check_images, graph_prep, max(trt.batch, 1))).check(qdq)
    if check is None:
        log.info("no calibration images (--images): the Q/DQ model's accuracy against FP32 is not checked")
    else:
        warn_inaccurate_qdq(check, graph, trt)
    method = "table" if trt.table else options.method
    return TrtExport(export, qdq, ranges, method, source, fp32_layers, choice, layer_ranges, check)


def trt_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>.onnx``, ``.qdq.onnx``, ``.cache``, ``.ranges.txt`` and ``.ranges.json``."""
    return {
        kind: Path(out_dir) / f"{stem}{suffix}"
        for kind, suffix in (
            ("onnx", ".onnx"),
            ("qdq", ".qdq.onnx"),
            ("cache", ".cache"),
            ("txt", ".ranges.txt"),
            ("json", ".ranges.json"),
        )
    }


def write_trt_export(export: TrtExport, out_dir: Path, stem: str, trt_version: str) -> dict[str, Path]:
    paths = trt_paths(out_dir, stem)
    with output_set():  # the five files land together, or none of them
        write_bytes_atomic(paths["onnx"], export.onnx.model.SerializeToString())
        write_bytes_atomic(paths["qdq"], export.qdq.SerializeToString())
        write_calibration_cache(paths["cache"], export.ranges, trt_version, algorithm_for(export.method))
        write_dynamic_ranges(paths["txt"], export.ranges)
        write_ranges_json(paths["json"], export.ranges, export.method, export.source)
    return paths


def load_inputs(images: Path, prep: Preprocess, input_name: str, max_images: int) -> list[dict[str, np.ndarray]]:
    """Network inputs of the readable ones of the first ``max_images`` images (0 = all)."""
    return network_inputs(first_images(images, max_images), prep, input_name)


@dataclass(frozen=True)
class EvalOptions:
    """``eval``: the images (not the calibration ones), the task metric, timing, and the Caffe FP32 reference."""

    images: Path
    max_images: int = 0
    task: str = "auto"
    score_threshold: float | None = None  # None: the task's default (``evaluate.score_threshold``)
    iou_threshold: float = 0.5
    threads: tuple[int, ...] = (1, 2)
    timing_runs: int = 10
    backend: str = "auto"
    gpu: int | None = None
    caffe_reference: bool = True
    layer_times: bool = False  # time each INT8 layer alone against FP32 (evaluation.speed)


def evaluate_ncnn(
    model: ModelFiles,
    files: dict[str, Path],
    prep: PreprocessOptions,
    options: EvalOptions,
    graph: Graph | None = None,
    arm: ArmOptions | None = None,
) -> EvalReport | ArmReport:
    """Caffe FP32 (unless skipped), ncnn FP32 and ncnn INT8 (``files``: ``ncnn_paths`` keys) on the images.

    With ``arm``: both ncnn models on ncnn's ARM kernels against x86 instead (``int8conv.arm.evaluate``), no Caffe.
    """
    graph = graph if graph is not None else model.load()
    images = first_images(options.images, options.max_images)
    caffe_forward = None
    if options.caffe_reference and arm is None:
        # the FP32 reference is Caffe's (pycaffe or OpenCV), never the ncnn model under evaluation
        backend = "auto" if options.backend == "ncnn" else options.backend
        caffe_forward = make_engine(backend, graph, model.proto, model.caffemodel, gpu=options.gpu).forward
        _check_converted_from(graph, model.proto, files["fp32_param"])
    config = EvalConfig(
        files["fp32_param"],
        files["fp32_bin"],
        files["int8_param"],
        files["int8_bin"],
        prep.for_graph(graph, model.proto),
        images,
        caffe_forward=caffe_forward,
        task=options.task,
        score_threshold=options.score_threshold,
        iou_threshold=options.iou_threshold,
        threads=tuple(options.threads),
        timing_runs=options.timing_runs,
    )
    found = evaluate(config) if arm is None else evaluate_arm(config, arm)
    if options.layer_times and arm is None:  # the ARM report has no per-layer times (the CLI refuses the pair)
        found.layer_ms = layer_times(files["fp32_param"], files["fp32_bin"], files["int8_param"], files["int8_bin"])
    return found


def _check_converted_from(graph: Graph, proto: Path, param: Path) -> None:
    """The ncnn model's outputs are values of the Caffe model it is compared with (or ``param`` is another model's,
    and the engine would fail later on a missing blob, naming neither file)."""
    outputs = read_param(param).output_names
    foreign = [name for name in outputs if name not in graph.blob_names]  # its keys: every input and top value
    if foreign:
        raise ModelError(
            f"{param} was converted from another Caffe model than {proto}, which has no blob "
            f"{', '.join(map(repr, foreign))} (an output of the ncnn model): convert this one with int8conv convert, "
            "or give the ncnn model's own --proto and --model"
        )


def report(
    model: ModelFiles,
    prep: PreprocessOptions,
    options: CalibrationOptions,
    evaluation: EvalOptions,
    out_dir: Path,
    table: Path | None = None,
    fp16_storage: bool = True,
) -> tuple[Path, EvalReport]:
    """Calibrate (or read ``table``), build and evaluate the ncnn pair, and write the HTML page with its plots.

    Returns the page and the evaluation report (``eval``'s).
    """
    with output_set() as outputs:  # the folder's table, models, page and figures land together, or none of them
        return _report(model, prep, options, evaluation, out_dir, table, fp16_storage, outputs)


def _report(
    model: ModelFiles,
    prep: PreprocessOptions,
    options: CalibrationOptions,
    evaluation: EvalOptions,
    out_dir: Path,
    table: Path | None,
    fp16_storage: bool,
    outputs: OutputSet,
) -> tuple[Path, EvalReport]:
    _refuse_adaround_with_table(table, options)
    graph = model.load()
    list_images(evaluation.images)  # no evaluation images: say so before any work
    stats = collect(model, graph, prep, options)
    paths = ncnn_paths(out_dir, model.stem)
    if table is None:
        result = table_from_statistics(graph, stats, options, prep.for_graph(graph, model.proto))
        warn_inaccurate_int8(result)
        build = build_ncnn(model, prep, options, fp16_storage=fp16_storage, result=result, graph=graph)
        write_ncnn_build(build, out_dir, model.stem)
        tbl, source = build.table, f"computed here with --method {options.method}, written to {paths['table']}"
    else:
        tbl, source = read_ncnn_table(table), f"table {table}, copied to {paths['table']}"
        fp32 = convert_graph(graph)
        write_ncnn_models(fp32, quantize_model(fp32, tbl, fp16_storage=fp16_storage), paths)
        write_text_atomic(paths["table"], format_ncnn_table(tbl))  # not a stale table of an earlier run beside them
    staged = {key: outputs.staged_file(path) for key, path in paths.items() if key != "table"}  # not landed yet
    found = evaluate_ncnn(model, staged, prep, evaluation, graph)
    found.model, found.int8_model = str(paths["fp32_param"]), str(paths["int8_param"])
    layers = layer_reports(graph, stats, tbl, found)
    intro = html.escape(
        f"{model.caffemodel} ({model.proto.name}); thresholds: {source}; histograms of "
        f"{stats.images_used} calibration image(s); evaluation on {found.images} image(s) "
        f"from {evaluation.images}."
    )
    return write_report(out_dir, model.stem, layers, found, format_report(found), intro), found
