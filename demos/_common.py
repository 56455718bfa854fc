"""What both demos share: finding the shared models, building (and caching) the ncnn FP32/INT8 pair,
running the two side by side with timing, and class-name lists.

The demos run from a plain checkout (``python demos/classify.py ...``), so the repository root is put on
``sys.path`` here when the ``int8conv`` package is not installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("int8conv") is None:
    sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from int8conv.atomic import write_text_atomic  # noqa: E402
from int8conv.caffe.graph import load_graph  # noqa: E402
from int8conv.calibration.calibrate import (  # noqa: E402
    build_table,
    collect_statistics,
    model_identity,
)
from int8conv.calibration.preprocess import Preprocess, list_images, read_image  # noqa: E402
from int8conv.engines import make_engine  # noqa: E402
from int8conv.errors import Int8ConvError  # noqa: E402
from int8conv.ncnn.convert import convert_graph  # noqa: E402
from int8conv.ncnn.model import write_model  # noqa: E402
from int8conv.ncnn.quantize import quantize_model  # noqa: E402
from int8conv.ncnn.runtime import NcnnRunner  # noqa: E402
from int8conv.tables.ncnn_table import write_ncnn_table  # noqa: E402

log = logging.getLogger("demo")

#: PASCAL VOC classes in the order MobileNet-SSD / VGG-SSD (21 outputs, background first) use.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def shared_dir() -> Path:
    """``$INT8CONV_SHARED`` or ``../shared`` next to the checkout: where the preset models live."""
    path = Path(os.environ.get("INT8CONV_SHARED", REPO_ROOT.parent / "shared"))
    if not (path / "models").is_dir():
        raise Int8ConvError(f"{path}/models not found: the presets need the shared models (set INT8CONV_SHARED), "
                            f"or give --proto and --model")
    return path


def load_names(spec: str | None) -> list[str] | None:
    """Class names from a file (one per line) or a comma-separated list; None when not given."""
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name.strip() for name in spec.split(",")]


def add_build_args(parser: argparse.ArgumentParser) -> None:
    """Calibration and caching options shared by the demos."""
    group = parser.add_argument_group("INT8 model (built once, cached in OUT/models)")
    group.add_argument("--calib-images", type=Path,
                       help="calibration images (a directory or a list file; default: the preset's shared folder)")
    group.add_argument("--max-calib-images", type=int, default=0, help="use at most this many (0 = all)")
    group.add_argument("--method", default="kl", help="activation threshold method (default kl)")
    group.add_argument("--auto-fp32", type=float, metavar="COSINE",
                       help="keep the most sensitive layers in FP32 until the output cosine reaches COSINE")
    group.add_argument("--backend", default="auto", help="FP32 engine for calibration: auto, opencv or caffe")
    group.add_argument("--rebuild", action="store_true", help="ignore cached models and build them again")
    run = parser.add_argument_group("running")
    run.add_argument("--threads", type=int, default=1, help="ncnn threads (default 1)")
    run.add_argument("--runs", type=int, default=5, help="timed forward passes per image and model (default 5)")


@dataclass
class NcnnPair:
    """The FP32 and INT8 ncnn files of one Caffe model, and the table the INT8 one was made with."""

    fp32_param: Path
    fp32_bin: Path
    int8_param: Path
    int8_bin: Path
    table: Path
    fp32_layers: list[str]


def _auto_fp32(fp32, table, graph, prep: Preprocess, images: Sequence[Path], target: float):
    from int8conv.evaluation.mixed_precision import auto_fp32

    name = next(iter(graph.inputs))
    inputs = [{name: prep.apply(img)} for img in (read_image(p) for p in images[:8]) if img is not None]
    chosen = auto_fp32(fp32, table, inputs, target)
    log.info("auto-fp32: %d layer(s) kept FP32, output cosine %.5f -> %.5f", len(chosen.fp32_layers),
             chosen.cosine_all_int8, chosen.cosine)
    return chosen.table, chosen.fp32_layers


def build_models(proto: Path, model: Path, prep: Preprocess, calib_images: Path, cache_dir: Path,
                 args: argparse.Namespace) -> NcnnPair:
    """Calibrate, convert and quantize, unless ``cache_dir`` already holds the files for the same inputs.

    The cache key is the content of the model files, the preprocessing, the calibration image list and the
    calibration options, so changing any of them rebuilds.
    """
    stem = model.stem
    pair = NcnnPair(cache_dir / f"{stem}.param", cache_dir / f"{stem}.bin", cache_dir / f"{stem}-int8.param",
                    cache_dir / f"{stem}-int8.bin", cache_dir / f"{stem}.table", [])
    images = list_images(calib_images)
    if args.max_calib_images > 0:
        images = images[:args.max_calib_images]
    identity = model_identity(proto, model)
    key = {"model": identity, "preprocess": json.loads(json.dumps(prep.describe())),
           "calibration": [str(p) for p in images], "method": args.method, "auto_fp32": args.auto_fp32}
    stamp = cache_dir / f"{stem}.stamp.json"
    files = (pair.fp32_param, pair.fp32_bin, pair.int8_param, pair.int8_bin, pair.table)
    if not args.rebuild and stamp.is_file() and all(f.is_file() for f in files):
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            pair.fp32_layers = saved.get("fp32_layers", [])
            log.info("using the cached ncnn models in %s", cache_dir)
            return pair
    graph = load_graph(proto, model)
    engine = make_engine(args.backend, graph, proto, model)
    log.info("calibrating %s on %d image(s) from %s", model.name, len(images), calib_images)
    stats = collect_statistics(graph, engine, images, prep, identity)
    result = build_table(graph, stats, args.method)
    fp32 = convert_graph(graph)
    table = result.table
    if args.auto_fp32 is not None:
        table, pair.fp32_layers = _auto_fp32(fp32, table, graph, prep, images, args.auto_fp32)
    write_model(fp32, pair.fp32_param, pair.fp32_bin)
    write_model(quantize_model(fp32, table), pair.int8_param, pair.int8_bin)
    write_ncnn_table(table, pair.table)
    write_text_atomic(stamp, json.dumps({"key": key, "fp32_layers": pair.fp32_layers}, indent=1))
    return pair


class SideBySide:
    """The FP32 and INT8 networks loaded once; each image runs through both, interleaved, and is timed."""

    def __init__(self, pair: NcnnPair, threads: int, runs: int) -> None:
        self.fp32 = NcnnRunner(pair.fp32_param, pair.fp32_bin, int8=False, threads=threads)
        self.int8 = NcnnRunner(pair.int8_param, pair.int8_bin, int8=True, threads=threads)
        self.runs = max(1, runs)
        self.input_name = self.fp32.input_names[0]

    def run(self, data: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, float]:
        """Outputs of both nets and their median ms over ``runs`` passes (after one untimed pass each).

        Passes alternate FP32/INT8 so that a change in machine load hits both alike.
        """
        inputs: Mapping[str, np.ndarray] = {self.input_name: data}
        out_fp32, out_int8 = self.fp32.run(inputs), self.int8.run(inputs)
        times: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(self.runs):
            for label, runner in (("fp32", self.fp32), ("int8", self.int8)):
                start = time.perf_counter()
                runner.run(inputs)
                times[label].append((time.perf_counter() - start) * 1000.0)
        return out_fp32, out_int8, statistics.median(times["fp32"]), statistics.median(times["int8"])


def speed_summary(ms_fp32: Sequence[float], ms_int8: Sequence[float], threads: int) -> str:
    """Median ms/image of both models over all images, and the INT8/FP32 ratio."""
    fp32, int8 = statistics.median(ms_fp32), statistics.median(ms_int8)
    return (f"speed ({threads} thread{'s' if threads > 1 else ''}, median over {len(ms_fp32)} image(s)): "
            f"FP32 {fp32:.2f} ms/image, INT8 {int8:.2f} ms/image, INT8/FP32 time ratio {int8 / fp32:.3f} "
            f"({fp32 / int8:.2f}x {'faster' if int8 < fp32 else 'slower'})")


def write_digit_cells(digits_png: Path, out_dir: Path, count: int, offset: int = 0) -> Path:
    """Cut ``count`` of OpenCV's 5000 handwritten digits (20x20 cells) into 28x28 MNIST-style PNGs.

    ``digits.png`` holds 50 rows of 100 cells, 5 rows per digit 0..9; cells are taken evenly over all 5000
    (starting at ``offset``) so every digit appears. Each cell is padded by 4 pixels, as MNIST centers its
    20x20 digits in 28x28.
    """
    sheet = cv2.imread(str(digits_png), cv2.IMREAD_GRAYSCALE)
    if sheet is None or sheet.shape != (1000, 2000):
        raise Int8ConvError(f"{digits_png}: not OpenCV's digits.png (2000x1000 grayscale)")
    out_dir.mkdir(parents=True, exist_ok=True)
    step = max(1, 5000 // max(count, 1))
    for index in range(offset, offset + step * count, step):
        row, col = divmod(index % 5000, 100)
        cell = cv2.copyMakeBorder(sheet[row * 20:(row + 1) * 20, col * 20:(col + 1) * 20], 4, 4, 4, 4,
                                  cv2.BORDER_CONSTANT, value=0)
        cv2.imwrite(str(out_dir / f"digit{row // 5}_{index:04d}.png"), cell)
    return out_dir


def parse_with_preset(parser: argparse.ArgumentParser, presets: Mapping[str, dict],
                      argv: list[str] | None) -> argparse.Namespace:
    """A preset's settings become the defaults of their flags, so explicit flags still win."""
    first, _ = parser.parse_known_args(argv)
    if first.proto is None and first.model is None:
        parser.set_defaults(**presets[first.model_name]["defaults"])
    args = parser.parse_args(argv)
    if (args.proto is None) != (args.model is None):
        parser.error("give both --proto and --model (or neither, for a preset)")
    return args
