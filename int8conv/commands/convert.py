"""``int8conv convert``: Caffe prototxt + caffemodel -> ncnn FP32 ``.param``/``.bin``.

Convert a Caffe deploy model to ncnn FP32 files, with BatchNorm/Scale folded into convolutions and activations
fused, as ncnnoptimize does. Layer names are kept, so calibration tables line up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv import pipeline
from int8conv.commands import common
from int8conv.errors import Int8ConvError
from int8conv.ncnn.model import write_model

#: the line ``int8conv --help`` shows for this command
SUMMARY = "convert a Caffe model to an ncnn FP32 .param/.bin"


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_model_args(parser)
    group = parser.add_argument_group("output (either --out-dir, or both --param and --bin)")
    common.add_out_dir_arg(group, "OUT/<stem>.param and OUT/<stem>.bin")
    common.add_ncnn_files_args(group, "ncnn FP32", written=True)


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The .param/.bin pair asked for; mixing the two styles or giving half a pair is an error."""
    if args.out_dir is not None:
        if args.param is not None or args.bin is not None:
            raise Int8ConvError("give either --out-dir or --param/--bin, not both")
        paths = pipeline.ncnn_paths(args.out_dir, common.model_files(args).stem)
        return paths["fp32_param"], paths["fp32_bin"]
    if args.param is None or args.bin is None:
        raise Int8ConvError("give --out-dir DIR, or both --param FILE and --bin FILE")
    return args.param, args.bin


def run(args: argparse.Namespace) -> int:
    param, binary = output_paths(args)
    model = pipeline.convert(common.model_files(args))
    write_model(model, param, binary)
    if not args.quiet:
        print(f"ncnn FP32 model: {param} ({len(model.layers)} layers), {binary}")
        print(f"inputs: {', '.join(model.input_names)}; outputs: {', '.join(model.output_names)}")
    return 0
