"""Streaming activation statistics: per-value |x| histograms that grow, merge and persist exactly.

The histogram range is always a power of two, ``2**exponent``, and the bin count is a power of two.
Two consequences make calibration reproducible and parallelisable:

* binning is exact: ``|x| / range * bins`` is a multiplication by a power of two, so no rounding
  decides which bin a value lands in;
* growing the range (a later image brings a larger |x|) or merging statistics of two image sets only
  ever widens by ``2**k``; old bins then merge ``2**k`` to one with no interpolation, and the result is
  bit-for-bit the histogram a single pass over all images would have built.

Exact zeros are counted apart from the histogram (``zeros``). After a ReLU they are often most of the
tensor; int8 represents 0 exactly for every threshold, so they carry no information about where to clip,
and a spike in bin 0 would dominate the KL search. Every threshold method sees the non-zero |x| only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from int8conv.atomic import write_bytes_atomic
from int8conv.errors import Int8ConvError

log = logging.getLogger(__name__)

DEFAULT_BINS = 2048
CHUNK = 1 << 16  # elements binned at a time (fits in L2 with its index buffer)
FORMAT = "int8conv-statistics"
VERSION = 1


def _check_bins(bins: int) -> int:
    if bins < 1 or bins & (bins - 1):
        raise Int8ConvError(f"the histogram bin count must be a power of two, not {bins}")
    return int(bins)


def _range_exponent(absmax: float) -> int:
    """The smallest e with 2**e >= absmax (absmax > 0)."""
    mantissa, exponent = np.frexp(absmax)
    return int(exponent) - 1 if mantissa == 0.5 else int(exponent)


def _rebin(counts: np.ndarray, shift: int, at_range_max: int) -> np.ndarray:
    """Counts over ``[0, R]`` -> counts over ``[0, R * 2**shift]``: groups of ``2**shift`` bins become one.

    The ``at_range_max`` values of the last bin that equal R exactly sit on the lower edge of bin
    ``bins / 2**shift`` of the wider range, one bin above their group: they move there."""
    if shift == 0:
        return counts
    bins = counts.size
    group = bins if shift >= bins.bit_length() else min(1 << shift, bins)
    merged = np.zeros_like(counts)
    sums = np.add.reduceat(counts, np.arange(0, bins, group))
    merged[: sums.size] = sums
    merged[sums.size - 1] -= at_range_max
    merged[bins >> shift] += at_range_max
    return merged


def _pieces(data: np.ndarray) -> list[np.ndarray]:
    """Views of about CHUNK elements that cover ``data``. A C-contiguous array is cut flat; another (an ncnn Mat,
    whose channels are padded to an aligned stride) into blocks of its rows (an image's last two axes), without the
    copy that flattening it would make."""
    if data.flags.c_contiguous or data.ndim < 2:
        flat = data.reshape(-1)
        return [flat[start : start + CHUNK] for start in range(0, flat.size, CHUNK)]
    rows = data.reshape(-1, data.shape[-2] * data.shape[-1])
    step = max(1, CHUNK // rows.shape[1])
    return [rows[start : start + step] for start in range(0, rows.shape[0], step)]


class BlobHistogram:
    """Statistics of one value over all calibration images: exact extremes and a non-zero |x| histogram.

    ``counts[j]`` holds the non-zero |x| in ``[j, j+1) * bin_width`` (|x| == range_max in the last bin).
    Memory is ``bins`` integers whatever the number of images.
    """

    def __init__(self, name: str, bins: int = DEFAULT_BINS) -> None:
        self.name = name
        self.bins = _check_bins(bins)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.exponent: int | None = None  # range_max = 2**exponent; None until a non-zero value arrives
        self.count = 0  # elements seen, zeros included
        self.zeros = 0  # exact zeros seen
        self.min = float("inf")
        self.max = float("-inf")
        self.abs_sum = 0.0  # sum of |x|, for ACIQ's Laplace fit
        self.at_range_max = 0  # |x| == range_max exactly (in the last bin): where they go when the range grows

    @property
    def absmax(self) -> float:
        """max |x| over everything seen (0.0 before any value)."""
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    @property
    def signed(self) -> bool:
        """True when the value took a negative value (input data, linear bottlenecks, detection heads)."""
        return self.count > 0 and self.min < 0

    @property
    def nonzero(self) -> int:
        return self.count - self.zeros

    @property
    def range_max(self) -> float:
        return 0.0 if self.exponent is None else float(np.ldexp(1.0, self.exponent))

    @property
    def bin_width(self) -> float:
        return self.range_max / self.bins

    def _grow(self, exponent: int) -> None:
        if self.exponent is None:
            self.exponent = exponent
        elif exponent > self.exponent:
            self.counts = _rebin(self.counts, exponent - self.exponent, self.at_range_max)
            self.exponent, self.at_range_max = exponent, 0

    def update(self, values: np.ndarray) -> None:
        """Add every element of ``values`` (any shape); a NaN or Inf is a clear error naming the value."""
        data = np.asarray(values)
        if data.size == 0:
            return
        if not np.issubdtype(data.dtype, np.floating):
            data = data.astype(np.float32)
        low, high = float(data.min()), float(data.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise Int8ConvError(
                f"value '{self.name}': the FP32 forward produced NaN or Inf; check the "
                f"model and the preprocessing (mean/norm) before calibrating"
            )
        self.count += int(data.size)
        self.min, self.max = min(self.min, low), max(self.max, high)
        if low == high == 0:
            self.zeros += int(data.size)
            return
        self._grow(_range_exponent(max(-low, high)))
        self._count_magnitudes(data)

    def _count_magnitudes(self, data: np.ndarray) -> None:
        """Bin |x| and count the zeros piece by piece into reused buffers: fresh multi-MB temporaries per blob cost
        more in page faults than the arithmetic, and the pieces bound the extra memory to about CHUNK elements."""
        shift = self.bins.bit_length() - 1 - self.exponent
        dtype = data.dtype if data.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        # |x| * 2**shift is exact (a power of two), so truncation picks the true bin
        exact_scale = np.finfo(dtype).minexp <= shift <= np.finfo(dtype).maxexp - 1
        pieces = _pieces(data)
        magnitude = np.empty(max(piece.size for piece in pieces), dtype)
        # |x| has no -0.0, so its zeros are exactly the all-zero bit patterns: counted as integers, 6x faster
        bits = magnitude.view(np.dtype(f"i{magnitude.itemsize}"))
        index = np.empty(magnitude.size, np.intp)
        found = np.zeros(self.bins + 1, np.int64)
        zeros = 0
        for piece in pieces:
            mag, idx = magnitude[: piece.size], index[: piece.size]
            np.abs(piece, out=mag.reshape(piece.shape))
            zeros += piece.size - int(np.count_nonzero(bits[: piece.size]))
            self.abs_sum += float(mag.sum(dtype=np.float64))
            if exact_scale:
                np.multiply(mag, dtype.type(2.0**shift), out=idx, casting="unsafe")
            else:
                np.ldexp(mag, shift, out=mag)
                np.copyto(idx, mag, casting="unsafe")
            found += np.bincount(idx, minlength=self.bins + 1)
        self.at_range_max += int(found[self.bins])
        found[self.bins - 1] += found[self.bins]  # |x| == range_max belongs to the last bin
        found[0] -= zeros
        self.zeros += zeros
        self.counts += found[: self.bins]

    def merge(self, other: BlobHistogram) -> None:
        """Add the statistics of the same value computed on other images (exact; see the module doc)."""
        if other.bins != self.bins:
            raise Int8ConvError(f"value '{self.name}': cannot merge histograms of {self.bins} and {other.bins} bins")
        if other.exponent is not None:
            self._grow(other.exponent)
            self.counts = self.counts + _rebin(other.counts, self.exponent - other.exponent, other.at_range_max)
            if self.exponent == other.exponent:
                self.at_range_max += other.at_range_max
        self.count += other.count
        self.zeros += other.zeros
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.abs_sum += other.abs_sum

    def __repr__(self) -> str:
        return (
            f"BlobHistogram({self.name!r}, count={self.count}, zeros={self.zeros}, absmax={self.absmax:g}, "
            f"range_max={self.range_max:g}, signed={self.signed})"
        )


def _identity_conflict(a: Mapping[str, str], b: Mapping[str, str]) -> str | None:
    """The first content hash that differs; file names alone never block a merge."""
    keys = sorted(k for k in set(a) | set(b) if k.endswith("sha256")) or sorted(set(a) | set(b))
    for key in keys:
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key, '(missing)')} vs {b.get(key, '(missing)')}"
    return None


class CalibrationStatistics:
    """``{value: BlobHistogram}`` for one model and one preprocessing, plus image counts.

    ``model`` identifies the model by content (``*_sha256`` entries; file names are informational),
    ``preprocess`` is a JSON-able description. Both must match to merge statistics of two runs.
    """

    def __init__(
        self, model: Mapping[str, str], preprocess: Mapping, bins: int = DEFAULT_BINS, source: str | None = None
    ) -> None:
        self.model = {str(k): str(v) for k, v in model.items()}
        # JSON round trip so a fresh description (tuples) compares equal to a loaded one (lists).
        self.preprocess = json.loads(json.dumps(dict(preprocess)))
        self.bins = _check_bins(bins)
        self.histograms: dict[str, BlobHistogram] = {}
        self.images_used = 0
        self.images_skipped = 0
        #: the images this run could not read (not saved): later steps leave them out of their subsets
        self.unreadable: list[Path] = []
        self.source = source or "(statistics in memory)"

    def update(self, batch_outputs: Mapping[str, np.ndarray]) -> None:
        """Add one batch of FP32 values; the caller counts images (``images_used``/``images_skipped``)."""
        for name, values in batch_outputs.items():
            histogram = self.histograms.get(name)
            if histogram is None:
                histogram = self.histograms[name] = BlobHistogram(name, self.bins)
            histogram.update(values)

    def merge(self, other: CalibrationStatistics) -> None:
        """Add statistics of the same model, preprocessing and values computed on other images."""
        where = f"cannot merge {self.source} and {other.source}"
        conflict = _identity_conflict(self.model, other.model)
        if conflict:
            raise Int8ConvError(f"{where}: they were collected for different models ({conflict})")
        if self.bins != other.bins:
            raise Int8ConvError(f"{where}: histograms of {self.bins} vs {other.bins} bins")
        if self.preprocess != other.preprocess:
            raise Int8ConvError(f"{where}: different preprocessing ({self.preprocess} vs {other.preprocess})")
        if set(self.histograms) != set(other.histograms):
            only = sorted(set(self.histograms) ^ set(other.histograms))
            raise Int8ConvError(f"{where}: they hold different values (e.g. {', '.join(only[:5])})")
        for name, histogram in self.histograms.items():
            histogram.merge(other.histograms[name])
        self.images_used += other.images_used
        self.images_skipped += other.images_skipped
        self.unreadable += other.unreadable

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` (no pickled objects) atomically."""
        names = list(self.histograms)
        hists = [self.histograms[n] for n in names]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "bins": self.bins,
            "model": self.model,
            "preprocess": self.preprocess,
            "images_used": self.images_used,
            "images_skipped": self.images_skipped,
            "values": names,
        }
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "counts": np.array([h.counts for h in hists], dtype=np.int64).reshape(len(hists), self.bins),
            # a value with no non-zero element has no range: stored as exponent 0 with has_range False
            "has_range": np.array([h.exponent is not None for h in hists], dtype=bool),
            "exponent": np.array([h.exponent or 0 for h in hists], dtype=np.int64),
            "count": np.array([h.count for h in hists], dtype=np.int64),
            "zeros": np.array([h.zeros for h in hists], dtype=np.int64),
            "min": np.array([h.min for h in hists], dtype=np.float64),
            "max": np.array([h.max for h in hists], dtype=np.float64),
            "abs_sum": np.array([h.abs_sum for h in hists], dtype=np.float64),
            "at_range_max": np.array([h.at_range_max for h in hists], dtype=np.int64),
        }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_bytes_atomic(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationStatistics:
        """Read a file written by :meth:`save`; a missing or damaged file is a clear error naming it."""
        path = Path(path)
        if not path.is_file():
            raise Int8ConvError(f"statistics file {path} does not exist")
        if not zipfile.is_zipfile(path):  # else numpy takes it for a pickle and suggests loading it unsafely
            raise Int8ConvError(f"{path} is not a readable int8conv statistics file (not an .npz archive)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
            meta = json.loads(str(arrays["meta"]))
        except (
            OSError,
            ValueError,
            KeyError,
            EOFError,
            zipfile.BadZipFile,
            struct.error,
            zlib.error,
            NotImplementedError,
            RuntimeError,
        ) as exc:  # zipfile's answers to damaged headers and flags
            raise Int8ConvError(f"{path} is not a readable int8conv statistics file ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise Int8ConvError(f"{path} is not an int8conv statistics file")
        if meta.get("version") != VERSION:
            raise Int8ConvError(
                f"{path}: statistics format version {meta.get('version')} is not supported "
                f"(this int8conv reads version {VERSION})"
            )
        try:
            return cls._from_arrays(meta, arrays, str(path))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, Int8ConvError) as exc:
            raise Int8ConvError(f"{path} is damaged: {exc}") from exc

    @classmethod
    def _from_arrays(cls, meta: dict, arrays: dict[str, np.ndarray], source: str) -> CalibrationStatistics:
        stats = cls(meta["model"], meta["preprocess"], bins=int(meta["bins"]), source=source)
        stats.images_used, stats.images_skipped = int(meta["images_used"]), int(meta["images_skipped"])
        names = list(meta["values"])
        counts = arrays["counts"]
        # files written before at_range_max was kept: their values at range_max stay in the last bin on growth
        at_range_max = arrays.get("at_range_max", np.zeros(len(names), np.int64))
        if counts.shape != (len(names), stats.bins):
            raise ValueError(f"histogram array of shape {counts.shape}, expected {(len(names), stats.bins)}")
        for i, name in enumerate(names):
            h = BlobHistogram(name, stats.bins)
            h.counts = counts[i].astype(np.int64)
            h.exponent = int(arrays["exponent"][i]) if bool(arrays["has_range"][i]) else None
            h.count, h.zeros = int(arrays["count"][i]), int(arrays["zeros"][i])
            h.min, h.max, h.abs_sum = (float(arrays[k][i]) for k in ("min", "max", "abs_sum"))
            h.at_range_max = int(at_range_max[i])
            if (h.counts < 0).any() or int(h.counts.sum()) != h.count - h.zeros or h.zeros < 0:
                raise ValueError(f"value '{name}': histogram counts do not add up")
            if h.count and not all(np.isfinite([h.min, h.max, h.abs_sum])):
                raise ValueError(f"value '{name}': non-finite min/max")
            if (h.exponent is None) != (h.count == h.zeros):
                raise ValueError(f"value '{name}': range and non-zero count disagree")
            if not 0 <= h.at_range_max <= int(h.counts[-1]) or (h.at_range_max and h.absmax != h.range_max):
                raise ValueError(f"value '{name}': {h.at_range_max} values at the range max do not fit the histogram")
            if h.exponent is not None and not (
                max(-h.min, h.max) > 0 and h.exponent == _range_exponent(max(-h.min, h.max))
            ):
                raise ValueError(
                    f"value '{name}': histogram range 2**{h.exponent} does not fit its min/max "
                    f"({h.min:.6g}, {h.max:.6g})"
                )
            stats.histograms[name] = h
        return stats

    @classmethod
    def load_and_merge(cls, paths: Iterable[str | os.PathLike[str]]) -> CalibrationStatistics:
        """Merge statistics files of one model computed on different image sets (or machines)."""
        paths = list(paths)
        if not paths:
            raise Int8ConvError("no statistics file given to merge")
        merged = cls.load(paths[0])
        for path in paths[1:]:
            merged.merge(cls.load(path))
        if len(paths) > 1:
            merged.source = " + ".join(str(p) for p in paths)
        return merged
