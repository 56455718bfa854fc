"""``int8conv report``: calibrate (or load statistics), build the ncnn FP32/INT8 pair, evaluate, and render
one HTML page of per-layer plots: activation histogram + threshold, KL curve, weight-scale spread, cosine."""
from __future__ import annotations

import argparse
import html
import logging
from pathlib import Path

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.calibration.calibrate import build_table
from int8conv.calibration.preprocess import list_images
from int8conv.commands.calibrate import statistics_for
from int8conv.commands.common import (
    add_calibration_args,
    add_model_args,
    add_preprocess_args,
    add_task_args,
    preprocess_from_args,
)
from int8conv.commands.eval import finite_json
from int8conv.engines import make_engine
from int8conv.evaluation.evaluate import EvalConfig, evaluate, format_report
from int8conv.evaluation.report import layer_reports, write_report
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import write_model
from int8conv.ncnn.quantize import quantize_model
from int8conv.tables.ncnn_table import read_ncnn_table, write_ncnn_table

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="HTML report of per-layer calibration plots and INT8-vs-FP32 accuracy",
        description="Per quantizable layer: the |x| histogram of its input with the threshold in use, the KL "
                    "divergence over every candidate threshold, the per-channel weight-scale spread and the "
                    "INT8-vs-FP32 cosine; plus the full 'int8conv eval' report. Writes OUT/<name>.html with "
                    "its figures in OUT/<name>_files, the ncnn FP32/INT8 models it evaluated, and "
                    "OUT/<name>.json (eval's --json).")
    add_model_args(parser)
    add_preprocess_args(parser)
    add_calibration_args(parser)
    group = parser.add_argument_group("table and evaluation")
    group.add_argument("--table", type=Path,
                       help="report on this ncnn table instead of computing one (histograms still come from "
                            "--images or --load-stats)")
    group.add_argument("--weights-8bit", action="store_true",
                       help="8-bit weight scales everywhere (when the table is computed here)")
    group.add_argument("--head-method", choices=("minmax", "same"), default="minmax",
                       help="thresholds of the layers feeding the outputs directly, as in calibrate (default minmax)")
    group.add_argument("--eval-images", type=Path, required=True,
                       help="evaluation images (ideally not the calibration ones): directory or list file")
    group.add_argument("--max-eval-images", type=int, default=0, help="use at most this many (0 = all)")
    add_task_args(group)
    group.add_argument("--no-caffe", action="store_true",
                       help="skip the Caffe FP32 reference (ncnn FP32 vs Caffe differences)")
    group.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time (default 1 2)")
    group.add_argument("--timing-runs", type=int, default=10, help="timed passes per model and thread count")
    group.add_argument("--no-fp16", action="store_true", help="FP32 layers of the INT8 model keep fp32 weights")
    parser.add_argument("--out-dir", type=Path, required=True, help="where the page, figures and models go")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    graph = load_graph(args.proto, args.model)
    stats = statistics_for(args, graph)
    stem = Path(args.model).stem
    out: Path = args.out_dir
    if args.table is not None:
        table = read_ncnn_table(args.table)
        source = f"table {args.table}"
    else:
        result = build_table(graph, stats, args.method, percentile=args.percentile,
                             winograd_6bit=not args.weights_8bit,
                             head_method=None if args.head_method == "same" else args.head_method)
        table = result.table
        write_ncnn_table(table, out / f"{stem}.table")
        source = f"computed here with --method {args.method}, written to {out / (stem + '.table')}"
    fp32 = convert_graph(graph)
    paths = {key: out / f"{stem}{suffix}" for key, suffix in
             (("fp32_param", ".param"), ("fp32_bin", ".bin"), ("int8_param", "-int8.param"),
              ("int8_bin", "-int8.bin"))}
    write_model(fp32, paths["fp32_param"], paths["fp32_bin"])
    write_model(quantize_model(fp32, table, fp16_storage=not args.no_fp16), paths["int8_param"], paths["int8_bin"])

    images = list_images(args.eval_images)
    if args.max_eval_images > 0:
        images = images[:args.max_eval_images]
    caffe_forward = None
    if not args.no_caffe:
        engine = make_engine(args.backend, graph, args.proto, args.model, gpu=args.gpu)
        caffe_forward = engine.forward
    evaluation = evaluate(EvalConfig(**paths, preprocess=preprocess_from_args(args, graph), images=images,
                                     caffe_forward=caffe_forward, task=args.task,
                                     score_threshold=args.score_threshold, iou_threshold=args.iou_threshold,
                                     threads=tuple(args.threads), timing_runs=args.timing_runs))
    layers = layer_reports(graph, stats, table, evaluation, fold_batchnorm_scale(graph))
    intro = html.escape(f"{args.model} ({args.proto.name}); thresholds: {source}; histograms of "
                        f"{stats.images_used} calibration image(s); evaluation on {evaluation['images']} image(s) "
                        f"from {args.eval_images}.")
    page = write_report(out, stem, layers, finite_json(evaluation), format_report(evaluation), intro)
    if not getattr(args, "quiet", False):
        print(format_report(evaluation))
        print(f"\nreport: {page}")
    return 0
