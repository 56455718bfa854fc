"""ncnn speed of every shared model, side by side in one run: FP32 with and without shape hints, and INT8/FP32
before (the shipped table, every layer INT8) and after speed-aware precision (``quantize --optimize speed``).

    python benchmarks/bench_ncnn_speed.py [--shared ../shared] [--models res10 ultraface] [--runs 30]

For each model all four files are timed in the same process, interleaved run by run so that machine load hits
them alike, at 1 and 2 threads; medians are printed with the ratios. Wall time (``perf_counter``) is what users
see; at 1 thread the CPU time (``process_time``, blind to other processes on a shared machine) is printed too.
The output cosine against FP32 (on held-out face images) shows what the speed-aware choice costs in accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from int8conv.caffe.graph import load_graph  # noqa: E402
from int8conv.calibration.preprocess import list_images, read_image  # noqa: E402
from int8conv.evaluation.evaluate import output_view, resolve_task  # noqa: E402
from int8conv.evaluation.speed import optimize_speed  # noqa: E402
from int8conv.ncnn.convert import convert_graph  # noqa: E402
from int8conv.ncnn.model import write_model  # noqa: E402
from int8conv.ncnn.quantize import int8_layers, quantize_model  # noqa: E402
from int8conv.ncnn.runtime import NcnnRunner, time_models  # noqa: E402
from int8conv.ncnn.shape_hints import without_shape_hints  # noqa: E402
from int8conv.tables.ncnn_table import read_ncnn_table  # noqa: E402
from int8conv.zoo import MODELS  # noqa: E402

#: shared model -> its shipped table in tables/
TABLES = {
    "res10": "res10_300x300_ssd",
    "open_nsfw": "open_nsfw_resnet50_1by2",
    "yufacedetectnet": "yufacedetectnet_v1",
    "ultraface": "ultraface_slim320",
    "lenet": "lenet_mnist",
    "det1": "mtcnn_det1",
    "det2": "mtcnn_det2",
    "det3": "mtcnn_det3",
}
LABELS = ("fp32 plain", "fp32 hints", "int8 all", "int8 speed")


def build(shared: Path, name: str, out: Path, images: list[np.ndarray]):
    """The four files of one model, the INT8 layer counts, the held-out inputs and the speed choice."""
    spec = MODELS[name]
    fp32 = convert_graph(load_graph(*spec.paths(shared)))
    table = read_ncnn_table(ROOT / "tables" / f"{TABLES[name]}.table")
    inputs = [{fp32.input_names[0]: spec.prep.apply(image)} for image in images]
    choice = optimize_speed(fp32, table, inputs[:2])
    models = {
        "fp32 plain": without_shape_hints(fp32),
        "fp32 hints": fp32,
        "int8 all": quantize_model(fp32, table),
        "int8 speed": quantize_model(fp32, choice.table),
    }
    files = {}
    for label, model in models.items():
        stem = out / f"{name}-{label.replace(' ', '-')}"
        write_model(model, stem.with_suffix(".param"), stem.with_suffix(".bin"))
        files[label] = (stem.with_suffix(".param"), stem.with_suffix(".bin"), label.startswith("int8"))
    counts = {label: len(int8_layers(models[label])) for label in ("int8 all", "int8 speed")}
    cosines = {}
    view = output_view(fp32, resolve_task(fp32, "auto"))
    reference = NcnnRunner(*files["fp32 hints"][:2], int8=False)
    for label in ("int8 all", "int8 speed"):
        runner = NcnnRunner(*files[label][:2], int8=True)
        cosines[label] = float(
            np.mean([view.cosine(reference.extract(x, view.blobs), runner.extract(x, view.blobs)) for x in inputs])
        )
    return files, counts, cosines, inputs[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")))
    parser.add_argument(
        "--models", nargs="+", choices=sorted(TABLES), default=["res10", "open_nsfw", "yufacedetectnet", "ultraface"]
    )
    parser.add_argument("--runs", type=int, default=30, help="timed passes per file and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=8, help="held-out face images for the output cosine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("INT8CONV_QUIET", "1")
    images = [read_image(p) for p in list_images(args.shared / "images" / "faces")[-args.images :]]
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; medians of "
        f"{args.runs} interleaved runs after 2 warm-up runs"
    )
    print(
        f"{'model':<16} {'thr':>3} {'clock':>5} {'FP32':>8} {'hints':>8} {'hints/':>7} {'INT8':>8} {'INT8/':>6} "
        f"{'speed':>8} {'speed/':>7}"
    )
    print(
        f"{'':<16} {'':>3} {'':>5} {'plain ms':>8} {'ms':>8} {'plain':>7} {'all ms':>8} {'FP32':>6} "
        f"{'INT8 ms':>8} {'FP32':>7}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            files, counts, cosines, x = build(args.shared, name, Path(tmp), images)
            clocks = {"wall": time.perf_counter}
            if 1 in args.threads:
                clocks["cpu"] = time.process_time
            for clock_name, clock in clocks.items():
                threads = args.threads if clock_name == "wall" else [1]
                ms = time_models(files, x, threads=threads, runs=args.runs, clock=clock)
                for t in threads:
                    plain, hints, int8, speed = (ms[label][t] for label in LABELS)
                    print(
                        f"{name:<16} {t:>3} {clock_name:>5} {plain:>8.2f} {hints:>8.2f} {hints / plain:>7.3f} "
                        f"{int8:>8.2f} {int8 / hints:>6.3f} {speed:>8.2f} {speed / hints:>7.3f}"
                    )
            print(
                f"{'':<16} INT8 layers: all {counts['int8 all']}, speed {counts['int8 speed']}; output cosine vs "
                f"FP32: all {cosines['int8 all']:.6f}, speed {cosines['int8 speed']:.6f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
