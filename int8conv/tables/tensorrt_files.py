"""TensorRT range files: the INT8 calibration cache and the per-tensor dynamic ranges (text and JSON).

TensorRT <= 10 with implicit quantization needs a range for every tensor of the network it parses (the
network inputs and every layer output), not only the convolution inputs an ncnn table holds. A range is
the symmetric ``amax``: the cache stores ``scale = amax / 127`` as the big-endian IEEE-754 bits of a
float32; the sampleINT8API text file stores ``name:amax``, applied as ``set_dynamic_range(-amax, amax)``.

The ranges themselves are computed in :mod:`int8conv.tensorrt.ranges`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.atomic import write_text_atomic
from int8conv.errors import Int8ConvError, some_names

log = logging.getLogger(__name__)

#: TensorRT 10.13.3, written as TensorRT 10 writes versions (major*10000 + minor*100 + patch).
DEFAULT_TRT_VERSION = "10.13.3"
#: Calibrator names TensorRT writes in the cache header; the header must match the calibrator that reads it.
ALGORITHMS = ("EntropyCalibration2", "MinMaxCalibration", "EntropyCalibration", "LegacyCalibration")
#: Smallest amax written: a value that was zero on every image still needs a positive, finite scale.
MIN_AMAX = 1e-8
#: int8 levels on each side of zero (TensorRT's symmetric quantization).
LEVELS = 127.0

_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{8}$")


def cache_version(version: str) -> str:
    """TensorRT's cache version number: ``10.13.3`` -> ``101303``, ``8.6.1`` -> ``8601``, a bare major ``10`` ->
    ``100000``; a number TensorRT writes (4 digits or more: ``8601``, ``101303``) passes through.

    Every TensorRT writes at least 4 digits (major * 1000 or more), so ``10`` or ``8`` is a major version, not a
    header TensorRT would recognise.
    """
    text = str(version).strip()
    if text.isdigit() and len(text) >= 4:
        return text
    parts = text.split(".")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts) or len(parts[0]) > 2:
        raise Int8ConvError(f"TensorRT version '{version}' is not like 10.13.3, 8.6.1, 10 or 101303")
    major, minor, patch = (int(p) for p in parts + ["0"] * (3 - len(parts)))
    if minor > 99 or patch > 99:
        raise Int8ConvError(f"TensorRT version '{version}': minor and patch must be below 100")
    return str(major * (10000 if major >= 10 else 1000) + minor * 100 + patch)


def algorithm_for(method: str) -> str:
    """The calibrator a cache of ``method`` thresholds is read with: MinMax for minmax, else Entropy2.

    TensorRT has no percentile/ACIQ/MSE calibrator; those thresholds load through IInt8EntropyCalibrator2,
    whose ``read_calibration_cache`` hands TensorRT the file as is.
    """
    return "MinMaxCalibration" if method == "minmax" else "EntropyCalibration2"


def scale_to_hex(scale: float) -> str:
    """The 8 hex digits TensorRT writes for a float32 scale (big-endian IEEE-754 bits)."""
    return struct.pack(">f", scale).hex()


def hex_to_scale(text: str) -> float:
    """Inverse of :func:`scale_to_hex`."""
    return struct.unpack(">f", bytes.fromhex(text))[0]


#: TensorRT holds each amax as a float32 (``setDynamicRange(float, float)``; its text readers use ``std::stof``).
FLOAT32_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def check_amax(name: str, amax: float) -> float:
    """A range TensorRT can hold: finite, positive and within float32 (beyond it, TensorRT would read 0 or Inf)."""
    if not FLOAT32_RANGE[0] <= amax <= FLOAT32_RANGE[1]:  # NaN compares False, Inf is above the range
        raise Int8ConvError(
            f"tensor '{name}': range {amax} is not a finite positive float32 "
            f"({FLOAT32_RANGE[0]:g} to {FLOAT32_RANGE[1]:g}); NaN, Inf and 0 never reach a TensorRT file"
        )
    return float(amax)


def _check_name(name: str) -> str:
    """Both file formats are line based with ':' separators, so names must not break a line."""
    if not name or any(c in name for c in "\r\n") or name != name.strip():
        raise Int8ConvError(f"tensor name {name!r} cannot be written to a TensorRT range file")
    return name


# calibration cache -------------------------------------------------------------------------------------------
@dataclass
class CalibrationCache:
    """A parsed TensorRT calibration cache: header fields and ``{tensor: scale}``."""

    version: str
    algorithm: str
    scales: dict[str, float] = field(default_factory=dict)

    def ranges(self) -> dict[str, float]:
        """``{tensor: amax}``, amax = scale * 127."""
        return {name: scale * LEVELS for name, scale in self.scales.items()}


def format_calibration_cache(
    ranges: Mapping[str, float], version: str = DEFAULT_TRT_VERSION, algorithm: str = "EntropyCalibration2"
) -> str:
    """The cache text: ``TRT-<version>-<algorithm>`` then ``name: <hex of amax/127>`` per tensor."""
    if algorithm not in ALGORITHMS:
        raise Int8ConvError(f"unknown calibrator '{algorithm}'; choose one of {', '.join(ALGORITHMS)}")
    lines = [f"TRT-{cache_version(version)}-{algorithm}"]
    for name, amax in ranges.items():
        # a float32 amax (check_amax) over 127 is a positive float32 too (the smallest: a denormal, not 0)
        scale = struct.unpack(">f", struct.pack(">f", check_amax(name, amax) / LEVELS))[0]
        lines.append(f"{_check_name(name)}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_calibration_cache(
    path: str | Path,
    ranges: Mapping[str, float],
    version: str = DEFAULT_TRT_VERSION,
    algorithm: str = "EntropyCalibration2",
) -> None:
    write_text_atomic(path, format_calibration_cache(ranges, version, algorithm))


def read_calibration_cache(path: str | Path) -> CalibrationCache:
    """Parse a cache written by TensorRT or by this module; a bad line names the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Int8ConvError(f"{path}: cannot read calibration cache: {exc}") from exc
    if not lines or not _HEADER.match(lines[0].strip()):
        raise Int8ConvError(f"{path}:1: not a TensorRT calibration cache header (TRT-<version>-<calibrator>)")
    version, algorithm = _HEADER.match(lines[0].strip()).groups()
    cache = CalibrationCache(version, algorithm)
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(": ")
        if not sep or not _HEX.match(value.strip()):
            raise Int8ConvError(f"{path}:{number}: expected 'tensor: <8 hex digits>', got '{line.strip()}'")
        scale = hex_to_scale(value.strip())
        if not (math.isfinite(scale) and scale > 0):
            raise Int8ConvError(f"{path}:{number}: tensor '{name}' has scale {scale}, not finite and positive")
        cache.scales[name] = scale
    return cache


# dynamic ranges ----------------------------------------------------------------------------------------------
def format_dynamic_ranges(ranges: Mapping[str, float]) -> str:
    """sampleINT8API's file: ``name:amax`` per line (repr floats, so the value reads back exactly)."""
    return "".join(f"{_check_name(name)}:{check_amax(name, amax)!r}\n" for name, amax in ranges.items())


def write_dynamic_ranges(path: str | Path, ranges: Mapping[str, float]) -> None:
    """Write the file; warn about the names sampleINT8API misreads (it splits each line at the first ':')."""
    colons = [name for name in ranges if ":" in name]
    if colons:
        log.warning(
            "%s: %d tensor name(s) contain ':' (%s): TensorRT's sampleINT8API splits each line at the first ':', "
            "so it cannot read their lines: it takes the text before that ':' as the tensor name, these tensors get no "
            "range there (and the rest of the line can abort it); the .ranges.json and the Q/DQ ONNX hold them "
            "unchanged (or rename the blobs in the prototxt)",
            path,
            len(colons),
            some_names(colons, 5),
        )
    write_text_atomic(path, format_dynamic_ranges(ranges))


def read_dynamic_ranges(path: str | Path) -> dict[str, float]:
    """Parse a ``name:amax`` file; the amax follows the last ':' (names may contain ':')."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise Int8ConvError(f"{path}: cannot read dynamic ranges: {exc}") from exc
    ranges: dict[str, float] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, sep, value = line.rpartition(":")
        try:
            amax = float(value)
        except ValueError:
            amax = float("nan")
        if not sep or not name or not (math.isfinite(amax) and amax > 0):
            raise Int8ConvError(
                f"{path}:{number}: expected 'tensor:amax' with a finite positive amax, got '{line.strip()}'"
            )
        ranges[name] = amax
    return ranges


def format_ranges_json(ranges: Mapping[str, float], method: str, source: str) -> str:
    """``{"method", "source", "ranges": {name: amax}}``; TensorRT applies each as ``(-amax, amax)``."""
    body = {
        "format": "int8conv-tensorrt-ranges",
        "version": 1,
        "method": method,
        "source": source,
        "ranges": {_check_name(n): check_amax(n, a) for n, a in ranges.items()},
    }
    return json.dumps(body, indent=1) + "\n"


def write_ranges_json(path: str | Path, ranges: Mapping[str, float], method: str, source: str) -> None:
    write_text_atomic(path, format_ranges_json(ranges, method, source))


def read_ranges_json(path: str | Path) -> dict[str, float]:
    path = Path(path)
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        ranges = body["ranges"]
        if not isinstance(ranges, dict):
            raise TypeError("'ranges' is not an object")
        return {str(name): check_amax(str(name), float(amax)) for name, amax in ranges.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, Int8ConvError) as exc:
        raise Int8ConvError(f"{path}: not an int8conv ranges JSON file ({exc})") from exc
