"""ncnn INT8 quantization: files that the ncnn runtime loads, checked against an integer numpy reference.

The reference re-implements ncnn's INT8 semantics (``Convolution::forward_int8`` in src/layer): quantize the
input with the bottom scale, integer convolution, dequantize with ``1 / (bottom_scale * weight_scale)``
(0 for a weight scale of 0), bias, activation, and requantize with the top scale when fused.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

from int8conv.calibration.weight_scales import winograd_levels
from int8conv.cli import main as cli
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnBlob, NcnnLayer, NcnnModel, read_model, write_model
from int8conv.ncnn.quantize import _quantize_layer, float_to_int8, int8_layers, quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.tables.ncnn_table import CalibrationTable

from .synthetic import conv2d

ncnn = pytest.importorskip("ncnn")


# ------------------------------------------------------------------------------------------------ helpers


def _conv(name, bottom, top, weight, bias, pad=1, relu=False, depthwise=False) -> NcnnLayer:
    out = weight.shape[0]
    params = {0: out, 1: weight.shape[-1], 4: pad, 5: 1, 6: int(weight.size)}
    if depthwise:
        params[7] = out
    if relu:
        params[9] = 1
    return NcnnLayer(
        "ConvolutionDepthWise" if depthwise else "Convolution",
        name,
        [bottom],
        [top],
        params,
        [NcnnBlob(weight.reshape(-1).astype(np.float32)), NcnnBlob(bias.astype(np.float32), False)],
    )


def _input(c, h, w) -> NcnnLayer:
    return NcnnLayer("Input", "data", [], ["data"], {0: w, 1: h, 2: c})


def _absmax_table(model: NcnnModel, activations: dict[str, float], levels: int = 127) -> CalibrationTable:
    """Per-channel (per-group) 127/absmax weight scales, and the given activation absmax per layer."""
    table = CalibrationTable()
    for layer in model.layers:
        if layer.type in ("Convolution", "ConvolutionDepthWise", "InnerProduct"):
            units = layer.params[7] if layer.type == "ConvolutionDepthWise" else layer.params[0]
            absmax = np.abs(layer.weights[0].data.reshape(units, -1)).max(axis=1)
            table.weight_scales[layer.name] = np.where(absmax > 0, levels / np.maximum(absmax, 1e-30), 0.0)
    table.activation_scales.update({name: 127.0 / amax for name, amax in activations.items()})
    return table


def _calibrated(model: NcnnModel, x: np.ndarray, tmp_path, layers=("c1", "dw", "c2")) -> CalibrationTable:
    """Weight scales plus activation scales from the bottoms' absmax in an FP32 run (minmax calibration)."""
    peaks = {
        name: float(np.abs(x).max())
        if model.layer(name).bottoms[0] == "data"
        else float(np.abs(_run(model, tmp_path, "peaks", x, False, model.layer(name).bottoms[0])).max())
        for name in layers
    }
    return _absmax_table(model, peaks)


def _save(model: NcnnModel, tmp_path, stem: str):
    param, binary = tmp_path / f"{stem}.param", tmp_path / f"{stem}.bin"
    write_model(model, param, binary)
    return param, binary


def _run(model: NcnnModel, tmp_path, stem: str, x: np.ndarray, int8: bool, blob: str = "out") -> np.ndarray:
    param, binary = _save(model, tmp_path, stem)
    return NcnnRunner(param, binary, int8=int8).extract({"data": x}, [blob])[blob]


def _cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _int8_conv_reference(q: np.ndarray, layer: NcnnLayer, group: int = 1) -> np.ndarray:
    """Integer accumulation of an ncnn INT8 conv layer (float64 holds the int sums exactly), then dequantize."""
    units = group if layer.type == "ConvolutionDepthWise" else layer.params[0]
    weights = layer.weights[0].data.astype(np.float64).reshape(layer.params[0], -1, layer.params[1], layer.params[1])
    pad = layer.params.get(4, 0)
    acc = conv2d(q[None].astype(np.float64), weights, None, pad=(pad, pad), group=group)[0].astype(np.float64)
    w_scales = layer.weights[2].data.astype(np.float64)
    bottom = float(layer.weights[3].data[0])
    per_out = np.repeat(w_scales, layer.params[0] // units)
    dequant = np.where(per_out > 0, 1.0 / (bottom * np.where(per_out > 0, per_out, 1.0)), 0.0)
    y = acc * dequant[:, None, None] + layer.weights[1].data.astype(np.float64)[:, None, None]
    return np.maximum(y, 0.0) if layer.params.get(9) == 1 else y


@pytest.fixture()
def chain():
    """Input -> 3x3 conv (ReLU) -> depthwise 3x3 (ReLU) -> 1x1 conv: two requantize fusions."""
    rng = np.random.default_rng(7)
    layers = [
        _input(8, 12, 12),
        _conv("c1", "data", "a", rng.normal(size=(16, 8, 3, 3)), rng.normal(size=16) * 0.1, relu=True),
        _conv("dw", "a", "b", rng.normal(size=(16, 1, 3, 3)), rng.normal(size=16) * 0.1, relu=True, depthwise=True),
        _conv("c2", "b", "out", rng.normal(size=(4, 16, 1, 1)), rng.normal(size=4) * 0.1, pad=0),
    ]
    x = rng.normal(size=(8, 12, 12)).astype(np.float32)
    return NcnnModel(layers), x


# ------------------------------------------------------------------------------------------------ unit


def test_float_to_int8_is_ncnn_float2int8():
    values = np.array([0.49, 0.5, -0.5, 1.5, 2.5, -2.5, 126.6, 300.0, -300.0])
    assert float_to_int8(values).tolist() == [0, 1, -1, 2, 3, -3, 127, 127, -127]


def test_int8_chain_matches_integer_reference(chain, tmp_path):
    model, x = chain
    table = _calibrated(model, x, tmp_path)
    q = quantize_model(model, table, fp16_storage=False)
    c1, dw, c2 = q.layers[1:]
    assert (c1.params[8], dw.params[8], c2.params[8]) == (102, 101, 2)
    assert [w.data.dtype for w in c1.weights] == [np.int8, np.float32, np.float32, np.float32, np.float32]
    assert float(c1.weights[-1].data[0]) == pytest.approx(table.activation_scales["dw"])
    assert float(dw.weights[-1].data[0]) == pytest.approx(table.activation_scales["c2"])

    # integer reference of the whole chain, requantizing between layers as the fused layers do
    s_in = table.activation_scales
    a = _int8_conv_reference(float_to_int8(x * s_in["c1"]), c1)
    b = _int8_conv_reference(float_to_int8(a * s_in["dw"]), dw, group=16)
    expected = _int8_conv_reference(float_to_int8(b * s_in["c2"]), c2)

    got = _run(q, tmp_path, "int8", x, int8=True)
    diff = np.abs(got - expected)
    # equal up to float rounding, except where a requantized value sat on a rounding boundary (4 of 576 here)
    assert np.mean(diff > 1e-4 * np.abs(expected).max()) < 0.02
    assert diff.max() < 0.005 * np.abs(expected).max()
    assert _cosine(got, _run(model, tmp_path, "fp32", x, int8=False)) > 0.999


def test_split_fusion_only_when_all_consumers_int8_at_one_scale(tmp_path):
    rng = np.random.default_rng(3)

    def model():
        return NcnnModel(
            [
                _input(4, 8, 8),
                _conv("c1", "data", "a", rng.normal(size=(8, 4, 3, 3)), np.zeros(8), relu=True),
                NcnnLayer("Split", "split", ["a"], ["a_0", "a_1"], {}),
                _conv("left", "a_0", "l", rng.normal(size=(8, 8, 1, 1)), np.zeros(8), pad=0),
                _conv("right", "a_1", "r", rng.normal(size=(8, 8, 1, 1)), np.zeros(8), pad=0),
                NcnnLayer("Eltwise", "sum", ["l", "r"], ["out"], {0: 1}),
            ]
        )

    x = rng.normal(size=(4, 8, 8)).astype(np.float32)
    m = model()
    reference = _run(m, tmp_path, "fp32", x, int8=False)
    peak = float(_run(m, tmp_path, "fp32", x, int8=False, blob="a").max())
    cases = {
        "fused": {"c1": 4.0, "left": peak, "right": peak},
        "one FP32 consumer": {"c1": 4.0, "left": peak},
        "different scales": {"c1": 4.0, "left": peak, "right": 1.1 * peak},
    }
    for label, activations in cases.items():
        q = quantize_model(m, _absmax_table(m, activations), fp16_storage=False)
        assert (q.layer("c1").params[8] == 102) == (label == "fused"), label
        if label == "fused":
            assert float(q.layer("c1").weights[-1].data[0]) == pytest.approx(127 / peak)
        got = _run(q, tmp_path, "int8", x, int8=True)
        assert _cosine(got, reference) > 0.995, label


def test_missing_weight_line_keeps_only_that_layer_fp32(chain, tmp_path, caplog):
    """ncnn2int8 stops quantizing every later layer here (return -1); this project keeps going."""
    model, x = chain
    table = _calibrated(model, x, tmp_path)
    del table.weight_scales["dw"]
    with caplog.at_level(logging.WARNING):
        q = quantize_model(model, table, fp16_storage=False)
    assert "dw" in caplog.text and "stays FP32" in caplog.text
    assert int8_layers(q) == ["c1", "c2"]
    assert q.layer("c1").params[8] == 2  # its consumer is FP32: no requantize
    assert q.layer("dw").weights[0].data.dtype == np.float32
    assert _cosine(_run(q, tmp_path, "int8", x, int8=True), _run(model, tmp_path, "fp32", x, int8=False)) > 0.99


def test_dead_channel_outputs_its_bias(tmp_path):
    """Scale 0: ncnn dequantizes with 0 (not 1/0), so the channel is exactly act(bias), never NaN."""
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(4, 3, 3, 3))
    weight[2] = 0.0
    bias = np.array([0.1, -0.2, 0.7, 0.3])
    model = NcnnModel([_input(3, 6, 6), _conv("c", "data", "out", weight, bias)])
    table = _absmax_table(model, {"c": 3.0})
    assert table.weight_scales["c"][2] == 0.0
    q = quantize_model(model, table)
    assert not np.any(q.layer("c").weights[0].data.reshape(4, -1)[2])
    got = _run(q, tmp_path, "int8", rng.normal(size=(3, 6, 6)).astype(np.float32), int8=True)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[2], 0.7, rtol=1e-6)


def test_dead_depthwise_channel_outputs_its_bias(tmp_path):
    """ncnn's x86 INT8 depthwise kernel with 54 channels (not a multiple of 8) writes NaN for a weight scale of 0;
    the quantizer stores a live scale for the dead channel, whose int8 weights stay 0."""
    rng = np.random.default_rng(6)
    weight = rng.normal(size=(54, 1, 3, 3))
    weight[2] = 0.0
    bias = rng.normal(size=54)
    model = NcnnModel([_input(54, 8, 8), _conv("dw", "data", "out", weight, bias, depthwise=True)])
    table = _absmax_table(model, {"dw": 3.0})
    assert table.weight_scales["dw"][2] == 0.0
    q = quantize_model(model, table)
    layer = q.layer("dw")
    assert not np.any(layer.weights[0].data.reshape(54, -1)[2]) and layer.weights[2].data[2] > 0
    x = rng.normal(size=(54, 8, 8)).astype(np.float32)
    got = _run(q, tmp_path, "int8", x, int8=True)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[2], bias[2], rtol=1e-5)
    assert _cosine(got, _run(model, tmp_path, "fp32", x, int8=False)) > 0.999

    forced = copy.deepcopy(model)
    _quantize_layer(forced.layers[1], table.weight_scales["dw"], table.activation_scales["dw"])
    forced.layer("dw").weights[2].data[2] = 0.0  # what ncnn2int8 writes from the same table
    assert not np.all(np.isfinite(_run(forced, tmp_path, "forced", x, int8=True)))


def test_fp16_storage_for_fp32_layers(chain, tmp_path):
    model, x = chain
    model.layers[3].weights[0].data[0] = 70000.0  # beyond fp16: this layer must keep fp32
    table = _calibrated(model, x, tmp_path, layers=("c1",))
    q = quantize_model(model, table, fp16_storage=True)
    param, binary = _save(q, tmp_path, "mixed")
    back = read_model(param, binary)
    assert back.layer("c1").weights[0].data.dtype == np.int8
    assert back.layer("dw").weights[0].data.dtype == np.float16
    assert back.layer("c2").weights[0].data.dtype == np.float32
    assert back.layer("dw").weights[1].data.dtype == np.float32  # bias stays raw fp32
    no16 = quantize_model(model, table, fp16_storage=False)
    assert no16.layer("dw").weights[0].data.dtype == np.float32
    got = NcnnRunner(param, binary, int8=True).run({"data": x})["out"]
    assert _cosine(got, _run(model, tmp_path, "fp32", x, int8=False)) > 0.999


def test_grouped_convs_staying_fp32_are_one_warning(caplog):
    """Every grouped convolution kept FP32 is named in one warning line, not one line each (the ShuffleNet has 31)."""
    rng = np.random.default_rng(3)
    layers = [_input(8, 6, 6)]
    for name, bottom in (("g1", "data"), ("g2", "g1")):
        layer = _conv(name, bottom, name, rng.normal(size=(8, 4, 3, 3)), np.zeros(8))
        layer.type, layer.params[7] = "ConvolutionDepthWise", 2  # 4 outputs per group
        layers.append(layer)
    model = NcnnModel(layers)
    with caplog.at_level(logging.WARNING):
        q = quantize_model(model, _absmax_table(model, {"g1": 1.0, "g2": 1.0}))
    warnings = [record.getMessage() for record in caplog.records if "stay FP32" in record.getMessage()]
    assert int8_layers(q) == [] and len(warnings) == 1
    assert warnings[0].startswith("2 grouped (not depthwise) convolution(s) stay FP32")
    assert warnings[0].endswith("layer (outputs per group): g1 (4), g2 (4)")


def test_grouped_conv_with_8_outputs_per_group_stays_fp32(tmp_path, caplog):
    """ncnn's x86 INT8 group convolution with packing returns garbage for 8k outputs per group; keep it FP32.

    The second half records the runtime defect itself: if a future ncnn fixes it, this test says so.
    """
    rng = np.random.default_rng(2)
    layer = _conv("g", "data", "out", rng.normal(size=(16, 4, 3, 3)), np.zeros(16))
    layer.type, layer.params[7] = "ConvolutionDepthWise", 2  # group 2: 8 channels in, 8 outputs per group
    model = NcnnModel([_input(8, 10, 10), layer])
    x = rng.normal(size=(8, 10, 10)).astype(np.float32)
    table = _absmax_table(model, {"g": float(np.abs(x).max())})
    with caplog.at_level(logging.WARNING):
        q = quantize_model(model, table)
    assert int8_layers(q) == [] and "layer (outputs per group): g (8)" in caplog.text
    reference = _run(model, tmp_path, "fp32", x, int8=False)
    assert _cosine(_run(q, tmp_path, "kept", x, int8=True), reference) > 0.999

    forced = copy.deepcopy(model)
    _quantize_layer(forced.layers[1], table.weight_scales["g"], table.activation_scales["g"])
    param, binary = _save(forced, tmp_path, "forced")
    outputs = {}
    for packing in (True, False):
        net = ncnn.Net()
        net.opt.use_packing_layout = packing
        net.load_param(str(param))
        net.load_model(str(binary))
        ex = net.create_extractor()
        ex.input("data", ncnn.Mat(x).clone())
        outputs[packing] = np.array(ex.extract("out")[1], dtype=np.float64)
    assert _cosine(outputs[False], reference) > 0.999
    assert not np.all(np.isfinite(outputs[True])) or _cosine(outputs[True], reference) < 0.5


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nan_or_inf_weight_is_named_not_cast_to_an_int8(chain, bad):
    """NaN * scale has no int8 (numpy casts it to 0 with a warning; float2int8 is undefined): refuse the layer."""
    model, _ = chain
    table = _absmax_table(model, {"c1": 4.0})
    model = copy.deepcopy(model)
    layer = next(layer for layer in model.layers if layer.name == "c1")
    layer.weights[0].data[3] = bad
    with pytest.raises(ModelError, match="'c1'.*1 NaN or Inf"):
        quantize_model(model, table)


def test_table_must_fit_the_model(chain):
    model, _ = chain
    table = _absmax_table(model, {"dw": 4.0})
    table.weight_scales["dw"] = table.weight_scales["dw"][:8]
    with pytest.raises(ModelError, match="'dw'.*8 weight scales.*16 \\(group\\)"):
        quantize_model(model, table)
    already = quantize_model(model, _absmax_table(model, {"c1": 4.0}))
    with pytest.raises(ModelError, match="c1"):
        quantize_model(already, _absmax_table(model, {"c1": 4.0}))


def test_quantize_cli_writes_a_model_ncnn_runs(chain, tmp_path):
    model, x = chain
    param, binary = _save(model, tmp_path, "fp32")
    table_path = tmp_path / "t.table"
    from int8conv.tables.ncnn_table import write_ncnn_table

    write_ncnn_table(_calibrated(model, x, tmp_path), table_path)
    out_param, out_bin = tmp_path / "q.param", tmp_path / "q.bin"

    def quantize(table) -> int:
        files = ["--param", param, "--bin", binary, "--table", table, "--out-param", out_param, "--out-bin", out_bin]
        return cli(["-q", "quantize", *map(str, files)])

    assert quantize(table_path) == 0
    got = NcnnRunner(out_param, out_bin, int8=True).run({"data": x})["out"]
    assert _cosine(got, NcnnRunner(param, binary, int8=False).run({"data": x})["out"]) > 0.995
    assert quantize(tmp_path / "nope") == 2


# ------------------------------------------------------------------------------------------------ Winograd


def _winograd_case(channels: int, signed: bool, levels: int, winograd: bool, tmp_path) -> float:
    """Cosine INT8/FP32 of a 3x3 stride-1 conv whose weights all share the sign pattern of its input."""
    rng = np.random.default_rng(0)
    signs = np.sign(rng.normal(size=(channels, 3, 3)))
    weight = (np.abs(rng.normal(size=(16, channels, 3, 3))) * signs).astype(np.float32)
    pattern = signs if signed else (signs > 0).astype(np.float32)
    x = (np.tile(pattern, (1, 8, 8)) * 5.0).astype(np.float32)
    model = NcnnModel([_input(channels, 24, 24), _conv("c", "data", "out", weight, np.zeros(16))])
    reference = _run(model, tmp_path, "fp32", x, int8=False)
    q = quantize_model(model, _absmax_table(model, {"c": 5.0}, levels=levels), fp16_storage=False)
    param, binary = _save(q, tmp_path, "int8")
    net = ncnn.Net()
    net.opt.num_threads = 1
    net.opt.use_winograd_convolution = winograd
    net.load_param(str(param))
    net.load_model(str(binary))
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(x).clone())
    return _cosine(np.array(ex.extract("out")[1]), reference)


def test_int8_winograd_overflow_with_8bit_weights(tmp_path):
    """Why ncnn2table uses 6-bit (31/absmax) scales for 3x3 stride-1 convolutions, measured on the runtime.

    ncnn's x86 INT8 Winograd F(4,3) computes 576 x the int32 sum of int8 products (its weights are scaled by 24
    in each direction), which must fit in int32 (``weight_scales.winograd_levels``). Fed inputs that align with
    the weights over 128 channels,
    8-bit weights overflow (cosine -0.66 to -0.98 against FP32 over six seeds) while the same INT8 model without
    Winograd, and 6-bit weights with it, stay exact. Non-negative (post-ReLU) inputs need 512 channels to overflow (not
    run here); ordinary activations never did (see the report's real-model numbers).
    """
    assert _winograd_case(128, signed=True, levels=127, winograd=True, tmp_path=tmp_path) < 0.5
    assert _winograd_case(128, signed=True, levels=127, winograd=False, tmp_path=tmp_path) > 0.9999
    assert _winograd_case(128, signed=True, levels=31, winograd=True, tmp_path=tmp_path) > 0.999
    assert _winograd_case(128, signed=False, levels=127, winograd=True, tmp_path=tmp_path) > 0.9999


def winograd_worst_case(channels: int, levels: int, tmp_path) -> tuple:
    """A 3x3 stride-1 convolution on its worst case: every int8 input 127 and every int8 weight ``levels``, so
    each output is channels x 9 x 127 x levels (576 times that inside ncnn's INT8 Winograd kernel).

    Returns the INT8 model's files, the input and the FP32 model's output.
    """
    weight = np.ones((16, channels, 3, 3), np.float32)
    x = np.ones((channels, 12, 12), np.float32)
    x[:, 0, 0] = 0.5  # one window off the worst case, so that the outputs are not all equal
    model = NcnnModel([_input(channels, 12, 12), _conv("c", "data", "out", weight, np.zeros(16), pad=0)])
    reference = _run(model, tmp_path, "fp32", x, int8=False)
    q = quantize_model(model, _absmax_table(model, {"c": 1.0}, levels=levels), fp16_storage=False)
    return (*_save(q, tmp_path, f"int8-{channels}-{levels}"), x, reference)


def _worst_case_cosine(channels: int, levels: int, tmp_path) -> float:
    param, binary, x, reference = winograd_worst_case(channels, levels, tmp_path)
    return _cosine(NcnnRunner(param, binary, int8=True).extract({"data": x}, ["out"])["out"], reference)


def test_winograd_weight_levels_are_the_most_that_cannot_overflow(tmp_path):
    """``weight_scales.winograd_levels`` is the runtime's bound, not a guess: on the worst-case input, one level
    above it overflows (26 channels at 8-bit: 26 x 9 x 127 x 127 x 576 > 2^31), and the bound stays exact."""
    assert [winograd_levels(c) for c in (25, 26, 64, 105, 512)] == [127, 125, 50, 31, 31]
    assert _worst_case_cosine(26, 127, tmp_path) < 0.5
    for channels in (26, 64, 105):
        levels = winograd_levels(channels)
        assert _worst_case_cosine(channels, levels, tmp_path) > 0.9999
        assert _worst_case_cosine(channels, levels + 1, tmp_path) < 0.5


# ------------------------------------------------------------------------------------------------ tables that do little


def _two_convs(rng) -> NcnnModel:
    return NcnnModel(
        [
            _input(3, 8, 8),
            _conv("c1", "data", "a", rng.normal(size=(4, 3, 3, 3)), np.zeros(4)),
            _conv("c2", "a", "out", rng.normal(size=(4, 4, 3, 3)), np.zeros(4)),
        ]
    )


def test_a_table_that_covers_no_layer_is_refused():
    model = _two_convs(np.random.default_rng(5))
    with pytest.raises(ModelError, match="the table quantizes no layer of this model"):
        quantize_model(model, CalibrationTable())
    foreign = CalibrationTable({"other_conv": np.ones(4, np.float32)}, {"other_conv": 1.0})
    with pytest.raises(ModelError, match=r"1 weight and 1 activation line\(s\)"):
        quantize_model(model, foreign)


def test_missing_activation_lines_and_dead_scales_on_live_channels_warn_per_layer(caplog):
    model = _two_convs(np.random.default_rng(6))
    table = _absmax_table(model, {"c1": 1.0, "c2": 1.0})
    del table.activation_scales["c2"]
    table.weight_scales["c1"][2] = 0.0  # channel 2 of c1 has weights
    with caplog.at_level(logging.WARNING):
        q = quantize_model(model, table)
    assert int8_layers(q) == ["c1"]
    assert "layer 'c2' (Convolution) has a weight line but no activation line" in caplog.text
    assert "layer 'c1' (Convolution): weight scale 0 on 1 channel(s) that have weights (e.g. channel 2)" in caplog.text


def test_dead_scales_on_negligible_weights_do_not_warn(caplog):
    """Channels whose weights are negligible (the lane net's BatchNorm-folded 1e-36) are dead by the weight-scale
    rule: their scale 0 is what calibrate writes, and quantizing with it says nothing."""
    model = _two_convs(np.random.default_rng(6))
    model.layer("c1").weights[0].data.reshape(4, -1)[2] = 1e-36
    table = _absmax_table(model, {"c1": 1.0, "c2": 1.0})
    table.weight_scales["c1"][2] = 0.0
    with caplog.at_level(logging.WARNING):
        quantize_model(model, table)
    assert "weight scale 0" not in caplog.text


def test_layers_kept_fp32_on_purpose_do_not_warn(caplog):
    from int8conv.evaluation.mixed_precision import without_activations

    model = _two_convs(np.random.default_rng(7))
    table = without_activations(_absmax_table(model, {"c1": 1.0, "c2": 1.0}), ["c2"])
    with caplog.at_level(logging.WARNING):
        assert int8_layers(quantize_model(model, table)) == ["c1"]
    assert "c2" not in caplog.text
    with caplog.at_level(logging.WARNING):  # every layer FP32 on purpose: the FP32 model, not an error
        assert int8_layers(quantize_model(model, without_activations(table, ["c1"]))) == []
