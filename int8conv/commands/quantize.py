"""``int8conv quantize``: ncnn FP32 ``.param``/``.bin`` + calibration table -> ncnn INT8 ``.param``/``.bin``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from int8conv.calibration.preprocess import Preprocess, list_images, read_image
from int8conv.commands.common import (
    add_preprocess_args,
    add_task_args,
    preprocess_of_size,
)
from int8conv.errors import ImageError, Int8ConvError
from int8conv.ncnn.model import NcnnModel, read_model, write_model
from int8conv.ncnn.quantize import int8_layers, quantize_model
from int8conv.tables.ncnn_table import (
    CalibrationTable,
    read_ncnn_table,
    write_ncnn_table,
)

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("quantize", help="quantize an ncnn FP32 model with a calibration table (ncnn2int8)",
                            description="Write the INT8 ncnn model for a table, as ncnn2int8 does: int8 weights and "
                                        "scales for every Convolution/ConvolutionDepthWise/InnerProduct with both "
                                        "table lines, requantize fusion between INT8 convolutions, fp16 storage for "
                                        "the weights that stay FP32. Layers without an activation line stay FP32.")
    files = parser.add_argument_group("files")
    files.add_argument("--param", required=True, type=Path, help="ncnn FP32 .param")
    files.add_argument("--bin", required=True, type=Path, help="ncnn FP32 .bin")
    files.add_argument("--table", required=True, type=Path, help="ncnn calibration table")
    files.add_argument("--out-param", required=True, type=Path, help="INT8 .param to write")
    files.add_argument("--out-bin", required=True, type=Path, help="INT8 .bin to write")
    files.add_argument("--no-fp16", action="store_true", help="keep the weights of FP32 layers in fp32, not fp16")
    add_auto_fp32_args(parser)
    add_preprocess_args(parser)
    parser.set_defaults(func=run)


def add_auto_fp32_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("automatic mixed precision")
    group.add_argument("--auto-fp32", type=float, metavar="COSINE",
                       help="keep the most sensitive layers in FP32 until the INT8 output cosine against FP32 "
                            "reaches COSINE (e.g. 0.99), measured on --images")
    group.add_argument("--images", type=Path, help="images for --auto-fp32 (directory or list file)")
    group.add_argument("--max-images", type=int, default=8, help="use at most this many images (default 8)")
    add_task_args(group, thresholds=False)
    group.add_argument("--out-table", type=Path, help="also write the table without the FP32 layers' activation lines")


def preprocess_for(args: argparse.Namespace, model: NcnnModel) -> Preprocess:
    """Preprocessing options, with the input size from the ncnn Input layer (0=w 1=h) unless --size is given."""
    if args.size:
        size = tuple(args.size)
    else:
        inputs = [layer for layer in model.layers if layer.type == "Input"]
        if not inputs or not inputs[0].params.get(0) or not inputs[0].params.get(1):
            raise ImageError(f"{args.param}: the Input layer gives no width/height (0= and 1=); pass --size H W")
        size = (int(inputs[0].params[1]), int(inputs[0].params[0]))
    return preprocess_of_size(args, size)


def load_inputs(paths: list[Path], prep: Preprocess, input_name: str) -> list[dict]:
    """Preprocessed network inputs of the readable images (unreadable ones are skipped with a warning)."""
    inputs = []
    for path in paths:
        image = read_image(path)
        if image is None:
            log.warning("skipping %s: not a readable image", path)
            continue
        inputs.append({input_name: prep.apply(image)})
    if not inputs:
        raise ImageError(f"none of the {len(paths)} images for --auto-fp32 could be read")
    return inputs


def mixed_precision_table(args: argparse.Namespace, model: NcnnModel, table: CalibrationTable,
                          images: Path | None, max_images: int) -> CalibrationTable:
    """``--auto-fp32``: the table with the chosen FP32 layers' activation lines removed (reported on stdout)."""
    from int8conv.evaluation.mixed_precision import auto_fp32

    if images is None:
        raise Int8ConvError("--auto-fp32 needs images to measure the output cosine on (--images / "
                            "--auto-fp32-images)")
    paths = list_images(images)[:max(max_images, 1)]
    inputs = load_inputs(paths, preprocess_for(args, model), model.input_names[0])
    choice = auto_fp32(model, table, inputs, args.auto_fp32, task=args.task, fp16_storage=not args.no_fp16)
    if not args.quiet:
        kept = ", ".join(choice.fp32_layers) if choice.fp32_layers else "none"
        print(f"auto-fp32  output cosine {choice.cosine_all_int8:.6f} all INT8 -> {choice.cosine:.6f} "
              f"(target {choice.target}, {len(inputs)} images); FP32 layers: {kept}")
    if not choice.reached:
        log.warning("--auto-fp32 %s not reached on these images (best: %.6f)", args.auto_fp32, choice.cosine)
    return choice.table


def run(args: argparse.Namespace) -> int:
    model = read_model(args.param, args.bin)
    table = read_ncnn_table(args.table)
    if args.auto_fp32 is not None:
        table = mixed_precision_table(args, model, table, args.images, args.max_images)
    int8 = quantize_model(model, table, fp16_storage=not args.no_fp16)
    write_model(int8, args.out_param, args.out_bin)
    if args.out_table is not None:
        write_ncnn_table(table, args.out_table)
    if not args.quiet:
        quantized = int8_layers(int8)
        fused = sum(1 for layer in int8.layers if int(layer.params.get(8, 0)) > 100)
        print(f"ncnn INT8 model: {args.out_param}, {args.out_bin}")
        print(f"{len(quantized)} INT8 layer(s), {fused} requantize fusion(s), "
              f"weights of FP32 layers in {'fp32' if args.no_fp16 else 'fp16'}")
    return 0
