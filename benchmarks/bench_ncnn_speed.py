"""ncnn speed of every shared model, side by side in one run: FP32 with and without shape hints, and INT8/FP32
before (the shipped table, every layer INT8) and after speed-aware precision (``quantize --optimize speed``).

    python benchmarks/bench_ncnn_speed.py [--shared ../shared] [--models res10 ultraface] [--runs 30]
        [--ncnnoptimize PATH] [--fp32-only]

For each model all four files are timed in the same process, interleaved run by run so that machine load hits
them alike, at 1 and 2 threads; medians are printed with the ratios. ``--ncnnoptimize PATH`` (Tencent/ncnn's tool,
built elsewhere) adds a fifth file, ``ncnnoptimize in.param in.bin out.param out.bin 0`` run on the project's FP32
model, and the ratio of the project's FP32 time to it (``hints/opt``); ``--fp32-only`` times the FP32 files alone
(no INT8 models, no speed-aware search), which makes the comparison over every shared model quick. Wall time
(``perf_counter``) is what users see; at 1 thread the CPU time (``process_time``, blind to other processes on a
shared machine) is printed too. The output cosine against FP32 (on held-out face images) shows what the speed-aware
choice costs in accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from int8conv.caffe.graph import load_graph  # noqa: E402
from int8conv.calibration.preprocess import list_images, readable_images  # noqa: E402
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
    "retinaface": "retinaface_mnet025",
    "yoloface": "yoloface_500k_v2",
    "shufflenet_driver": "shufflenet_v1_driver_action",
    "lane": "mobilenet_yolov3_lite_lane",
}
LABELS = ("fp32 plain", "fp32 hints", "int8 all", "int8 speed")
OPTIMIZED = "fp32 ncnnoptimize"


def ncnnoptimize(tool: Path, param: Path, binary: Path) -> tuple[Path, Path, bool]:
    """ncnnoptimize's FP32 rewrite (flag 0: fp32 storage) of the project's files, beside them."""
    out_param, out_bin = param.with_name(f"{param.stem}-ncnnoptimize.param"), binary.with_name(f"{binary.stem}-opt.bin")
    subprocess.run(
        [str(tool), str(param), str(binary), str(out_param), str(out_bin), "0"], check=True, capture_output=True
    )
    return out_param, out_bin, False


def build(shared: Path, name: str, out: Path, images: list[np.ndarray], fp32_only: bool):
    """The files of one model, the INT8 layer counts, the held-out inputs and the speed choice."""
    spec = MODELS[name]
    fp32 = convert_graph(load_graph(*spec.paths(shared)))
    inputs = [{fp32.input_names[0]: spec.prep.apply(image)} for image in images]
    models = {"fp32 plain": without_shape_hints(fp32), "fp32 hints": fp32}
    if not fp32_only:
        table = read_ncnn_table(ROOT / "tables" / f"{TABLES[name]}.table")
        choice = optimize_speed(fp32, table, inputs[:2])
        models.update({"int8 all": quantize_model(fp32, table), "int8 speed": quantize_model(fp32, choice.table)})
    files = {}
    for label, model in models.items():
        stem = out / f"{name}-{label.replace(' ', '-')}"
        write_model(model, stem.with_suffix(".param"), stem.with_suffix(".bin"))
        files[label] = (stem.with_suffix(".param"), stem.with_suffix(".bin"), label.startswith("int8"))
    if fp32_only:
        return files, {}, {}, inputs[0]
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
    parser.add_argument("--ncnnoptimize", type=Path, help="Tencent/ncnn's ncnnoptimize binary: add its FP32 file")
    parser.add_argument("--fp32-only", action="store_true", help="time the FP32 files only (no INT8 models)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("INT8CONV_QUIET", "1")
    images = [image for _, image in readable_images(list_images(args.shared / "images" / "faces")[-args.images :])]
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores; medians of "
        f"{args.runs} interleaved runs after 2 warm-up runs"
    )
    # (header line 1, header line 2, value from {file label: ms}); "ms" columns are times, the others ratios
    columns = [("FP32", "plain ms", lambda ms: ms["fp32 plain"]), ("hints", "ms", lambda ms: ms["fp32 hints"])]
    columns.append(("hints/", "plain", lambda ms: ms["fp32 hints"] / ms["fp32 plain"]))
    if args.ncnnoptimize:
        columns.append(("ncnnopt", "ms", lambda ms: ms[OPTIMIZED]))
        columns.append(("hints/", "opt", lambda ms: ms["fp32 hints"] / ms[OPTIMIZED]))
    if not args.fp32_only:
        columns.append(("INT8", "all ms", lambda ms: ms["int8 all"]))
        columns.append(("INT8/", "FP32", lambda ms: ms["int8 all"] / ms["fp32 hints"]))
        columns.append(("speed", "INT8 ms", lambda ms: ms["int8 speed"]))
        columns.append(("speed/", "FP32", lambda ms: ms["int8 speed"] / ms["fp32 hints"]))
    print(f"{'model':<18} {'thr':>3} {'clock':>5} " + " ".join(f"{c[0]:>8}" for c in columns))
    print(f"{'':<18} {'':>3} {'':>5} " + " ".join(f"{c[1]:>8}" for c in columns))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            files, counts, cosines, x = build(args.shared, name, Path(tmp), images, args.fp32_only)
            if args.ncnnoptimize:
                files[OPTIMIZED] = ncnnoptimize(args.ncnnoptimize, *files["fp32 hints"][:2])
            clocks = {"wall": time.perf_counter}
            if 1 in args.threads:
                clocks["cpu"] = time.process_time
            for clock_name, clock in clocks.items():
                threads = args.threads if clock_name == "wall" else [1]
                ms = time_models(files, x, threads=threads, runs=args.runs, clock=clock)
                for t in threads:
                    at = {label: ms[label][t] for label in files}
                    values = " ".join(f"{c[2](at):>8.{2 if 'ms' in c[1] else 3}f}" for c in columns)
                    print(f"{name:<18} {t:>3} {clock_name:>5} {values}")
            if counts:
                print(
                    f"{'':<18} INT8 layers: all {counts['int8 all']}, speed {counts['int8 speed']}; output cosine "
                    f"vs FP32: all {cosines['int8 all']:.6f}, speed {cosines['int8 speed']:.6f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
