"""Table formats: what ncnn2int8 parses, round trips, and NaN/Inf never reaching a file."""

from __future__ import annotations

import numpy as np
import pytest

from int8conv.errors import Int8ConvError
from int8conv.tables.ncnn_table import (
    CalibrationTable,
    format_legacy_table,
    format_ncnn_table,
    read_ncnn_table,
    write_ncnn_table,
)


def test_round_trip_and_layout(tmp_path):
    table = CalibrationTable(
        {"conv1": np.array([1.5, 0.0, 123456.789], np.float32), "fc": np.array([2.0], np.float32)},
        {"conv1": 0.8412, "fc": 33.3},
    )
    path = tmp_path / "t.table"
    write_ncnn_table(table, path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("conv1_param_0 1.5 0 123456.")
    assert lines[1] == "fc_param_0 2" and lines[2] == "conv1 0.8412" and lines[3] == "fc 33.3"
    back = read_ncnn_table(path)
    np.testing.assert_array_equal(back.weight_scales["conv1"], table.weight_scales["conv1"])
    assert back.activation_scales == table.activation_scales


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0, 127.0 / 1e-40])
def test_invalid_scales_never_written(tmp_path, bad):
    path = tmp_path / "t.table"
    with pytest.raises(Int8ConvError, match="conv1"):
        write_ncnn_table(CalibrationTable({"conv1": np.array([1.0, bad])}, {}), path)
    with pytest.raises(Int8ConvError, match="conv1"):
        write_ncnn_table(CalibrationTable({}, {"conv1": float(bad)}), path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_malformed_table_names_line(tmp_path):
    path = tmp_path / "t.table"
    path.write_text("conv1_param_0 1 2\nconv1 abc\n")
    with pytest.raises(Int8ConvError, match=r"t\.table:2"):
        read_ncnn_table(path)


def test_a_written_table_reads_back_as_float32_like_ncnn(tmp_path):
    """ncnn sscanf's every scale as float32: the largest float32 round trips, anything above would load as Inf."""
    largest = float(np.finfo(np.float32).max)
    path = tmp_path / "t.table"
    write_ncnn_table(CalibrationTable({"c": np.array([largest], np.float32)}, {"c": largest}), path)
    back = read_ncnn_table(path)
    assert np.float32(back.activation_scales["c"]) == back.weight_scales["c"][0] == np.float32(largest)
    with pytest.raises(Int8ConvError, match="legacy"):
        format_legacy_table({}, {"data": 127.0 / 1e-40})


@pytest.mark.parametrize("name", ["conv 1", "conv\n1", "", "c" * 248])
def test_a_layer_name_that_is_not_one_token_is_refused(tmp_path, name):
    """The table is whitespace-separated tokens (ncnn2int8: fscanf "%255s"): "conv 1" would read as key "conv"."""
    with pytest.raises(Int8ConvError, match="1-247 characters without spaces"):
        write_ncnn_table(CalibrationTable({}, {name: 2.0}), tmp_path / "t.table")
    assert not list(tmp_path.iterdir())


def ncnn2int8_tables(text: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Today's ncnn2int8 read_int8scale_table from its definition (tools/quantize/ncnn2int8.cpp): per line, the first
    space-separated token is the key and the others scales; a key holding '_param_' is a weight line."""
    weights: dict[str, list[float]] = {}
    activations: dict[str, list[float]] = {}
    for line in text.splitlines():
        key, *scales = line.split(" ")
        (weights if "_param_" in key else activations)[key] = [float(s) for s in scales]
    return weights, activations


def test_layer_names_ncnn2int8_misreads_are_named(caplog):
    """Numeric layer names (UltraFace's '203') are keys like any other; an activation key holding '_param_' is
    taken for a weight line, and that is named."""
    table = CalibrationTable({"203": np.array([2.0], np.float32)}, {"203": 3.0, "info": 5.0})
    assert ncnn2int8_tables(format_ncnn_table(table)) == ({"203_param_0": [2.0]}, {"203": [3.0], "info": [5.0]})
    assert not caplog.text
    odd = CalibrationTable({"x_param_1": np.array([2.0], np.float32)}, {"x_param_1": 3.0})
    assert ncnn2int8_tables(format_ncnn_table(odd)) == ({"x_param_1_param_0": [2.0], "x_param_1": [3.0]}, {})
    assert "ncnn2int8 takes the activation lines of layers x_param_1 for weight lines" in caplog.text


def test_legacy_format():
    text = format_legacy_table({"conv1": 138.066410735}, {"data": 0.841264989609, "pool1": 0.161700784564})
    assert text.splitlines() == ["conv1_param_0 138.066411", "data 0.84126499", "pool1 0.161700785"]


def test_table_text_is_stable():
    table = CalibrationTable({"c": np.array([3.0], np.float32)}, {"c": 1.0 / 3.0})
    assert format_ncnn_table(table) == format_ncnn_table(table) == "c_param_0 3\nc 0.333333333\n"


def test_a_duplicate_line_names_both_lines(tmp_path):
    path = tmp_path / "dup.table"
    path.write_text("conv1_param_0 1 2\nconv1 3.5\nconv1 4.5\n")
    with pytest.raises(Int8ConvError, match=r"dup.table:3: 'conv1' appears again \(first on line 2\)"):
        read_ncnn_table(path)
