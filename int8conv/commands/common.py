"""Option groups shared by subcommands, and their conversion into the pipeline's option dataclasses."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from int8conv import pipeline
from int8conv.calibration.auto_select import AUTO_METHOD
from int8conv.calibration.preprocess import COLORS
from int8conv.calibration.scale_search import SEARCH_METHODS
from int8conv.calibration.thresholds import DEFAULT_METHOD, METHODS
from int8conv.engines import CALIBRATION_BACKENDS
from int8conv.ncnn.model import NcnnModel
from int8conv.pipeline import CalibrationOptions, ModelFiles, PreprocessOptions
from int8conv.tables.ncnn_table import CalibrationTable

#: every ``--method``: the histogram methods, the searches and auto
CALIBRATION_METHODS = METHODS + SEARCH_METHODS + (AUTO_METHOD,)


def add_command(sub: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    """The subcommand of module ``int8conv.commands.<name>`` (``export_trt``: ``export-trt``): its ``SUMMARY`` in the
    command list; as its ``--help`` description, its ``DESCRIPTION`` or else its docstring after the first paragraph;
    its flags from ``add_args``; ``run`` does the work."""
    module = importlib.import_module(f"int8conv.commands.{name}")
    description = getattr(module, "DESCRIPTION", None) or " ".join(module.__doc__.partition("\n\n")[2].split())
    parser = sub.add_parser(name.replace("_", "-"), help=module.SUMMARY, description=description)
    parser.set_defaults(func=module.run)
    module.add_args(parser)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--proto`` and ``--model``: the Caffe deploy prototxt and its caffemodel."""
    group = parser.add_argument_group("model")
    group.add_argument("--proto", required=True, type=Path, help="path to deploy prototxt")
    group.add_argument("--model", required=True, type=Path, help="path to pretrained weights (.caffemodel)")


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    """How images become network inputs; defaults follow the original caffe-int8-convert-tools."""
    group = parser.add_argument_group("preprocessing: input = (pixel - mean) * norm / std")
    per_channel = {"type": float, "nargs": "+"}  # 1 value for all channels, or one per channel
    height_width = {"type": int, "nargs": 2, "metavar": ("H", "W")}
    mean_help = "mean per channel in the model's channel order (1 or 3 values; default 0)"
    group.add_argument("--mean", **per_channel, default=[0.0], metavar="M", help=mean_help)
    group.add_argument("--norm", type=float, default=1.0, help="scale applied after mean subtraction (default 1)")
    std_help = "per-channel std to divide by (1 or 3 values; default 1)"
    group.add_argument("--std", **per_channel, default=[1.0], metavar="S", help=std_help)
    group.add_argument(
        "--size", **height_width, help="network input height and width (default: the prototxt input shape)"
    )
    crop_help = "resize to HxW first, then center-crop to the input size (e.g. 256 256 for a 224 crop)"
    group.add_argument("--resize-then-crop", **height_width, help=crop_help)
    group.add_argument("--color", choices=COLORS, default="bgr", help="channel order the model expects (default bgr)")
    group.add_argument(
        "--swap-hw", action="store_true", help="transpose height and width (models trained through Matlab, e.g. MTCNN)"
    )
    group.add_argument(
        "--letterbox",
        action="store_true",
        help="resize keeping the aspect ratio to fit the input, pad bottom/right with 0 (e.g. RetinaFace)",
    )


TASK_HELP = (
    "classifier, ssd (DetectionOutput), host-decoded (UltraFace scores/boxes), retinaface, yoloface "
    "(host-decoded anchors), segmentation (a sigmoid map); default: from the model's outputs"
)


def add_task_args(group: argparse._ArgumentGroup, thresholds: bool = True) -> None:
    """``--task`` (and the detection thresholds): what INT8 is compared with FP32 on."""
    from int8conv.evaluation.evaluate import TASKS

    group.add_argument("--task", choices=TASKS, default="auto", help="the task INT8 is judged on: " + TASK_HELP)
    if thresholds:
        score_help = "detection score threshold (default: 0.8 for retinaface, else 0.5)"
        group.add_argument("--score-threshold", type=float, help=score_help)
        group.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a detection match (default 0.5)")


#: what every images flag takes (``list_images``)
IMAGE_SOURCE = "a directory (recursive), a file listing image paths, or one image"


def add_images_args(
    group: argparse._ArgumentGroup,
    what: str,
    required: bool = False,
    max_default: int = 0,
    flags: tuple[str, str] = ("--images", "--max-images"),
) -> None:
    """An image set and how many of its images to use: ``--images`` and ``--max-images``, or the two ``flags``."""
    images, most = flags
    group.add_argument(images, type=Path, required=required, help=f"{what}: {IMAGE_SOURCE}")
    limit = f"default {max_default}" if max_default else "0 = all"
    group.add_argument(most, type=int, default=max_default, help=f"use at most this many of them ({limit})")


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Calibration images, FP32 backend and statistics files."""
    group = parser.add_argument_group("calibration")
    add_images_args(group, "calibration images")
    group.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images per forward pass (default 4); peak memory grows with it for OpenCV and "
        "pycaffe, not for ncnn (one image at a time), and never with the number of images",
    )
    group.add_argument(
        "--backend",
        choices=CALIBRATION_BACKENDS,
        default="auto",
        help="FP32 engine: ncnn (the project's own FP32 ncnn model: the least CPU time per image of "
        "the three, see benchmarks/bench_calibrate.py), OpenCV DNN, or pycaffe. auto (default): "
        "pycaffe with --gpu, else ncnn, else OpenCV when ncnn fuses a requested value away",
    )
    group.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes that decode, forward and histogram images (ncnn engine; default: one per CPU core, "
        "at most 8; 1: this process only). Each worker holds its own ncnn net, so memory grows with N, "
        "never with the number of images; the statistics do not depend on it",
    )
    group.add_argument("--gpu", type=int, default=None, metavar="N", help="use GPU N (pycaffe backend only)")
    group.add_argument(
        "--method",
        choices=CALIBRATION_METHODS,
        default=DEFAULT_METHOD,
        help=f"activation threshold method (default {DEFAULT_METHOD}, chosen by "
        "benchmarks/bench_quality.py); eq searches thresholds and weight scales "
        "for the best INT8 layer outputs on the calibration images (needs --images); auto measures "
        "the candidate methods' tables on some of the calibration images and keeps the best",
    )
    group.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        help="percentile of |x| taken as the threshold by --method percentile and by auto's percentile candidate "
        "(default 99.99)",
    )
    group.add_argument(
        "--save-stats", type=Path, metavar="FILE", help="save the activation histograms, to merge with other runs later"
    )
    group.add_argument(
        "--load-stats",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="merge saved histograms and compute the table without forwarding images",
    )


def add_adaround_arg(group: argparse._ArgumentGroup, where: str) -> None:
    """``--adaround``, for the commands that write INT8 weights (``where`` says which files get them)."""
    group.add_argument(
        "--adaround",
        action="store_true",
        help="learn whether each INT8 weight rounds up or down, for the least layer output error on the "
        f"calibration images (AdaRound; after --method, before --bias-correction); {where}",
    )


def add_calibration_inputs(parser: argparse.ArgumentParser) -> None:
    """The model, preprocessing and calibration groups: what every command that calibrates takes."""
    add_model_args(parser)
    add_preprocess_args(parser)
    add_calibration_args(parser)


def calibration_inputs(args: argparse.Namespace) -> tuple[ModelFiles, PreprocessOptions, CalibrationOptions]:
    """The options ``add_calibration_inputs`` parsed, as the pipeline takes them."""
    options = calibration_options(args)
    return model_files(args), pipeline.saved_preprocessing(preprocess_options(args), options), options


def model_files(args: argparse.Namespace) -> ModelFiles:
    return ModelFiles(args.proto, args.model)


def preprocess_options(args: argparse.Namespace) -> PreprocessOptions:
    return PreprocessOptions(
        mean=tuple(args.mean),
        norm=args.norm,
        std=tuple(args.std),
        size=tuple(args.size) if args.size else None,
        resize=tuple(args.resize_then_crop) if args.resize_then_crop else None,
        color=args.color,
        swap_hw=args.swap_hw,
        letterbox=args.letterbox,
    )


def calibration_options(args: argparse.Namespace) -> CalibrationOptions:
    """The calibration group's flags (and the table group's, where the command has it)."""
    head_method = getattr(args, "head_method", "minmax")
    return CalibrationOptions(
        images=args.images,
        max_images=args.max_images,
        batch_size=args.batch_size,
        backend=args.backend,
        gpu=args.gpu,
        method=args.method,
        percentile=args.percentile,
        head_method=None if head_method == "same" else head_method,
        weights_8bit=getattr(args, "weights_8bit", False),
        bias_correction=getattr(args, "bias_correction", False),
        adaround=getattr(args, "adaround", False),
        save_stats=args.save_stats,
        load_stats=tuple(args.load_stats or ()),
        jobs=args.jobs,
    )


def eval_options(args: argparse.Namespace, images: Path, max_images: int) -> pipeline.EvalOptions:
    """The evaluation flags ``eval`` and ``report`` share."""
    return pipeline.EvalOptions(
        images,
        max_images,
        args.task,
        args.score_threshold,
        args.iou_threshold,
        tuple(args.threads),
        args.timing_runs,
        args.backend,
        getattr(args, "gpu", None),
        not args.no_caffe,
        args.layer_times,
    )


def add_evaluation_args(group: argparse._ArgumentGroup, flags: tuple[str, str] = ("--images", "--max-images")) -> None:
    """The evaluation images (``flags``), the task INT8 is judged on and the timing: what ``eval_options`` reads
    (with the command's ``--backend``)."""
    add_images_args(group, "evaluation images (ideally not the calibration ones)", required=True, flags=flags)
    add_task_args(group)
    add_timing_args(group)
    group.add_argument(
        "--no-caffe", action="store_true", help="skip the Caffe FP32 reference (and the ncnn FP32 vs Caffe differences)"
    )


def add_ncnn_files_args(
    group: argparse._ArgumentGroup, model: str, prefix: str = "", required: bool = False, written: bool = False
) -> None:
    """``--<prefix>param`` and ``--<prefix>bin``: the two files of one ncnn model (``model``: which one), read or
    ``written``."""
    for kind in ("param", "bin"):
        text = f"{model} .{kind}" + (" to write" if written else "")
        group.add_argument(f"--{prefix}{kind}", type=Path, required=required, help=text)


def add_out_dir_arg(group: argparse._ArgumentGroup, files: str, required: bool = False) -> None:
    """``--out-dir OUT``: the folder a command writes ``files`` into, named after the caffemodel."""
    text = f"write {files} (<stem>: the caffemodel's file stem)"
    group.add_argument("--out-dir", type=Path, required=required, help=text)


def add_no_fp16_arg(group: argparse._ArgumentGroup, when: str = "") -> None:
    """``--no-fp16``: the INT8 model's FP32 layers keep fp32 weights (``quantize_model``'s ``fp16_storage``)."""
    group.add_argument(
        "--no-fp16",
        action="store_true",
        help=f"{when}keep the weights of the INT8 model's FP32 layers in fp32, not fp16",
    )


def add_timing_args(group: argparse._ArgumentGroup) -> None:
    """``--threads``, ``--timing-runs`` and ``--layer-times``: how ``eval`` and ``report`` time the two models."""
    group.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time (default 1 2)")
    group.add_argument("--timing-runs", type=int, default=10, help="timed passes per model and thread count")
    group.add_argument(
        "--layer-times",
        action="store_true",
        help="also time every INT8 layer alone against FP32 on the ncnn runtime (on this machine, a "
        "proxy for the target device) and mark those where INT8 does not pay",
    )


def add_auto_fp32_arg(group: argparse._ArgumentGroup, help: str, flag: str = "--auto-fp32") -> None:
    """``--auto-fp32 COSINE``: the output cosine the layers kept FP32 are chosen for (``auto_fp32_options``)."""
    group.add_argument(flag, type=float, dest="auto_fp32", metavar="COSINE", help=help)


def add_head_method_arg(group: argparse._ArgumentGroup, help: str) -> None:
    """``--head-method``: the threshold rule of the layers feeding the outputs (``calibration_options`` reads it)."""
    group.add_argument("--head-method", choices=("minmax", "same"), default="minmax", help=help)


def auto_fp32_options(args: argparse.Namespace, images: Path | None, max_images: int) -> pipeline.AutoFp32Options:
    return pipeline.AutoFp32Options(args.auto_fp32, images, max_images, args.task)


def mixed_precision_table(
    args: argparse.Namespace, model: NcnnModel, table: CalibrationTable, options: pipeline.AutoFp32Options
) -> CalibrationTable:
    """``--auto-fp32``: the table with the chosen FP32 layers' activation lines removed (reported on stdout)."""
    choice = pipeline.auto_fp32_table(
        model, table, preprocess_options(args), options, args.param, fp16_storage=not args.no_fp16
    )
    if not args.quiet:
        kept = ", ".join(choice.fp32_layers) if choice.fp32_layers else "none"
        print(
            f"auto-fp32  output cosine {choice.cosine_all_int8:.6f} all INT8 -> {choice.cosine:.6f} "
            f"(target {choice.target}); FP32 layers: {kept}"
            + (f" ({len(choice.returned)} more returned to INT8 by the final pass)" if choice.returned else "")
        )
    return choice.table
