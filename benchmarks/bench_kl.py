"""KL-search time per blob: int8conv's vectorized search vs the slow reference, side by side in one run.

Real histograms: every Convolution/ReLU/Scale/Eltwise/Pooling output of the res10 SSD face detector on a
few face images (OpenCV DNN FP32 forward). Both searches run on the same histograms, their chosen
thresholds are checked equal, and the ratio of the time per blob is printed.

    python benchmarks/bench_kl.py [--shared ../shared] [--images 4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from int8conv.calibration.histograms import CalibrationStatistics  # noqa: E402
from int8conv.calibration.thresholds import kl_threshold  # noqa: E402
from tests.kl_reference import reference_kl_threshold_bin, res10_activations  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared")),
        help="folder with models/ and images/ (default $INT8CONV_SHARED or ../shared)",
    )
    parser.add_argument("--images", type=int, default=4, help="face images to build the histograms from")
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats of the vectorized search (best kept)")
    args = parser.parse_args()
    if not (args.shared / "models" / "res10_300x300_ssd").is_dir():
        parser.error(f"{args.shared} has no models/res10_300x300_ssd; pass --shared")

    stats = CalibrationStatistics(model={}, preprocess={})
    for outputs in res10_activations(args.shared, args.images):
        stats.update(outputs)
    # blobs where the search itself runs (>= 128 non-empty bins; otherwise both keep absmax at once)
    histograms = [h for h in stats.histograms.values() if np.count_nonzero(h.counts) >= 128]

    vectorized_s, reference_s, equal = 0.0, 0.0, 0
    for hist in histograms:
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            threshold = kl_threshold(hist.counts, hist.bin_width)
            best = min(best, time.perf_counter() - start)
        vectorized_s += best
        start = time.perf_counter()
        chosen = reference_kl_threshold_bin(hist.counts)
        reference_s += time.perf_counter() - start
        equal += threshold == chosen * hist.bin_width

    count = len(histograms)
    print(
        f"res10_300x300_ssd, {args.images} images, {count} blobs searched (2048 bins, 128 levels, "
        f"{2048 - 128 + 1} candidates each)"
    )
    print(f"  vectorized  {1e3 * vectorized_s / count:9.2f} ms/blob  (best of {args.repeat})")
    print(f"  reference   {1e3 * reference_s / count:9.2f} ms/blob")
    print(f"  speed-up    {reference_s / vectorized_s:9.1f} x")
    print(f"  same threshold on {equal}/{count} blobs")
    return 0 if equal == count else 1


if __name__ == "__main__":
    sys.exit(main())
