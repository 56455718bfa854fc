"""Calibration throughput per engine and per --jobs, and peak memory, measured side by side in one run.

    python benchmarks/bench_calibrate.py [--shared ../shared] [--images 100] [--repeats 3]

Each measurement is one ``int8conv calibrate`` in a fresh subprocess (imports included, as a user runs it),
interleaved over the configurations ``--repeats`` times so that load from other processes hits all alike; the
medians are printed with the ratio to today's OpenCV engine. Reported per configuration:

- wall images/s of the whole process, and its CPU seconds (user + system of the child, from ``getrusage``:
  insensitive to other load on the machine, but counts the spinning of idle ncnn/OpenMP threads);
- the peak RSS of the child; then, for the default engine, peak RSS at 50 vs 200 images and at --batch-size 1
  vs 16 (streaming: the ratios should stay near 1.0);
- the largest relative difference of each table's activation scales from the OpenCV table (KL near-ties aside,
  the engines agree to float rounding).
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

#: runs the CLI in the child, then prints the child's own peak RSS (KiB) as the last stdout line
PEAK_WRAPPER = (
    "import resource, sys; from int8conv.cli import main; code = main(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
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


def run_once(shared: Path, key: str, images: int, flags: list[str], table: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one calibration subprocess."""
    spec = MODELS[key]
    proto, model = spec.paths(shared)
    cmd = [sys.executable, "-c", PEAK_WRAPPER, "-q", "calibrate", *flags, "--proto", str(proto), "--model", str(model)]
    cmd += [*cli_flags(spec.prep), "--images", str(shared / "images" / "imagenet_samples_200")]
    cmd += ["--max-images", str(images), "--output", str(table)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, int(proc.stdout.strip().splitlines()[-1]) / 1024.0


def scale_difference(table: Path, reference: Path) -> float:
    mine, theirs = read_ncnn_table(table).activation_scales, read_ncnn_table(reference).activation_scales
    return max(abs(mine[layer] / scale - 1) for layer, scale in theirs.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")))
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(BENCHMARKED))
    args = parser.parse_args()
    configs = [c for c in CONFIGS if c[0] != "caffe (pycaffe)" or caffe_importable()]
    print(f"{os.cpu_count()} logical cores; {args.images} images; medians of {args.repeats} interleaved runs")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for key in args.models:
            samples: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _ in configs}
            for _ in range(args.repeats):
                for label, flags in configs:
                    samples[label].append(run_once(args.shared, key, args.images, flags, out / f"{label}.table"))
            reference = out / "opencv.table"
            base_wall = statistics.median(s[0] for s in samples["opencv"])
            print(
                f"\n{key:<10} {'engine':<16} {'img/s':>7} {'x opencv':>8} {'CPU s':>6} {'peak MiB':>8} "
                f"{'max |scale diff|':>16}"
            )
            for label, _ in configs:
                wall, cpu, peak = (statistics.median(s[i] for s in samples[label]) for i in range(3))
                print(
                    f"{'':<10} {label:<16} {args.images / wall:>7.1f} {base_wall / wall:>8.2f} {cpu:>6.1f} "
                    f"{peak:>8.0f} {scale_difference(out / f'{label}.table', reference):>16.2e}"
                )
            memory = {}
            for count, batch in ((50, 4), (200, 4), (args.images, 1), (args.images, 16)):
                memory[count, batch] = run_once(
                    args.shared, key, count, ["--batch-size", str(batch)], out / "memory.table"
                )[2]
            print(
                f"{'':<10} default engine peak RSS: 200 vs 50 images x{memory[200, 4] / memory[50, 4]:.2f}; "
                f"--batch-size 16 vs 1 x{memory[args.images, 16] / memory[args.images, 1]:.2f} "
                f"({memory[args.images, 1]:.0f} -> {memory[args.images, 16]:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
