"""Model reading and the graph IR: legacy headers, in-place chains, layer kinds, and clear errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from int8conv.caffe import fold
from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.calibration.calibrate import build_table, calibration_values
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.errors import ModelError
from int8conv.ncnn.convert import convert_graph
from int8conv.tensorrt.onnx_export import export_onnx
from tests.synthetic import write_caffe_model

RNG = np.random.default_rng(0)

CONV_BN_NET = """
name: "convbn"
{header}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 }} }}
layer {{ name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }}
layer {{ name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param {{ bias_term: true }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1" inner_product_param {{ num_output: 3 }} }}
layer {{ name: "prob" type: "Softmax" bottom: "ip1" top: "prob" }}
"""

HEADERS = {
    "input_layer": 'layer { name: "data" type: "Input" top: "data" '
    "input_param { shape { dim: 1 dim: 2 dim: 8 dim: 8 } } }",
    "input_dim": 'input: "data"\ninput_dim: 1\ninput_dim: 2\ninput_dim: 8\ninput_dim: 8',
    "input_shape": 'input: "data"\ninput_shape { dim: 1 dim: 2 dim: 8 dim: 8 }',
}


def conv_bn_weights() -> dict[str, list[np.ndarray]]:
    return {
        "conv1": [RNG.normal(size=(4, 2, 3, 3)).astype(np.float32), RNG.normal(size=4).astype(np.float32)],
        "bn1": [
            RNG.normal(size=4).astype(np.float32),
            RNG.uniform(0.5, 2, size=4).astype(np.float32),
            np.array([2.0], np.float32),
        ],
        "sc1": [RNG.uniform(0.5, 2, size=4).astype(np.float32), RNG.normal(size=4).astype(np.float32)],
        "ip1": [RNG.normal(size=(3, 64)).astype(np.float32), RNG.normal(size=3).astype(np.float32)],
    }


def test_an_input_layer_without_a_shape_is_named_with_its_file(tmp_path):
    proto, model = write_caffe_model(
        tmp_path,
        'layer { name: "feed" type: "Input" top: "data" }\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }',
        {},
    )
    with pytest.raises(ModelError, match=rf"^{re.escape(str(proto))}: Input layer 'feed' has no input_param\.shape$"):
        load_graph(proto, model)


@pytest.mark.parametrize("header", sorted(HEADERS))
def test_input_headers_and_in_place_chain(tmp_path, header):
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS[header]), conv_bn_weights())
    graph = load_graph(proto, model)
    assert graph.inputs == {"data": (1, 2, 8, 8)}
    assert [layer.name for layer in graph.layers] == ["conv1", "bn1", "sc1", "relu1", "pool1", "ip1", "prob"]
    assert graph.layer("bn1").bottoms == ["conv1"] and graph.layer("bn1").tops == ["conv1_bn1"]
    assert graph.layer("pool1").bottoms == ["conv1_relu1"]
    assert graph.final_value("conv1") == "conv1_relu1"
    assert graph.blob_of("conv1_sc1") == "conv1"
    assert graph.shapes["pool1"] == (1, 4, 4, 4) and graph.shapes["prob"] == (1, 3)
    assert graph.outputs == ["prob"]


def test_a_run_folds_the_graph_once(tmp_path, monkeypatch):
    """Calibration, the ncnn converter and the ONNX export read the graph's one folded form (``Graph.folded``)."""
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), conv_bn_weights())
    graph = load_graph(proto, model)
    folds = []
    monkeypatch.setattr(fold, "fold_batchnorm_scale", lambda g: folds.append(g) or fold_batchnorm_scale(g))
    stats = CalibrationStatistics(model={}, preprocess={})
    stats.update({value: RNG.normal(size=(2, *graph.shapes[value][1:])) for value in calibration_values(graph)})
    result = build_table(graph, stats, "kl")
    model_fp32 = convert_graph(graph)
    export = export_onnx(graph)
    assert folds == [graph] and result.deploy is graph.folded() and graph.folded().folded() is graph.folded()
    assert [layer.type for layer in model_fp32.layers].count("BatchNorm") == 0
    assert export.folded == {"conv1": "conv1_sc1", "conv1_bn1": "conv1_sc1"}
    assert [layer.name for layer in load_graph(proto, model).folded().layers] == [
        "conv1",
        "relu1",
        "pool1",
        "ip1",
        "prob",
    ]
    assert len(folds) == 2  # a graph loaded again is folded again


def test_fold_matches_unfolded_arithmetic(tmp_path):
    weights = conv_bn_weights()
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), weights)
    folded = fold_batchnorm_scale(load_graph(proto, model))
    conv = folded.layer("conv1")
    assert conv.tops == ["conv1_sc1"] and [layer.name for layer in folded.layers][:2] == ["conv1", "relu1"]
    mean, var, factor = weights["bn1"]
    gamma, beta = weights["sc1"]
    a = gamma / np.sqrt(var / factor[0] + 1e-5)
    np.testing.assert_allclose(conv.blobs[0], weights["conv1"][0] * a[:, None, None, None], rtol=1e-5)
    np.testing.assert_allclose(conv.blobs[1], (weights["conv1"][1] - mean / factor[0]) * a + beta, rtol=1e-4, atol=1e-5)


def test_real_models_build(shared):
    for folder, proto, model, n_inputs in [
        ("res10_300x300_ssd", "deploy.prototxt", "res10_300x300_ssd_iter_140000.caffemodel", 1),
        ("mtcnn", "det1.prototxt", "det1.caffemodel", 1),
        ("ultraface_slim320", "slim-320.prototxt", "slim-320.caffemodel", 1),
    ]:
        graph = load_graph(shared / "models" / folder / proto, shared / "models" / folder / model)
        assert len(graph.inputs) == n_inputs and graph.outputs


def test_prototxt_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  typo_field: 3\n}\n')
    with pytest.raises(ModelError, match=r"bad\.prototxt:4"):
        load_graph(path, path)


def test_swapped_proto_and_model_say_so(tmp_path):
    """--proto given the caffemodel (the two flags swapped): the file is named as binary, not quoted by the text
    parser ('Expected identifier or number' around raw bytes)."""
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), conv_bn_weights())
    with pytest.raises(ModelError, match=r"net\.caffemodel: a binary file, not a text prototxt") as error:
        load_graph(model, proto)
    assert "Expected" not in str(error.value)


def test_a_prototxt_with_a_byte_order_mark_says_so(tmp_path):
    """A prototxt saved as 'UTF-8 with BOM' (CRLF lines too): named, not 'Expected identifier or number, got' an
    invisible character at 1:1."""
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), conv_bn_weights())
    proto.write_bytes(b"\xef\xbb\xbf" + proto.read_bytes().replace(b"\n", b"\r\n"))
    with pytest.raises(ModelError, match=r"net\.prototxt: starts with a byte order mark") as error:
        load_graph(proto, model)
    assert "Expected" not in str(error.value)


def test_v1_prototxt_refused(tmp_path):
    path = tmp_path / "v1.prototxt"
    path.write_text('name: "old"\nlayers { name: "conv1" bottom: "data" top: "conv1" }\n')
    with pytest.raises(ModelError, match="V1 Caffe model"):
        load_graph(path, path)


def test_missing_blob_names_itself(tmp_path):
    text = CONV_BN_NET.format(header=HEADERS["input_layer"]).replace('bottom: "pool1"', 'bottom: "pool9"')
    proto, model = write_caffe_model(tmp_path, text, conv_bn_weights())
    with pytest.raises(ModelError, match="'ip1'.*'pool9'"):
        load_graph(proto, model)


def test_caffemodel_missing_layer(tmp_path):
    weights = conv_bn_weights()
    del weights["ip1"]
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), weights)
    with pytest.raises(ModelError, match="'ip1'.*no weights"):
        load_graph(proto, model)


def test_caffemodel_wrong_shape(tmp_path):
    weights = conv_bn_weights()
    weights["conv1"][0] = RNG.normal(size=(4, 3, 3, 3)).astype(np.float32)
    proto, model = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), weights)
    with pytest.raises(ModelError, match=r"'conv1'.*\(4, 3, 3, 3\).*\(4, 2, 3, 3\)"):
        load_graph(proto, model)


def test_corrupt_caffemodel(tmp_path):
    proto, _ = write_caffe_model(tmp_path, CONV_BN_NET.format(header=HEADERS["input_layer"]), conv_bn_weights())
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(ModelError, match="bad.caffemodel"):
        load_graph(proto, bad)
