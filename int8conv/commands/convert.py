"""``int8conv convert``: Caffe prototxt + caffemodel -> ncnn FP32 ``.param``/``.bin``.

Convert a Caffe deploy model to ncnn FP32 files, with BatchNorm/Scale folded into convolutions and activations
fused, as ncnnoptimize does. Layer names are kept, so calibration tables line up.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv import pipeline
from int8conv.commands.common import add_command, add_model_args, model_files
from int8conv.errors import Int8ConvError
from int8conv.ncnn.model import write_model

#: the line ``int8conv --help`` shows for this command
SUMMARY = "convert a Caffe model to an ncnn FP32 .param/.bin"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = add_command(sub, "convert", run, SUMMARY, __doc__)
    add_model_args(parser)
    group = parser.add_argument_group("output (either --out-dir, or both --param and --bin)")
    group.add_argument(
        "--out-dir",
        type=Path,
        help="write OUT/<stem>.param and OUT/<stem>.bin, where <stem> is the caffemodel's file stem",
    )
    group.add_argument("--param", type=Path, help="path of the .param file to write")
    group.add_argument("--bin", type=Path, help="path of the .bin file to write")


def output_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """The .param/.bin pair asked for; mixing the two styles or giving half a pair is an error."""
    if args.out_dir is not None:
        if args.param is not None or args.bin is not None:
            raise Int8ConvError("give either --out-dir or --param/--bin, not both")
        stem = Path(args.model).stem
        return args.out_dir / f"{stem}.param", args.out_dir / f"{stem}.bin"
    if args.param is None or args.bin is None:
        raise Int8ConvError("give --out-dir DIR, or both --param FILE and --bin FILE")
    return args.param, args.bin


def run(args: argparse.Namespace) -> int:
    param, binary = output_paths(args)
    model = pipeline.convert(model_files(args))
    write_model(model, param, binary)
    if not getattr(args, "quiet", False):
        print(f"ncnn FP32 model: {param} ({len(model.layers)} layers), {binary}")
        print(f"inputs: {', '.join(model.input_names)}; outputs: {', '.join(model.output_names)}")
    return 0
