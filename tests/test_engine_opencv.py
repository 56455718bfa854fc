"""The OpenCV FP32 engine returns every value exactly as a numpy forward of the same synthetic net."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from int8conv.caffe.graph import load_graph
from int8conv.engines import make_engine
from int8conv.engines.caffe_engine import CaffeEngine
from int8conv.errors import BackendUnavailable, ModelError
from tests.synthetic import conv2d, max_pool, write_caffe_model

RNG = np.random.default_rng(1)

NET = """
name: "mix"
input: "data"
input_shape { dim: 2 dim: 4 dim: 11 dim: 11 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "dw" type: "Convolution" bottom: "conv1" top: "dw"
  convolution_param { num_output: 6 group: 6 kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "grp" type: "Convolution" bottom: "conv1" top: "grp"
  convolution_param { num_output: 6 group: 2 kernel_h: 1 kernel_w: 3 pad_h: 0 pad_w: 1 bias_term: false } }
layer { name: "sum" type: "Eltwise" bottom: "dw" bottom: "grp" top: "sum" eltwise_param { coeff: 1 coeff: -0.5 } }
layer { name: "cat" type: "Concat" bottom: "sum" bottom: "conv1" top: "cat" }
layer { name: "pool" type: "Pooling" bottom: "cat" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
"""


def weights() -> dict[str, list[np.ndarray]]:
    f = np.float32
    return {
        "conv1": [RNG.normal(size=(6, 4, 3, 3)).astype(f), RNG.normal(size=6).astype(f)],
        "bn1": [RNG.normal(size=6).astype(f), RNG.uniform(0.5, 2, size=6).astype(f), np.array([1.0], f)],
        "sc1": [RNG.uniform(0.5, 2, size=6).astype(f), RNG.normal(size=6).astype(f)],
        "dw": [RNG.normal(size=(6, 1, 3, 3)).astype(f), RNG.normal(size=6).astype(f)],
        "grp": [RNG.normal(size=(6, 3, 1, 3)).astype(f)],
        "ip": [RNG.normal(size=(5, 12 * 3 * 3)).astype(f), RNG.normal(size=5).astype(f)],
    }


def numpy_forward(x: np.ndarray, w: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    out = {"data": x}
    conv1 = conv2d(x, *w["conv1"], stride=(2, 2), pad=(1, 1))
    out["conv1"] = conv1
    mean, var, factor = w["bn1"]
    bn = (conv1 - (mean / factor[0])[None, :, None, None]) / np.sqrt(var / factor[0] + 1e-5)[None, :, None, None]
    out["conv1_bn1"] = bn
    sc = bn * w["sc1"][0][None, :, None, None] + w["sc1"][1][None, :, None, None]
    out["conv1_sc1"] = sc
    relu = np.where(sc > 0, sc, 0.1 * sc)
    out["conv1_relu1"] = relu
    out["dw"] = conv2d(relu, *w["dw"], pad=(2, 2), dilation=(2, 2), group=6)
    out["grp"] = conv2d(relu, w["grp"][0], None, pad=(0, 1), group=2)
    out["sum"] = out["dw"] - 0.5 * out["grp"]
    out["cat"] = np.concatenate([out["sum"], relu], axis=1)
    out["pool"] = max_pool(out["cat"], 3, 2)
    out["ip"] = out["pool"].reshape(2, -1) @ w["ip"][0].T + w["ip"][1]
    return out


@pytest.fixture(scope="module")
def mixed_net(tmp_path_factory):
    w = weights()
    proto, model = write_caffe_model(tmp_path_factory.mktemp("mix"), NET, w)
    return proto, model, w


def test_every_value_matches_numpy(mixed_net):
    proto, model, w = mixed_net
    graph = load_graph(proto, model)
    engine = make_engine("opencv", graph, proto, model)
    x = RNG.normal(size=(2, 4, 11, 11)).astype(np.float32)
    expected = numpy_forward(x, w)
    got = engine.forward(x, list(expected))
    for value, reference in expected.items():
        assert got[value].shape == reference.shape, value
        np.testing.assert_allclose(got[value], reference, rtol=1e-4, atol=1e-4, err_msg=value)
        assert graph.shapes.get(value, reference.shape)[1:] == reference.shape[1:], value


def test_final_value_is_what_pycaffe_shows(mixed_net):
    """pycaffe's net.blobs['conv1'] after forward() is the last in-place version (after ReLU)."""
    proto, model, w = mixed_net
    graph = load_graph(proto, model)
    x = RNG.normal(size=(2, 4, 11, 11)).astype(np.float32)
    value = graph.final_value("conv1")
    got = make_engine("opencv", graph, proto, model).forward(x, [value])[value]
    np.testing.assert_allclose(got, numpy_forward(x, w)["conv1_relu1"], rtol=1e-4, atol=1e-4)


def test_unknown_value_names_itself(mixed_net):
    proto, model, _ = mixed_net
    engine = make_engine("opencv", load_graph(proto, model), proto, model)
    with pytest.raises(ModelError, match="'nope'"):
        engine.forward(np.zeros((1, 4, 11, 11), np.float32), ["nope"])


def test_gpu_without_pycaffe_is_clear(mixed_net):
    proto, model, _ = mixed_net
    with pytest.raises(BackendUnavailable, match="pycaffe"):
        make_engine("opencv", load_graph(proto, model), proto, model, gpu=0)


def test_gpu_without_pycaffe_says_install_caffe_would_not_do(mixed_net, monkeypatch):
    """--gpu with no pycaffe: install-caffe's hint would build a CPU-only pycaffe, which --gpu refuses next; say so."""
    monkeypatch.setitem(sys.modules, "caffe", None)  # ``import caffe`` fails, wherever pycaffe is installed
    proto, model, _ = mixed_net
    with pytest.raises(BackendUnavailable, match="pycaffe is not importable") as refused:
        make_engine("caffe", load_graph(proto, model), proto, model, gpu=0, calibration=True)
    assert "does not build (CPU-only)" in str(refused.value) and "drop --gpu" in str(refused.value)
    with pytest.raises(BackendUnavailable, match="run `int8conv install-caffe` to build it"):
        make_engine("caffe", load_graph(proto, model), proto, model, calibration=True)


def test_gpu_with_a_cpu_only_pycaffe_names_the_device_not_a_flag_value(mixed_net, monkeypatch, tmp_path):
    """convert_tool.py --gpu 1 is GPU mode on device 0: the refusal must not read '--gpu 0', which the user did not
    type. A pycaffe without the CUDA runtime (a fake one here, so the test runs without pycaffe) is CPU-only."""
    fake = types.ModuleType("caffe")
    (tmp_path / "caffe").mkdir()
    fake.__file__ = str(tmp_path / "caffe" / "__init__.py")  # no _caffe*.so beside it: no CUDA
    monkeypatch.setitem(sys.modules, "caffe", fake)
    proto, model, _ = mixed_net
    with pytest.raises(BackendUnavailable, match=r"--gpu \(GPU device 0\): this pycaffe .* is built CPU-only"):
        CaffeEngine(load_graph(proto, model), proto, model, gpu=0)


SLICE_NET = """
name: "slices"
input: "data"
input_shape { dim: 1 dim: 6 dim: 5 dim: 5 }
layer { name: "cut" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" slice_param { slice_point: 2
  slice_point: 4 } }
layer { name: "ca" type: "Convolution" bottom: "a" top: "ca" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "cb" type: "Convolution" bottom: "b" top: "cb" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "cc" type: "Convolution" bottom: "c" top: "cc" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "cat" type: "Concat" bottom: "ca" bottom: "cb" bottom: "cc" top: "cat" }
"""


def test_every_output_of_a_multi_output_layer(tmp_path):
    """Asking for all values at once must not return reused memory for a Slice's later outputs."""
    f = np.float32
    w = {name: [RNG.normal(size=(2, 2, 1, 1)).astype(f), RNG.normal(size=2).astype(f)] for name in ("ca", "cb", "cc")}
    proto, model = write_caffe_model(tmp_path, SLICE_NET, w)
    graph = load_graph(proto, model)
    x = RNG.normal(size=(1, 6, 5, 5)).astype(np.float32)
    values = ["data"] + [t for layer in graph.layers for t in layer.tops]
    got = make_engine("opencv", graph, proto, model).forward(x, values)
    for i, name in enumerate("abc"):
        np.testing.assert_array_equal(got[name], x[:, 2 * i : 2 * i + 2])
        np.testing.assert_allclose(
            got["c" + name], conv2d(x[:, 2 * i : 2 * i + 2], *w["c" + name]), rtol=1e-5, atol=1e-5
        )


FORK_NET = """
name: "forks"
input: "data"
input_shape { dim: 2 dim: 4 dim: 3 dim: 5 }
layer { name: "dw" type: "DepthwiseConvolution" bottom: "data" top: "dw"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "pool" type: "Pooling" bottom: "dw" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gate" type: "Sigmoid" bottom: "pool" top: "gate" }
layer { name: "se" type: "Scale" bottom: "dw" bottom: "gate" top: "se" scale_param { axis: 0 } }
layer { name: "up" type: "Upsample" bottom: "se" top: "up" }
"""


def test_fork_layers_match_numpy(tmp_path):
    """DepthwiseConvolution without ``group`` (one filter per channel), a two-bottom Scale (SE gate) and the nearest
    Upsample of Caffe forks.
    The project's schema may not know ``upsample_param`` yet, so Upsample runs with its default scale here; the
    real models (test_fork_models.py) check scale 2 against pycaffe."""
    w = [RNG.normal(size=(4, 1, 3, 3)).astype(np.float32), RNG.normal(size=4).astype(np.float32)]
    proto, model = write_caffe_model(tmp_path, FORK_NET, {"dw": w})
    graph = load_graph(proto, model)
    x = RNG.normal(size=(2, 4, 3, 5)).astype(np.float32)
    got = make_engine("opencv", graph, proto, model).forward(x, ["dw", "se", "up"])
    dw = conv2d(x, *w, pad=(1, 1), group=4)
    gate = 1 / (1 + np.exp(-dw.mean(axis=(2, 3), keepdims=True)))
    np.testing.assert_allclose(got["dw"], dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["se"], gate * dw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["up"], got["se"], rtol=0, atol=0)


def test_upsample_with_two_bottoms_is_refused(tmp_path):
    net = FORK_NET.replace('bottom: "se" top: "up"', 'bottom: "se" bottom: "data" top: "up"')
    w = [RNG.normal(size=(4, 1, 3, 3)).astype(np.float32), RNG.normal(size=4).astype(np.float32)]
    proto, model = write_caffe_model(tmp_path, net, {"dw": w})
    with pytest.raises(ModelError, match="layer 'up' \\(Upsample\\) has 2 bottoms"):
        make_engine("opencv", load_graph(proto, model), proto, model)


def test_upsample_layer_is_caffe_forks_nearest_neighbour():
    """out[h, w] = in[h // scale, w // scale], as brocolli-caffe's upsample_layer.cpp loops over it."""
    from int8conv.engines.opencv_engine import UpsampleLayer

    x = RNG.normal(size=(2, 3, 4, 5)).astype(np.float32)
    layer = UpsampleLayer({"scale": "3"}, [])
    assert layer.getMemoryShapes([[2, 3, 4, 5]]) == [[2, 3, 12, 15]]
    rows, cols = np.meshgrid(np.arange(12) // 3, np.arange(15) // 3, indexing="ij")
    np.testing.assert_array_equal(layer.forward([x])[0], x[:, :, rows, cols])
    with pytest.raises(ValueError, match="scale"):
        UpsampleLayer({"scale": "0"}, [])


def test_a_non_finite_opencv_forward_is_run_again_once(mixed_net, caplog):
    """OpenCV now and then returns a few NaN on a forward that requests every layer (the ShuffleNet, measured);
    the engine runs that forward once more on a freshly loaded net, and a value that stays non-finite is returned
    as it is."""
    import logging

    proto, model, _ = mixed_net
    engine = make_engine("opencv", load_graph(proto, model), proto, model)
    x = RNG.normal(size=(2, 4, 11, 11)).astype(np.float32)
    expected = engine.forward(x, ["conv1", "ip"])
    read, calls = engine._read_net, []

    def poisoning(poison):
        def read_net():
            net = read()
            real = net.forwardAndRetrieve

            def forward_and_retrieve(layers):
                calls.append(1)
                outputs = real(layers)
                return _poisoned(outputs) if poison(len(calls)) else outputs

            return _Wrapped(net, forward_and_retrieve)

        return read_net

    engine._read_net, engine._net = poisoning(lambda call: call == 1), None
    with caplog.at_level(logging.WARNING):
        got = engine.forward(x, ["conv1", "ip"])
    assert len(calls) == 2 and "non-finite values for layer 'conv1'" in caplog.text
    for value in expected:
        np.testing.assert_array_equal(got[value], expected[value])
    calls.clear()
    engine._read_net, engine._net = poisoning(lambda call: True), None
    assert np.isnan(engine.forward(x, ["conv1"])["conv1"]).any() and len(calls) == 2


class _Wrapped:
    """A cv2.dnn.Net whose forwardAndRetrieve is replaced."""

    def __init__(self, net, forward_and_retrieve) -> None:
        self._net, self.forwardAndRetrieve = net, forward_and_retrieve

    def __getattr__(self, name):
        return getattr(self._net, name)


def _poisoned(outputs):
    """The outputs with one NaN in the first layer's first blob."""
    first = np.array(outputs[0][0])
    first.flat[0] = np.nan
    return [[first, *outputs[0][1:]], *outputs[1:]]


def test_a_convolution_named_apart_from_its_top_is_read(tmp_path):
    """OpenCV 4.14 names a Convolution after its top: layer 'c1' with top 'a' is 'a' there, yet its value is read."""
    rng = np.random.default_rng(4)
    text = (
        'input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }\n'
        'layer { name: "c1" type: "Convolution" bottom: "data" top: "a" '
        "convolution_param { num_output: 2 kernel_size: 3 } }\n"
        'layer { name: "r" type: "ReLU" bottom: "a" top: "b" }\n'
    )
    w, b = rng.normal(size=(2, 3, 3, 3)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    proto, model = write_caffe_model(tmp_path, text, {"c1": [w, b]})
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    got = make_engine("opencv", load_graph(proto, model), proto, model).forward(x, ["a", "b"])
    expected = conv2d(x.astype(np.float64), w, b)
    np.testing.assert_allclose(got["a"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["b"], np.maximum(expected, 0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("layer", "name", "definition"),
    [
        ('type: "Log" log_param { base: 10 }', "Log", lambda x: np.log10(x)),
        ('type: "LRN" lrn_param { local_size: 1 alpha: 1 beta: 1 k: 2 }', "LRN", lambda x: x / (2 + x * x)),
    ],
    ids=["log_base", "lrn_k"],
)
def test_parameters_opencv_ignores_are_refused_by_layer(tmp_path, layer, name, definition):
    """OpenCV's DNN loads these layers but ignores the parameter (its raw output is checked against the definition
    here, so a fixed OpenCV shows up): the engine refuses them by layer name instead of computing them wrongly."""
    import cv2

    text = (
        'input: "data" input_shape { dim: 1 dim: 2 dim: 3 dim: 3 }\n'
        f'layer {{ name: "l" {layer} bottom: "data" top: "out" }}\n'
    )
    proto, model = write_caffe_model(tmp_path, text, {})
    x = (np.abs(np.random.default_rng(5).normal(size=(1, 2, 3, 3))) + 0.5).astype(np.float32)
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    net.setInput(x)
    assert np.abs(net.forward() - definition(x.astype(np.float64))).max() > 0.05  # OpenCV computes it wrongly
    with pytest.raises(ModelError, match=rf"layer 'l' \({name}\): OpenCV's DNN ignores its .*--backend caffe"):
        make_engine("opencv", load_graph(proto, model), proto, model)
