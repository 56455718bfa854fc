"""``convert_tool.py``: the original caffe-int8-convert-tools command line on top of ``int8conv calibrate``.

Differences from ``int8conv calibrate`` are only those the original tool had: ``--output`` defaults to
``calibration.table`` and ``--gpu`` is the original on/off switch (``--gpu 1`` = pycaffe GPU mode on device 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from int8conv.cli import run
from int8conv.commands.calibrate import (
    add_table_args,
    calibrate_from_args,
    summary,
    write_table,
)
from int8conv.commands.calibrate import run as run_calibrate
from int8conv.commands.common import (
    add_calibration_args,
    add_model_args,
    add_preprocess_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convert_tool.py",
                                     description="find the pretrained caffe models int8 quantize scale value")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_model_args(parser)
    add_preprocess_args(parser)
    add_calibration_args(parser, images_required=False)
    add_table_args(parser)
    for action in parser._actions:
        if action.dest == "output":
            action.required, action.default = False, "calibration.table"
        if action.dest == "gpu":
            action.default, action.help = 0, "use gpu to forward (1 = pycaffe GPU mode on device 0, 0 = CPU)"
    parser.add_argument("--ncnn-dir", metavar="OUT",
                        help="also write OUT/<name>.param/.bin (FP32), OUT/<name>-int8.param/.bin and "
                             "OUT/<name>.table, where <name> is the caffemodel's file stem")
    parser.set_defaults(func=_run)
    return parser


def _run(args: argparse.Namespace) -> int:
    args.gpu = 0 if args.gpu else None
    if args.gpu is not None and args.backend == "auto":
        args.backend = "caffe"
    if args.ncnn_dir:
        return run_one_shot(args)
    return run_calibrate(args)


def run_one_shot(args: argparse.Namespace) -> int:
    """Calibrate, convert and quantize: OUT/<name>.param/.bin, OUT/<name>-int8.param/.bin, OUT/<name>.table."""
    from int8conv.ncnn.convert import convert_graph
    from int8conv.ncnn.model import write_model
    from int8conv.ncnn.quantize import quantize_model

    out = Path(args.ncnn_dir)
    name = Path(args.model).stem
    args.output = str(out / f"{name}.table")
    graph, result = calibrate_from_args(args)
    fp32 = convert_graph(graph)
    write_model(fp32, out / f"{name}.param", out / f"{name}.bin")
    int8 = quantize_model(fp32, result.table)
    write_model(int8, out / f"{name}-int8.param", out / f"{name}-int8.bin")
    write_table(args, graph, result)
    if not args.quiet:
        print(summary(args, result))
        print(f"ncnn       {out / name}.param/.bin (FP32), {out / name}-int8.param/.bin (INT8)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv if argv is not None else sys.argv[1:])
