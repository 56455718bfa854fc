"""``int8conv calibrate``: Caffe model + images -> ncnn calibration table."""
from __future__ import annotations

import argparse
import logging
import time

from int8conv.atomic import write_text_atomic
from int8conv.caffe.graph import Graph, load_graph
from int8conv.calibration.calibrate import (
    CalibrationResult,
    build_table,
    collect_statistics,
    legacy_table,
    model_identity,
)
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.preprocess import list_images
from int8conv.commands.common import (
    add_calibration_args,
    add_model_args,
    add_preprocess_args,
    preprocess_from_args,
)
from int8conv.engines import make_engine
from int8conv.errors import Int8ConvError
from int8conv.tables.ncnn_table import write_ncnn_table

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("calibrate", help="compute an ncnn INT8 calibration table from images",
                            description="Forward calibration images through the Caffe model in FP32 and write "
                                        "the ncnn calibration table (layer-keyed, per-channel weight scales).")
    add_model_args(parser)
    add_preprocess_args(parser)
    add_calibration_args(parser)
    add_table_args(parser)
    parser.set_defaults(func=run)


def add_table_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("table")
    group.add_argument("--output", required=True, help="path to output calibration table file")
    group.add_argument("--legacy-table", action="store_true",
                       help="write the original caffe-int8-convert-tools format (blob-keyed, per-tensor weights)")
    group.add_argument("--head-method", choices=("minmax", "same"), default="minmax",
                       help="threshold of the layers that feed the network outputs directly (detection and "
                            "classification heads): their input's full range (minmax, default) or --method")
    group.add_argument("--weights-8bit", action="store_true",
                       help="8-bit weight scales everywhere; by default 3x3 stride-1 convolutions get 6-bit "
                            "scales, as ncnn's INT8 Winograd kernel needs")


def statistics_for(args: argparse.Namespace, graph: Graph, values: list[str] | None = None) -> CalibrationStatistics:
    """Forward the images (or merge saved statistics) and optionally save the result."""
    identity = model_identity(args.proto, args.model)
    if args.load_stats:
        stats = CalibrationStatistics.load_and_merge(args.load_stats)
        if stats.model.get("caffemodel_sha256") != identity["caffemodel_sha256"]:
            raise Int8ConvError(f"{args.load_stats[0]}: these statistics were collected for "
                                f"{stats.model.get('caffemodel', '?')}, not for {args.model}")
        log.info("merged statistics of %d file(s): %d images", len(args.load_stats), stats.images_used)
    else:
        if args.images is None:
            raise Int8ConvError("give calibration images with --images DIR (or saved statistics with --load-stats)")
        images = list_images(args.images)
        if args.max_images > 0:
            images = images[:args.max_images]
        prep = preprocess_from_args(args, graph)
        engine = make_engine(args.backend, graph, args.proto, args.model, gpu=args.gpu)
        log.info("calibrating %s on %d images with %s (%s)", args.model.name, len(images), engine.name,
                 args.method)
        stats = collect_statistics(graph, engine, images, prep, identity, values=values, batch_size=args.batch_size)
    if args.save_stats:
        stats.save(args.save_stats)
        log.info("statistics saved to %s", args.save_stats)
    return stats


def calibrate_from_args(args: argparse.Namespace) -> tuple[Graph, CalibrationResult]:
    """The calibrate pipeline shared by ``calibrate``, ``convert_tool.py`` and the one-shot conversion."""
    started = time.perf_counter()
    graph = load_graph(args.proto, args.model)
    stats = statistics_for(args, graph)
    result = build_table(graph, stats, args.method, percentile=args.percentile,
                         winograd_6bit=not args.weights_8bit,
                         head_method=None if args.head_method == "same" else args.head_method)
    result.seconds = time.perf_counter() - started
    return graph, result


def write_table(args: argparse.Namespace, graph: Graph, result: CalibrationResult) -> None:
    if args.legacy_table:
        write_text_atomic(args.output, legacy_table(graph, result))
    else:
        write_ncnn_table(result.table, args.output)


def summary(args: argparse.Namespace, result: CalibrationResult) -> str:
    stats = result.statistics
    lines = [f"table      {args.output}{' (legacy format)' if args.legacy_table else ''}",
             f"layers     {len(result.table.weight_scales)} quantizable, {len(result.table.activation_scales)} "
             f"with an activation scale" + (f", kept FP32: {', '.join(result.skipped_layers)}"
                                            if result.skipped_layers else ""),
             f"method     {result.method}",
             f"images     {stats.images_used} used, {stats.images_skipped} skipped",
             f"time       {result.seconds:.1f} s"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    graph, result = calibrate_from_args(args)
    write_table(args, graph, result)
    if not args.quiet:
        print(summary(args, result))
    return 0
