"""``int8conv calibrate``: Caffe model + images -> ncnn calibration table.

Forward calibration images through the Caffe model in FP32 and write the ncnn calibration table (layer-keyed,
per-channel weight scales).
"""

from __future__ import annotations

import argparse

from int8conv import pipeline
from int8conv.calibration.calibrate import CalibrationResult
from int8conv.commands import common
from int8conv.errors import Int8ConvError

#: the line ``int8conv --help`` shows for this command
SUMMARY = "compute an ncnn INT8 calibration table from images"


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_calibration_inputs(parser)
    add_table_args(parser)


def add_table_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("table")
    group.add_argument("--output", required=True, help="path to output calibration table file")
    group.add_argument(
        "--legacy-table",
        action="store_true",
        help="write the original caffe-int8-convert-tools format (blob-keyed, per-tensor weights)",
    )
    common.add_head_method_arg(
        group,
        "threshold of the layers that feed the network outputs directly (detection and "
        "classification heads): their input's full range (minmax, default) or --method",
    )
    group.add_argument(
        "--weights-8bit",
        action="store_true",
        help="8-bit weight scales everywhere; by default 3x3 stride-1 convolutions (ncnn's INT8 Winograd kernel) "
        "get the most levels that cannot overflow it: 8-bit up to 25 input channels, 6-bit from 105",
    )
    group.add_argument(
        "--bias-correction",
        action="store_true",
        help="with --method eq or --adaround: correct each INT8 layer's FP32 bias for the mean output error of "
        "its quantization; the biases go into the INT8 .bin, so this needs a command that "
        "writes the INT8 model (convert_tool.py --ncnn-dir, report)",
    )
    common.add_adaround_arg(
        group,
        "the learned weights go into the INT8 .bin, so this needs a command that writes the INT8 model "
        "(convert_tool.py --ncnn-dir, report, export-trt)",
    )


def summary(args: argparse.Namespace, result: CalibrationResult) -> str:
    stats = result.statistics
    lines = [
        f"table      {args.output}{' (legacy format)' if args.legacy_table else ''}",
        f"layers     {len(result.table.weight_scales)} quantizable, {len(result.table.activation_scales)} "
        f"with an activation scale"
        + (f", kept FP32: {', '.join(result.skipped_layers)}" if result.skipped_layers else ""),
        f"method     {result.method}",
        f"images     {stats.images_used} used, {stats.images_skipped} skipped",
        f"time       {result.seconds:.1f} s",
    ]
    if result.validation_images:
        lines.append(
            f"check      INT8 output cosine {result.scores['auto']:.4f} against FP32 (ncnn runtime, worst of "
            f"{result.validation_images} calibration image(s))"
        )
    return "\n".join(lines)


def check_table_only(args: argparse.Namespace) -> None:
    """A table cannot hold corrected biases or learned weights: refuse --bias-correction and --adaround where only
    a table is written."""
    one_shot = "convert_tool.py --ncnn-dir OUT"
    for flag, what, where in (
        ("bias_correction", "biases", one_shot),  # ncnn only: report and export-trt do not take it
        ("adaround", "weights", f"{one_shot}, int8conv report, int8conv export-trt"),
    ):
        if getattr(args, flag, False):
            raise Int8ConvError(
                f"--{flag.replace('_', '-')} changes the INT8 model's {what}, which a calibration table cannot "
                f"hold: use it where the INT8 model is written ({where})"
            )


def run(args: argparse.Namespace) -> int:
    check_table_only(args)
    result = pipeline.calibrate(*common.calibration_inputs(args))
    pipeline.write_table(result, args.output, legacy=args.legacy_table)
    pipeline.warn_inaccurate_int8(result)
    if not args.quiet:
        print(summary(args, result))
    return 0
