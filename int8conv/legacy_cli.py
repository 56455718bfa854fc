"""``convert_tool.py``: the original caffe-int8-convert-tools command line on top of ``int8conv calibrate``.

Differences from ``int8conv calibrate`` are only those the original tool had: ``--output`` defaults to
``calibration.table`` and ``--gpu`` is the original on/off switch (``--gpu 1`` = pycaffe GPU mode on device 0).
"""
from __future__ import annotations

import argparse
import sys

from .cli import run
from .commands.calibrate import add_table_args
from .commands.calibrate import run as run_calibrate
from .commands.common import add_calibration_args, add_model_args, add_preprocess_args


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
        from .commands.convert import run_one_shot

        return run_one_shot(args)
    return run_calibrate(args)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv if argv is not None else sys.argv[1:])
