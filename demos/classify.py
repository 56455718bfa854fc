#!/usr/bin/env python3
"""Classify images with a Caffe classifier converted to ncnn FP32 and INT8, side by side.

    python demos/classify.py --images DIR --out-dir OUT                       # open_nsfw (SFW / NSFW)
    python demos/classify.py --model-name lenet --images DIGITS --out-dir OUT  # LeNet MNIST digits
    python demos/classify.py --proto deploy.prototxt --model net.caffemodel --labels synset.txt \
        --mean 104 117 123 --resize-then-crop 256 256 --calib-images CALIB --images DIR --out-dir OUT

The model is calibrated on ``--calib-images`` (default: the preset's shared folder), converted and quantized
once; the files are cached in OUT/models. Each image runs through both networks; the top-k of each and the
ms/image are printed, and OUT/<image>.png shows the image with the FP32 and INT8 top-k bars.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from _common import demo_parser, finish, header, load_names, parse_with_preset, prepare, run_main

from int8conv.atomic import atomic_write
from int8conv.cli import setup_logging
from int8conv.errors import Int8ConvError
from int8conv.evaluation.evaluate import class_output
from int8conv.ncnn.model import read_param
from int8conv.zoo import MODELS, shared_dir, write_digit_cells

log = logging.getLogger("demo")

#: Shared models the demo knows how to preprocess; ``calib`` is relative to the shared folder.
PRESETS = {
    "open_nsfw": {
        "zoo": "open_nsfw",
        "labels": "SFW,NSFW",
        "calib": "images/imagenet_samples_200",
        "max_calib": 100,
        "defaults": {},
    },
    "lenet": {
        "zoo": "lenet",
        "labels": ",".join(str(d) for d in range(10)),
        "calib": "digits",
        "max_calib": 0,
        # KL clips conv2's spiky input at a tenth of its range (output cosine 0.92); ACIQ: 0.9999
        "defaults": {"method": "aciq"},
    },
}


def _model_flags(model: argparse._ArgumentGroup) -> None:
    model.add_argument("--labels", help="class names: a file with one per line, or a comma-separated list")
    model.add_argument("--top-k", type=int, default=5, help="classes shown per model (default 5)")


def build_parser() -> argparse.ArgumentParser:
    helps = (
        "images to classify (directory or list file)",
        "a shared model with its preprocessing, labels and calibration images",
    )
    return demo_parser(__doc__, PRESETS, "open_nsfw", "classifier", helps, _model_flags)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse_with_preset(build_parser(), PRESETS, argv)


def resolve_model(args: argparse.Namespace) -> tuple[Path, Path, list[str] | None, Path]:
    """prototxt, caffemodel, class names and calibration images, from the flags or the preset."""
    if args.proto is not None:
        if args.calib_images is None:
            raise Int8ConvError("give --calib-images DIR for your own model (images like the ones it was trained on)")
        return args.proto, args.model, load_names(args.labels), args.calib_images
    preset = PRESETS[args.model_name]
    shared = shared_dir()
    proto, model = MODELS[preset["zoo"]].paths(shared)
    calib = args.calib_images
    if calib is None:
        if preset["calib"] == "digits":  # LeNet wants digits: cut them from OpenCV's digits.png sheet
            calib = write_digit_cells(
                shared / "images" / "opencv_samples" / "digits.png", args.out_dir / "models" / "digits_calib", count=200
            )
        else:
            calib = shared / preset["calib"]
            if args.max_calib_images == 0:
                args.max_calib_images = preset["max_calib"]
    return proto, model, load_names(args.labels or preset["labels"]), calib


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-probs, kind="stable")[:k]


def describe(probs: np.ndarray, order: np.ndarray, names: list[str]) -> str:
    return ", ".join(f"{names[i]} {probs[i]:.4f}" for i in order)


def plot(
    path: Path, image: np.ndarray, title: str, panels: list[tuple[str, np.ndarray, np.ndarray]], names: list[str]
) -> None:
    """The image, then one horizontal bar chart of top-k scores per model, on a shared scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        1 + len(panels),
        figsize=(4.2 * (1 + len(panels)), 3.8),
        gridspec_kw={"width_ratios": [1.1] + [1] * len(panels)},
    )
    shown = image[:, :, ::-1] if image.ndim == 3 and image.shape[2] == 3 else image.squeeze()
    axes[0].imshow(shown, cmap="gray" if shown.ndim == 2 else None)
    axes[0].axis("off")
    top = max(1.0, max(float(p[o].max()) for _, p, o in panels))
    for ax, (label, probs, order) in zip(axes[1:], panels, strict=True):
        y = np.arange(order.size)
        ax.barh(y, probs[order], color="#4477aa" if label.startswith("FP32") else "#cc6633")
        ax.set_yticks(y, [names[i] for i in order])
        ax.invert_yaxis()
        ax.set_xlim(0, top * 1.15)
        for yy, i in zip(y, order, strict=True):
            ax.text(probs[i], yy, f" {probs[i]:.4f}", va="center", fontsize=9)
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose, quiet=False)
    proto, model, names, calib = resolve_model(args)
    images, prep, pair, nets = prepare(args, proto, model, calib)
    output = class_output(read_param(pair.fp32_param))  # the one eval reads its top-1 from
    if output is None:
        raise Int8ConvError(
            f"{proto}: outputs {', '.join(nets.fp32.output_names)} and none is a Softmax: no class scores to rank"
        )
    ms_fp32, ms_int8, agree = [], [], 0
    print(header(model, images, pair))
    for path, image, out_fp32, out_int8, t_fp32, t_int8 in nets.each(images, prep):
        p_fp32, p_int8 = out_fp32[output].reshape(-1), out_int8[output].reshape(-1)
        if names is None or len(names) != p_fp32.size:
            if names is not None:
                log.warning("%d class names for %d outputs: using class numbers", len(names), p_fp32.size)
            names = [f"class {i}" for i in range(p_fp32.size)]
        k = min(args.top_k, p_fp32.size)
        o_fp32, o_int8 = top_k(p_fp32, k), top_k(p_int8, k)
        agree += int(o_fp32[0] == o_int8[0])
        ms_fp32.append(t_fp32)
        ms_int8.append(t_int8)
        print(
            f"{path.name}\n  FP32 {t_fp32:7.2f} ms  {describe(p_fp32, o_fp32, names)}\n"
            f"  INT8 {t_int8:7.2f} ms  {describe(p_int8, o_int8, names)}"
        )
        png = args.out_dir / f"{path.stem}.png"
        same = "same top-1" if o_fp32[0] == o_int8[0] else "TOP-1 DIFFERS"
        plot(
            png,
            image,
            f"{path.name}: {same}, INT8/FP32 time {t_int8 / t_fp32:.2f}",
            [(f"FP32 ncnn  {t_fp32:.1f} ms", p_fp32, o_fp32), (f"INT8 ncnn  {t_int8:.1f} ms", p_int8, o_int8)],
            names,
        )
    return finish(ms_fp32, ms_int8, images, args, lambda: f"top-1 agreement INT8 vs FP32: {agree}/{len(ms_fp32)}")


if __name__ == "__main__":
    run_main(main)
