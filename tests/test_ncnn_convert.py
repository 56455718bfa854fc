"""Caffe -> ncnn FP32: the written .param/.bin run on the ncnn runtime and give OpenCV's Caffe outputs.

Every comparison loads the produced files with ``ncnn.Net`` and checks numbers against OpenCV's forward of the
same Caffe files; nothing here compares only text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.graph import Graph, load_graph
from int8conv.calibration.preprocess import read_image
from int8conv.engines.opencv_engine import OpenCVEngine
from int8conv.errors import ModelError
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import NcnnBlob, NcnnLayer, NcnnModel, ParamValue, format_float, read_model, write_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.zoo import MODELS as SHARED_MODELS
from int8conv.zoo import SharedModel, model_input
from tests.synthetic import LSTM_NET, lstm_weights, write_caffe_model

RNG = np.random.default_rng(7)
TOLERANCE = 1e-3


def relative_difference(reference: np.ndarray, value: np.ndarray) -> float:
    """max |a - b| / max |a|: the converter's error relative to the output's range."""
    reference = np.asarray(reference, np.float64).reshape(-1)
    value = np.asarray(value, np.float64).reshape(-1)
    assert reference.size == value.size, f"{reference.size} values against {value.size}"
    return float(np.abs(reference - value).max() / max(np.abs(reference).max(), 1e-12))


def convert_to_files(graph: Graph, directory: Path, stem: str) -> NcnnRunner:
    """Convert, write, and load the files with the ncnn runtime (FP32: no fp16/bf16, no int8)."""
    model = convert_graph(graph)
    param, binary = directory / f"{stem}.param", directory / f"{stem}.bin"
    write_model(model, param, binary)
    return NcnnRunner(param, binary, int8=False)


def compare_with_opencv(proto: Path, caffemodel: Path, inputs: list[np.ndarray], tmp: Path) -> dict[str, float]:
    """Max relative difference per graph output, ncnn FP32 against OpenCV, over ``inputs`` (CHW each)."""
    graph = load_graph(proto, caffemodel)
    runner = convert_to_files(graph, tmp, proto.stem)
    engine = OpenCVEngine(graph, proto, caffemodel)
    name = next(iter(graph.inputs))
    worst: dict[str, float] = {}
    for x in inputs:
        expected = engine.forward(x[None], graph.outputs)
        got = runner.run({name: x})
        for value in graph.outputs:
            worst[value] = max(worst.get(value, 0.0), relative_difference(expected[value][0], got[value]))
    return worst


# --------------------------------------------------------------------------------------------------- file format


def _conv_model(
    input_params: dict[int, ParamValue], params: dict[int, ParamValue], blobs: list[NcnnBlob], *after: NcnnLayer
) -> NcnnModel:
    """Input "data" -> Convolution "conv" (``params``, ``blobs``) -> ``after``: a hand-made model to write and read."""
    conv = NcnnLayer("Convolution", "conv", ["data"], ["conv"], params, blobs)
    return NcnnModel([NcnnLayer("Input", "data", [], ["data"], input_params), conv, *after])


def test_write_read_round_trip_and_ncnn_loads(tmp_path):
    """Params of every kind and blobs of every storage survive write/read, and ncnn computes with them."""
    weight = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    bias = RNG.normal(size=4).astype(np.float32)
    model = _conv_model(
        {0: 7, 1: 6, 2: 3},
        {0: 4, 1: 3, 4: 1, 5: 1, 6: weight.size, 9: 2, 10: [1 / 3]},
        [NcnnBlob(weight.astype(np.float16)), NcnnBlob(bias, tagged=False)],
        NcnnLayer("Clip", "clip", ["conv"], ["clip"], {0: -0.123456789, 1: 2.5e-7}),
    )
    write_model(model, tmp_path / "m.param", tmp_path / "m.bin")
    back = read_model(tmp_path / "m.param", tmp_path / "m.bin")
    conv = back.layer("conv")
    assert conv.params == {0: 4, 1: 3, 4: 1, 5: 1, 6: 108, 9: 2, 10: [float(np.float32(1 / 3))]}
    assert back.layer("clip").params == {0: float(np.float32(-0.123456789)), 1: float(np.float32(2.5e-7))}
    assert conv.weights[0].data.dtype == np.float16 and conv.weights[0].tagged
    np.testing.assert_array_equal(conv.weights[0].data, weight.astype(np.float16).reshape(-1))
    np.testing.assert_array_equal(conv.weights[1].data, bias)
    assert back.input_names == ["data"] and back.output_names == ["clip"]

    x = RNG.normal(size=(3, 6, 7)).astype(np.float32)
    out = NcnnRunner(tmp_path / "m.param", tmp_path / "m.bin", int8=False).run({"data": x})["clip"]
    w16 = weight.astype(np.float16).astype(np.float64)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    ref = np.stack(
        [
            sum(
                np.einsum("chw,c->hw", xp[:, i : i + 6, j : j + 7], w16[o, :, i, j]) for i in range(3) for j in range(3)
            )
            + bias[o]
            for o in range(4)
        ]
    )
    ref = np.clip(np.where(ref > 0, ref, ref / 3), np.float32(-0.123456789), np.float32(2.5e-7))
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_tiny_fp32_weights_are_written_as_zero_and_outputs_keep(tmp_path):
    """|w| < 1e-30 is written as +0 (as ncnnoptimize does: denormal products are slow on x86), tagged or raw."""
    weight = RNG.normal(size=(2, 1, 1, 1)).astype(np.float32)
    weight[0] = np.float32(-6.7e-38)
    bias = np.array([3e-31, 1e-30], np.float32)  # below and at the limit
    model = _conv_model({0: 2, 1: 2, 2: 1}, {0: 2, 1: 1, 5: 1, 6: 2}, [NcnnBlob(weight), NcnnBlob(bias, tagged=False)])
    write_model(model, tmp_path / "m.param", tmp_path / "m.bin")
    back = read_model(tmp_path / "m.param", tmp_path / "m.bin").layer("conv")
    np.testing.assert_array_equal(back.weights[0].data, [0.0, weight[1, 0, 0, 0]])
    assert not np.signbit(back.weights[0].data[0])
    np.testing.assert_array_equal(back.weights[1].data, [0.0, np.float32(1e-30)])
    x = RNG.normal(size=(1, 2, 2)).astype(np.float32)
    out = NcnnRunner(tmp_path / "m.param", tmp_path / "m.bin", int8=False).run({"data": x})["conv"]
    reference = np.stack([x[0] * w + b for w, b in zip(weight.ravel(), bias, strict=True)])
    np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-29)  # what is flushed changes < 1e-30
    assert model.layer("conv").weights[0].data[0, 0, 0, 0] == np.float32(-6.7e-38)  # the model itself is unchanged


def test_int8_blobs_round_trip(tmp_path):
    """An int8 weight array keeps its tag and padding; trailing scales stay raw fp32."""
    weight = RNG.integers(-127, 128, size=2 * 3 * 1 * 1).astype(np.int8)  # 6 bytes: padded to 8
    scales = [NcnnBlob(np.array([50.0, 60.0], np.float32), False), NcnnBlob(np.array([10.0], np.float32), False)]
    model = _conv_model({0: 4, 1: 4, 2: 3}, {0: 2, 1: 1, 5: 0, 6: 6, 8: 2}, [NcnnBlob(weight), *scales])
    write_model(model, tmp_path / "q.param", tmp_path / "q.bin")
    assert (tmp_path / "q.bin").stat().st_size == 4 + 8 + 8 + 4
    back = read_model(tmp_path / "q.param", tmp_path / "q.bin")
    np.testing.assert_array_equal(back.layer("conv").weights[0].data, weight)
    assert [b.tagged for b in back.layer("conv").weights] == [True, False, False]


def test_format_float_is_exact_and_short():
    """Every float32 comes back bit-exact through ncnn's 15-character, 9-decimal parser limits."""
    values = np.concatenate(
        [
            RNG.normal(size=200) * 10.0 ** RNG.integers(-30, 30, size=200),
            [0.1, -233.0, 1e-10, 6.0, np.finfo(np.float32).max],
        ]
    ).astype(np.float32)
    for v in values:
        text = format_float(float(v))
        assert len(text) <= 15 and ("." in text or "e" in text) and len(text.partition(".")[2].split("e")[0]) <= 9
        assert np.float32(float(text)) == v
    with pytest.raises(ModelError, match="not finite"):
        format_float(float("nan"))


def test_bin_mismatches_are_errors(tmp_path):
    model = NcnnModel(
        [
            NcnnLayer("Input", "data", [], ["data"], {0: 4, 1: 4, 2: 2}),
            NcnnLayer("Scale", "sc", ["data"], ["sc"], {0: 2, 1: 1}, [NcnnBlob(np.ones(2, np.float32), False)]),
        ]
    )
    with pytest.raises(ModelError, match="'sc'.*do not match"):
        write_model(model, tmp_path / "s.param", tmp_path / "s.bin")
    model.layers[1].weights.append(NcnnBlob(np.zeros(2, np.float32), False))
    write_model(model, tmp_path / "s.param", tmp_path / "s.bin")
    (tmp_path / "s.bin").write_bytes((tmp_path / "s.bin").read_bytes() + b"\0" * 4)
    with pytest.raises(ModelError, match="4 bytes left"):
        read_model(tmp_path / "s.param", tmp_path / "s.bin")
    (tmp_path / "s.bin").write_bytes(b"\0" * 12)
    with pytest.raises(ModelError, match="ends inside the weights of layer 'sc'"):
        read_model(tmp_path / "s.param", tmp_path / "s.bin")
    (tmp_path / "bad.param").write_text("7767517\n1 1\nInput data 0 1 data 0=x\n")
    with pytest.raises(ModelError, match=r"bad.param:3: cannot parse"):
        read_model(tmp_path / "bad.param", tmp_path / "s.bin")


# --------------------------------------------------------------------------------------------------- synthetic nets


def _w(*shape: int, low: float | None = None) -> np.ndarray:
    if low is not None:
        return RNG.uniform(low, 2.0, size=shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


CONV_NET = """
name: "convs"
input: "data"
input_dim: 1 input_dim: 4 input_dim: 13 input_dim: 11
layer { name: "asym" type: "Convolution" bottom: "data" top: "asym"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 5 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 2 } }
layer { name: "leaky" type: "ReLU" bottom: "asym" top: "asym" relu_param { negative_slope: 0.2 } }
layer { name: "dil" type: "Convolution" bottom: "asym" top: "dil"
  convolution_param { num_output: 8 kernel_size: 3 dilation: 2 pad: 2 } }
layer { name: "sig" type: "Sigmoid" bottom: "dil" top: "dil" }
layer { name: "dw" type: "Convolution" bottom: "dil" top: "dw"
  convolution_param { num_output: 8 group: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "six" type: "ReLU6" bottom: "dw" top: "dw" }
layer { name: "grp" type: "Convolution" bottom: "dw" top: "grp"
  convolution_param { num_output: 4 group: 2 kernel_size: 1 bias_term: false } }
layer { name: "tanh" type: "TanH" bottom: "grp" top: "grp" }
layer { name: "up" type: "Deconvolution" bottom: "grp" top: "up"
  convolution_param { num_output: 3 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "up_prelu" type: "PReLU" bottom: "up" top: "up" prelu_param { channel_shared: true } }
layer { name: "upg" type: "Deconvolution" bottom: "grp" top: "upg"
  convolution_param { num_output: 6 group: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "dw" top: "bn" }
layer { name: "bn_scale" type: "Scale" bottom: "bn" top: "bn" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "bn" top: "bn" }
layer { name: "fc" type: "InnerProduct" bottom: "bn" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "fc_relu" type: "ReLU" bottom: "fc" top: "fc" }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" dropout_param { dropout_ratio: 0.3 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc" top: "fc2" inner_product_param { num_output: 3 } }
"""


def conv_weights() -> dict[str, list[np.ndarray]]:
    return {
        "asym": [_w(6, 4, 3, 5), _w(6)],
        "dil": [_w(8, 6, 3, 3), _w(8)],
        "dw": [_w(8, 1, 3, 3), _w(8)],
        "grp": [_w(4, 4, 1, 1)],
        "up": [_w(4, 3, 4, 4), _w(3)],
        "upg": [_w(4, 3, 3, 2)],
        "bn": [_w(8), _w(8, low=0.5), np.array([2.0], np.float32)],
        "bn_scale": [_w(8), _w(8)],
        "prelu": [_w(8) * 0.3],
        "up_prelu": [np.array([0.25], np.float32)],
        "fc": [_w(5, 8 * 4 * 6), _w(5)],
        "fc2": [_w(3, 5), _w(3)],
    }


POOL_NET = """
name: "pools"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 15 dim: 14 } } }
layer { name: "ave_tail" type: "Pooling" bottom: "data" top: "ave_tail" pooling_param { pool: AVE kernel_size: 3
  stride: 2 } }
layer { name: "ave_pad_tail" type: "Pooling" bottom: "data" top: "ave_pad_tail"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ave_pad" type: "Pooling" bottom: "data" top: "ave_pad" pooling_param { pool: AVE kernel_size: 3
  stride: 1 pad: 1 } }
layer { name: "ave_clip" type: "Pooling" bottom: "data" top: "ave_clip" pooling_param { pool: AVE kernel_size: 2
  stride: 2 pad: 1 } }
layer { name: "max_clip" type: "Pooling" bottom: "data" top: "max_clip" pooling_param { pool: MAX kernel_size: 2
  stride: 2 pad: 1 } }
layer { name: "max_asym" type: "Pooling" bottom: "data" top: "max_asym"
  pooling_param { pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 } }
layer { name: "ave_global" type: "Pooling" bottom: "data" top: "ave_global" pooling_param { pool: AVE
  global_pooling: true } }
layer { name: "max_global" type: "Pooling" bottom: "data" top: "max_global" pooling_param { pool: MAX
  global_pooling: true } }
layer { name: "squeeze" type: "Convolution" bottom: "ave_global" top: "squeeze" convolution_param { num_output: 2
  kernel_size: 1 } }
layer { name: "squeeze_relu" type: "ReLU" bottom: "squeeze" top: "squeeze" }
layer { name: "excite" type: "Convolution" bottom: "squeeze" top: "excite" convolution_param { num_output: 3
  kernel_size: 1 } }
layer { name: "excite_sigmoid" type: "Sigmoid" bottom: "excite" top: "excite" }
"""


def pool_weights() -> dict[str, list[np.ndarray]]:
    return {"squeeze": [_w(2, 3, 1, 1), _w(2)], "excite": [_w(3, 2, 1, 1), _w(3)]}


MIX_NET = """
name: "mix"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 dim: 8 dim: 7 } } }
layer { name: "parts" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" slice_param { slice_point: 1
  slice_point: 3 } }
layer { name: "halves" type: "Slice" bottom: "data" top: "h1" top: "h2" slice_param { axis: 2 } }
layer { name: "prod" type: "Eltwise" bottom: "h1" bottom: "h2" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "h1" bottom: "h2" bottom: "h1" top: "max" eltwise_param { operation: MAX } }
layer { name: "wsum" type: "Eltwise" bottom: "prod" bottom: "max" top: "wsum" eltwise_param { coeff: 0.5 coeff: -1.5 } }
layer { name: "cat_c" type: "Concat" bottom: "c" bottom: "a" bottom: "b" top: "cat_c" }
layer { name: "cat_h" type: "Concat" bottom: "wsum" bottom: "prod" top: "cat_h" concat_param { axis: 2 } }
layer { name: "lrn_across" type: "LRN" bottom: "cat_c" top: "lrn_across"
  lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 } }
layer { name: "lrn_within" type: "LRN" bottom: "cat_h" top: "lrn_within"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.6 norm_region: WITHIN_CHANNEL } }
layer { name: "scale" type: "Scale" bottom: "lrn_within" top: "scaled" scale_param { bias_term: true } }
layer { name: "scalar" type: "Scale" bottom: "scaled" top: "scaled" scale_param { num_axes: 0 } }
layer { name: "softmax" type: "Softmax" bottom: "scaled" top: "softmax" }
layer { name: "norm" type: "Normalize" bottom: "lrn_across" top: "norm"
  norm_param { across_spatial: false channel_shared: false } }
layer { name: "norm_all" type: "Normalize" bottom: "lrn_across" top: "norm_all" norm_param { across_spatial: true } }
layer { name: "perm" type: "Permute" bottom: "norm" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "flat" type: "Flatten" bottom: "perm" top: "flat" }
layer { name: "shape" type: "Reshape" bottom: "norm_all" top: "shape" reshape_param { shape { dim: 0 dim: -1 dim: 14
  } } }
layer { name: "soft2" type: "Softmax" bottom: "shape" top: "soft2" softmax_param { axis: 2 } }
layer { name: "perm2" type: "Permute" bottom: "soft2" top: "perm2" permute_param { order: 0 order: 2 order: 1 } }
"""


def mix_weights() -> dict[str, list[np.ndarray]]:
    return {
        "scale": [_w(6), _w(6)],
        "scalar": [np.array([1.7], np.float32)],
        "norm": [_w(6, low=0.5)],
        "norm_all": [np.array([3.0], np.float32)],
    }


SYNTHETIC = {
    "convs": (CONV_NET, conv_weights, (4, 13, 11)),
    "pools": (POOL_NET, pool_weights, (3, 15, 14)),
    "mix": (MIX_NET, mix_weights, (6, 8, 7)),
}


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_layers_match_opencv(name, tmp_path):
    """Each layer kind the shared models lack, converted and run by ncnn, equals OpenCV's Caffe forward."""
    text, weights, shape = SYNTHETIC[name]
    proto, caffemodel = write_caffe_model(tmp_path, text, weights(), name=name)
    inputs = [RNG.normal(size=shape).astype(np.float32) * 2 for _ in range(2)]
    worst = compare_with_opencv(proto, caffemodel, inputs, tmp_path)
    assert worst and all(d < TOLERANCE for d in worst.values()), worst


def test_caffe_semantics_that_opencv_lacks(tmp_path):
    """Against numpy, where OpenCV departs from Caffe: LRN adds ``k`` across channels and 1 within a channel
    (OpenCV always adds 1), and Dropout with ``scale_train: false`` scales by 1 - ratio at test time."""
    text = """
    layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 dim: 5 dim: 4 } } }
    layer { name: "across" type: "LRN" bottom: "data" top: "across" lrn_param { local_size: 5 alpha: 0.3 k: 2 } }
    layer { name: "within" type: "LRN" bottom: "data" top: "within"
      lrn_param { local_size: 3 alpha: 0.4 beta: 0.6 k: 3 norm_region: WITHIN_CHANNEL } }
    layer { name: "drop" type: "Dropout" bottom: "data" top: "drop" dropout_param { dropout_ratio: 0.25 scale_train:
      false } }
    """
    proto, caffemodel = write_caffe_model(tmp_path, text, {}, name="lrn")
    runner = convert_to_files(load_graph(proto, caffemodel), tmp_path, "lrn")
    x = RNG.normal(size=(6, 5, 4))
    got = runner.run({"data": x.astype(np.float32)})
    sq = np.pad(x**2, ((2, 2), (0, 0), (0, 0)))
    across = x * (2 + 0.3 / 5 * sum(sq[i : i + 6] for i in range(5))) ** -0.75
    sq = np.pad(x**2, ((0, 0), (1, 1), (1, 1)))
    within = x * (1 + 0.4 / 9 * sum(sq[:, i : i + 5, j : j + 4] for i in range(3) for j in range(3))) ** -0.6
    assert relative_difference(across, got["across"]) < 1e-5
    assert relative_difference(within, got["within"]) < 1e-5
    assert relative_difference(x * 0.75, got["drop"]) < 1e-6


def test_conversion_folds_and_fuses(tmp_path):
    """BatchNorm/Scale fold into convolutions, activations fuse, Dropout and Caffe Splits vanish, names stay."""
    proto, caffemodel = write_caffe_model(tmp_path, CONV_NET, conv_weights(), name="convs")
    model = convert_graph(load_graph(proto, caffemodel))
    types = {layer.name: layer.type for layer in model.layers}
    assert types["asym"] == "Convolution" and model.layer("asym").params[9] == 2
    assert model.layer("asym").params[10] == [float(np.float32(0.2))]
    assert model.layer("dil").params[9] == 4 and model.layer("dw").params[9] == 3
    assert types["dw"] == "ConvolutionDepthWise" and model.layer("dw").params[7] == 8
    assert types["grp"] == "ConvolutionDepthWise" and types["upg"] == "DeconvolutionDepthWise"
    assert types["fc"] == "InnerProduct" and model.layer("fc").params[9] == 1
    assert types["up"] == "Deconvolution" and model.layer("up").params[9] == 2 and "up_prelu" not in types
    assert types["prelu"] == "PReLU"
    assert "drop" not in types and "leaky" not in types and "bn_scale" not in types and "tanh" in types
    assert model.layer("bn").type == "BatchNorm" and model.layer("fc").tops == ["fc_drop"]
    assert model.layer("asym").tops == ["asym_leaky"]
    assert model.input_names == ["data"] and types["data"] == "Input"
    split = model.producer("grp_tanh_splitncnn_0")
    assert split.type == "Split" and split.tops == ["grp_tanh_splitncnn_0", "grp_tanh_splitncnn_1"]
    assert model.layer("up").bottoms == ["grp_tanh_splitncnn_1"]  # caffe2ncnn: the first reader gets the last

    proto, caffemodel = write_caffe_model(tmp_path, POOL_NET, pool_weights(), name="pools")
    model = convert_graph(load_graph(proto, caffemodel))
    assert model.layer("squeeze").type == "InnerProduct" and model.layer("excite").params[9] == 4
    assert model.layer("ave_pad_tail_pad").type == "Padding" and model.layer("ave_pad").params[6] == 1
    assert model.layer("max_clip").params[5] == 1 and "max_clip_pad" not in {layer.name for layer in model.layers}


def test_unsupported_layer_names_layer_and_type(tmp_path):
    text = """
    input: "data" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 4
    layer { name: "odd" type: "Tile" bottom: "data" top: "odd" }
    """
    proto, caffemodel = write_caffe_model(tmp_path, text, {}, name="odd")
    with pytest.raises(ModelError, match="layer 'odd' has type 'Tile'"):
        convert_graph(load_graph(proto, caffemodel))


def test_declined_layer_names_the_reason(tmp_path):
    proto, caffemodel = write_caffe_model(tmp_path, LSTM_NET, {"rnn": lstm_weights()}, name="rnn")
    with pytest.raises(
        ModelError, match="layer 'rnn' has type 'LSTM', which the ncnn converter does not support: Caffe's LSTM steps"
    ):
        convert_graph(load_graph(proto, caffemodel))


def test_unsupported_settings_are_errors(tmp_path):
    text = """
    input: "data" input_dim: 1 input_dim: 2 input_dim: 4 input_dim: 4
    layer { name: "perm" type: "Permute" bottom: "data" top: "perm" permute_param { order: 1 order: 0 } }
    """
    proto, caffemodel = write_caffe_model(tmp_path, text, {}, name="perm")
    with pytest.raises(ModelError, match=r"layer 'perm' \(Permute\): order \(1, 0, 2, 3\)"):
        convert_graph(load_graph(proto, caffemodel))


# --------------------------------------------------------------------------------------------------- real models


@dataclass(frozen=True)
class RealModel:
    model: SharedModel
    images: tuple[str, ...]


FACES = ("faces/bobmtcnn_multiple-faces.jpg", "faces/dlib_2008_001322.jpg")


def _real(model: SharedModel, images: tuple[str, ...] = FACES) -> RealModel:
    return RealModel(model, images)


REAL = {
    "lenet": _real(SHARED_MODELS["lenet"], ("opencv_samples/digits.png", "faces/libfacedetection_test.jpg")),
    "det1": _real(SHARED_MODELS["det1"]),
    # P-Net is fully convolutional: the converted model must also run at sizes other than the prototxt's
    "det1_97x130": _real(SHARED_MODELS["det1"].with_size(97, 130)),
    "det2": _real(SHARED_MODELS["det2"]),
    "det3": _real(SHARED_MODELS["det3"]),
    "det4": _real(SHARED_MODELS["det4"]),
    "open_nsfw": _real(SHARED_MODELS["open_nsfw"], ("voc_coco_detection/caffe_cat.jpg", "skimage/coffee.png")),
    "res10_ssd": _real(SHARED_MODELS["res10"]),
    "ultraface": _real(SHARED_MODELS["ultraface"]),
    "yufacedetectnet": _real(SHARED_MODELS["yufacedetectnet"]),
}


def real_inputs(shared: Path, spec: RealModel, channels: int) -> list[np.ndarray]:
    """Two preprocessed real images (det4: five RGB crops of each)."""
    images = [read_image(shared / "images" / name) for name in spec.images]
    assert all(image is not None for image in images), spec.images
    return [model_input(spec.model.prep, image, channels) for image in images]


@pytest.fixture(scope="session")
def real_runs(shared, tmp_path_factory):
    """Each real model converted once, with its OpenCV and ncnn outputs on two real images."""
    directory = tmp_path_factory.mktemp("ncnn_real")
    runs = {}
    for key, spec in REAL.items():
        proto, caffemodel = spec.model.paths(shared)
        graph = load_graph(proto, caffemodel)
        runner = convert_to_files(graph, directory, key)
        engine = OpenCVEngine(graph, proto, caffemodel)
        name, shape = next(iter(graph.inputs.items()))
        pairs = []
        for x in real_inputs(shared, spec, shape[1]):
            pairs.append((engine.forward(x[None], graph.outputs), runner.run({name: x})))
        runs[key] = (graph, pairs)
    return runs


def detections(opencv_out: np.ndarray, ncnn_out: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows [label, score, x1, y1, x2, y2] above ``threshold``, best first, from OpenCV's Nx7 and ncnn's Nx6."""
    cv = np.asarray(opencv_out).reshape(-1, 7)[:, 1:]
    nc = np.asarray(ncnn_out).reshape(-1, 6)
    cv, nc = cv[cv[:, 1] > threshold], nc[nc[:, 1] > threshold]
    return cv[np.argsort(-cv[:, 1], kind="stable")], nc[np.argsort(-nc[:, 1], kind="stable")]


@pytest.mark.parametrize("key", list(REAL))
def test_real_model_ncnn_fp32_matches_opencv(key, real_runs):
    """ncnn FP32 equals OpenCV's Caffe forward: rel. difference < 1e-3, or identical detections for SSDs."""
    graph, pairs = real_runs[key]
    for expected, got in pairs:
        for value in graph.outputs:
            if graph.producer(value).type == "DetectionOutput":
                cv, nc = detections(expected[value][0], got[value], threshold=0.3)
                assert len(cv) > 0 and len(cv) == len(nc), (len(cv), len(nc))
                for row in cv:  # every OpenCV detection has an ncnn twin: same class, score and box within 1e-3
                    assert np.abs(nc - row).max(axis=1).min() < TOLERANCE, row
            else:
                assert relative_difference(expected[value][0], got[value]) < TOLERANCE, value


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_convert_writes_files_ncnn_runs(tmp_path, capsys):
    """``int8conv convert --out-dir`` writes <stem>.param/.bin that ncnn runs to OpenCV's numbers."""
    from int8conv.cli import main

    proto, caffemodel = write_caffe_model(tmp_path / "caffe", CONV_NET, conv_weights(), name="convs")
    assert main(["convert", "--proto", str(proto), "--model", str(caffemodel), "--out-dir", str(tmp_path)]) == 0
    assert "convs.param" in capsys.readouterr().out
    graph = load_graph(proto, caffemodel)
    runner = NcnnRunner(tmp_path / "convs.param", tmp_path / "convs.bin", int8=False)
    x = RNG.normal(size=(4, 13, 11)).astype(np.float32)
    expected = OpenCVEngine(graph, proto, caffemodel).forward(x[None], ["fc2"])["fc2"][0]
    assert relative_difference(expected, runner.run({"data": x})["fc2"]) < TOLERANCE
    assert main(["convert", "--proto", str(proto), "--model", str(caffemodel), "--param", str(tmp_path / "p")]) == 2
    assert "--param FILE and --bin FILE" in capsys.readouterr().err
