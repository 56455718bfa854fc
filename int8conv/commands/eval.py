"""``int8conv eval``: Caffe FP32, ncnn FP32 and ncnn INT8 on evaluation images; accuracy and speed.

Run the Caffe FP32 reference, ncnn FP32 and ncnn INT8 on evaluation images (not the calibration ones) and report:
ncnn FP32 vs Caffe differences; INT8 vs FP32 cosine per quantized layer and at the outputs, top-1 agreement
(classifiers), detection precision/recall (SSD, host-decoded detectors) or thresholded-map IoU (segmentation);
median ms/image of FP32 and INT8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from int8conv import pipeline
from int8conv.arm.evaluate import format_arm_report
from int8conv.arm.runtime import ARM_CPUS, ArmOptions
from int8conv.atomic import write_text_atomic
from int8conv.commands import common
from int8conv.engines import BACKENDS
from int8conv.errors import Int8ConvError
from int8conv.evaluation.evaluate import format_report
from int8conv.ncnn.model import read_model, write_model
from int8conv.ncnn.quantize import quantize_model
from int8conv.tables.ncnn_table import read_ncnn_table

#: the line ``int8conv --help`` shows for this command
SUMMARY = "compare ncnn FP32/INT8 with Caffe FP32 on images: accuracy and speed"


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_model_args(parser)
    files = parser.add_argument_group("ncnn models (either --ncnn-dir, or --param/--bin plus the INT8 pair or --table)")
    layout = "<stem>.param/.bin and <stem>-int8.param/.bin"  # pipeline.ncnn_paths
    files.add_argument("--ncnn-dir", type=Path, help=f"folder written by convert_tool.py --ncnn-dir: {layout}")
    common.add_ncnn_files_args(files, "ncnn FP32")
    common.add_ncnn_files_args(files, "ncnn INT8", prefix="int8-")
    files.add_argument(
        "--table", type=Path, help="quantize the FP32 model with this table instead of reading an INT8 pair"
    )
    common.add_no_fp16_arg(files, "with --table: ")
    group = parser.add_argument_group("evaluation")
    common.add_evaluation_args(group)
    group.add_argument("--backend", choices=BACKENDS, default="auto", help="Caffe FP32 engine (default auto)")
    group.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the report as JSON to FILE (stdout when no FILE is given)",
    )
    arm = parser.add_argument_group("ARM kernels (after `int8conv install-arm`; natively on an aarch64 host)")
    arch_help = (
        "arm64: run both models on ncnn's ARM kernels under qemu and report ARM INT8 vs ARM FP32 "
        "and ARM vs x86 per precision (no Caffe reference; emulated timings only)"
    )
    arm.add_argument("--arch", choices=("x86", "arm64"), default="x86", help=arch_help)
    arm.add_argument(
        "--arm-cpu",
        choices=ARM_CPUS,
        default="cortex-a76",
        help="QEMU_CPU: cortex-a53 (ARMv8.0), cortex-a76 (ARMv8.2 + dot product, default), max",
    )
    arm.add_argument(
        "--arm-fp16",
        choices=("on", "off"),
        default="on",
        help="ncnn's fp16 packed/storage/arithmetic on ARM (on by default, as on a phone)",
    )
    arm.add_argument("--arm-threads", type=int, default=1, help="ncnn threads on ARM (default 1)")
    mixed = parser.add_argument_group("automatic mixed precision (with --table)")
    common.add_auto_fp32_arg(mixed, "keep the most sensitive layers FP32 until the output cosine reaches COSINE")
    what = "images the FP32 layers are chosen on (keep them apart from --images)"
    common.add_images_args(mixed, what, max_default=8, flags=("--auto-fp32-images", "--auto-fp32-max-images"))
    common.add_preprocess_args(parser)


def _pair(args: argparse.Namespace) -> tuple[Path, Path, Path | None, Path | None]:
    """FP32 and INT8 file paths from --ncnn-dir (as ``pipeline.ncnn_paths`` names them) or the explicit options."""
    if (
        args.ncnn_dir is not None
    ):  # validate.UNUSED refused file-by-file models beside it, and an INT8 pair with --table
        paths = pipeline.ncnn_paths(args.ncnn_dir, common.model_files(args).stem)
        int8 = (None, None) if args.table else (paths["int8_param"], paths["int8_bin"])
        return paths["fp32_param"], paths["fp32_bin"], *int8
    if args.param is None or args.bin is None:
        raise Int8ConvError("give --ncnn-dir DIR, or --param and --bin of the ncnn FP32 model")
    if args.table is None and (args.int8_param is None or args.int8_bin is None):
        raise Int8ConvError("give the INT8 model (--int8-param and --int8-bin) or a --table to quantize with")
    return args.param, args.bin, args.int8_param, args.int8_bin


def run(args: argparse.Namespace) -> int:
    if args.auto_fp32 is not None and args.table is None:
        raise Int8ConvError("--auto-fp32 needs --table (the INT8 model is built here from the table)")
    fp32_param, fp32_bin, int8_param, int8_bin = _pair(args)
    for path in (fp32_param, fp32_bin, int8_param, int8_bin):
        if path is not None and not path.is_file():
            raise Int8ConvError(f"{path}: no such file")
    with tempfile.TemporaryDirectory(prefix="int8conv-eval-") as tmp:
        if int8_param is None:
            model = read_model(fp32_param, fp32_bin)
            table = read_ncnn_table(args.table)
            if args.auto_fp32 is not None:
                options = common.auto_fp32_options(args, args.auto_fp32_images, args.auto_fp32_max_images)
                table = common.mixed_precision_table(args, model, table, options)
            int8_param, int8_bin = Path(tmp) / "int8.param", Path(tmp) / "int8.bin"
            write_model(quantize_model(model, table, fp16_storage=not args.no_fp16), int8_param, int8_bin)
        files = {"fp32_param": fp32_param, "fp32_bin": fp32_bin, "int8_param": int8_param, "int8_bin": int8_bin}
        arm = ArmOptions(args.arm_cpu, args.arm_fp16 == "on", args.arm_threads) if args.arch == "arm64" else None
        report = pipeline.evaluate_ncnn(
            common.model_files(args),
            files,
            common.preprocess_options(args),
            common.eval_options(args, args.images, args.max_images),
            arm=arm,
        )
    if args.table is not None:
        report.int8_model = f"quantized from {args.table}" + (
            f" with --auto-fp32 {args.auto_fp32}" if args.auto_fp32 is not None else ""
        )
    if args.json == "-":
        sys.stdout.write(report.to_json() + "\n")
        return 0
    if args.json:
        write_text_atomic(args.json, report.to_json() + "\n")
    # the report is what eval is run for: -q silences the log, not the result
    print(format_report(report) if arm is None else format_arm_report(report))
    return 0
