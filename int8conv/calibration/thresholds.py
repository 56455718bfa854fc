"""Activation thresholds: the amax T at which a value is clipped (ncnn table scale 127/T, TensorRT T/127).

Every method reads a :class:`~int8conv.calibration.histograms.BlobHistogram` of the non-zero |x| (exact zeros are
representable for every T, so they never pull a threshold; see ``statistics``). The histogram is of |x|,
so signed values (network input, linear bottlenecks, detection heads) are handled like any other: int8
is symmetric, [-127, 127].

Guarantee of :func:`activation_threshold`: a finite T with 0 < T <= absmax, the same T for the same
histogram, or ``None`` for a value that was exactly zero on every calibration image (there is no scale
to give it; the caller keeps that layer in FP32 and says so).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from int8conv.calibration.histograms import BlobHistogram
from int8conv.errors import Int8ConvError

log = logging.getLogger(__name__)

METHODS = ("kl", "minmax", "percentile", "aciq", "mse")
#: What ``calibrate`` uses unless told: chosen by ``benchmarks/bench_quality.py`` (README, "Calibration methods,
#: measured"): ``auto`` (``auto_select``: these methods' whole-model tables measured on the ncnn runtime, the best
#: kept) meets the accuracy targets on the most shared models, under 3x KL's time.
DEFAULT_METHOD = "auto"

# Banner et al., "Post training 4-bit quantization of convolutional networks for rapid deployment"
# (ACIQ): optimal clipping of a Laplace(0, b) variable quantized to 8 bits is alpha = 9.89 b.
ACIQ_LAPLACE_8BIT = 9.89

# KL candidates whose divergence is within float rounding of the minimum count as ties; the smallest
# threshold among them wins (same information loss, finer resolution).
KL_TIE_RELATIVE = 1e-9
KL_TIE_ABSOLUTE = 1e-12


def kl_divergences(
    counts: np.ndarray, num_quantized_bins: int = 128, start_bin: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate ``i`` in ``start_bin..len(counts)`` (bins kept), all at once.

    TensorRT's entropy calibration: P = counts[:i] with the outliers counts[i:] added to its last bin;
    Q = counts[:i] merged into ``num_quantized_bins`` levels (bin j belongs to level
    floor(j * levels / i)), each level's mass spread evenly over its non-empty bins, empty bins 0.
    A bin where P > 0 but Q == 0 (outliers beyond an empty last bin) makes KL infinite.

    Instead of building P and Q per candidate, the divergence is expanded into prefix sums over bins
    and per-level sums, so the work is (candidates x levels) vectorized numpy:

        KL(i) = sum_{j<i} p_j log p_j - sum_l s_l log(s_l / n_l) + log c
                + (pi log pi - p_{i-1} log p_{i-1}) - o log(s_last / n_last)

    with p = counts / total, c = sum_{j<i} p_j, o = 1 - c, pi = p_{i-1} + o, and s_l / n_l the mass /
    number of non-empty bins of level l. Returns (candidates, divergences).
    """
    levels = int(num_quantized_bins)
    bins = counts.size
    if start_bin < levels or start_bin > bins:
        raise Int8ConvError(f"KL needs {levels} <= start bin ({start_bin}) <= number of bins ({bins})")
    total = float(counts.sum())
    if total <= 0:
        raise ValueError("KL of an empty histogram")
    p = counts.astype(np.float64) / total
    present = p > 0
    plogp = np.zeros_like(p)
    plogp[present] = p[present] * np.log(p[present])
    prefix_p = np.concatenate(([0.0], np.cumsum(p)))
    suffix_p = np.concatenate((np.cumsum(p[::-1])[::-1], [0.0]))  # suffix_p[i] = sum_{j>=i} p_j
    prefix_plogp = np.concatenate(([0.0], np.cumsum(plogp)))
    prefix_present = np.concatenate(([0], np.cumsum(present)))

    kept = np.arange(start_bin, bins + 1)
    # level edges: level l holds bins [ceil(l*i/levels), ceil((l+1)*i/levels)), exact integer arithmetic
    edges = -((-np.arange(levels + 1)[None, :] * kept[:, None]) // levels)
    mass = prefix_p[edges[:, 1:]] - prefix_p[edges[:, :-1]]
    filled = prefix_present[edges[:, 1:]] - prefix_present[edges[:, :-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        level_term = np.where(mass > 0, mass * np.log(mass / np.maximum(filled, 1)), 0.0).sum(axis=1)
        inside = prefix_p[kept]
        outliers = suffix_p[kept]
        last = p[kept - 1]
        merged_last = last + outliers
        last_mean = mass[:, -1] / np.maximum(filled[:, -1], 1)
        divergence = (
            prefix_plogp[kept]
            - level_term
            + np.log(inside)
            + np.where(merged_last > 0, merged_last * np.log(merged_last), 0.0)
            - plogp[kept - 1]
            - np.where(outliers > 0, outliers * np.log(last_mean), 0.0)
        )
    divergence = np.where((last == 0) & (outliers > 0), np.inf, divergence)
    return kept, divergence


def select_candidate(divergences: np.ndarray) -> int:
    """Index of the chosen candidate: the first whose divergence is within rounding of the minimum."""
    best = float(np.min(divergences))
    return int(np.argmax(divergences <= best + KL_TIE_RELATIVE * abs(best) + KL_TIE_ABSOLUTE))


def kl_threshold(counts: np.ndarray, bin_width: float, num_quantized_bins: int = 128, start_bin: int = 128) -> float:
    """The KL-optimal clipping point ``i * bin_width`` (the upper edge of the last kept bin).

    The zero spike: exact zeros never reach ``counts`` (see ``statistics``), but activations such as
    BatchNorm/Scale outputs with near-dead channels still pile most of their mass into bin 0 (64% of
    res10's ``layer_256_1_scale1``). KL then values the resolution of that one bin above everything else
    and picks the smallest candidate (1/16 of the range). As NVIDIA's entropy calibrator does, bin 0 is
    given the count of bin 1 before the search, so the spike's height no longer decides the threshold.

    With fewer non-empty bins than quantized levels there is nothing to gain from clipping: the result
    is the upper edge of the last non-empty bin (the caller clamps it to absmax).
    """
    nonempty = np.flatnonzero(counts)
    if nonempty.size == 0:
        raise ValueError("KL of an empty histogram")
    if nonempty.size < num_quantized_bins:
        return float(nonempty[-1] + 1) * bin_width
    counts = counts.copy()
    counts[0] = counts[1]
    kept, divergences = kl_divergences(counts, num_quantized_bins, start_bin)
    return float(kept[select_candidate(divergences)]) * bin_width


def percentile_threshold(hist: BlobHistogram, percentile: float) -> float:
    """The ``percentile`` of the non-zero |x|, interpolated linearly inside its bin."""
    cumulative = np.cumsum(hist.counts)
    target = percentile / 100.0 * float(cumulative[-1])
    j = int(np.searchsorted(cumulative, target, side="left"))
    below = float(cumulative[j - 1]) if j > 0 else 0.0
    return (j + (target - below) / float(hist.counts[j])) * hist.bin_width


def aciq_threshold(hist: BlobHistogram) -> float:
    """Laplace prior: b = mean non-zero |x| (exact, from the streamed sum), T = 9.89 b. Deterministic."""
    return ACIQ_LAPLACE_8BIT * hist.abs_sum / hist.nonzero


def mse_threshold(hist: BlobHistogram) -> float:
    """The bin edge T minimizing the expected squared error over the histogram, all edges at once.

    Values below T cost the uniform rounding error (T/127)^2 / 12 each; values above T are clipped to T
    and cost (center - T)^2, a bin's values taken at its center. Tail sums come from suffix sums.
    """
    counts = hist.counts.astype(np.float64)
    centers = np.arange(counts.size) + 0.5  # in units of bin width
    edges = np.arange(1, counts.size + 1, dtype=np.float64)  # candidate T, in units of bin width

    def suffix(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x[::-1])[::-1]

    tail_n, tail_c, tail_c2 = (np.append(suffix(x), 0.0)[1:] for x in (counts, counts * centers, counts * centers**2))
    inside = np.cumsum(counts)
    clipping = np.maximum(tail_c2 - 2 * edges * tail_c + edges**2 * tail_n, 0.0)
    error = (edges / 127.0) ** 2 / 12.0 * inside + clipping
    return float(edges[int(np.argmin(error))]) * hist.bin_width


def activation_threshold(hist: BlobHistogram, method: str, percentile: float = 99.99) -> float | None:
    """The threshold T of one value by ``method`` (one of METHODS); ``None`` for an all-zero value."""
    if method not in METHODS:
        raise Int8ConvError(f"unknown threshold method '{method}'; choose one of {', '.join(METHODS)}")
    if method == "percentile" and not 0.0 < percentile <= 100.0:
        raise Int8ConvError(f"--percentile must be in (0, 100], not {percentile}")
    absmax = hist.absmax
    if hist.nonzero == 0:
        log.warning("value '%s' is exactly zero on every calibration image: it gets no activation threshold", hist.name)
        return None
    if method == "kl":
        threshold = kl_threshold(hist.counts, hist.bin_width)
    elif method == "minmax":
        threshold = absmax
    elif method == "percentile":
        threshold = percentile_threshold(hist, percentile)
    elif method == "aciq":
        threshold = aciq_threshold(hist)
    else:
        threshold = mse_threshold(hist)
    threshold = min(float(threshold), absmax)
    if not (math.isfinite(threshold) and threshold > 0):
        raise Int8ConvError(
            f"value '{hist.name}': method {method} gave an unusable threshold {threshold} "
            f"(absmax {absmax}); use --method minmax for this model and report the issue"
        )
    log.debug("value %s: %s threshold %.6g (absmax %.6g, signed %s)", hist.name, method, threshold, absmax, hist.signed)
    return threshold
