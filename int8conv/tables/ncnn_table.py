"""The calibration table, and its ncnn text formats.

Current ncnn (what ``ncnn2int8`` reads): ``<layer>_param_0 s0 s1 ...`` per quantized layer (weight scales),
then ``<layer> s`` (the scale of that layer's bottom blob), keyed by layer NAME. Scales are ``levels/threshold``.
Legacy (the original caffe-int8-convert-tools, ncnn before 2018-08): per-tensor weight scales and activation
scales keyed by BLOB name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.atomic import write_text_atomic
from int8conv.errors import Int8ConvError

log = logging.getLogger(__name__)


def _float32_finite(values: np.ndarray | float) -> bool:
    """True when every value is finite as the float32 ncnn reads it (sscanf %f rounds: 3.40282347e+38 is FLT_MAX):
    NaN and Inf fail as well as what only float64 holds."""
    with np.errstate(over="ignore"):
        return bool(np.all(np.isfinite(np.asarray(values, dtype=np.float32))))


@dataclass
class CalibrationTable:
    """Weight scales per layer (one per channel/group) and the scale of each quantized layer's input."""

    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)
    activation_scales: dict[str, float] = field(default_factory=dict)
    #: layers whose activation line was left out on purpose (mixed precision, all-zero input): no warning for them
    fp32_layers: set[str] = field(default_factory=set)

    def validate(self) -> None:
        """NaN or Inf never reaches a table; weight scales are >= 0 (0 = dead channel), activations > 0. ncnn reads
        scales as float32, so a scale beyond float32 (127 / a denormal threshold) would load as Inf."""
        for name, scales in self.weight_scales.items():
            scales = np.asarray(scales, dtype=np.float64)
            if np.any(scales < 0) or not _float32_finite(scales):
                raise Int8ConvError(f"layer '{name}': weight scales must be finite float32 and >= 0, got {scales}")
        for name, scale in self.activation_scales.items():
            if not _float32_finite(scale) or scale <= 0:
                raise Int8ConvError(
                    f"layer '{name}': activation scale must be finite float32 and > 0, got {scale} "
                    f"(its input's threshold {127.0 / scale if scale else 0:g} is too small for int8)"
                )


def _fmt(value: float) -> str:
    return f"{float(value):.9g}"


def format_ncnn_table(table: CalibrationTable) -> str:
    """The table text, weight lines first, as ncnn2table writes it."""
    table.validate()
    for name in (*table.weight_scales, *table.activation_scales):
        if not name or len(name) > 247 or any(c.isspace() for c in name):  # 247 + "_param_0": ncnn's 255
            raise Int8ConvError(f"layer {name!r}: an ncnn table key must be 1-247 characters without spaces")
    # ncnn2int8 reads a line's first token as its key and files every key holding '_param_' as a weight line
    misread = [name for name in table.activation_scales if "_param_" in name]
    if misread:
        log.warning(
            "ncnn2int8 takes the activation lines of layers %s for weight lines (their names hold '_param_'); "
            "int8conv quantize reads them right, or rename the layers",
            ", ".join(sorted(misread)),
        )
    lines = [
        f"{name}_param_0 " + " ".join(_fmt(s) for s in np.asarray(scales).reshape(-1))
        for name, scales in table.weight_scales.items()
    ]
    lines += [f"{name} {_fmt(scale)}" for name, scale in table.activation_scales.items()]
    return "\n".join(lines) + "\n"


def write_ncnn_table(table: CalibrationTable, path: str | Path) -> None:
    """Write the current (layer-keyed, per-channel) ncnn table atomically."""
    write_text_atomic(path, format_ncnn_table(table))


def read_ncnn_table(path: str | Path) -> CalibrationTable:
    """Parse a current ncnn table; a malformed line names the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Int8ConvError(f"{path}: cannot read calibration table: {exc}") from exc
    table = CalibrationTable()
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = np.array([float(v) for v in parts[1:]], dtype=np.float64)
        except ValueError as exc:
            raise Int8ConvError(f"{path}:{number}: not a number in '{line.strip()}'") from exc
        if values.size == 0:
            raise Int8ConvError(f"{path}:{number}: '{parts[0]}' has no scale")
        if not _float32_finite(values):
            raise Int8ConvError(f"{path}:{number}: '{parts[0]}' has a NaN, Inf or beyond-float32 scale")
        key = parts[0]
        weight_line = "_param_" in key
        layer = key.rsplit("_param_", 1)[0] + "_param_" if weight_line else key  # conv_param_0, conv_param_1: one
        if layer in first_line:
            raise Int8ConvError(
                f"{path}:{number}: '{key}' appears again (first on line {first_line[layer]}); "
                "which scale is meant is unclear: keep one line per key"
            )
        first_line[layer] = number
        if np.any(values < 0) if weight_line else values[0] <= 0:
            raise Int8ConvError(
                f"{path}:{number}: '{key}' has a scale {'< 0' if weight_line else '<= 0'} "
                f"(weight scales are >= 0, 0 = dead channel; activation scales > 0)"
            )
        if weight_line:
            table.weight_scales[key.rsplit("_param_", 1)[0]] = values.astype(np.float32)
        else:
            table.activation_scales[key] = float(values[0])
    return table


def format_legacy_table(weight_scales: dict[str, float], blob_scales: dict[str, float]) -> str:
    """The original caffe-int8-convert-tools format: per-tensor weight lines, then blob-keyed activation lines."""
    lines = [f"{name}_param_0 {_fmt(scale)}" for name, scale in weight_scales.items()]
    lines += [f"{blob} {_fmt(scale)}" for blob, scale in blob_scales.items()]
    for line in lines:
        value = float(line.rsplit(" ", 1)[1])
        if not _float32_finite(value) or value < 0:
            raise Int8ConvError(f"legacy table line '{line}' has an invalid scale")
    return "\n".join(lines) + "\n"
