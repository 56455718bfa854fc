"""The slow, obviously-correct KL search that ``int8conv.calibration.thresholds`` must equal (tests and benchmark).

Written straight from TensorRT's entropy-calibration description, one candidate at a time:
P = hist[:i] with the outliers hist[i:] summed into its last bin; Q = hist[:i] merged into 128 levels
(bin j in level floor(j * 128 / i)), each level's count spread evenly over its non-empty bins and
expanded back (empty bins stay 0); both normalized; KL(P || Q) = sum over P > 0 of P log(P / Q),
infinite where P > 0 and Q == 0. Kept apart from the package so the two never share code.
Also the source of real activations (res10 SSD) both are compared on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from int8conv.calibration.thresholds import KL_TIE_ABSOLUTE, KL_TIE_RELATIVE


def reference_kl_divergences(counts: np.ndarray, levels: int = 128, start_bin: int = 128) -> list[float]:
    """KL(P || Q) for i = start_bin .. len(counts), computed candidate by candidate."""
    counts = np.asarray(counts, dtype=np.float64)
    divergences = []
    for i in range(start_bin, len(counts) + 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()

        in_range = counts[:i]
        level = np.arange(i) * levels // i
        level_count = np.bincount(level, weights=in_range, minlength=levels)
        level_nonempty = np.bincount(level, weights=(in_range > 0), minlength=levels)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.where(in_range > 0, level_count[level] / level_nonempty[level], 0.0)

        p = p / p.sum()
        if q.sum() > 0:
            q = q / q.sum()
        support = p > 0
        if (q[support] == 0).any():
            divergences.append(math.inf)
        else:
            divergences.append(float(np.sum(p[support] * np.log(p[support] / q[support]))))
    return divergences


def reference_kl_bin(counts: np.ndarray, levels: int = 128, start_bin: int = 128) -> int:
    """The chosen number of kept bins: the first candidate within rounding of the minimum divergence."""
    divergences = reference_kl_divergences(counts, levels, start_bin)
    best = min(divergences)
    for offset, divergence in enumerate(divergences):
        if divergence <= best + KL_TIE_RELATIVE * abs(best) + KL_TIE_ABSOLUTE:
            return start_bin + offset
    raise AssertionError("unreachable: the minimum is always within tolerance of itself")


def reference_kl_threshold_bin(counts: np.ndarray, levels: int = 128, start_bin: int = 128) -> int:
    """The full rule of ``kl_threshold`` in bins: few non-empty bins keep everything; else bin 0 takes
    bin 1's count (the zero/near-zero spike) and the KL search decides."""
    counts = np.asarray(counts)
    nonempty = np.flatnonzero(counts)
    if nonempty.size < levels:
        return int(nonempty[-1]) + 1
    flattened = counts.copy()
    flattened[0] = flattened[1]
    return reference_kl_bin(flattened, levels, start_bin)


RES10 = ("res10_300x300_ssd", "deploy.prototxt", "res10_300x300_ssd_iter_140000.caffemodel")


def res10_activations(shared: Path, images: int) -> Iterator[dict[str, np.ndarray]]:
    """Real activations to check the search on: every Convolution/ReLU/Scale/Eltwise/Pooling output of
    the res10 SSD face detector (OpenCV DNN, fusion off), one dict per face image, preprocessed as its
    SOURCE.txt says (300x300 BGR, mean 104 177 123)."""
    import cv2

    folder = shared / "models" / RES10[0]
    net = cv2.dnn.readNetFromCaffe(str(folder / RES10[1]), str(folder / RES10[2]))
    net.enableFusion(False)
    kinds = {"Convolution", "ReLU", "Scale", "Eltwise", "Pooling"}
    names = [n for n in net.getLayerNames() if net.getLayer(net.getLayerId(n)).type in kinds]
    for path in sorted((shared / "images" / "faces").glob("*.jpg"))[:images]:
        blob = cv2.dnn.blobFromImage(cv2.imread(str(path)), 1.0, (300, 300), (104, 177, 123))
        net.setInput(blob)
        yield dict(zip(names, net.forward(names), strict=True))
