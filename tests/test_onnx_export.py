"""Caffe -> ONNX export and Q/DQ insertion, checked against OpenCV's Caffe forward and a numpy fake-quant reference.

* FP32: onnxruntime on the exported model equals OpenCV's ``readNetFromCaffe`` forward (relative difference
  < 1e-3) on every shared model, SSD heads included, and the host-decoded detections equal OpenCV's
  DetectionOutput; a synthetic net covers the layer types the real models lack.
* Q/DQ: the structure TensorRT requires; onnxruntime with graph optimizations off equals an independent
  numpy fake quantization of the FP32 model; output cosine >= 0.99 against FP32 on held-out images.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from int8conv.caffe.graph import load_graph
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.shapes import infer_shapes
from int8conv.errors import ModelError
from int8conv.tables.tensorrt_files import MIN_AMAX
from int8conv.tensorrt.onnx_export import DYNAMIC_BATCH, export_onnx
from int8conv.tensorrt.qdq import OutputCosine, choose_fp32_layers, insert_qdq, quantized_layers
from int8conv.tensorrt.ssd_host import decode_head, detection_output, ssd_heads
from tests.onnx_models import HELD_OUT, MODELS, digits, inputs, model_paths, session
from tests.synthetic import LSTM_NET, lstm_weights, write_caffe_model

pytestmark = [pytest.mark.usefixtures("ort_cache")]


def relative_difference(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference = np.asarray(reference, dtype=np.float64).reshape(candidate.shape)
    return float(np.abs(reference - candidate).max() / max(np.abs(reference).max(), 1e-12))


# FP32 -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(MODELS))
def test_fp32_onnx_matches_opencv(shared, exported, key):
    model = exported(key)
    for x in inputs(shared, key, slice(0, 2)):
        got = model.run(x)
        for name, reference in zip(model.export.outputs, model.opencv(x, model.export.outputs), strict=True):
            assert relative_difference(reference, got[name]) < 1e-3, (key, name)


def test_pooling_rounding_at_another_input_size(shared):
    """MTCNN's P-Net at 47x61: Caffe rounds pooling up and drops windows that start in the padding."""
    proto, caffemodel = model_paths(shared, "det1")
    graph = load_graph(proto, caffemodel)
    graph.inputs = {"data": (1, 3, 47, 61)}
    graph.shapes = infer_shapes(graph)
    export = export_onnx(graph)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 47, 61)).astype(np.float32)
    net = cv2.dnn.readNetFromCaffe(str(proto), str(caffemodel))
    net.enableFusion(False)
    net.setInput(x)
    expected = net.forward([graph.producer(v).name for v in export.outputs])
    got = session(export.model).run(export.outputs, {"data": x})
    assert got[1].shape == (1, 2, 19, 26)
    for reference, out in zip(expected, got, strict=True):
        assert relative_difference(reference, out) < 1e-3


@pytest.mark.parametrize("key", ["res10", "yunet"])
def test_ssd_heads_decode_to_opencv_detections(shared, exported, key):
    """loc/conf/priors exported, DetectionOutput on the host == OpenCV's DetectionOutput (zero rows dropped)."""
    model = exported(key)
    head = model.export.heads[0]
    assert model.export.outputs == [head.loc, head.conf, head.priors]
    assert head.priors in model.export.constants
    found = 0
    for x in inputs(shared, key, slice(1, 4)):
        ours = decode_head(head, model.run(x))[0, 0]
        theirs = model.opencv(x, [head.output])[0][0, 0]
        theirs = theirs[theirs[:, 2] > 0]  # OpenCV pads to keep_top_k with zero rows
        assert ours.shape == theirs.shape
        order_ours = np.lexsort((ours[:, 3], -ours[:, 2]))
        order_theirs = np.lexsort((theirs[:, 3], -theirs[:, 2]))
        np.testing.assert_allclose(ours[order_ours], theirs[order_theirs], atol=2e-4)
        found += int((ours[:, 2] > 0.5).sum())
    assert found > 0


ZOO = """
name: "zoo"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 13 dim: 17 } } }
layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "bn0" batch_norm_param { eps: 0.001 } }
layer { name: "sc0" type: "Scale" bottom: "bn0" top: "bn0" scale_param { bias_term: true } }
layer { name: "conv1" type: "Convolution" bottom: "bn0" top: "conv1"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "dw" type: "Convolution" bottom: "conv1" top: "dw"
  convolution_param { num_output: 6 group: 6 kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "prelu" type: "PReLU" bottom: "dw" top: "dw" }
layer { name: "pool_ave" type: "Pooling" bottom: "dw" top: "pool_ave" pooling_param { pool: AVE kernel_size: 3
  stride: 2 pad: 1 } }
layer { name: "pool_max" type: "Pooling" bottom: "dw" top: "pool_max" pooling_param { pool: MAX kernel_size: 3
  stride: 2 pad: 1 } }
layer { name: "pool_ave0" type: "Pooling" bottom: "dw" top: "pool_ave0" pooling_param { pool: AVE kernel_size: 2
  stride: 2 } }
layer { name: "up" type: "Deconvolution" bottom: "pool_ave0" top: "up"
  convolution_param { num_output: 6 kernel_size: 2 stride: 2 group: 2 } }
layer { name: "sum" type: "Eltwise" bottom: "pool_ave" bottom: "pool_max" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -1.5 } }
layer { name: "prod" type: "Eltwise" bottom: "pool_ave" bottom: "pool_max" bottom: "sum" top: "prod"
  eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" top: "max" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "max" bottom: "pool_ave" top: "cat" }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 alpha: 0.01 beta: 0.75 } }
layer { name: "slice" type: "Slice" bottom: "lrn" top: "s1" top: "s2" top: "s3"
  slice_param { axis: 1 slice_point: 2 slice_point: 7 } }
layer { name: "sig" type: "Sigmoid" bottom: "s1" top: "s1" }
layer { name: "tanh" type: "TanH" bottom: "s2" top: "s2" }
layer { name: "abs" type: "AbsVal" bottom: "s3" top: "s3" }
layer { name: "norm" type: "Normalize" bottom: "s2" top: "norm" norm_param { across_spatial: true channel_shared:
  true } }
layer { name: "norm2" type: "Normalize" bottom: "s3" top: "norm2"
  norm_param { across_spatial: false channel_shared: false } }
layer { name: "perm" type: "Permute" bottom: "norm" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "flat" type: "Flatten" bottom: "perm" top: "flat" }
layer { name: "drop" type: "Dropout" bottom: "flat" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "norm2" top: "ip" inner_product_param { num_output: 7 } }
layer { name: "ip_relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2" inner_product_param { num_output: 6 } }
layer { name: "reshape" type: "Reshape" bottom: "ip2" top: "reshape" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }
layer { name: "softmax" type: "Softmax" bottom: "reshape" top: "softmax" softmax_param { axis: 2 } }
layer { name: "flat_up" type: "Flatten" bottom: "up" top: "flat_up" flatten_param { axis: 2 } }
"""


def zoo_weights(rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def pos(*shape):
        return (rng.random(shape) + 0.5).astype(np.float32)

    one = np.array([1.0], np.float32)
    return {
        "bn0": [r(4), pos(4), np.array([2.0], np.float32)],
        "sc0": [pos(4), r(4)],
        "conv1": [r(6, 4, 3, 2) * 0.5, r(6)],
        "bn1": [r(6), pos(6), one],
        "sc1": [pos(6), r(6)],
        "dw": [r(6, 1, 3, 3), r(6)],
        "prelu": [r(6) * 0.3],
        "up": [r(6, 3, 2, 2), r(6)],
        "norm": [pos(1)],
        "norm2": [pos(5)],
        "ip": [r(7, 5 * 7 * 5) * 0.1, r(7)],
        "ip2": [r(6, 7), r(6)],
    }


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    proto, caffemodel = write_caffe_model(tmp_path_factory.mktemp("zoo"), ZOO, zoo_weights(np.random.default_rng(0)))
    return proto, caffemodel, load_graph(proto, caffemodel)


def test_every_layer_type_matches_opencv_with_a_dynamic_batch(zoo):
    """Every value of a net with the layer types the real models lack (asymmetric/dilated/grouped conv,
    deconvolution, AVE pooling with padding and overhang, Eltwise with coefficients, LRN, Slice,
    Normalize both ways, Permute, Reshape, ...) equals OpenCV's, run at batch 2 through a dynamic batch."""
    proto, caffemodel, graph = zoo
    export = export_onnx(graph, batch=-1)
    assert export.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == DYNAMIC_BATCH
    values = [t for layer in graph.layers if layer.type != "Slice" for t in layer.tops if t not in export.folded]
    model = onnx.ModelProto()
    model.CopyFrom(export.model)
    model.graph.output.extend(onnx.ValueInfoProto(name=v) for v in values if v not in export.outputs)
    x = np.random.default_rng(1).standard_normal((2, 4, 13, 17)).astype(np.float32)
    got = session(model).run(values, {"data": x})
    net = cv2.dnn.readNetFromCaffe(str(proto), str(caffemodel))
    net.enableFusion(False)
    net.setInput(x)
    for value, reference, out in zip(values, net.forward([graph.producer(v).name for v in values]), got, strict=True):
        assert relative_difference(reference, out) < 1e-3, value
    assert export.folded == {"conv1": "conv1_sc1", "conv1_bn1": "conv1_sc1"}


def test_lrn_bias_k(tmp_path):
    """Caffe LRN's k becomes ONNX's bias (OpenCV's importer ignores k, so the reference is numpy)."""
    net = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 5 dim: 3 dim: 4 } } }
    layer { name: "lrn" type: "LRN" bottom: "data" top: "lrn" lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 k: 2 } }
    """
    graph = load_graph(*write_caffe_model(tmp_path, net, {}))
    x = np.random.default_rng(2).standard_normal((1, 5, 3, 4)).astype(np.float32)
    got = session(export_onnx(graph).model).run(["lrn"], {"data": x})[0]
    padded = np.pad(x.astype(np.float64) ** 2, ((0, 0), (1, 1), (0, 0), (0, 0)))
    window = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    np.testing.assert_allclose(got, x / (2 + 0.3 / 3 * window) ** 0.6, rtol=1e-5)


def test_names_are_caffe_values(exported):
    """Every value of the folded graph keeps its Caffe (SSA) name; folded and inner tensors are accounted for."""
    for key in ("res10", "nsfw"):
        model = exported(key)
        export = model.export
        tensors = set(export.activations()) | export.constants
        head_tops = {h.output for h in export.heads}
        for layer in model.graph.layers:
            for top in layer.tops:
                if top in head_tops:
                    continue
                assert top in tensors or export.folded.get(top) in tensors, (key, top)
        inner = tensors - set(model.graph.blob_names)
        assert inner == set(export.derived), key
        assert all(r.source is None or r.source in tensors for r in export.derived.values())
    assert exported("nsfw").export.folded["conv_1"] == "conv_1_scale_1"


def test_batch_choices(shared, exported):
    proto, caffemodel = model_paths(shared, "lenet")
    graph = exported("lenet").graph
    dims = {
        b: [
            d.dim_value or d.dim_param
            for d in export_onnx(graph, batch=b).model.graph.input[0].type.tensor_type.shape.dim
        ]
        for b in (None, 1, 3, -1)
    }
    assert dims == {None: [64, 1, 28, 28], 1: [1, 1, 28, 28], 3: [3, 1, 28, 28], -1: [DYNAMIC_BATCH, 1, 28, 28]}
    batch = np.concatenate(digits(shared, slice(0, 3)))
    together = session(export_onnx(graph, batch=3).model).run(["prob"], {"data": batch})[0]
    alone = np.concatenate([exported("lenet").run(x[None])["prob"] for x in batch])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-7)


def test_a_batch_never_changes_an_lstm_sequence_length(tmp_path):
    """An LSTM's axis 0 is time (3 steps here): a batch that would rewrite it is refused by name; one equal to it,
    or none, exports the prototxt's shapes."""
    graph = load_graph(*write_caffe_model(tmp_path, LSTM_NET, {"rnn": lstm_weights()}))
    for batch in (1, 4, -1):
        with pytest.raises(ModelError, match=r"layer 'rnn' \(LSTM\) steps through time along axis 0 \(3 steps\)"):
            export_onnx(graph, batch=batch)
    for batch in (None, 3):
        model = export_onnx(graph, batch=batch).model
        shapes = {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output]
        }
        assert shapes == {"data": [3, 1, 4], "cont": [3, 1], "rnn": [3, 1, 2]}


AXIS0_LAYERS = {
    "Concat": 'bottom: "data" bottom: "data" top: "r" concat_param { axis: 0 }',
    "Permute": 'bottom: "data" top: "r" permute_param { order: 1 order: 0 order: 2 order: 3 }',
    "Flatten": 'bottom: "data" top: "r" flatten_param { axis: 0 }',
}


@pytest.mark.parametrize("kind", sorted(AXIS0_LAYERS))
def test_a_batch_never_rewrites_a_layer_working_along_axis_0(tmp_path, kind):
    """A layer working along axis 0 (Caffe's shapes at batch 1: Concat (2, 2, 4, 4), Permute (2, 1, 4, 4), Flatten
    (32,)) makes the net batch-bound: a --batch of 3 or N is refused by the layer's name instead of exporting a
    Q/DQ model whose declared shapes onnxruntime contradicts (Concat at N ran to 2N rows, Permute's batch axis
    moved to axis 1). The prototxt's own batch exports and runs as OpenCV runs the prototxt."""
    net = (
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }\n'
        f'layer {{ name: "r" type: "{kind}" {AXIS0_LAYERS[kind]} }}'
    )
    proto, caffemodel = write_caffe_model(tmp_path, net, {})
    graph = load_graph(proto, caffemodel)
    for batch in (3, -1):
        with pytest.raises(ModelError, match=r"layer 'r' works along axis 0, the batch axis.*--batch 1"):
            export_onnx(graph, batch=batch)
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    reference = cv2.dnn.readNetFromCaffe(str(proto), str(caffemodel))
    reference.setInput(x)
    for batch in (None, 1):
        got = session(export_onnx(graph, batch=batch).model).run(["r"], {"data": x})[0]
        np.testing.assert_array_equal(got.reshape(-1), reference.forward("r").reshape(-1))


def test_unsupported_layer_is_named(tmp_path):
    net = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 3 dim: 3 } } }
    layer { name: "my_tile" type: "Tile" bottom: "data" top: "tile" }
    """
    graph = load_graph(*write_caffe_model(tmp_path, net, {}))
    with pytest.raises(ModelError, match="my_tile.*Tile"):
        export_onnx(graph)


def test_detection_output_rules():
    """CORNER decode, confidence threshold, per-class NMS at the IoU threshold, keep_top_k by score."""
    param = caffe_pb2.DetectionOutputParameter(
        num_classes=3,
        background_label_id=0,
        keep_top_k=3,
        confidence_threshold=0.2,
        code_type=caffe_pb2.PriorBoxParameter.CORNER,
    )
    param.nms_param.nms_threshold = 0.5
    priors = np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]])
    variances = np.full_like(priors, 0.1)
    loc = np.zeros((1, 4, 4))
    loc[0, 3] = [1.0, 1.0, 1.0, 1.0]  # moves prior 3 by +0.1 (variance 0.1)
    conf = np.array(
        [
            [
                [0.1, 0.8, 0.1],  # class 1 wins; overlaps prior 1 (IoU 0.905)
                [0.1, 0.7, 0.2],  # suppressed for class 1, but 0.2 is not > threshold 0.2
                [0.1, 0.3, 0.6],
                [0.1, 0.25, 0.65],
            ]
        ]
    )
    out = detection_output(loc.reshape(1, -1), conf.reshape(1, -1), np.stack([priors, variances])[None], param)[0, 0]
    # candidates: class1 {0: .8, (1 suppressed), 2: .3, 3: .25}, class2 {2: .6, 3: .65}; keep 3 best by score
    expected = np.array(
        [[0, 1, 0.8, 0.1, 0.1, 0.5, 0.5], [0, 2, 0.65, 0.1, 0.1, 0.3, 0.3], [0, 2, 0.6, 0.6, 0.6, 0.9, 0.9]]
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)


PRIOR_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 48 dim: 72 } } }
layer { name: "feat" type: "Input" top: "feat" input_param { shape { dim: 1 dim: 8 dim: 6 dim: 7 } } }
layer { name: "pb" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb" prior_box_param { min_size: 16 %s } }
"""


@pytest.mark.parametrize("half", ["img_h: 60", "img_w: 60 step: 8", "step_h: 8", "step_w: 4"])
def test_half_a_prior_box_image_or_step_pair_is_refused(tmp_path, half):
    """Caffe's PriorBox refuses img_h without img_w (CHECK_GT(img_w_, 0)) and step_h without step_w: the priors
    would be divided by a zero image side (Inf in the ONNX constant) or stacked at x = 0 by a zero step."""
    from int8conv.ncnn.convert import convert_graph

    graph = load_graph(*write_caffe_model(tmp_path, PRIOR_NET % half, {}))
    with pytest.raises(ModelError, match=r"layer 'pb' \(PriorBox\).*both positive"):
        export_onnx(graph)
    with pytest.raises(ModelError, match=r"layer 'pb' \(PriorBox\).*both positive"):
        convert_graph(graph)
    whole = load_graph(*write_caffe_model(tmp_path / "whole", PRIOR_NET % "img_h: 60 img_w: 80 step: 8", {}))
    priors = next(numpy_helper.to_array(n.attribute[0].t) for n in export_onnx(whole).model.graph.node)
    assert np.all(np.isfinite(priors)) and priors[0, 0, 0] == np.float32((4 - 8) / 80)  # (0.5 * step - 16/2) / img_w


SSD_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 20 dim: 20 } } }
layer { name: "feat" type: "Input" top: "feat" input_param { shape { dim: 1 dim: 8 dim: 2 dim: 2 } } }
layer { name: "loc" type: "Input" top: "loc" input_param { shape { dim: 1 dim: 16 } } }
layer { name: "conf" type: "Input" top: "conf" input_param { shape { dim: 1 dim: 12 } } }
layer { name: "pb" type: "PriorBox" bottom: "feat" bottom: "data" top: "pb"
  prior_box_param { min_size: 8 clip: false variance: 0.1 } }
layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" bottom: "pb" top: "det"
  detection_output_param { num_classes: 3 background_label_id: 0 nms_param { nms_threshold: 0.45 }
    code_type: CENTER_SIZE keep_top_k: 100 %s } }
"""
#: scores of 4 disjoint priors (rows) for background and 2 classes; zeros and negatives (conf not from a Softmax)
SSD_CONF = np.array([[0.9, 0.0, -0.5], [0.1, 0.6, 0.0], [0.2, -1.0, 0.3], [0.5, 0.0, 0.0]], np.float32)


def host_detections(tmp_path, extra: str) -> tuple[np.ndarray, tuple[str, str]]:
    proto, caffemodel = write_caffe_model(tmp_path, SSD_NET % extra, {})
    graph = load_graph(proto, caffemodel)
    priors = next(numpy_helper.to_array(n.attribute[0].t) for n in export_onnx(graph).model.graph.node)
    loc = np.zeros((1, 16), np.float32)
    return detection_output(loc, SSD_CONF.reshape(1, -1), priors, ssd_heads(graph)[0].param)[0, 0], (proto, caffemodel)


def test_an_unset_confidence_threshold_keeps_every_score(tmp_path):
    """Caffe's DetectionOutput takes an unset confidence_threshold as -FLT_MAX: every score is a candidate,
    zeros and negatives too (Caffe writes these 8 rows, by label then score); with 0 set, only scores above it."""
    unset, _ = host_detections(tmp_path / "unset", "")
    zero, _ = host_detections(tmp_path / "zero", "confidence_threshold: 0")
    expected = [[1, 0.6], [1, 0], [1, 0], [1, -1], [2, 0.3], [2, 0], [2, 0], [2, -0.5]]
    np.testing.assert_allclose(unset[:, 1:3], np.float32(expected))
    np.testing.assert_allclose(zero[:, 1:3], np.float32([[1, 0.6], [2, 0.3]]))


@pytest.mark.pycaffe
@pytest.mark.parametrize("extra", ["", "confidence_threshold: 0", "confidence_threshold: -0.7"])
def test_host_detection_output_equals_caffes(caffe, tmp_path, extra):
    """The host DetectionOutput against Caffe's own layer on the same loc/conf: the same rows in the same order."""
    ours, (proto, _) = host_detections(tmp_path, extra)
    net = caffe.Net(str(proto), caffe.TEST)
    net.blobs["conf"].data[...] = SSD_CONF.reshape(1, -1)
    net.blobs["loc"].data[...] = 0
    net.forward()
    np.testing.assert_allclose(ours, net.blobs["det"].data[0, 0], atol=1e-6)


# Q/DQ -----------------------------------------------------------------------------------------------------------
def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_qdq_structure_is_what_tensorrt_takes(shared, exported):
    """Each Conv/Gemm reads DequantizeLinear outputs for input and weight; int8, zero-point 0, scale amax/127
    per tensor for activations and per output channel (axis 0) for weights."""
    model = exported("res10")
    ranges = model.ranges(shared, "percentile")
    qdq = insert_qdq(model.export, ranges)
    producers = {o: n for n in qdq.graph.node for o in n.output}
    convs = [n for n in qdq.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [n.name for n in convs] == quantized_layers(model.export)
    for node in convs:
        activation, weight = producers[node.input[0]], producers[node.input[1]]
        assert activation.op_type == weight.op_type == "DequantizeLinear"
        for dq in (activation, weight):
            quantize = producers[dq.input[0]]
            assert quantize.op_type == "QuantizeLinear" and list(quantize.input[1:]) == list(dq.input[1:])
            zero = initializer(qdq, dq.input[2])
            assert zero.dtype == np.int8 and not zero.any()
            scale = initializer(qdq, dq.input[1])
            assert scale.dtype == np.float32 and np.all(np.isfinite(scale)) and np.all(scale > 0)
        source = producers[activation.input[0]].input[0]
        assert initializer(qdq, activation.input[1]).shape == ()
        assert initializer(qdq, activation.input[1]) == np.float32(ranges[source] / 127)
        w = initializer(qdq, producers[weight.input[0]].input[0])
        w_scale = initializer(qdq, weight.input[1])
        assert {a.name: a.i for a in weight.attribute}["axis"] == 0
        np.testing.assert_array_equal(w_scale, (np.abs(w.reshape(len(w), -1)).max(axis=1) / 127).astype(np.float32))


def test_dead_channel_and_zero_range_get_positive_scales(tmp_path):
    net = """
    layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 3
      kernel_size: 3 } }
    """
    w = np.random.default_rng(3).standard_normal((3, 2, 3, 3)).astype(np.float32)
    w[1] = 0
    graph = load_graph(*write_caffe_model(tmp_path, net, {"conv": [w, np.zeros(3, np.float32)]}))
    export = export_onnx(graph)
    qdq = insert_qdq(export, {"data": 0.0})
    scales = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer if "qdq_scale" in i.name}
    assert all(np.all(s > 0) for s in scales.values())
    assert scales["conv/weight/qdq_scale"][1] == np.float32(MIN_AMAX / 127)
    x = np.random.default_rng(4).standard_normal((1, 2, 5, 5)).astype(np.float32)
    assert np.all(np.isfinite(session(qdq, optimize=False).run(["conv"], {"data": x})[0]))


def fake_quant(x: np.ndarray, scale: np.ndarray, low: int, high: int) -> np.ndarray:
    """Quantize (round half to even, saturate) and dequantize, in numpy."""
    return (np.clip(np.rint(x / scale), low, high) * scale).astype(np.float32)


def single_node_reference(export_model: onnx.ModelProto, node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray:
    """One FP32 node of the exported model evaluated by onnx's numpy reference on the given inputs."""
    names = [f"in{i}" for i in range(len(inputs))]
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                node.op_type, names, ["out"], **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            )
        ],
        "one",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
    )
    model = onnx.helper.make_model(graph, opset_imports=list(export_model.opset_import))
    return ReferenceEvaluator(model).run(None, dict(zip(names, inputs, strict=True)))[0]


@pytest.mark.parametrize("key", ["lenet", "det1", "det2", "det3", "det4", "ultraface", "yunet"])
def test_qdq_onnxruntime_equals_numpy_fake_quantization(shared, exported, key):
    """With graph optimizations off, onnxruntime's Q/DQ model computes, at every quantized layer,
    op(fakequant(x, amax/127), fakequant(w, per-channel amax/127)) with the FP32 op: checked layer by layer
    on the layer's actual input, the fake quantization done in numpy and the op by onnx's numpy reference."""
    model = exported(key)
    ranges = model.ranges(shared, "kl")
    qdq = insert_qdq(model.export, ranges)
    nodes = [n for n in model.export.model.graph.node if n.name in set(quantized_layers(model.export))]
    watched = [n.input[0] for n in nodes] + [n.output[0] for n in nodes]
    watched = list(dict.fromkeys(watched))
    probe = onnx.ModelProto()
    probe.CopyFrom(qdq)
    probe.graph.output.extend(onnx.ValueInfoProto(name=v) for v in watched if v not in model.export.outputs)
    x = inputs(shared, key, HELD_OUT)[0]
    seen = dict(zip(watched, session(probe, optimize=False).run(watched, {model.input: x}), strict=True))
    for node in nodes:
        w = initializer(model.export.model, node.input[1])
        w_scale = (np.abs(w.reshape(len(w), -1)).max(axis=1) / 127).astype(np.float32)
        args = [
            fake_quant(seen[node.input[0]], np.float32(ranges[node.input[0]] / 127), -128, 127),
            fake_quant(w, w_scale.reshape((-1,) + (1,) * (w.ndim - 1)), -127, 127),
        ]
        args += [initializer(model.export.model, name) for name in node.input[2:]]
        expected = single_node_reference(model.export.model, node, args)
        got = seen[node.output[0]]
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max() + 1e-7, (key, node.name)
        assert not np.array_equal(args[0], seen[node.input[0]]), (key, node.name)  # quantization shows


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(MODELS))
def test_qdq_cosine_against_fp32_on_held_out_images(shared, exported, key):
    """Percentile ranges from 8 images; where all-INT8 misses 0.995 on 4 of them, the most harmful layers
    stay FP32 (choose_fp32_layers). Judged on 6 other images: output cosine >= 0.99 on each."""
    model = exported(key)
    ranges = model.ranges(shared, "percentile")
    feeds = [{model.input: x} for x in inputs(shared, key, slice(0, 4))]
    choice, _ = choose_fp32_layers(model.export, ranges, feeds, 0.995)
    assert len(choice.fp32_layers) <= len(quantized_layers(model.export)) // 4, choice.fp32_layers
    judge = OutputCosine(model.export, [{model.input: x} for x in inputs(shared, key, HELD_OUT)])
    assert min(judge.per_image(insert_qdq(model.export, ranges, choice.fp32_layers))) >= 0.99
