"""``convert_tool.py``: the original caffe-int8-convert-tools command line on top of ``int8conv calibrate``.

Differences from ``int8conv calibrate`` are only those the original tool had: ``--output`` defaults to
``calibration.table`` and ``--gpu`` is the original on/off switch (``--gpu 1`` = pycaffe GPU mode on device 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from int8conv import pipeline
from int8conv.cli import run
from int8conv.commands.calibrate import add_table_args, summary
from int8conv.commands.calibrate import run as run_calibrate
from int8conv.commands.common import add_calibration_inputs, calibration_inputs
from int8conv.commands.validate import harden
from int8conv.errors import Int8ConvError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_tool.py", description="find the pretrained caffe models int8 quantize scale value"
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_calibration_inputs(parser)
    add_table_args(parser)
    for action in parser._actions:
        if action.dest == "output":
            action.required, action.default = False, None
        if action.dest == "gpu":
            action.default, action.help = 0, "use gpu to forward (1 = pycaffe GPU mode on device 0, 0 = CPU)"
    parser.add_argument(
        "--ncnn-dir",
        metavar="OUT",
        help="also write OUT/<name>.param/.bin (FP32), OUT/<name>-int8.param/.bin and "
        "OUT/<name>.table, where <name> is the caffemodel's file stem",
    )
    parser.add_argument(
        "--equalize",
        action="store_true",
        help="with --ncnn-dir: equalize the depthwise layers' input channels first (int8conv equalize) and "
        "build from that model, written as OUT/<name>-equalized.caffemodel; the table fits these models only",
    )
    harden(parser, "convert_tool.py")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    args.gpu = 0 if args.gpu else None
    if args.gpu is not None and args.backend == "auto":
        args.backend = "caffe"
    if args.equalize and not args.ncnn_dir:
        raise Int8ConvError(
            "--equalize changes the model the table is for: use it with --ncnn-dir (table and models together), "
            "or run int8conv equalize and calibrate its caffemodel"
        )
    if args.ncnn_dir:
        if args.output is not None:
            raise Int8ConvError(
                f"--output {args.output} and --ncnn-dir: the one-shot conversion writes its table "
                "to OUT/<name>.table; drop --output"
            )
        return run_one_shot(args)
    args.output = args.output or "calibration.table"
    return run_calibrate(args)


def run_one_shot(args: argparse.Namespace) -> int:
    """Calibrate, convert and quantize: OUT/<name>.param/.bin, OUT/<name>-int8.param/.bin, OUT/<name>.table."""
    model, prep, calibration = calibration_inputs(args)
    with pipeline.run_model(model, prep, calibration, args.equalize) as (source, equalized):
        build = pipeline.build_ncnn(source, prep, calibration)
    paths = pipeline.write_ncnn_build(
        build, Path(args.ncnn_dir), model.stem, legacy_table=args.legacy_table, equalized=equalized
    )
    args.output = str(paths["table"])
    pipeline.warn_inaccurate_int8(build.result, equalized is not None)
    if not args.quiet:
        print(summary(args, build.result))
        print(
            f"ncnn       {paths['fp32_param'].with_suffix('')}.param/.bin (FP32), "
            f"{paths['int8_param'].with_suffix('')}.param/.bin (INT8)"
        )
        if equalized is not None:
            print(
                f"equalized  {paths['equalized']} ({len(equalized.pairs)} depthwise layer(s); the table and models "
                "are for it)"
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv if argv is not None else sys.argv[1:])
