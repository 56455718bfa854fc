"""Threshold methods: the vectorized KL search equals the slow reference; every method's guarantees."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from int8conv.calibration.histograms import BlobHistogram, CalibrationStatistics
from int8conv.calibration.thresholds import (
    ACIQ_LAPLACE_8BIT,
    METHODS,
    activation_threshold,
    kl_divergences,
    kl_threshold,
    mse_threshold,
    select_candidate,
)
from int8conv.errors import Int8ConvError, ModelError
from tests.kl_reference import reference_kl_bin, reference_kl_divergences, reference_kl_threshold_bin, res10_activations


def random_histograms() -> list[np.ndarray]:
    """Decaying, gappy, bimodal, heavy-tailed and single-outlier shapes, 2048 bins each."""
    rng = np.random.default_rng(7)
    bins = np.arange(2048)
    shapes = [
        rng.poisson(5e4 * np.exp(-bins / 150.0)),  # ReLU-like decay
        rng.poisson(1e3 * np.exp(-bins / 700.0)) * (rng.random(2048) > 0.3),  # gaps everywhere
        rng.poisson(2e3 * (np.exp(-(((bins - 300) / 80.0) ** 2)) + 0.5 * np.exp(-(((bins - 1200) / 200.0) ** 2)))),
        rng.poisson(1e5 / (1.0 + bins / 20.0) ** 2.5),  # heavy tail, sparse end
        np.where(bins < 600, rng.integers(50, 100, 2048), 0) + (bins == 1990),  # one far outlier
        rng.integers(0, 4, 2048),  # small noisy counts
    ]
    return [np.asarray(s, dtype=np.int64) for s in shapes]


@pytest.mark.parametrize("index", range(6))
def test_vectorized_kl_equals_reference_on_random_histograms(index):
    counts = random_histograms()[index]
    kept, divergences = kl_divergences(counts)
    reference = np.array(reference_kl_divergences(counts))
    assert kept[0] == 128 and kept[-1] == 2048
    np.testing.assert_array_equal(np.isinf(divergences), np.isinf(reference))
    finite = np.isfinite(reference)
    np.testing.assert_allclose(divergences[finite], reference[finite], rtol=1e-9, atol=1e-12)
    chosen = reference_kl_threshold_bin(counts)
    assert kl_threshold(counts, 0.25) == chosen * 0.25
    assert reference_kl_bin(counts) == kept[select_candidate(divergences)]


@pytest.fixture(scope="module")
def res10_statistics(shared) -> CalibrationStatistics:
    stats = CalibrationStatistics(model={"caffemodel_sha256": "res10"}, preprocess={})
    for outputs in res10_activations(shared, images=2):
        stats.update(outputs)
    return stats


def test_vectorized_kl_equals_reference_on_real_res10_histograms(res10_statistics):
    histograms = list(res10_statistics.histograms.values())
    assert len(histograms) > 60
    searched = 0
    for hist in histograms[::3]:
        threshold = kl_threshold(hist.counts, hist.bin_width)
        chosen = reference_kl_threshold_bin(hist.counts)
        assert threshold == pytest.approx(chosen * hist.bin_width, rel=1e-12), hist.name
        searched += np.count_nonzero(hist.counts) >= 128
    assert searched >= 20  # the search itself ran, not the few-bins rule


def test_every_method_on_real_histograms_is_finite_positive_bounded_and_deterministic(res10_statistics):
    signed = 0
    for hist in res10_statistics.histograms.values():
        signed += hist.signed
        for method in METHODS:
            threshold = activation_threshold(hist, method)
            assert np.isfinite(threshold) and 0 < threshold <= hist.absmax, (hist.name, method)
            assert activation_threshold(hist, method) == threshold
    assert signed >= 20  # detection heads and BN/Scale outputs are signed


def relu_like(zero_fraction: float, zero_value: float = 0.0, seed: int = 11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.abs(rng.standard_normal(200_000)).astype(np.float32)
    data[0] = 6.0  # same absmax, so the same histogram range
    if zero_fraction:
        spike = np.full(int(len(data) * zero_fraction / (1 - zero_fraction)), zero_value, np.float32)
        data = np.concatenate([data, spike])
    return rng.permutation(data)


def histogram_of(data: np.ndarray, name: str = "v") -> BlobHistogram:
    hist = BlobHistogram(name)
    for chunk in np.array_split(data, 3):
        hist.update(chunk)
    return hist


def test_relu_zero_spike_does_not_move_any_threshold():
    plain, spiked = histogram_of(relu_like(0.0)), histogram_of(relu_like(0.6))
    assert spiked.zeros / spiked.count == pytest.approx(0.6, abs=1e-3)
    for method in METHODS:
        assert activation_threshold(spiked, method) == activation_threshold(plain, method), method
    kl = activation_threshold(plain, "kl")
    assert 2.0 < kl < 6.0  # a real clipping decision, not absmax


def test_near_zero_spike_does_not_move_kl():
    plain, spiked = histogram_of(relu_like(0.0)), histogram_of(relu_like(0.6, zero_value=1e-4))
    assert spiked.zeros == 0 and spiked.counts[0] > 100 * spiked.counts[1]
    assert activation_threshold(spiked, "kl") == activation_threshold(plain, "kl")


@pytest.mark.parametrize("negative_only", [False, True])
def test_signed_values_get_a_valid_threshold(negative_only):
    data = np.random.default_rng(3).laplace(0.0, 1.0, 100_000).astype(np.float32)
    hist = histogram_of(-np.abs(data) if negative_only else data)
    assert hist.signed and hist.nonzero == data.size
    for method in METHODS:
        threshold = activation_threshold(hist, method)
        assert np.isfinite(threshold) and 0 < threshold <= hist.absmax, method


def test_all_zero_value_gets_none_and_a_warning(caplog):
    hist = BlobHistogram("dead_relu")
    hist.update(np.zeros((2, 3, 4, 4), np.float32))
    with caplog.at_level(logging.WARNING, logger="int8conv.calibration.thresholds"):
        for method in METHODS:
            assert activation_threshold(hist, method) is None
    assert "dead_relu" in caplog.text


def test_few_nonempty_bins_keep_absmax():
    hist = histogram_of(np.repeat(np.float32([0.5, 1.0, 3.0, -2.5]), 1000))
    assert activation_threshold(hist, "kl") == hist.absmax == 3.0


def test_kl_keeps_a_uniform_range_and_clips_a_lone_outlier():
    counts = np.zeros(2048, np.int64)
    counts[:1000] = 500
    assert kl_threshold(counts, 1.0) == 1000.0  # Q == P exactly at 1000 bins: KL 0
    decaying = np.round(1e5 * np.exp(-np.arange(2048) / 100.0)).astype(np.int64)
    without = kl_threshold(decaying, 1.0)
    decaying[1990] = 1
    assert kl_threshold(decaying, 1.0) == without < 1990.0


def test_minmax_percentile_and_aciq_definitions():
    rng = np.random.default_rng(5)
    data = rng.laplace(0.0, 0.5, 400_000).astype(np.float32)
    data[:1000] = 0.0
    hist = histogram_of(data)
    magnitude = np.abs(data[data != 0]).astype(np.float64)
    assert activation_threshold(hist, "minmax") == hist.absmax
    assert activation_threshold(hist, "percentile", percentile=100.0) == hist.absmax
    for q in (99.0, 99.9, 99.99):
        assert activation_threshold(hist, "percentile", percentile=q) == pytest.approx(
            np.percentile(magnitude, q, method="inverted_cdf"), abs=hist.bin_width
        )
    assert activation_threshold(hist, "aciq") == pytest.approx(ACIQ_LAPLACE_8BIT * magnitude.mean(), rel=1e-9)
    assert activation_threshold(hist, "aciq") == pytest.approx(ACIQ_LAPLACE_8BIT * 0.5, rel=0.02)


def test_mse_equals_brute_force_search():
    rng = np.random.default_rng(9)
    hist = histogram_of(rng.laplace(0.0, 1.0, 300_000).astype(np.float32))
    counts, width = hist.counts.astype(np.float64), hist.bin_width
    centers = (np.arange(2048) + 0.5) * width
    errors = []
    for k in range(1, 2049):
        t = k * width
        clipped = centers > t
        errors.append(
            (t / 127) ** 2 / 12 * counts[~clipped].sum() + (counts[clipped] * (centers[clipped] - t) ** 2).sum()
        )
    expected = (int(np.argmin(errors)) + 1) * width
    assert mse_threshold(hist) == pytest.approx(expected, rel=1e-12)
    assert activation_threshold(hist, "mse") == min(expected, hist.absmax)


def test_unknown_method_and_bad_percentile_are_clear_errors():
    hist = histogram_of(np.linspace(-1, 1, 1000, dtype=np.float32))
    with pytest.raises(Int8ConvError, match="unknown threshold method 'entropy'.*kl, minmax"):
        activation_threshold(hist, "entropy")
    for bad in (0.0, -1.0, 100.5):
        with pytest.raises(Int8ConvError, match="--percentile must be in"):
            activation_threshold(hist, "percentile", percentile=bad)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_nan_or_inf_weight_is_named_not_turned_into_dead_channels(bad):
    """Per-channel scales are 127 / max|w| of each output (numpy from the definition); an Inf weight made the
    layer's max Inf, so every other channel fell under the dead-channel ratio and got scale 0 silently."""
    from int8conv.caffe.graph import Layer
    from int8conv.caffe.proto import caffe_pb2
    from int8conv.calibration.weight_scales import layer_weight_scales

    param = caffe_pb2.LayerParameter(name="fc7", type="InnerProduct")
    param.inner_product_param.num_output = 3
    weight = np.array([[0.5, -2.0], [0.25, 0.0], [-1.0, 4.0]], np.float32)
    layer = Layer("fc7", "InnerProduct", ["x"], ["y"], param, [weight])
    np.testing.assert_array_equal(layer_weight_scales(layer), np.float32(127.0 / np.array([2.0, 0.25, 4.0])))
    weight[1, 1] = bad
    with pytest.raises(ModelError, match="'fc7'.*1 weights are NaN or Inf"):
        layer_weight_scales(layer)
