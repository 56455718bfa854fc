"""``--method eq`` and bias correction: the numpy model of ncnn's INT8 arithmetic, checked against the runtime.

The simulation is what the scale search scores its candidates with, so it must be the runtime's arithmetic:
on real layers (depthwise, requantize fusion through Split, 6-bit Winograd, InnerProduct) every quantized
layer's output, fed the input the INT8 net gave it, equals ncnn's within one requantization step where a
value sits on a rounding boundary.
"""

from __future__ import annotations

import numpy as np
import pytest

from int8conv.caffe.graph import load_graph
from int8conv.calibration.int8_simulation import LayerGeometry, round_clip, simulate_layer
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.calibration.scale_search import _bias_correction, _sample
from int8conv.calibration.weight_scales import dead_channels
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import NcnnBlob, NcnnLayer, NcnnModel, write_model
from int8conv.ncnn.quantize import float_to_int8, int8_layers, quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.tables.ncnn_table import CalibrationTable
from int8conv.zoo import MODELS

pytest.importorskip("ncnn")


def _minmax_table(model: NcnnModel, runner: NcnnRunner, x: np.ndarray) -> CalibrationTable:
    """Per-channel 127/absmax weight scales (31 for 3x3 stride 1) and each INT8 layer's input absmax on ``x``."""
    table = CalibrationTable()
    layers = [layer for layer in model.layers if layer.type in ("Convolution", "ConvolutionDepthWise", "InnerProduct")]
    blobs = runner.extract({runner.input_names[0]: x}, sorted({layer.bottoms[0] for layer in layers}))
    for layer in layers:
        g = LayerGeometry.of(layer)
        absmax = np.abs(g.weight.reshape(g.units, -1)).max(axis=1)
        levels = 31 if (g.kernel, g.stride, g.dilation, g.group) == ((3, 3), (1, 1), (1, 1), 1) else 127
        table.weight_scales[layer.name] = np.where(
            dead_channels(absmax), 0.0, levels / np.maximum(absmax, 1e-30)
        ).astype(np.float32)
        table.activation_scales[layer.name] = 127.0 / float(np.abs(blobs[layer.bottoms[0]]).max())
    return table


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_clip_is_float_to_int8_in_float(dtype):
    """The simulation's rounding gives ``float2int8``'s values (halves away from zero, clamped) in the input's type."""
    halves = (np.arange(-130, 131) + np.array([[-0.5], [0.0], [0.5]])).astype(dtype).reshape(-1)
    up, down = np.nextafter(halves, dtype(np.inf)), np.nextafter(halves, dtype(-np.inf))
    noise = np.random.default_rng(0).normal(scale=60, size=4000).astype(dtype)
    values = np.concatenate([halves, up, down, noise])
    got = round_clip(values)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, float_to_int8(values).astype(dtype))


@pytest.mark.parametrize("key", ["ultraface", "lenet", "det3"])
def test_simulation_equals_ncnn_runtime_on_real_layers(shared, tmp_path, key):
    zoo = MODELS[key]
    graph = load_graph(*zoo.paths(shared))
    fp32 = convert_graph(graph)
    write_model(fp32, tmp_path / "f.param", tmp_path / "f.bin")
    image = read_image(list_images(shared / "images" / "faces")[3])
    x = zoo.prep.apply(image)
    table = _minmax_table(fp32, NcnnRunner(tmp_path / "f.param", tmp_path / "f.bin", int8=False), x)
    int8 = quantize_model(fp32, table, fp16_storage=False)
    write_model(int8, tmp_path / "q.param", tmp_path / "q.bin")
    runner = NcnnRunner(tmp_path / "q.param", tmp_path / "q.bin", int8=True)
    names = int8_layers(int8)
    blobs = runner.extract(
        {runner.input_names[0]: x},
        sorted({b for n in names for b in (int8.layer(n).bottoms[0], int8.layer(n).tops[0])}),
    )
    kinds = set()
    for name in names:
        layer = int8.layer(name)
        expected = simulate_layer(layer, blobs[layer.bottoms[0]])
        got = blobs[layer.tops[0]].reshape(expected.shape)
        peak = float(np.abs(got).max())
        fused = int(layer.params[8]) > 100
        step = 1.0 / float(layer.weights[-1].data[0]) if fused else 0.0
        diff = np.abs(expected - got)
        # exact up to float rounding, except values on a requantization rounding boundary (one int8 step)
        assert diff.max() <= step * 1.001 + 1e-5 * peak, name
        assert np.mean(diff > 1e-5 * peak) < 0.01, name
        kinds.add((layer.type, fused))
    if key == "ultraface":
        assert {("Convolution", True), ("ConvolutionDepthWise", True), ("Convolution", False)} <= kinds
    if key == "lenet":
        assert ("InnerProduct", False) in kinds


def test_bias_correction_removes_the_mean_weight_rounding_error(tmp_path):
    """A 1x1 conv on inputs with mean 1: weight rounding adds (Wq - W) @ E[x] per output; the correction is
    exactly minus that, and the INT8 model (run by ncnn) then has a much smaller mean output error."""
    rng = np.random.default_rng(1)
    cin, cout = 32, 8
    weight = rng.normal(size=(cout, cin, 1, 1)).astype(np.float32)
    bias = rng.normal(size=cout).astype(np.float32) * 0.1
    conv = NcnnLayer(
        "Convolution",
        "c",
        ["data"],
        ["out"],
        {0: cout, 1: 1, 5: 1, 6: weight.size},
        [NcnnBlob(weight.reshape(-1)), NcnnBlob(bias, tagged=False)],
    )
    model = NcnnModel([NcnnLayer("Input", "data", [], ["data"], {0: 16, 1: 16, 2: cin}), conv])
    inputs = [(1.0 + 0.01 * rng.normal(size=(cin, 16, 16))).astype(np.float32) for _ in range(4)]
    g = LayerGeometry.of(conv)
    weight_scales = (7.0 / np.abs(g.weight).max(axis=1)).astype(np.float32)  # coarse: a large rounding error
    samples = _sample(model, [g], inputs, tmp_path)["c"]
    bottom = 127.0 / 1.1
    corrected = _bias_correction(samples, bottom, weight_scales)
    dequantized = g.quantized_weight(weight_scales) / weight_scales[:, None].astype(np.float64)
    expected_error = (dequantized - g.weight) @ np.ones(cin)  # E[x] = 1 (up to 0.01 noise)
    np.testing.assert_allclose(bias - corrected, expected_error, rtol=0.05, atol=2e-3)

    table = CalibrationTable({"c": weight_scales}, {"c": bottom})
    fp32_param, fp32_bin, q_param, q_bin = (tmp_path / n for n in ("f.param", "f.bin", "q.param", "q.bin"))
    write_model(model, fp32_param, fp32_bin)
    reference = NcnnRunner(fp32_param, fp32_bin, int8=False)
    errors = {}
    for label, biases in (("plain", None), ("corrected", {"c": corrected})):
        write_model(quantize_model(model, table, fp16_storage=False, biases=biases), q_param, q_bin)
        runner = NcnnRunner(q_param, q_bin, int8=True)
        test = (1.0 + 0.01 * rng.normal(size=(cin, 16, 16))).astype(np.float32)
        diff = runner.run({"data": test})["out"] - reference.run({"data": test})["out"]
        errors[label] = float(np.abs(diff.reshape(cout, -1).mean(axis=1)).mean())
    assert errors["corrected"] < 0.1 * errors["plain"], errors


def test_eq_through_the_command_lines(shared, tmp_path):
    """``calibrate --method eq`` writes a table ncnn's INT8 model runs well with; ``--bias-correction`` is refused
    where only a table is written, and in the one-shot conversion its biases reach the INT8 .bin."""
    from int8conv.cli import main as int8conv_main
    from int8conv.legacy_cli import main as convert_tool
    from int8conv.ncnn.model import read_model
    from int8conv.tables.ncnn_table import read_ncnn_table
    from int8conv.zoo import cli_flags

    zoo = MODELS["det3"]
    proto, caffemodel = zoo.paths(shared)
    args = [
        "--proto",
        str(proto),
        "--model",
        str(caffemodel),
        "--images",
        str(shared / "images" / "faces"),
        "--max-images",
        "8",
        "--backend",
        "opencv",
        "-q",
        *cli_flags(zoo.prep),
    ]
    kl_table, eq_table = tmp_path / "kl.table", tmp_path / "eq.table"
    assert int8conv_main(["calibrate", *args, "--method", "kl", "--output", str(kl_table)]) == 0
    assert int8conv_main(["calibrate", *args, "--method", "eq", "--output", str(eq_table)]) == 0
    kl, eq = read_ncnn_table(kl_table), read_ncnn_table(eq_table)
    assert set(eq.activation_scales) == set(kl.activation_scales)
    assert eq.activation_scales != kl.activation_scales
    # the searched thresholds never clip more than KL's (a larger threshold is a smaller scale)
    assert all(eq.activation_scales[n] <= kl.activation_scales[n] * 1.0001 for n in eq.activation_scales)
    assert (
        int8conv_main(
            ["calibrate", *args, "--method", "eq", "--bias-correction", "--output", str(tmp_path / "x.table")]
        )
        == 2
    )

    out = {}
    for label, extra in (("eq", []), ("bc", ["--bias-correction"])):
        out[label] = tmp_path / label
        assert convert_tool([*args, "--method", "eq", *extra, "--ncnn-dir", str(out[label])]) == 0
    plain = read_model(out["eq"] / "det3-int8.param", out["eq"] / "det3-int8.bin")
    corrected = read_model(out["bc"] / "det3-int8.param", out["bc"] / "det3-int8.bin")
    changed = [
        layer.name
        for layer in plain.layers
        if layer.name in eq.activation_scales
        and not np.array_equal(layer.weights[1].data, corrected.layer(layer.name).weights[1].data)
    ]
    assert changed, "bias correction changed no stored bias"
    x = zoo.prep.apply(read_image(list_images(shared / "images" / "faces")[15]))
    fp32 = NcnnRunner(out["bc"] / "det3.param", out["bc"] / "det3.bin", int8=False).run({"data": x})["prob1"]
    got = NcnnRunner(out["bc"] / "det3-int8.param", out["bc"] / "det3-int8.bin", int8=True).run({"data": x})["prob1"]
    assert np.abs(got - fp32).max() < 0.05
