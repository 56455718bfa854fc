"""Calibration throughput per engine and per --jobs, and peak memory, measured side by side in one run.

    python benchmarks/bench_calibrate.py [--shared ../shared] [--images 100] [--repeats 3] [--method kl]

Each measurement is one ``int8conv calibrate`` in a fresh subprocess (imports included, as a user runs it),
interleaved over the configurations ``--repeats`` times so that load from other processes hits all alike; the
medians are printed with the ratio to today's OpenCV engine. Reported per configuration:

- wall images/s of the whole process, its ratio to OpenCV's (median, and the lowest to highest ratio of the runs of
  one repeat), and its CPU seconds (user + system of the child, from ``getrusage``:
  insensitive to other load on the machine, but counts the spinning of idle ncnn/OpenMP threads);
- the peak RSS of the child and its worker processes (the child's own peak plus ``jobs - 1`` times its largest
  worker's, when workers started: an upper bound, since they need not peak at once); then, for the default
  engine, peak RSS at 50 vs 200 images (in all, with the number of processes, and per process) and at
  --batch-size 1 vs 16 (streaming: the ratios should stay near 1.0);
- the largest relative difference of each table's activation scales from the OpenCV table (KL near-ties aside,
  the engines agree to float rounding);
- the default engine's CPU ms per image, step by step in one process: ncnn's forward with the blobs extracted
  unpacked and packed (what calibration reads), and the histogram update.

``--method`` is the threshold method of every run (default kl: its search takes a few ms, so the images/s are the
engine's; ``auto``, the calibrate default, adds a validation on the ncnn runtime that no engine speeds up).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8conv.tables.ncnn_table import read_ncnn_table  # noqa: E402
from int8conv.zoo import MODELS, cli_flags  # noqa: E402

#: runs the CLI in the child, then prints its own peak RSS and its largest worker's (KiB) as the last stdout line
PEAK_WRAPPER = (
    "import resource, sys; from int8conv.cli import main; code = main(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
    " sys.exit(code)"
)

#: the zoo models timed (``int8conv.zoo``): an SSD detector and a ResNet-50 classifier
BENCHMARKED = ("open_nsfw", "res10")
#: (label, calibrate flags): today's engine first (the reference of the ratios), the default last
CONFIGS = [
    ("opencv", ["--backend", "opencv"]),
    ("caffe (pycaffe)", ["--backend", "caffe"]),
    ("ncnn --jobs 1", ["--backend", "ncnn", "--jobs", "1"]),
    ("ncnn --jobs 2", ["--backend", "ncnn", "--jobs", "2"]),
    ("default (auto)", []),
]


def caffe_importable() -> bool:
    from int8conv.engines import caffe_importable as importable

    return importable()


def workers(flags: list[str]) -> int:
    """How many worker processes a run with these flags starts at most (``jobs - 1``; none for OpenCV, pycaffe)."""
    from int8conv.calibration.workers import default_jobs

    if "--backend" in flags and flags[flags.index("--backend") + 1] in ("opencv", "caffe"):
        return 0
    jobs = int(flags[flags.index("--jobs") + 1]) if "--jobs" in flags else default_jobs()
    return jobs - 1


def run_once(
    shared: Path, key: str, images: int, flags: list[str], table: Path, method: str
) -> tuple[float, float, float, float, int]:
    """Wall seconds, CPU seconds (workers included), peak RSS (MiB, workers included), the largest process's peak
    RSS (MiB) and the number of processes of one calibration (workers start only when the images pay for them)."""
    spec = MODELS[key]
    proto, model = spec.paths(shared)
    cmd = [sys.executable, "-c", PEAK_WRAPPER, "-q", "calibrate", *flags, "--proto", str(proto), "--model", str(model)]
    cmd += [*cli_flags(spec.prep), "--images", str(shared / "images" / "imagenet_samples_200")]
    cmd += ["--max-images", str(images), "--method", method, "--output", str(table)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    own, worker = (int(v) for v in proc.stdout.strip().splitlines()[-1].split())
    processes = 1 + (workers(flags) if worker else 0)
    return wall, cpu, (own + (processes - 1) * worker) / 1024.0, max(own, worker) / 1024.0, processes


def per_image_cpu(shared: Path, key: str, images: int) -> dict[str, float]:
    """CPU ms per image of the default engine's steps, in this process, interleaved image by image: ncnn's forward
    with every calibrated blob extracted unpacked (as before packed reading) and packed (as calibrate reads them),
    and the histogram update of the packed values."""
    from int8conv.caffe.graph import load_graph
    from int8conv.calibration.calibrate import calibration_values
    from int8conv.calibration.histograms import CalibrationStatistics
    from int8conv.calibration.preprocess import ImageTally, iter_batches, list_images
    from int8conv.engines import make_engine

    spec = MODELS[key]
    proto, model = spec.paths(shared)
    graph = load_graph(proto, model)
    reader = make_engine("ncnn", graph, proto, model).reader(calibration_values(graph))
    stats = CalibrationStatistics({}, {})
    spent = {"forward, blobs unpacked": 0.0, "forward, blobs packed": 0.0, "histograms": 0.0}
    paths = list_images(shared / "images" / "imagenet_samples_200")[:images]
    batches = list(iter_batches(paths, spec.prep, 1, ImageTally()))
    reader.forward(batches[0][0])  # the net loaded and warm before anything is timed
    count = 0
    for batch, _ in batches:
        for label, packed in (("forward, blobs unpacked", False), ("forward, blobs packed", True)):
            started = time.process_time()
            values = reader.forward(batch, packed=packed)
            spent[label] += time.process_time() - started
        started = time.process_time()
        stats.update(values)
        spent["histograms"] += time.process_time() - started
        count += 1
    return {label: 1000.0 * seconds / count for label, seconds in spent.items()}


def scale_difference(table: Path, reference: Path) -> float:
    mine, theirs = read_ncnn_table(table).activation_scales, read_ncnn_table(reference).activation_scales
    return max(abs(mine[layer] / scale - 1) for layer, scale in theirs.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", default="kl", help="threshold method of every run (default kl)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(BENCHMARKED))
    labels = [label for label, _ in CONFIGS]
    parser.add_argument("--configs", nargs="+", choices=labels, default=labels, help="(opencv always runs)")
    args = parser.parse_args()
    wanted = {"opencv", *args.configs}
    configs = [c for c in CONFIGS if c[0] in wanted and (c[0] != "caffe (pycaffe)" or caffe_importable())]
    print(
        f"{os.cpu_count()} logical cores; {args.images} images; --method {args.method}; medians of {args.repeats} "
        "interleaved runs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for key in args.models:
            samples: dict[str, list[tuple[float, ...]]] = {label: [] for label, _ in configs}
            for _ in range(args.repeats):
                for label, flags in configs:
                    samples[label].append(
                        run_once(args.shared, key, args.images, flags, out / f"{label}.table", args.method)
                    )
            reference = out / "opencv.table"
            base_wall = statistics.median(s[0] for s in samples["opencv"])
            print(
                f"\n{key:<10} {'engine':<16} {'img/s':>7} {'x opencv':>8} {'(spread)':>11} {'CPU s':>6} "
                f"{'peak MiB':>8} {'max |scale diff|':>16}"
            )
            for label, _ in configs:
                wall, cpu, peak = (statistics.median(s[i] for s in samples[label]) for i in range(3))
                # the ratio within each repeat (the runs closest in time), lowest to highest
                ratios = [o[0] / x[0] for o, x in zip(samples["opencv"], samples[label], strict=True)]
                print(
                    f"{'':<10} {label:<16} {args.images / wall:>7.1f} {base_wall / wall:>8.2f} "
                    f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>11} {cpu:>6.1f} {peak:>8.0f} "
                    f"{scale_difference(out / f'{label}.table', reference):>16.2e}"
                )
            memory = {}
            for count, batch in ((50, 4), (200, 4), (args.images, 1), (args.images, 16)):
                memory[count, batch] = run_once(
                    args.shared, key, count, ["--batch-size", str(batch)], out / "memory.table", args.method
                )[2:]
            (few, few_process, few_count), (many, many_process, many_count) = memory[50, 4], memory[200, 4]
            print(
                f"{'':<10} default engine peak RSS: 200 vs 50 images x{many / few:.2f} in all ({few_count} -> "
                f"{many_count} process(es)), x{many_process / few_process:.2f} per process; --batch-size 16 vs 1 "
                f"x{memory[args.images, 16][0] / memory[args.images, 1][0]:.2f} "
                f"({memory[args.images, 1][0]:.0f} -> {memory[args.images, 16][0]:.0f} MiB)"
            )
            steps = per_image_cpu(args.shared, key, min(args.images, 30))
            print(f"{'':<10} CPU ms per image, one process: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))


if __name__ == "__main__":
    main()
