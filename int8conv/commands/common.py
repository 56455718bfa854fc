"""Option groups shared by subcommands, and their conversion into pipeline inputs."""
from __future__ import annotations

import argparse
from pathlib import Path

from int8conv.caffe.graph import Graph
from int8conv.calibration.preprocess import COLORS, Preprocess
from int8conv.calibration.thresholds import METHODS
from int8conv.engines import BACKENDS
from int8conv.errors import ImageError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--proto`` and ``--model``: the Caffe deploy prototxt and its caffemodel."""
    group = parser.add_argument_group("model")
    group.add_argument("--proto", required=True, type=Path, help="path to deploy prototxt")
    group.add_argument("--model", required=True, type=Path, help="path to pretrained weights (.caffemodel)")


def add_preprocess_args(parser: argparse.ArgumentParser) -> None:
    """How images become network inputs; defaults follow the original caffe-int8-convert-tools."""
    group = parser.add_argument_group("preprocessing: input = (pixel - mean) * norm / std")
    group.add_argument("--mean", type=float, nargs="+", default=[0.0], metavar="M",
                       help="mean per channel in the model's channel order (1 or 3 values; default 0)")
    group.add_argument("--norm", type=float, default=1.0, help="scale applied after mean subtraction (default 1)")
    group.add_argument("--std", type=float, nargs="+", default=[1.0], metavar="S",
                       help="per-channel std to divide by (1 or 3 values; default 1)")
    group.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                       help="network input height and width (default: the prototxt input shape)")
    group.add_argument("--resize-then-crop", type=int, nargs=2, metavar=("H", "W"),
                       help="resize to HxW first, then center-crop to the input size (e.g. 256 256 for a 224 crop)")
    group.add_argument("--color", choices=COLORS, default="bgr", help="channel order the model expects (default bgr)")
    group.add_argument("--swap-hw", action="store_true",
                       help="transpose height and width (models trained through Matlab, e.g. MTCNN)")
    group.add_argument("--letterbox", action="store_true",
                       help="resize keeping the aspect ratio to fit the input, pad bottom/right with 0 (e.g. RetinaFace)")


TASK_HELP = ("classifier, ssd (DetectionOutput), host-decoded (UltraFace scores/boxes), retinaface, yoloface "
             "(host-decoded anchors), segmentation (a sigmoid map); default: from the model's outputs")


def add_task_args(group: argparse._ArgumentGroup, thresholds: bool = True) -> None:
    """``--task`` (and the detection thresholds): what INT8 is compared with FP32 on."""
    from int8conv.evaluation.evaluate import TASKS

    group.add_argument("--task", choices=TASKS, default="auto", help="the task INT8 is judged on: " + TASK_HELP)
    if thresholds:
        group.add_argument("--score-threshold", type=float, default=None,
                           help="detection score threshold (default: 0.8 for retinaface, else 0.5)")
        group.add_argument("--iou-threshold", type=float, default=0.5, help="IoU for a detection match (default 0.5)")


def add_calibration_args(parser: argparse.ArgumentParser, images_required: bool = False) -> None:
    """Calibration images, FP32 backend and statistics files."""
    group = parser.add_argument_group("calibration")
    group.add_argument("--images", type=Path, required=images_required,
                       help="calibration images: a directory (recursive) or a file listing image paths")
    group.add_argument("--max-images", type=int, default=0, help="use at most this many images (0 = all)")
    group.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    group.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="FP32 engine: pycaffe when importable (auto), or OpenCV DNN (default auto)")
    group.add_argument("--gpu", type=int, default=None, metavar="N", help="use GPU N (pycaffe backend only)")
    group.add_argument("--method", choices=METHODS, default="kl", help="activation threshold method (default kl)")
    group.add_argument("--percentile", type=float, default=99.99,
                       help="percentile of |x| for --method percentile (default 99.99)")
    group.add_argument("--save-stats", type=Path, metavar="FILE",
                       help="save the activation histograms, to merge with other runs later")
    group.add_argument("--load-stats", type=Path, nargs="+", metavar="FILE",
                       help="merge saved histograms and compute the table without forwarding images")


def preprocess_of_size(args: argparse.Namespace, size: tuple[int, int]) -> Preprocess:
    """The preprocessing options of ``add_preprocess_args`` for an input of ``size`` (H, W)."""
    return Preprocess(size=size, mean=tuple(args.mean), norm=args.norm, std=tuple(args.std), color=args.color,
                      resize=tuple(args.resize_then_crop) if args.resize_then_crop else None, swap_hw=args.swap_hw,
                      letterbox=args.letterbox)


def preprocess_from_args(args: argparse.Namespace, graph: Graph) -> Preprocess:
    """The ``Preprocess`` for this model: explicit options, else the prototxt's input shape."""
    name, shape = next(iter(graph.inputs.items()))
    if len(shape) != 4:
        raise ImageError(f"input '{name}' has shape {shape}, not NCHW: images cannot feed it")
    prep = preprocess_of_size(args, tuple(args.size) if args.size else (shape[2], shape[3]))
    if prep.channels != shape[1]:
        raise ImageError(f"input '{name}' of {args.proto} has {shape[1]} channels, but --color {args.color} gives "
                         f"{prep.channels}: this model cannot be calibrated from plain images")
    return prep
