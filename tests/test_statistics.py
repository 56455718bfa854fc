"""Streaming histograms: exact binning, exact growth and merge, persistence and its errors."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from int8conv.calibration.histograms import BlobHistogram, CalibrationStatistics
from int8conv.errors import Int8ConvError

MODEL = {
    "prototxt": "net.prototxt",
    "prototxt_sha256": "aa" * 32,
    "caffemodel": "net.caffemodel",
    "caffemodel_sha256": "bb" * 32,
}
PREPROCESS = {"size": (8, 8), "mean": (104.0, 117.0, 123.0), "norm": 1.0}


def batches(seed: int, count: int) -> list[np.ndarray]:
    """Signed, ReLU-like batches whose scale grows, so the histogram range must grow several times."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(count):
        data = rng.laplace(0.0, 0.3 * 3.0**k, size=(2, 4, 9, 7)).astype(np.float32)
        data[rng.random(data.shape) < 0.4] = 0.0
        out.append(data)
    return out


def numpy_histogram(values: list[np.ndarray], range_max: float, bins: int = 2048) -> np.ndarray:
    """Independent reference: one np.histogram over every non-zero |x| at the final range."""
    magnitude = np.abs(np.concatenate([v.ravel() for v in values]))
    return np.histogram(magnitude[magnitude != 0], bins=bins, range=(0.0, range_max))[0]


def assert_same(a: BlobHistogram, b: BlobHistogram) -> None:
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.exponent, a.count, a.zeros, a.min, a.max) == (b.exponent, b.count, b.zeros, b.min, b.max)
    assert a.abs_sum == pytest.approx(b.abs_sum, rel=1e-12)


@pytest.mark.parametrize("chunk", [100, 1 << 16])
def test_growing_histogram_equals_one_histogram_at_the_final_range(monkeypatch, chunk):
    monkeypatch.setattr("int8conv.calibration.histograms.CHUNK", chunk)  # 100: many chunks per batch
    data = batches(0, 4)
    hist = BlobHistogram("conv1")
    for batch in data:
        hist.update(batch)
    everything = np.concatenate([d.ravel() for d in data])
    assert hist.absmax == float(np.abs(everything).max())
    assert hist.range_max / 2 < hist.absmax <= hist.range_max  # smallest power of two covering absmax
    assert hist.range_max == 2.0**hist.exponent
    assert (hist.count, hist.zeros) == (everything.size, int((everything == 0).sum()))
    assert hist.signed and (hist.min, hist.max) == (float(everything.min()), float(everything.max()))
    np.testing.assert_array_equal(hist.counts, numpy_histogram(data, hist.range_max))
    assert hist.abs_sum == pytest.approx(float(np.abs(everything.astype(np.float64)).sum()), rel=1e-9)


@pytest.mark.parametrize("chunk", [20, 1 << 16])
def test_a_channel_padded_view_is_binned_like_its_copy(monkeypatch, chunk):
    """An ncnn Mat's channels start at an aligned stride (9x7 = 63 values in 64): the strided view, binned in blocks
    of its channels without a copy, gives the statistics of the contiguous array and of one np.histogram."""
    monkeypatch.setattr("int8conv.calibration.histograms.CHUNK", chunk)  # 20: a block is one channel
    data = batches(2, 3)
    views = []
    for batch in data:
        padded = np.full((batch.shape[0], batch.shape[1], 64), np.nan, np.float32)  # padding that must not count
        padded[:, :, :63] = batch.reshape(batch.shape[0], batch.shape[1], 63)
        views.append(padded[:, :, :63].reshape(batch.shape[0], batch.shape[1], 9, 7)[:1])
    assert not views[0].flags.c_contiguous
    strided, copied = BlobHistogram("v"), BlobHistogram("v")
    for view in views:
        strided.update(view)
        copied.update(np.ascontiguousarray(view))
    assert_same(strided, copied)
    np.testing.assert_array_equal(strided.counts, numpy_histogram(views, strided.range_max))


@pytest.mark.parametrize("scale", [1e-39, 1e-20, 1e30])
def test_extreme_magnitudes_are_binned_exactly(scale):
    data = [(np.random.default_rng(8).standard_normal(5000) * scale).astype(np.float32)]
    hist = BlobHistogram("x")
    hist.update(data[0])
    assert hist.range_max / 2 < hist.absmax <= hist.range_max
    np.testing.assert_array_equal(hist.counts, numpy_histogram(data, hist.range_max))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_value_at_range_max_lands_in_last_bin_and_zeros_are_counted_apart(dtype):
    """-0.0 is a zero; the smallest denormal is not (zeros are counted on the bit patterns of |x|)."""
    hist = BlobHistogram("x", bins=128)
    tiny = np.finfo(dtype).smallest_subnormal
    hist.update(np.array([0.0, -0.0, 0.0, 4.0, 1.0, 2.0**-20, -tiny], dtype=dtype))
    assert hist.range_max == 4.0 and hist.zeros == 3 and hist.counts.sum() == 4
    assert hist.counts[127] == 1 and hist.counts[32] == 1 and hist.counts[0] == 2
    assert hist.signed


def test_merge_equals_single_pass_and_memory_is_fixed():
    data = batches(1, 5)
    single = BlobHistogram("v")
    for batch in data:
        single.update(batch)
    # split so that each part starts at a different range and the parts' ranges differ by 2**k
    part_a, part_b = BlobHistogram("v"), BlobHistogram("v")
    for batch in (data[0], data[3]):
        part_a.update(batch)
    for batch in (data[4], data[1], data[2]):
        part_b.update(batch)
    assert part_a.exponent != part_b.exponent
    part_a.merge(part_b)
    assert_same(part_a, single)
    assert single.counts.shape == (2048,) and single.counts.dtype == np.int64


def test_merge_narrow_into_wide_and_with_an_all_zero_part():
    small, large = batches(2, 3)[0], batches(2, 3)[2]
    wide = BlobHistogram("v")
    wide.update(large)
    narrow = BlobHistogram("v")
    narrow.update(small)
    narrow.update(np.zeros((3, 3), np.float32))
    wide.merge(narrow)
    single = BlobHistogram("v")
    for batch in (large, small, np.zeros((3, 3), np.float32)):
        single.update(batch)
    assert_same(wide, single)
    empty = BlobHistogram("v")
    empty.update(np.zeros(10, np.float32))
    assert empty.exponent is None and empty.absmax == 0.0 and empty.nonzero == 0
    empty.merge(single)
    np.testing.assert_array_equal(empty.counts, single.counts)
    assert empty.zeros == single.zeros + 10


@pytest.mark.parametrize("bins", [4, 128, 2048])
def test_values_at_an_exact_power_of_two_keep_their_bin_when_the_range_grows(tmp_path, bins):
    """A sigmoid's 1.0 or a clip's 4.0 is |x| == range_max, in the last bin; once a later image (or a merged run)
    widens the range 2**k times it lies on the lower edge of bin bins / 2**k, as one np.histogram puts it."""
    rng = np.random.default_rng(9)
    data = [np.array([1.0, -1.0, 0.3], np.float32), np.array([4.0, 2.5], np.float32)]
    data += [rng.uniform(-64.0, 64.0, 50).astype(np.float32), np.array([3e4, -(2.0**20)], np.float32)]
    streamed = BlobHistogram("v", bins)
    for seen, batch in enumerate(data, 1):
        streamed.update(batch)
        np.testing.assert_array_equal(streamed.counts, numpy_histogram(data[:seen], streamed.range_max, bins))
    stats = [CalibrationStatistics(MODEL, PREPROCESS, bins=bins) for _ in data]
    for part, batch in zip(stats, data, strict=True):
        part.update({"v": batch})
        part.save(tmp_path / "part.npz")
        part.histograms = CalibrationStatistics.load(tmp_path / "part.npz").histograms
    for first, second in ((0, 1), (1, 0)):
        merged = CalibrationStatistics(MODEL, PREPROCESS, bins=bins)
        merged.update({"v": np.zeros(1, np.float32)})
        for part in (stats[first], stats[second]):
            merged.histograms["v"].merge(part.histograms["v"])
        merged.histograms["v"].merge(stats[3].histograms["v"])
        np.testing.assert_array_equal(
            merged.histograms["v"].counts, numpy_histogram([data[0], data[1], data[3]], 2.0**20, bins)
        )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_a_clear_error_naming_the_value(bad):
    hist = BlobHistogram("layer_64_1_sum")
    with pytest.raises(Int8ConvError, match="layer_64_1_sum.*NaN or Inf"):
        hist.update(np.array([1.0, bad], dtype=np.float32))
    assert hist.count == 0


def test_bins_must_be_a_power_of_two():
    with pytest.raises(Int8ConvError, match="power of two"):
        BlobHistogram("x", bins=2000)


def collect(data: list[np.ndarray], images: int) -> CalibrationStatistics:
    stats = CalibrationStatistics(model=MODEL, preprocess=PREPROCESS)
    for batch in data:
        stats.update({"data": batch, "conv1/relu": np.maximum(batch, 0), "dead": np.zeros_like(batch)})
    stats.images_used = images
    return stats


def test_save_load_round_trip_is_exact_and_atomic(tmp_path):
    stats = collect(batches(3, 3), images=6)
    stats.images_skipped = 1
    path = tmp_path / "run.stats.npz"
    stats.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    with np.load(path, allow_pickle=False) as npz:  # loadable without pickle
        assert json.loads(str(npz["meta"]))["values"] == ["data", "conv1/relu", "dead"]
    loaded = CalibrationStatistics.load(path)
    assert (loaded.model, loaded.bins, loaded.images_used, loaded.images_skipped) == (MODEL, 2048, 6, 1)
    assert loaded.preprocess == stats.preprocess == json.loads(json.dumps(PREPROCESS))
    for name, hist in stats.histograms.items():
        assert_same(loaded.histograms[name], hist)
        assert loaded.histograms[name].abs_sum == hist.abs_sum
    assert loaded.histograms["dead"].exponent is None


def test_load_and_merge_equals_one_run_over_both_image_sets(tmp_path):
    data = batches(4, 4)
    collect(data[:2], images=4).save(tmp_path / "a.npz")
    collect(data[2:], images=4).save(tmp_path / "b.npz")
    merged = CalibrationStatistics.load_and_merge([tmp_path / "a.npz", tmp_path / "b.npz"])
    single = collect(data, images=8)
    assert merged.images_used == 8
    for name, hist in single.histograms.items():
        assert_same(merged.histograms[name], hist)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.model.update(caffemodel_sha256="cc" * 32), "different models.*caffemodel_sha256"),
        (lambda s: s.preprocess.update(norm=0.5), "different preprocessing"),
        (lambda s: s.histograms.pop("dead"), "different values.*dead"),
    ],
)
def test_merge_refuses_other_models_and_names_both_files(tmp_path, change, message):
    data = batches(5, 2)
    collect(data, images=2).save(tmp_path / "a.npz")
    other = collect(data, images=2)
    change(other)
    other.save(tmp_path / "b.npz")
    with pytest.raises(Int8ConvError, match=message) as error:
        CalibrationStatistics.load_and_merge([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert "a.npz" in str(error.value) and "b.npz" in str(error.value)


def test_merge_ignores_file_names_but_not_bins(tmp_path):
    renamed = dict(MODEL, caffemodel="copy.caffemodel")
    a = CalibrationStatistics(model=MODEL, preprocess=PREPROCESS)
    a.merge(CalibrationStatistics(model=renamed, preprocess=PREPROCESS))
    with pytest.raises(Int8ConvError, match="2048 vs 1024 bins"):
        a.merge(CalibrationStatistics(model=MODEL, preprocess=PREPROCESS, bins=1024))


def _rewrite(path, **replace):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(replace)
    np.savez(path, **arrays)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(Int8ConvError, match="nowhere.npz does not exist"):
        CalibrationStatistics.load(tmp_path / "nowhere.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(Int8ConvError, match="garbage.npz is not a readable"):
        CalibrationStatistics.load(garbage)
    table = tmp_path / "model.table"  # a table given to --load-stats: numpy took the text for a pickle
    table.write_text("conv1_param_0 296.96 292.45\nconv1 127.5\n")
    with pytest.raises(Int8ConvError, match="model.table is not a readable .*not an .npz archive") as error:
        CalibrationStatistics.load(table)
    assert "pickle" not in str(error.value)

    good = tmp_path / "good.npz"
    collect(batches(6, 2), images=2).save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(Int8ConvError, match="truncated.npz"):
        CalibrationStatistics.load(truncated)

    other = tmp_path / "other.npz"
    np.savez(other, weights=np.ones(3))
    with pytest.raises(Int8ConvError, match="other.npz is not a readable"):
        CalibrationStatistics.load(other)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array([{"format": "int8conv-statistics"}], dtype=object))
    with pytest.raises(Int8ConvError, match="pickled.npz"):
        CalibrationStatistics.load(pickled)

    tampered = tmp_path / "tampered.npz"
    tampered.write_bytes(good.read_bytes())
    with np.load(tampered, allow_pickle=False) as npz:
        counts = npz["counts"].copy()
    counts[0, 5] += 1
    _rewrite(tampered, counts=counts)
    with pytest.raises(Int8ConvError, match="tampered.npz is damaged.*do not add up"):
        CalibrationStatistics.load(tampered)

    newer = tmp_path / "newer.npz"
    newer.write_bytes(good.read_bytes())
    with np.load(newer, allow_pickle=False) as npz:
        meta = json.loads(str(npz["meta"]))
    _rewrite(newer, meta=np.array(json.dumps(dict(meta, version=99))))
    with pytest.raises(Int8ConvError, match="newer.npz: statistics format version 99"):
        CalibrationStatistics.load(newer)
    assert zipfile.is_zipfile(good)


def test_load_and_merge_needs_a_file():
    with pytest.raises(Int8ConvError, match="no statistics file"):
        CalibrationStatistics.load_and_merge([])


def test_count_at_range_max_is_checked_and_optional_in_older_files(tmp_path):
    path = tmp_path / "run.npz"
    stats = CalibrationStatistics(model=MODEL, preprocess=PREPROCESS)
    stats.update({"v": np.array([2.0, 2.0, -1.5], np.float32)})
    stats.save(path)
    assert CalibrationStatistics.load(path).histograms["v"].at_range_max == 2
    _rewrite(path, at_range_max=np.array([3], np.int64))  # more than the last bin holds
    with pytest.raises(Int8ConvError, match="run.npz is damaged.*3 values at the range max"):
        CalibrationStatistics.load(path)
    with np.load(path, allow_pickle=False) as npz:
        older = {k: npz[k] for k in npz.files if k != "at_range_max"}
    np.savez(path, **older)
    assert CalibrationStatistics.load(path).histograms["v"].at_range_max == 0
