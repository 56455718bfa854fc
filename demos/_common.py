"""What both demos share: finding the shared models, building (and caching) the ncnn FP32/INT8 pair,
running the two side by side with timing, and class-name lists.

The demos run from a plain checkout (``python demos/classify.py ...``), so the repository root is put on
``sys.path`` here when the ``int8conv`` package is not installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("int8conv") is None:
    sys.path.insert(0, str(REPO_ROOT))

try:
    import numpy as np

    from int8conv import pipeline
except ModuleNotFoundError as missing:  # a Python without the project's dependencies: not the venv's
    sys.exit(
        f"{missing.name} is not installed for {sys.executable}: run the demos with the project's venv, "
        "`.venv/bin/python demos/...` (README.md, 'Set up and run')"
    )
from int8conv.atomic import write_text_atomic  # noqa: E402
from int8conv.caffe.graph import load_graph  # noqa: E402
from int8conv.calibration.calibrate import model_identity  # noqa: E402
from int8conv.calibration.preprocess import Preprocess, list_images, readable_images  # noqa: E402
from int8conv.calibration.thresholds import DEFAULT_METHOD  # noqa: E402
from int8conv.commands.common import CALIBRATION_METHODS, add_auto_fp32_arg, add_preprocess_args, preprocess_options  # noqa: E402
from int8conv.commands.validate import harden  # noqa: E402
from int8conv.engines import CALIBRATION_BACKENDS  # noqa: E402
from int8conv.errors import Int8ConvError  # noqa: E402
from int8conv.ncnn.runtime import NcnnRunner, interleaved_ms  # noqa: E402
from int8conv.pipeline import PreprocessOptions  # noqa: E402
from int8conv.zoo import MODELS, cli_flags  # noqa: E402

log = logging.getLogger("demo")

#: PASCAL VOC classes in the order MobileNet-SSD / VGG-SSD (21 outputs, background first) use.
VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def load_names(spec: str | None) -> list[str] | None:
    """Class names from a file (one per line) or a comma-separated list; None when not given."""
    if spec is None:
        return None
    path = Path(spec)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [name.strip() for name in spec.split(",")]


def demo_parser(
    doc: str,
    presets: Mapping[str, dict],
    default: str,
    kind: str,
    helps: tuple[str, str],
    model_flags: Callable[[argparse._ArgumentGroup], None],
) -> argparse.ArgumentParser:
    """The flags both demos take: the images (``helps[0]``), the output folder, a preset (``helps[1]``) or your own
    ``kind`` of model (``model_flags`` adds the demo's own flags to that group), preprocessing, the build, -v."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help=helps[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="where the PNGs and cached models go")
    model = parser.add_argument_group(f"model (default: the {default} preset)")
    model.add_argument("--model-name", choices=sorted(presets), default=default, help=helps[1])
    model.add_argument("--proto", type=Path, help=f"deploy prototxt of your own {kind} (with --model)")
    model.add_argument("--model", type=Path, help="its caffemodel")
    model_flags(model)
    add_preprocess_args(parser)
    add_build_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    harden(parser, "demo")  # the CLI's checks: thresholds in [0, 1], counts >= 1, model files that exist
    return parser


def add_build_args(parser: argparse.ArgumentParser) -> None:
    """Calibration and caching options shared by the demos."""
    group = parser.add_argument_group("INT8 model (built once, cached in OUT/models)")
    group.add_argument(
        "--calib-images",
        type=Path,
        help="calibration images (a directory or a list file; default: the preset's shared folder)",
    )
    group.add_argument("--max-calib-images", type=int, default=0, help="use at most this many (0 = all)")
    group.add_argument(
        "--method",
        choices=CALIBRATION_METHODS,
        default=DEFAULT_METHOD,
        help=f"activation threshold method (default {DEFAULT_METHOD}, as int8conv calibrate)",
    )
    add_auto_fp32_arg(group, "keep the most sensitive layers in FP32 until the output cosine reaches COSINE")
    group.add_argument("--backend", choices=CALIBRATION_BACKENDS, default="auto", help="FP32 engine for calibration")
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


def build_models(
    proto: Path, model: Path, prep: PreprocessOptions, calib_images: Path, cache_dir: Path, args: argparse.Namespace
) -> NcnnPair:
    """Calibrate, convert and quantize, unless ``cache_dir`` already holds the files for the same inputs.

    The cache key is the content of the model files, the preprocessing, the calibration image list and the
    calibration options (method, backend, auto-fp32), so changing any of them rebuilds.
    """
    files = pipeline.ModelFiles(proto, model)
    paths = pipeline.ncnn_paths(cache_dir, files.stem)
    pair = NcnnPair(**paths, fp32_layers=[])
    images = list_images(calib_images)
    if args.max_calib_images > 0:
        images = images[: args.max_calib_images]
    key = {
        "model": model_identity(proto, model),
        "preprocess": json.loads(json.dumps(dataclasses.asdict(prep))),
        "calibration": [str(p) for p in images],
        "method": args.method,
        "backend": args.backend,  # the FP32 engine the histograms come from
        "auto_fp32": args.auto_fp32,
    }
    stamp = cache_dir / f"{files.stem}.stamp.json"
    if not args.rebuild and stamp.is_file() and all(f.is_file() for f in paths.values()):
        saved = json.loads(stamp.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            pair.fp32_layers = saved.get("fp32_layers", [])
            log.info("using the cached ncnn models in %s", cache_dir)
            return pair
    log.info("calibrating %s on %d image(s) from %s", model.name, len(images), calib_images)
    calib = pipeline.CalibrationOptions(
        images=calib_images, max_images=args.max_calib_images, backend=args.backend, method=args.method
    )
    auto = None if args.auto_fp32 is None else pipeline.AutoFp32Options(args.auto_fp32, calib_images)
    build = pipeline.build_ncnn(files, prep, calib, auto=auto)
    if build.mixed is not None:
        pair.fp32_layers = build.mixed.fp32_layers
        log.info(
            "auto-fp32: %d layer(s) kept FP32, output cosine %.5f -> %.5f",
            len(pair.fp32_layers),
            build.mixed.cosine_all_int8,
            build.mixed.cosine,
        )
    pipeline.write_ncnn_build(build, cache_dir, files.stem)
    write_text_atomic(stamp, json.dumps({"key": key, "fp32_layers": pair.fp32_layers}, indent=1))
    return pair


def prepare(
    args: argparse.Namespace, proto: Path, model: Path, calib_images: Path
) -> tuple[list[Path], Preprocess, NcnnPair, SideBySide]:
    """What both demos start from: the images to run (listed first: a wrong path fails before the build), the
    input preprocessing, the built pair and its two networks loaded side by side."""
    images = list_images(args.images)
    prep_options = preprocess_options(args)
    prep = prep_options.for_graph(load_graph(proto, model), proto)
    pair = build_models(proto, model, prep_options, calib_images, args.out_dir / "models", args)
    return images, prep, pair, SideBySide(pair, args.threads, args.runs)


def header(model: Path, images: Sequence[Path], pair: NcnnPair) -> str:
    """The first line a demo prints: the model, how many images, the INT8 model and the layers it keeps FP32."""
    kept = f" (FP32 layers: {', '.join(pair.fp32_layers)})" if pair.fp32_layers else ""
    return f"{model.name}: {len(images)} image(s); INT8 model {pair.int8_param}{kept}"


class SideBySide:
    """The FP32 and INT8 networks loaded once; each image runs through both, interleaved, and is timed."""

    def __init__(self, pair: NcnnPair, threads: int, runs: int) -> None:
        self.fp32 = NcnnRunner(pair.fp32_param, pair.fp32_bin, int8=False, threads=threads)
        self.int8 = NcnnRunner(pair.int8_param, pair.int8_bin, int8=True, threads=threads)
        self.runs = max(1, runs)
        self.input_name = self.fp32.input_names[0]

    def each(
        self, images: Sequence[Path], prep: Preprocess
    ) -> Iterator[tuple[Path, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], float, float]]:
        """(path, image, FP32 outputs, INT8 outputs, FP32 ms, INT8 ms) of each readable image; others are skipped."""
        for path, image in readable_images(images):
            yield (path, image, *self.run(prep.apply(image)))

    def run(self, data: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, float]:
        """Outputs of both nets and their median ms over ``runs`` passes (after one untimed pass each).

        Passes alternate FP32/INT8 so that a change in machine load hits both alike.
        """
        inputs: Mapping[str, np.ndarray] = {self.input_name: data}
        out_fp32, out_int8 = self.fp32.run(inputs), self.int8.run(inputs)
        ms = interleaved_ms({"fp32": self.fp32, "int8": self.int8}, inputs, self.runs, warmup=0)
        return out_fp32, out_int8, ms["fp32"], ms["int8"]


def speed_summary(ms_fp32: Sequence[float], ms_int8: Sequence[float], threads: int) -> str:
    """Median ms/image of both models over all images, and the INT8/FP32 ratio."""
    fp32, int8 = statistics.median(ms_fp32), statistics.median(ms_int8)
    return (
        f"speed ({threads} thread{'s' if threads > 1 else ''}, median over {len(ms_fp32)} image(s)): "
        f"FP32 {fp32:.2f} ms/image, INT8 {int8:.2f} ms/image, INT8/FP32 time ratio {int8 / fp32:.3f} "
        f"({max(fp32, int8) / min(fp32, int8):.2f}x {'faster' if int8 < fp32 else 'slower'})"
    )


def preprocess_defaults(prep: Preprocess) -> dict:
    """The preprocessing flags' values (``add_preprocess_args``' dests) that give the zoo's ``prep``: its
    ``cli_flags`` parsed as the demo parses them; the input size stays the prototxt's."""
    parser = argparse.ArgumentParser(add_help=False)
    add_preprocess_args(parser)
    return vars(parser.parse_args(cli_flags(prep)))


def parse_with_preset(
    parser: argparse.ArgumentParser, presets: Mapping[str, dict], argv: list[str] | None
) -> argparse.Namespace:
    """A preset's settings (its zoo model's preprocessing, then its own ``defaults``) become the defaults of their
    flags, so explicit flags still win."""
    first, _ = parser.parse_known_args(argv)
    if first.proto is None and first.model is None:
        preset = presets[first.model_name]
        parser.set_defaults(**preprocess_defaults(MODELS[preset["zoo"]].prep), **preset["defaults"])
    args = parser.parse_args(argv)
    if (args.proto is None) != (args.model is None):
        parser.error("give both --proto and --model (or neither, for a preset)")
    return args


def finish(
    ms_fp32: Sequence[float],
    ms_int8: Sequence[float],
    images: Sequence[Path],
    args: argparse.Namespace,
    task_line: Callable[[], str],
) -> int:
    """The end of a demo run: an error when no image could be read, else the task line, speed and pictures."""
    if not ms_fp32:
        raise Int8ConvError(f"none of the {len(images)} images in {args.images} could be read")
    print(task_line())
    print(speed_summary(ms_fp32, ms_int8, args.threads))
    print(f"pictures: {args.out_dir}/<image>.png")
    return 0


def run_main(main: Callable[[], int]) -> None:
    """Exit with ``main``'s code; a user error is one logged line and exit code 2, as in the CLI."""
    try:
        sys.exit(main())
    except Int8ConvError as exc:
        log.error("%s", exc)
        sys.exit(2)
