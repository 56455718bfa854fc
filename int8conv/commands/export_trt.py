"""``int8conv export-trt``: Caffe model + calibration -> ONNX, Q/DQ ONNX, TensorRT cache and dynamic ranges."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from int8conv.atomic import write_bytes_atomic
from int8conv.caffe.graph import Graph, load_graph
from int8conv.calibration.calibrate import all_values
from int8conv.calibration.preprocess import ImageTally, iter_batches, list_images
from int8conv.commands.calibrate import statistics_for
from int8conv.commands.common import (
    add_calibration_args,
    add_model_args,
    add_preprocess_args,
    preprocess_from_args,
)
from int8conv.errors import Int8ConvError
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.tables.tensorrt_files import (
    DEFAULT_TRT_VERSION,
    algorithm_for,
    write_calibration_cache,
    write_dynamic_ranges,
    write_ranges_json,
)
from int8conv.tensorrt.onnx_export import OnnxExport, export_onnx
from int8conv.tensorrt.qdq import choose_fp32_layers, insert_qdq
from int8conv.tensorrt.ranges import table_ranges, tensor_ranges, value_ranges

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export-trt", help="export ONNX, Q/DQ ONNX, TensorRT calibration cache and dynamic ranges",
        description="Export the Caffe model to ONNX (FP32) and to a Q/DQ ONNX for TensorRT 10/11 explicit "
                    "quantization, and write the TensorRT 8-10 calibration cache and per-tensor dynamic ranges "
                    "(text and JSON) for every tensor of the exported network. Ranges come from calibration "
                    "images (as 'calibrate' takes them), saved statistics (--load-stats) or an ncnn table (--table).")
    add_model_args(parser)
    add_preprocess_args(parser)
    add_calibration_args(parser)
    group = parser.add_argument_group("TensorRT export")
    group.add_argument("--out-dir", required=True, type=Path,
                       help="write OUT/<stem>.onnx, .qdq.onnx, .cache, .ranges.txt, .ranges.json "
                            "(<stem>: the caffemodel's file stem)")
    group.add_argument("--table", type=Path, metavar="FILE",
                       help="take the convolution-input ranges from an ncnn table (amax = 127/scale) instead of "
                            "statistics; the cache then covers only those tensors")
    group.add_argument("--trt-version", default=DEFAULT_TRT_VERSION,
                       help=f"TensorRT version for the cache header, e.g. 8.6.1, 10.13.3 or 101303 "
                            f"(default {DEFAULT_TRT_VERSION})")
    group.add_argument("--batch", type=int, default=1,
                       help="batch dimension of the ONNX models: N > 0 fixes it, -1 makes it dynamic (default 1)")
    group.add_argument("--fp32-layers", nargs="+", default=[], metavar="LAYER",
                       help="Convolution/InnerProduct layers to leave without Q/DQ (FP32) in the Q/DQ ONNX")
    group.add_argument("--auto-fp32", type=float, metavar="COSINE",
                       help="keep the fewest layers FP32 in the Q/DQ ONNX so that its output cosine against FP32 "
                            "(onnxruntime, worst of --auto-fp32-images calibration images) reaches COSINE")
    group.add_argument("--auto-fp32-images", type=int, default=4, metavar="N",
                       help="calibration images scored by --auto-fp32 (default 4)")
    parser.set_defaults(func=run)


def _value_ranges(args: argparse.Namespace, graph: Graph, export: OnnxExport) -> tuple[dict[str, float], str]:
    """amax per Caffe value and a description of where they came from."""
    if args.table:
        return table_ranges(read_ncnn_table(args.table), graph), f"ncnn table {args.table}"
    stats = statistics_for(args, graph, values=all_values(graph))
    needed = [v for v in export.activations() if v in graph.blob_names and v not in export.constants]
    missing = [v for v in needed if v not in stats.histograms]
    if missing:
        raise Int8ConvError(f"the statistics hold no histogram for {len(missing)} of the {len(needed)} tensors "
                            f"TensorRT needs (e.g. {', '.join(missing[:4])}); statistics saved by 'calibrate' "
                            "cover only convolution inputs: collect them with 'int8conv export-trt --images DIR "
                            "--save-stats FILE'")
    return value_ranges(stats, args.method, args.percentile), f"{stats.images_used} images, method {args.method}"


def _auto_fp32_feeds(args: argparse.Namespace, graph: Graph) -> list[dict[str, np.ndarray]]:
    if args.images is None:
        raise Int8ConvError("--auto-fp32 scores the Q/DQ model on images: give them with --images")
    images = list_images(args.images)[:max(args.auto_fp32_images, 1)]
    prep = preprocess_from_args(args, graph)
    name = next(iter(graph.inputs))
    return [{name: batch} for batch, _ in iter_batches(images, prep, 1, ImageTally())]


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.batch == 0 or args.batch < -1:
        raise Int8ConvError(f"--batch must be a positive number or -1 (dynamic), not {args.batch}")
    graph = load_graph(args.proto, args.model)
    export = export_onnx(graph, batch=args.batch)
    values, source = _value_ranges(args, graph, export)
    ranges = tensor_ranges(export, values)
    fp32_layers = list(args.fp32_layers)
    choice = None
    if args.auto_fp32 is not None:
        scoring = export if args.batch in (1, -1) else export_onnx(graph, batch=1)
        choice = choose_fp32_layers(scoring, ranges, _auto_fp32_feeds(args, graph), args.auto_fp32)
        fp32_layers += [name for name in choice.fp32_layers if name not in fp32_layers]
    qdq = insert_qdq(export, ranges, fp32_layers)

    stem = args.model.stem
    out = args.out_dir
    paths = {kind: out / f"{stem}{suffix}" for kind, suffix in
             (("onnx", ".onnx"), ("qdq", ".qdq.onnx"), ("cache", ".cache"), ("txt", ".ranges.txt"),
              ("json", ".ranges.json"))}
    write_bytes_atomic(paths["onnx"], export.model.SerializeToString())
    write_bytes_atomic(paths["qdq"], qdq.SerializeToString())
    method = "table" if args.table else args.method
    write_calibration_cache(paths["cache"], ranges, args.trt_version, algorithm_for(method))
    write_dynamic_ranges(paths["txt"], ranges)
    write_ranges_json(paths["json"], ranges, method, source)
    if not args.quiet:
        quantized = sum(1 for n in qdq.graph.node if n.op_type == "QuantizeLinear")
        lines = [f"{kind:<6} {path}" for kind, path in paths.items()]
        lines.append(f"ranges {len(ranges)} of {len(export.activations())} tensors ({source})")
        lines.append(f"Q/DQ   {quantized} QuantizeLinear nodes; FP32 layers: {', '.join(fp32_layers) or 'none'}")
        if choice is not None:
            lines.append(f"cosine all INT8 {choice.cosine_all_int8:.5f}, with FP32 layers {choice.cosine:.5f} "
                         f"(target {choice.target})")
        lines.append(f"time   {time.perf_counter() - started:.1f} s")
        print("\n".join(lines))
    return 0
