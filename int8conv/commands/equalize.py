"""``int8conv equalize``: Caffe model + images -> an equalized caffemodel, the same network in FP32, better in INT8.

Cross-layer equalization: every depthwise convolution's input channels get one range (the producer's output
channel divided by a scale, the depthwise weights multiplied by it), measured on calibration images. Calibrate,
convert and export the new caffemodel with the same prototxt; its tables and models belong together (a table
made on it does not fit a model converted from the original).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv import pipeline
from int8conv.commands import common
from int8conv.engines import CALIBRATION_BACKENDS
from int8conv.errors import Int8ConvError

#: the line ``int8conv --help`` shows for this command
SUMMARY = "equalize depthwise layers' input channels: a caffemodel that quantizes better"


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_model_args(parser)
    common.add_preprocess_args(parser)
    group = parser.add_argument_group("equalization")
    what = f"calibration images (up to {pipeline.EQUALIZE_IMAGES}, spread over the set, measure the channel ranges)"
    common.add_images_args(group, what, required=True)
    group.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    group.add_argument(
        "--backend", choices=CALIBRATION_BACKENDS, default="auto", help="FP32 engine, as for calibrate (default auto)"
    )
    group.add_argument("--gpu", type=int, default=None, metavar="N", help="use GPU N (pycaffe backend only)")
    group.add_argument("--output", type=Path, required=True, help="path of the equalized .caffemodel to write")


def run(args: argparse.Namespace) -> int:
    if args.output.suffix.lower() == ".prototxt":  # before any work: a text name for the binary weights
        raise Int8ConvError(
            f"--output {args.output}: equalize writes a caffemodel (binary weights); the prototxt stays the same "
            f"({args.proto}): name the output like {args.output.with_suffix('.caffemodel').name}"
        )
    options = pipeline.CalibrationOptions(
        images=args.images, max_images=args.max_images, batch_size=args.batch_size, backend=args.backend, gpu=args.gpu
    )
    result = pipeline.equalize(common.model_files(args), common.preprocess_options(args), options)
    pipeline.write_equalized(result, args.output)
    if not args.quiet:
        print(
            f"equalized {len(result.pairs)} depthwise layer(s) on {result.images} image(s); FP32 outputs unchanged "
            f"within {result.fp32_max_rel:.2g} (relative): {args.output}"
        )
        for pair in result.pairs:
            print(
                f"  {pair.producer} -> {pair.depthwise}: {pair.scales.size} channels, "
                f"range spread {pair.spread:.1f}x -> 1x"
            )
    return 0
