"""``int8conv quantize``: ncnn FP32 ``.param``/``.bin`` + calibration table -> ncnn INT8 ``.param``/``.bin``.

Write the INT8 ncnn model for a table, as ncnn2int8 does: int8 weights and scales for every
Convolution/ConvolutionDepthWise/InnerProduct with both table lines, requantize fusion between INT8 convolutions,
fp16 storage for the weights that stay FP32. Layers without an activation line stay FP32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv import pipeline
from int8conv.atomic import output_set
from int8conv.commands import common
from int8conv.evaluation.speed import format_choice
from int8conv.ncnn.model import read_model, write_model
from int8conv.ncnn.quantize import REQUANTIZE, int8_layers, quantize_model
from int8conv.tables.ncnn_table import read_ncnn_table, write_ncnn_table

#: the line ``int8conv --help`` shows for this command
SUMMARY = "quantize an ncnn FP32 model with a calibration table (ncnn2int8)"


def add_args(parser: argparse.ArgumentParser) -> None:
    files = parser.add_argument_group("files")
    common.add_ncnn_files_args(files, "ncnn FP32", required=True)
    files.add_argument("--table", required=True, type=Path, help="ncnn calibration table")
    common.add_ncnn_files_args(files, "ncnn INT8", prefix="out-", required=True, written=True)
    common.add_no_fp16_arg(files)
    add_auto_fp32_args(parser)
    common.add_preprocess_args(parser)


def add_auto_fp32_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("automatic mixed precision")
    common.add_auto_fp32_arg(
        group,
        "keep the most sensitive layers in FP32 until the INT8 output cosine against FP32 "
        "reaches COSINE (e.g. 0.99), measured on --images",
    )
    common.add_images_args(group, "images for --auto-fp32", max_default=8)
    common.add_task_args(group, thresholds=False)
    group.add_argument("--out-table", type=Path, help="also write the table without the FP32 layers' activation lines")
    common.add_auto_fp32_arg(group, "the same as --auto-fp32 (reads better with --optimize speed)", flag="--min-cosine")
    speed = parser.add_argument_group("speed-aware precision")
    speed.add_argument(
        "--optimize",
        choices=("accuracy", "speed"),
        default="accuracy",
        help="speed: time every layer alone on the ncnn runtime, FP32 against INT8, keep FP32 where "
        "INT8 does not pay, then check the whole model is no slower than FP32 at 1 and 2 "
        "threads; with --min-cosine, the fastest choice within that output cosine. Timing on "
        "this machine is a proxy for the target device (see --layer-timings)",
    )
    speed.add_argument(
        "--layer-timings",
        type=Path,
        metavar="JSON",
        help="per-layer ms measured on the target device, instead of timing here: {layer: {fp32: ms, int8: ms}} "
        "at one thread, or per thread count {layer: {fp32: {threads: ms}, int8: {...}}} as --save-layer-timings "
        "writes them",
    )
    speed.add_argument("--save-layer-timings", type=Path, metavar="JSON", help="write the per-layer timings used")


def run(args: argparse.Namespace) -> int:
    model = read_model(args.param, args.bin)
    table = read_ncnn_table(args.table)
    if args.optimize == "speed":
        options = pipeline.SpeedOptions(
            args.auto_fp32, args.images, args.max_images, args.task, args.layer_timings, args.save_layer_timings
        )
        choice = pipeline.speed_table(
            model, table, common.preprocess_options(args), options, args.param, fp16_storage=not args.no_fp16
        )
        table = choice.table
        if not args.quiet:
            print(format_choice(choice))
    elif args.auto_fp32 is not None:
        table = common.mixed_precision_table(
            args, model, table, common.auto_fp32_options(args, args.images, args.max_images)
        )
    int8 = quantize_model(model, table, fp16_storage=not args.no_fp16)
    with output_set():  # the INT8 pair and --out-table land together
        write_model(int8, args.out_param, args.out_bin)
        if args.out_table is not None:
            write_ncnn_table(table, args.out_table)
    if not args.quiet:
        quantized = int8_layers(int8)
        fused = sum(1 for layer in int8.layers if int(layer.params.get(8, 0)) > REQUANTIZE)
        print(f"ncnn INT8 model: {args.out_param}, {args.out_bin}")
        print(
            f"{len(quantized)} INT8 layer(s), {fused} requantize fusion(s), "
            f"weights of FP32 layers in {'fp32' if args.no_fp16 else 'fp16'}"
        )
    return 0
