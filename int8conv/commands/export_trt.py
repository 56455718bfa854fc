"""``int8conv export-trt``: Caffe model + calibration -> ONNX, Q/DQ ONNX, TensorRT cache and dynamic ranges.

Export the Caffe model to ONNX (FP32) and to a Q/DQ ONNX for TensorRT 10/11 explicit quantization, and write the
TensorRT 8-10 calibration cache and per-tensor dynamic ranges (text and JSON) for every tensor of the exported
network. Ranges come from calibration images (as 'calibrate' takes them), saved statistics (--load-stats) or an ncnn
table (--table).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from int8conv import pipeline
from int8conv.commands import common
from int8conv.errors import Int8ConvError
from int8conv.tables.tensorrt_files import DEFAULT_TRT_VERSION

#: the line ``int8conv --help`` shows for this command
SUMMARY = "export ONNX, Q/DQ ONNX, TensorRT calibration cache and dynamic ranges"


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_calibration_inputs(parser)
    group = parser.add_argument_group("TensorRT export")
    common.add_out_dir_arg(group, "OUT/<stem>.onnx, .qdq.onnx, .cache, .ranges.txt, .ranges.json", required=True)
    group.add_argument(
        "--equalize",
        action="store_true",
        help="export the equalized model (int8conv equalize: every depthwise layer's input channels one range); the "
        "ONNX files are the same network, and the cache and ranges fit them, not an ONNX of the original caffemodel",
    )
    group.add_argument(
        "--table",
        type=Path,
        metavar="FILE",
        help="take the convolution-input ranges from an ncnn table (amax = 127/scale) instead of "
        "statistics; the cache then covers only those tensors",
    )
    group.add_argument(
        "--trt-version",
        default=DEFAULT_TRT_VERSION,
        help=f"TensorRT version for the cache header: 8.6.1, 10.13.3, 10 or 101303 (default {DEFAULT_TRT_VERSION})",
    )
    group.add_argument(
        "--batch",
        type=int,
        default=1,
        help="batch dimension of the ONNX models: N > 0 fixes it, -1 makes it dynamic (default 1)",
    )
    group.add_argument(
        "--fp32-layers",
        nargs="+",
        default=[],
        metavar="LAYER",
        help="Convolution/InnerProduct layers to leave without Q/DQ (FP32) in the Q/DQ ONNX",
    )
    common.add_auto_fp32_arg(
        group,
        "keep the fewest layers FP32 in the Q/DQ ONNX so that its output cosine against FP32 "
        "(onnxruntime, worst of --auto-fp32-images calibration images) reaches COSINE",
    )
    common.add_adaround_arg(
        group,
        "the Q/DQ ONNX gets FP32 weights that round to the learned integers with the ncnn table's weight "
        "scales (the same integers as the ncnn INT8 model)",
    )
    group.add_argument(
        "--auto-fp32-images",
        type=int,
        default=4,
        metavar="N",
        help="calibration images scored by --auto-fp32 (default 4)",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.table is not None and args.equalize:  # the statistics flags beside --table: validate.UNUSED
        raise Int8ConvError(f"--equalize changes the model, which the table {args.table} is not for: drop one")
    model, prep, calibration = common.calibration_inputs(args)
    trt = pipeline.TrtOptions(
        batch=args.batch,
        trt_version=args.trt_version,
        table=args.table,
        fp32_layers=tuple(args.fp32_layers),
        auto_fp32=args.auto_fp32,
        auto_fp32_images=args.auto_fp32_images,
        equalized=args.equalize,
    )
    with pipeline.run_model(model, prep, calibration, args.equalize) as (source, _):
        export = pipeline.export_trt(source, prep, calibration, trt)
    paths = pipeline.write_trt_export(export, args.out_dir, model.stem, args.trt_version)
    if not args.quiet:
        quantized = sum(1 for n in export.qdq.graph.node if n.op_type == "QuantizeLinear")
        lines = [f"{kind:<6} {path}" for kind, path in paths.items()]
        lines.append(f"ranges {len(export.ranges)} of {len(export.onnx.activations())} tensors ({export.source})")
        lines.append(f"Q/DQ   {quantized} QuantizeLinear nodes; FP32 layers: {', '.join(export.fp32_layers) or 'none'}")
        if export.choice is not None:
            lines.append(
                f"cosine all INT8 {export.choice.cosine_all_int8:.5f}, with FP32 layers "
                f"{export.choice.cosine:.5f} (target {export.choice.target})"
            )
        if export.check is not None:
            lines.append(
                f"check  Q/DQ output cosine {export.check.worst:.5f} against FP32 (onnxruntime CPU, worst of "
                f"{len(export.check.cosines)} calibration image(s); mean {export.check.mean:.5f})"
            )
        lines.append(f"time   {time.perf_counter() - started:.1f} s")
        print("\n".join(lines))
    return 0
