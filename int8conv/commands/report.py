"""``int8conv report``: calibrate (or load statistics), build the ncnn FP32/INT8 pair, evaluate, and render
one HTML page of per-layer plots: activation histogram + threshold, KL curve, weight-scale spread, cosine.

Per quantizable layer: the |x| histogram of its input with the threshold in use, the KL divergence over every
candidate threshold, the per-channel weight-scale spread and the INT8-vs-FP32 cosine; plus the full 'int8conv eval'
report. Writes OUT/<name>.html with its figures in OUT/<name>_files, the ncnn FP32/INT8 models it evaluated, and
OUT/<name>.json (eval's --json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv import pipeline
from int8conv.commands import common
from int8conv.evaluation.evaluate import format_report

#: the line ``int8conv --help`` shows for this command
SUMMARY = "HTML report of per-layer calibration plots and INT8-vs-FP32 accuracy"


def add_args(parser: argparse.ArgumentParser) -> None:
    common.add_calibration_inputs(parser)
    group = parser.add_argument_group("table and evaluation")
    group.add_argument(
        "--table",
        type=Path,
        help="report on this ncnn table instead of computing one (histograms still come from --images or --load-stats)",
    )
    group.add_argument(
        "--weights-8bit", action="store_true", help="8-bit weight scales everywhere (when the table is computed here)"
    )
    common.add_head_method_arg(
        group, "thresholds of the layers feeding the outputs directly, as in calibrate (default minmax)"
    )
    common.add_adaround_arg(
        group, "the INT8 model evaluated gets the learned weights (when the table is computed here)"
    )
    common.add_evaluation_args(group, flags=("--eval-images", "--max-eval-images"))
    common.add_no_fp16_arg(group)
    parser.add_argument("--out-dir", type=Path, required=True, help="where the page, figures and models go")


def run(args: argparse.Namespace) -> int:
    page, evaluation = pipeline.report(
        *common.calibration_inputs(args),
        common.eval_options(args, args.eval_images, args.max_eval_images),
        args.out_dir,
        table=args.table,
        fp16_storage=not args.no_fp16,
    )
    if not args.quiet:
        print(format_report(evaluation))
        print(f"\nreport: {page}")
    return 0
