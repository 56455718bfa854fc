"""Speed-aware precision: per-layer timings (measured here or given), the FP32 choice, and the CLI around it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.graph import load_graph
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.cli import main as int8conv_main
from int8conv.errors import Int8ConvError
from int8conv.evaluation.mixed_precision import OutputScorer
from int8conv.evaluation.speed import (
    LayerTiming,
    load_layer_timings,
    optimize_speed,
    save_layer_timings,
    table_of,
    time_layers,
)
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import read_model, write_model
from int8conv.ncnn.quantize import int8_layers, quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.zoo import MODELS, cli_flags
from tests.conftest import eval_args

TABLES = Path(__file__).resolve().parents[1] / "tables"


@pytest.fixture(scope="module")
def det1(shared):
    spec = MODELS["det1"]
    fp32 = convert_graph(load_graph(*spec.paths(shared)))
    inputs = [
        {fp32.input_names[0]: spec.prep.apply(read_image(p))} for p in list_images(shared / "images" / "faces")[:3]
    ]
    return fp32, read_ncnn_table(TABLES / "mtcnn_det1.table"), inputs


@pytest.mark.real_models
def test_table_of_an_int8_model_is_its_table(det1):
    fp32, table, _ = det1
    recovered = table_of(quantize_model(fp32, table))
    assert set(recovered.activation_scales) == set(table.activation_scales)
    for name, scales in table.weight_scales.items():
        np.testing.assert_array_equal(recovered.weight_scales[name], np.asarray(scales, np.float32))
        assert recovered.activation_scales[name] == pytest.approx(table.activation_scales[name], rel=1e-7)


@pytest.mark.real_models
def test_every_quantized_layer_is_timed_both_ways(det1):
    fp32, table, _ = det1
    timings = time_layers(fp32, table, runs=3)
    assert set(timings) == set(table.activation_scales)
    for timing in timings.values():
        assert set(timing.fp32_ms) == set(timing.int8_ms) == {1}
        assert all(ms > 0 for ms in [*timing.fp32_ms.values(), *timing.int8_ms.values()])


@pytest.mark.real_models
def test_given_timings_decide_which_layers_stay_fp32(det1, tmp_path):
    """Timings from the target device decide alone: the slow layers lose their activation line, the rest stay
    INT8, and the INT8 model written from the choice runs on ncnn with exactly those layers FP32."""
    fp32, table, inputs = det1
    names = sorted(table.activation_scales)
    slow = names[:2]
    given = {name: LayerTiming({1: 1.0, 2: 0.6}, {1: 2.0 if name in slow else 0.5, 2: 0.3}) for name in names}
    choice = optimize_speed(fp32, table, inputs, timings=given, runs=3)
    assert choice.slow_layers == [n for n in names if n in slow] and not choice.model_layers
    assert set(choice.table.activation_scales) == set(names) - set(slow)
    int8 = quantize_model(fp32, choice.table)
    assert sorted(int8_layers(int8)) == sorted(set(names) - set(slow))
    assert set(choice.model_ms) == {"fp32", "int8"} and set(choice.model_ms["fp32"]) == {1, 2}

    accurate = optimize_speed(fp32, table, inputs, min_cosine=0.9999, timings=given, runs=3)
    assert set(accurate.slow_layers) == set(slow)
    # the target is reached (measured: 0.9999998 with 3 layers FP32 for accuracy), and the cosine reported is the
    # shipped table's, rescored independently (fp16 storage, as optimize_speed's default)
    assert accurate.cosine >= 0.9999 and accurate.accuracy_layers, (accurate.cosine, accurate.accuracy_layers)
    rescored = OutputScorer(fp32, inputs, tmp_path, "auto", True, 1)(accurate.table)
    assert rescored == pytest.approx(accurate.cosine, abs=1e-9)


@pytest.mark.real_models
@pytest.mark.slow
def test_measured_choice_is_no_slower_than_fp32(det1):
    """Timed here: the whole INT8 model ends no slower than FP32 at 1 and 2 threads, or with no INT8 layer."""
    fp32, table, inputs = det1
    choice = optimize_speed(fp32, table, inputs, runs=5)
    assert set(choice.fp32_layers) <= set(table.activation_scales)
    no_slower = all(choice.model_ms["int8"][t] <= choice.model_ms["fp32"][t] for t in (1, 2))
    assert no_slower or not choice.table.activation_scales


def test_layer_timings_file_round_trip_and_errors(tmp_path):
    timings = {"conv1": LayerTiming({1: 0.5, 2: 0.3}, {1: 0.25, 2: 0.2})}
    save_layer_timings(timings, tmp_path / "t.json")
    assert load_layer_timings(tmp_path / "t.json") == timings
    (tmp_path / "plain.json").write_text('{"conv1": {"fp32": 1.5, "int8": 2}}')
    assert load_layer_timings(tmp_path / "plain.json") == {"conv1": LayerTiming({1: 1.5}, {1: 2.0})}
    for text, message in (
        ('{"conv1": {"fp32": 1}}', "conv1.*'fp32' and 'int8'"),
        ('{"conv1": {"fp32": -1, "int8": 1}}', "conv1.*non-negative"),
        ('{"conv1": {"fp32": {"1": 1}, "int8": {"2": 1}}}', "conv1.*different thread counts"),
        # conv2 plain (1 thread) after conv1 at 1 and 2: format_choice's table then failed with a KeyError
        (
            '{"conv1": {"fp32": {"1": 1, "2": 0.6}, "int8": {"1": 0.5, "2": 0.4}}, "conv2": {"fp32": 2, "int8": 1}}',
            r"layer 'conv2' has times for \[1\] thread\(s\), the layers before it for \[1, 2\]",
        ),
        ("[1, 2]", "JSON object"),
        ("{oops", "cannot read"),
    ):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(Int8ConvError, match=message):
            load_layer_timings(tmp_path / "bad.json")


@pytest.mark.real_models
def test_quantize_and_eval_cli(shared, tmp_path, capsys):
    """``quantize --optimize speed --min-cosine`` with device timings prints the per-layer table and the choice;
    ``eval --layer-times`` shows the INT8 layers' timings."""
    spec = MODELS["det1"]
    proto, caffemodel = spec.paths(shared)
    write_model(convert_graph(load_graph(proto, caffemodel)), tmp_path / "det1.param", tmp_path / "det1.bin")
    (tmp_path / "t.json").write_text(
        json.dumps({"conv1": {"fp32": 0.1, "int8": 0.2}, "conv2": {"fp32": 0.3, "int8": 0.1}})
    )
    flags = cli_flags(spec.prep)
    assert (
        int8conv_main(
            [
                "quantize",
                "--param",
                str(tmp_path / "det1.param"),
                "--bin",
                str(tmp_path / "det1.bin"),
                "--table",
                str(TABLES / "mtcnn_det1.table"),
                "--out-param",
                str(tmp_path / "i.param"),
                "--out-bin",
                str(tmp_path / "i.bin"),
                "--optimize",
                "speed",
                "--min-cosine",
                "0.99",
                "--images",
                str(shared / "images" / "faces"),
                "--max-images",
                "2",
                "--layer-timings",
                str(tmp_path / "t.json"),
                "--save-layer-timings",
                str(tmp_path / "saved.json"),
                *flags,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "per-layer timings given by the user" in out
    assert [line.split()[-1] for line in out.splitlines() if line.startswith("conv1 ")] == ["slower"]
    int8 = read_model(tmp_path / "i.param", tmp_path / "i.bin")
    assert "conv1" not in int8_layers(int8) and "conv2" in int8_layers(int8)
    NcnnRunner(tmp_path / "i.param", tmp_path / "i.bin", int8=True)  # ncnn loads it
    assert set(load_layer_timings(tmp_path / "saved.json")) == {"conv1", "conv2"}

    fp32_files = (tmp_path / "det1.param", tmp_path / "det1.bin")
    int8_files = (tmp_path / "i.param", tmp_path / "i.bin")
    timing = ["--max-images", "2", "--timing-runs", "2", "--layer-times", "--no-caffe", *flags]
    assert (
        int8conv_main(eval_args(proto, caffemodel, fp32_files, int8_files, shared / "images" / "faces", *timing)) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per-layer time of the INT8 layers"))
    timed = {line.split()[0] for line in lines[start + 2 :] if line.startswith("  ") and "does not pay" not in line}
    assert timed == set(int8_layers(int8))
