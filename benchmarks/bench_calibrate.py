"""Calibration throughput (images/s) and peak memory at 50 vs 200 images, measured side by side in one run.

    python benchmarks/bench_calibrate.py [--shared ../shared]

Each measurement runs ``int8conv calibrate`` in a fresh subprocess and reads its peak RSS, so memory growth with
the number of images shows directly in the ratio (a streaming pass should stay near 1.0).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: runs the CLI in the child, then prints the child's own peak RSS (KiB) as the last stdout line
PEAK_WRAPPER = ("import resource, sys; from int8conv.cli import main; code = main(sys.argv[1:]); "
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")

MODELS = {
    "res10_ssd": ("res10_300x300_ssd", "deploy.prototxt", "res10_300x300_ssd_iter_140000.caffemodel",
                  ["--mean", "104", "177", "123"]),
    "open_nsfw": ("open_nsfw_resnet50_1by2", "deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel",
                  ["--mean", "104", "117", "123", "--resize-then-crop", "256", "256"]),
}


def run_once(shared: Path, key: str, images: int) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one calibration subprocess over ``images`` images."""
    folder, proto, model, flags = MODELS[key]
    base = shared / "models" / folder
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", PEAK_WRAPPER, "-q", "calibrate", "--backend", "opencv",
               "--proto", str(base / proto), "--model", str(base / model), *flags,
               "--images", str(shared / "images" / "imagenet_samples_200"), "--max-images", str(images),
               "--output", str(Path(tmp) / "t.table")]
        started = time.perf_counter()
        proc = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    return seconds, peak_kib / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")))
    args = parser.parse_args()
    print(f"{'model':<10} {'images':>6} {'seconds':>8} {'img/s':>7} {'peak MiB':>9}")
    for key in MODELS:
        rows = {}
        for count in (50, 200):
            seconds, peak = run_once(args.shared, key, count)
            rows[count] = (seconds, peak)
            print(f"{key:<10} {count:>6} {seconds:>8.1f} {count / seconds:>7.2f} {peak:>9.0f}")
        print(f"{key:<10} peak memory 200 vs 50 images: x{rows[200][1] / rows[50][1]:.2f}; "
              f"throughput 200 vs 50: x{(200 / rows[200][0]) / (50 / rows[50][0]):.2f}")


if __name__ == "__main__":
    main()
