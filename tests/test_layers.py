"""Every registered Caffe layer type, on a tiny synthetic net written through the project's schema.

The FP32 reference is pycaffe (the ``caffe`` backend CI builds) when every type of the net is declared as run by
it, else OpenCV's DNN, else a numpy reference written here. Each writer that handles the type must match it:
ncnn FP32 and ONNX under onnxruntime to a max relative difference of 1e-4 (max|a - b| / max|b|), and ncnn INT8
to a cosine of 0.99 for the quantizable types. The registry itself is checked for completeness.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import Graph, load_graph
from int8conv.caffe.layers import REGISTRY, Decline, kind_of
from int8conv.caffe.reader import read_prototxt
from int8conv.calibration.calibrate import calibration_values
from int8conv.calibration.weight_scales import weight_scales
from int8conv.engines import caffe_importable, make_engine
from int8conv.errors import ModelError
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import write_model
from int8conv.ncnn.quantize import int8_layers, quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.tables.ncnn_table import CalibrationTable
from int8conv.tensorrt.onnx_export import export_onnx
from tests.synthetic import LSTM_NET, lstm_weights, write_caffe_model

#: Every type Tencent/ncnn's caffe2ncnn converts, the parameter-free types it passes through, and the fork layers
#: of the issue: each must be declared.
CAFFE2NCNN = [
    "BN",
    "BatchNorm",
    "Concat",
    "Convolution",
    "ConvolutionDepthwise",
    "DepthwiseConvolution",
    "Crop",
    "Deconvolution",
    "DetectionOutput",
    "Dropout",
    "ELU",
    "Eltwise",
    "Embed",
    "InnerProduct",
    "Input",
    "Interp",
    "LRN",
    "LSTM",
    "MVN",
    "MemoryData",
    "Normalize",
    "PReLU",
    "PSROIPooling",
    "Permute",
    "Pooling",
    "Power",
    "PriorBox",
    "ROIAlign",
    "ROIPooling",
    "ReLU",
    "ReLU6",
    "Reorg",
    "Reshape",
    "Scale",
    "ShuffleChannel",
    "Silence",
    "Slice",
    "Softmax",
    "Threshold",
    "YoloDetectionOutput",
    "Yolov3DetectionOutput",
]
PASS_THROUGH = ["AbsVal", "BNLL", "Exp", "Log", "Sigmoid", "TanH", "Split", "Flatten"]
FORK_LAYERS = ["Upsample", "Axpy"]
REL_BOUND = 1e-4
COSINE_BOUND = 0.99


def test_every_caffe2ncnn_and_fork_type_is_declared():
    missing = [t for t in CAFFE2NCNN + PASS_THROUGH + FORK_LAYERS if t not in REGISTRY]
    assert not missing


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_writer_handles_or_declines(name):
    """Each writer and engine either handles the type or says why not; a shape rule unless both writers decline."""
    kind = REGISTRY[name]
    for what in ("ncnn", "onnx"):
        handler = getattr(kind, what)
        assert callable(handler) or (isinstance(handler, Decline) and handler.reason), (name, what)
    for what in ("opencv", "caffe", "quantizable"):
        value = getattr(kind, what)
        assert value is True or value is False or (isinstance(value, Decline) and value.reason), (name, what)
    both_decline = isinstance(kind.ncnn, Decline) and isinstance(kind.onnx, Decline)
    graph_input = kind.input_shapes is not None
    assert (kind.shape is None) == (both_decline or graph_input), name
    if kind.alias_of:
        assert kind.alias_of in REGISTRY and kind.rename is not None, name


#: Types pycaffe registers but cannot run on the CPU: declined for the caffe engine all the same.
NO_CPU_FORWARD = {"PSROIPooling"}


@pytest.mark.pycaffe
def test_pycaffe_declarations_are_true(caffe, tmp_path):
    """A type declared as run by pycaffe is in its layer registry, and a declined one is not (unless it has no CPU
    forward, which the engine's model check names before pycaffe could abort on it)."""
    from int8conv.engines import caffe_obstacle

    known = set(caffe.layer_type_list())
    wrong = [
        name
        for name, kind in REGISTRY.items()
        if (kind.caffe is True) != (name in known) and name not in NO_CPU_FORWARD
    ]
    assert not wrong
    assert known >= NO_CPU_FORWARD and all(isinstance(REGISTRY[name].caffe, Decline) for name in NO_CPU_FORWARD)
    proto = tmp_path / "psroi.prototxt"
    proto.write_text(
        'input: "data" input_shape { dim: 1 dim: 8 dim: 4 dim: 4 }\ninput: "rois" input_shape { dim: 1 dim: 5 }\n'
        + _roi("PSROIPooling", "psroi_pooling_param { spatial_scale: 1 output_dim: 2 group_size: 2 }")
    )
    assert "layer 'l' has type 'PSROIPooling': pycaffe's PSROIPooling" in caffe_obstacle(proto)


# --------------------------------------------------------------------------------------------------- cases

Weights = Callable[[np.random.Generator], dict[str, list[np.ndarray]]]


@dataclass
class Case:
    """A synthetic net: an input of ``shape`` (called data) followed by ``layers``; ``type`` is the type under test."""

    id: str
    type: str
    layers: str
    shape: tuple[int, ...] = (1, 4, 6, 6)
    weights: Weights = field(default=lambda rng: {})
    positive: bool = False
    numpy: Callable[[np.ndarray, dict[str, list[np.ndarray]]], np.ndarray] | None = None
    renamed: dict[str, str] = field(default_factory=dict)  # prototxt edits the reference engine needs
    engine: str | None = None  # the reference engine, when not the default choice
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # more inputs by name (a ROI blob, LSTM's cont)


def _w(*shapes: tuple[int, ...], name: str = "l") -> Weights:
    return lambda rng: {name: [rng.normal(0, 0.5, s).astype(np.float32) for s in shapes]}


def _conv(kind: str, params: str) -> str:
    return f'layer {{ name: "l" type: "{kind}" bottom: "data" top: "out" convolution_param {{ {params} }} }}'


def _one(kind: str, params: str = "") -> str:
    return f'layer {{ name: "l" type: "{kind}" bottom: "data" top: "out" {params} }}'


def _roi(kind: str, params: str) -> str:
    return f'layer {{ name: "l" type: "{kind}" bottom: "data" bottom: "rois" top: "out" {params} }}'


def _bn_fork(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    scale, shift = weights["l"]
    return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def _axpy(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    a = x.mean(axis=(2, 3), keepdims=True)
    return a * x + x


def _reorg(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(n, c * 4, h // 2, w // 2)


def _upsample(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    return x.repeat(2, axis=2).repeat(2, axis=3)


#: One ROI [batch, x1, y1, x2, y2] in image pixels; at spatial_scale 0.5 it lies inside the 8x8 feature maps.
ROIS = np.array([[0.0, 2.2, 3.1, 11.6, 13.4]], np.float32)


def _bilinear(plane: np.ndarray, y: float, x: float) -> np.ndarray:
    """Mask R-CNN's bilinear sample of ``(C, H, W)`` at (y, x): zero outside [-1, H] x [-1, W], edges clamped."""
    _, h, w = plane.shape
    if y < -1 or y > h or x < -1 or x > w:
        return np.zeros(plane.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    y, x = min(y, float(y0)) if y0 == h - 1 else y, min(x, float(x0)) if x0 == w - 1 else x
    ly, lx = y - y0, x - x0
    return (
        plane[:, y0, x0] * (1 - ly) * (1 - lx)
        + plane[:, y0, x1] * (1 - ly) * lx
        + plane[:, y1, x0] * ly * (1 - lx)
        + plane[:, y1, x1] * ly * lx
    )


def _roi_align(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Mask R-CNN's ROIAlign (Caffe2's RoIAlign, not aligned): each of the 3x2 bins averages a grid of
    ceil(bin size) bilinear samples; the ROI is at least 1x1; no rounding anywhere. Spatial scale 0.5."""
    x1, y1, x2, y2 = (float(v) * 0.5 for v in ROIS[0, 1:])
    pooled_h, pooled_w = 3, 2
    bin_h, bin_w = max(y2 - y1, 1.0) / pooled_h, max(x2 - x1, 1.0) / pooled_w
    grid_h, grid_w = int(np.ceil(bin_h)), int(np.ceil(bin_w))
    out = np.zeros((1, x.shape[1], pooled_h, pooled_w))
    for i in range(pooled_h):
        for j in range(pooled_w):
            samples = [
                _bilinear(
                    x[0], y1 + i * bin_h + (gy + 0.5) * bin_h / grid_h, x1 + j * bin_w + (gx + 0.5) * bin_w / grid_w
                )
                for gy in range(grid_h)
                for gx in range(grid_w)
            ]
            out[0, :, i, j] = np.mean(samples, axis=0)
    return out


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def _nms_rows(candidates: list[tuple[float, int, float, float, float, float]], threshold: float) -> np.ndarray:
    """Class-agnostic greedy NMS in descending score (a box overlapping a kept one by IoU > threshold goes), as
    rows [label + 1, score, x1, y1, x2, y2]."""
    kept: list[tuple[float, int, float, float, float, float]] = []
    for box in sorted(candidates, key=lambda c: -c[0]):
        _, _, ax1, ay1, ax2, ay2 = box
        overlaps = []
        for _, _, bx1, by1, bx2, by2 in kept:
            inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
            overlaps.append(inter / ((ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter))
        if all(o <= threshold for o in overlaps):
            kept.append(box)
    return np.array([[label + 1, score, x1, y1, x2, y2] for score, label, x1, y1, x2, y2 in kept])


def _yolo_boxes(
    t: np.ndarray, scores: np.ndarray, anchor: tuple[float, float], size: tuple[float, float], threshold: float
) -> list[tuple[float, int, float, float, float, float]]:
    """Darknet's box of each cell: centre (col + sigmoid(tx)) / w, size e^tw * anchor / size; the cell's best
    class when its score reaches the threshold."""
    h, w = t.shape[1:]
    rows, cols = np.mgrid[0:h, 0:w]
    cx, cy = (cols + _sigmoid(t[0])) / w, (rows + _sigmoid(t[1])) / h
    bw, bh = np.exp(t[2]) * anchor[0] / size[0], np.exp(t[3]) * anchor[1] / size[1]
    label, score = scores.argmax(axis=0), scores.max(axis=0)
    return [
        (
            float(score[i, j]),
            int(label[i, j]),
            cx[i, j] - bw[i, j] / 2,
            cy[i, j] - bh[i, j] / 2,
            cx[i, j] + bw[i, j] / 2,
            cy[i, j] + bh[i, j] / 2,
        )
        for i, j in zip(*np.nonzero(score >= threshold), strict=True)
    ]


YOLO_BIASES = (1.5, 2.0, 3.0, 2.5)


def _yolo_v2(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    """YOLOv2's region output (darknet): 2 anchors, 3 classes; score sigmoid(objectness) * softmax(class)."""
    h, w = x.shape[2:]
    boxes = []
    for a in range(2):
        t = x[0, a * 8 : (a + 1) * 8]
        classes = np.exp(t[5:] - t[5:].max(axis=0))
        scores = _sigmoid(t[4]) * classes / classes.sum(axis=0)
        boxes += _yolo_boxes(t, scores, YOLO_BIASES[2 * a : 2 * a + 2], (w, h), 0.3)
    return _nms_rows(boxes, 0.45)


def _yolo_v3(x: np.ndarray, weights: dict[str, list[np.ndarray]]) -> np.ndarray:
    """YOLOv3's output (darknet, MobileNet-YOLO's Caffe layer): a 4x4 map and its 2x2 max pool, 1 anchor each
    (mask 1 then 0), anchors over the input size 16 * map size; score sigmoid(objectness) * sigmoid(class)."""
    pooled = x.reshape(1, 7, 2, 2, 2, 2).max(axis=(3, 5))
    boxes = []
    for t, anchor in ((x[0], YOLO_BIASES[2:]), (pooled[0], YOLO_BIASES[:2])):
        h, w = t.shape[1:]
        boxes += _yolo_boxes(t, _sigmoid(t[4]) * _sigmoid(t[5:]), anchor, (16 * w, 16 * h), 0.3)
    return _nms_rows(boxes, 0.45)


def _roi_case(id: str, kind: str, params: str, shape: tuple[int, ...], rois: np.ndarray = ROIS, **more) -> Case:
    """A ROI layer (``_roi``) on "data" of ``shape`` and the "rois" input it reads, one ROI ``rois``."""
    return Case(id, kind, _roi(kind, params), shape=shape, extra={"rois": rois}, **more)


CONV_W = _w((6, 4, 3, 3), (6,))

#: a squeeze-and-excitation gate on "data" (global average, sigmoid): the second bottom of a two-bottom Scale
SE_GATE = """
        layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
                pooling_param { pool: AVE global_pooling: true } }
        layer { name: "gate" type: "Sigmoid" bottom: "pool" top: "gate" }"""


CASES = [
    Case("conv", "Convolution", _conv("Convolution", "num_output: 6 kernel_size: 3 pad: 1 stride: 2"), weights=CONV_W),
    Case(
        "conv_grouped",
        "Convolution",
        _conv("Convolution", "num_output: 16 kernel_size: 1 group: 2"),
        weights=_w((16, 2, 1, 1), (16,)),
    ),
    Case(
        "conv_depthwise",
        "Convolution",
        _conv("Convolution", "num_output: 4 kernel_size: 3 pad: 1 group: 4"),
        weights=_w((4, 1, 3, 3), (4,)),
    ),
    Case(
        "conv_dw_fork",
        "ConvolutionDepthwise",
        _conv("ConvolutionDepthwise", "num_output: 4 kernel_size: 3 pad: 1"),
        weights=_w((4, 1, 3, 3), (4,)),
        renamed={'"ConvolutionDepthwise"': '"Convolution"', "num_output: 4": "num_output: 4 group: 4"},
    ),
    Case(
        "conv_dw_fork2",
        "DepthwiseConvolution",
        _conv("DepthwiseConvolution", "num_output: 4 kernel_size: 3 pad: 1 group: 4"),
        weights=_w((4, 1, 3, 3), (4,)),
        renamed={'"DepthwiseConvolution"': '"Convolution"'},
    ),
    Case(
        "deconv",
        "Deconvolution",
        _conv("Deconvolution", "num_output: 3 kernel_size: 4 stride: 2 pad: 1"),
        weights=_w((4, 3, 4, 4), (3,)),
    ),
    Case(
        "deconv_depthwise",
        "Deconvolution",
        _conv("Deconvolution", "num_output: 4 kernel_size: 4 stride: 2 pad: 1 group: 4 bias_term: false"),
        weights=_w((4, 1, 4, 4)),
    ),
    Case(
        "ip", "InnerProduct", _one("InnerProduct", "inner_product_param { num_output: 5 }"), weights=_w((5, 144), (5,))
    ),
    Case(
        "batchnorm",
        "BatchNorm",
        _one("BatchNorm"),
        weights=lambda rng: {
            "l": [
                rng.normal(0, 1, 4).astype(np.float32),
                rng.uniform(0.5, 2, 4).astype(np.float32),
                np.array([2.0], np.float32),
            ]
        },
    ),
    Case("scale", "Scale", _one("Scale", "scale_param { bias_term: true }"), weights=_w((4,), (4,))),
    Case(
        "scale_two_bottoms",
        "Scale",
        SE_GATE
        + """
        layer { name: "flat" type: "Flatten" bottom: "gate" top: "flat" }
        layer { name: "l" type: "Scale" bottom: "data" bottom: "flat" top: "out" scale_param { axis: 0 } }""",
    ),
    Case(
        "scale_two_bottoms_4d",
        "Scale",
        SE_GATE
        + """
        layer { name: "l" type: "Scale" bottom: "data" bottom: "gate" top: "out" scale_param { axis: 0 } }""",
        engine="opencv",
    ),  # Caffe rejects the (N, C, 1, 1) gate at axis 0 (and aborts); OpenCV broadcasts it
    Case("bn_fork", "BN", _one("BN"), weights=_w((1, 4, 1, 1), (1, 4, 1, 1)), numpy=_bn_fork),
    Case("bias", "Bias", _one("Bias"), weights=_w((4,))),
    Case("bias_3d", "Bias", _one("Bias"), shape=(1, 3, 5), weights=_w((3,))),  # ncnn's Bias adds per Mat channel
    Case(
        "normalize",
        "Normalize",
        _one("Normalize", "norm_param { across_spatial: false channel_shared: false }"),
        weights=lambda rng: {"l": [rng.uniform(0.5, 2, 4).astype(np.float32)]},
    ),
    Case(
        "normalize_eps",  # a stated eps: ONNX's LpNormalization has none
        "Normalize",
        _one("Normalize", "norm_param { across_spatial: true channel_shared: false eps: 3 }"),
        weights=lambda rng: {"l": [rng.uniform(0.5, 2, 4).astype(np.float32)]},
    ),
    Case("lrn", "LRN", _one("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }")),
    Case("mvn", "MVN", _one("MVN", "mvn_param { across_channels: true }")),
    Case("relu", "ReLU", _one("ReLU")),
    Case("leaky_relu", "ReLU", _one("ReLU", "relu_param { negative_slope: 0.1 }")),
    Case("relu6", "ReLU6", _one("ReLU6")),
    Case("prelu", "PReLU", _one("PReLU"), weights=_w((4,))),
    Case("sigmoid", "Sigmoid", _one("Sigmoid")),
    Case("tanh", "TanH", _one("TanH")),
    Case("absval", "AbsVal", _one("AbsVal")),
    Case("bnll", "BNLL", _one("BNLL")),
    Case("elu", "ELU", _one("ELU", "elu_param { alpha: 0.5 }")),
    Case("exp", "Exp", _one("Exp", "exp_param { scale: 0.5 shift: 0.1 }")),
    Case("exp_base", "Exp", _one("Exp", "exp_param { base: 2 scale: 0.5 }")),
    Case("log", "Log", _one("Log", "log_param { base: 10 scale: 2 shift: 1 }"), positive=True),
    Case("power", "Power", _one("Power", "power_param { power: 2 scale: 0.5 shift: 1 }")),
    Case("threshold", "Threshold", _one("Threshold", "threshold_param { threshold: 0.2 }")),
    Case("softmax", "Softmax", _one("Softmax")),
    Case("hardswish", "HardSwish", _one("HardSwish"), shape=(1, 4, 8, 8)),
    Case("pool_max", "Pooling", _one("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")),
    Case("pool_ave", "Pooling", _one("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }")),
    # a map smaller than the kernel: Caffe has one window; ncnn's full padding (C's % of a negative) two
    Case(
        "pool_small_max",
        "Pooling",
        _one("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }"),
        (1, 2, 2, 2),
    ),
    Case(
        "pool_small_ave",
        "Pooling",
        _one("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }"),
        (1, 2, 2, 2),
    ),
    Case("pool_global", "Pooling", _one("Pooling", "pooling_param { pool: AVE global_pooling: true }")),
    Case(
        "eltwise_sum",
        "Eltwise",
        """
        layer { name: "a" type: "TanH" bottom: "data" top: "a" }
        layer { name: "l" type: "Eltwise" bottom: "data" bottom: "a" top: "out"
                eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }""",
    ),
    Case(
        "eltwise_prod",
        "Eltwise",
        """
        layer { name: "a" type: "TanH" bottom: "data" top: "a" }
        layer { name: "l" type: "Eltwise" bottom: "data" bottom: "a" top: "out" eltwise_param { operation: PROD } }""",
    ),
    Case(
        "eltwise_max",
        "Eltwise",
        """
        layer { name: "a" type: "TanH" bottom: "data" top: "a" }
        layer { name: "l" type: "Eltwise" bottom: "data" bottom: "a" top: "out" eltwise_param { operation: MAX } }""",
    ),
    Case(
        "axpy",
        "Axpy",
        """
        layer { name: "a" type: "Pooling" bottom: "data" top: "a" pooling_param { pool: AVE global_pooling: true } }
        layer { name: "l" type: "Axpy" bottom: "a" bottom: "data" bottom: "data" top: "out" }""",
        numpy=_axpy,
    ),
    Case(
        "concat",
        "Concat",
        """
        layer { name: "a" type: "TanH" bottom: "data" top: "a" }
        layer { name: "l" type: "Concat" bottom: "data" bottom: "a" top: "out" }""",
    ),
    Case(
        "slice",
        "Slice",
        """
        layer { name: "l" type: "Slice" bottom: "data" top: "s1" top: "s2" slice_param { slice_point: 1 } }
        layer { name: "m" type: "Eltwise" bottom: "s2" bottom: "s2" top: "out" eltwise_param { operation: PROD } }
        layer { name: "k" type: "TanH" bottom: "s1" top: "out1" }""",
    ),
    Case(
        "split",
        "Split",
        """
        layer { name: "l" type: "Split" bottom: "data" top: "a" top: "b" }
        layer { name: "m" type: "Eltwise" bottom: "a" bottom: "b" top: "out" eltwise_param { operation: PROD } }""",
    ),
    Case(
        "flatten",
        "Flatten",
        """
        layer { name: "a" type: "Pooling" bottom: "data" top: "a" pooling_param { pool: MAX global_pooling: true } }
        layer { name: "l" type: "Flatten" bottom: "a" top: "out" }""",
    ),
    Case("reshape", "Reshape", _one("Reshape", "reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 6 } }")),
    Case("permute", "Permute", _one("Permute", "permute_param { order: 0 order: 2 order: 3 order: 1 }")),
    Case(
        "crop",
        "Crop",
        """
        layer { name: "a" type: "Pooling" bottom: "data" top: "a" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "l" type: "Crop" bottom: "data" bottom: "a" top: "out" crop_param { axis: 2 offset: 1 } }""",
    ),
    Case(
        "shuffle_channel",
        "ShuffleChannel",
        _one("ShuffleChannel", "shuffle_channel_param { group: 2 }"),
        shape=(1, 6, 4, 4),
    ),
    Case("reorg", "Reorg", _one("Reorg", "reorg_param { stride: 2 }"), numpy=_reorg),
    Case(
        "dropout",
        "Dropout",
        """
        layer { name: "l" type: "Dropout" bottom: "data" top: "d" }
        layer { name: "m" type: "TanH" bottom: "d" top: "out" }""",
    ),
    Case(
        "dropout_unscaled",  # scale_train: false scales by 1 - ratio at test time (BVLC pycaffe has no such field)
        "Dropout",
        """
        layer { name: "l" type: "Dropout" bottom: "data" top: "d"
                dropout_param { dropout_ratio: 0.3 scale_train: false } }
        layer { name: "m" type: "TanH" bottom: "d" top: "out" }""",
        engine="opencv",
    ),
    Case(
        "silence",
        "Silence",
        """
        layer { name: "a" type: "TanH" bottom: "data" top: "a" }
        layer { name: "l" type: "Silence" bottom: "a" }
        layer { name: "m" type: "Sigmoid" bottom: "data" top: "out" }""",
    ),
    Case("upsample", "Upsample", _one("Upsample", "upsample_param { scale: 2 }"), numpy=_upsample),
    Case("interp", "Interp", _one("Interp", "interp_param { zoom_factor: 2 }")),
    Case(
        "priorbox",
        "PriorBox",
        """
        layer { name: "a" type: "Pooling" bottom: "data" top: "a" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "l" type: "PriorBox" bottom: "a" bottom: "data" top: "out"
                prior_box_param { min_size: 2 max_size: 4 aspect_ratio: 2 flip: true clip: false variance: 0.1 } }""",
    ),
    _roi_case(
        "roi_pooling",
        "ROIPooling",
        "roi_pooling_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.5 }",
        (1, 4, 10, 10),
        rois=np.array([[0.0, 2.2, 3.1, 9.6, 15.4]], np.float32),  # rounded: 5x7 (ROIPooling's notes)
    ),
    _roi_case(
        "psroi_pooling",
        "PSROIPooling",
        "psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 group_size: 2 }",
        (1, 8, 8, 8),
    ),
    _roi_case(
        "roi_align",
        "ROIAlign",
        "roi_align_param { pooled_h: 3 pooled_w: 2 spatial_scale: 0.5 }",
        (1, 4, 8, 8),
        numpy=_roi_align,
    ),
    Case(
        "lstm",
        "LSTM",
        'layer { name: "l" type: "LSTM" bottom: "data" bottom: "cont" top: "out" recurrent_param { num_output: 3 } }',
        shape=(5, 1, 4),
        weights=_w((12, 4), (12,), (12, 3)),
        extra={"cont": np.array([[0.0], [1.0], [1.0], [1.0], [1.0]], np.float32)},  # one sequence of 5 steps
    ),
    Case(
        "lstm_streams",
        "LSTM",
        'layer { name: "l" type: "LSTM" bottom: "data" bottom: "cont" top: "out" recurrent_param { num_output: 2 } }',
        shape=(3, 2, 2, 2),  # 2 streams of 3 steps, each step a 2x2 input (flattened to 4)
        weights=_w((8, 4), (8,), (8, 2)),
        extra={"cont": np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], np.float32)},
    ),
    Case(
        "yolo_v2",
        "YoloDetectionOutput",
        _one(
            "YoloDetectionOutput",
            "yolo_detection_output_param { num_classes: 3 num_box: 2 confidence_threshold: 0.3 nms_threshold: 0.45 "
            + " ".join(f"biases: {v}" for v in YOLO_BIASES)
            + " }",
        ),
        shape=(1, 16, 4, 4),
        numpy=_yolo_v2,
    ),
    Case(
        "yolo_v3",
        "Yolov3DetectionOutput",
        """
        layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "l" type: "Yolov3DetectionOutput" bottom: "data" bottom: "p" top: "out"
                yolov3_detection_output_param { num_classes: 2 num_box: 1 confidence_threshold: 0.3 nms_threshold: 0.45
                """
        + " ".join(f"biases: {v}" for v in YOLO_BIASES)
        + " mask: 1 mask: 0 anchors_scale: 16 anchors_scale: 16 mask_group_num: 2 } }",
        shape=(1, 7, 4, 4),
        numpy=_yolo_v3,
    ),
]
#: Types whose synthetic case is elsewhere: DetectionOutput on the real SSDs (test_evaluate, test_caffe_backend);
#: Input everywhere; MemoryData below; Embed (an index input) below.
ELSEWHERE = {"DetectionOutput", "Input", "MemoryData", "Embed"}


def test_every_handled_type_has_a_case():
    handled = {
        name
        for name, kind in REGISTRY.items()
        if not (isinstance(kind.ncnn, Decline) and isinstance(kind.onnx, Decline))
    }
    assert handled - ELSEWHERE - {case.type for case in CASES} == set()


# --------------------------------------------------------------------------------------------------- machinery


@dataclass
class Built:
    case: Case
    graph: Graph
    weights: dict[str, list[np.ndarray]]
    batch: np.ndarray
    feeds: dict[str, np.ndarray]  # every network input (data, then the case's extra ones), batch axis first
    reference: dict[str, np.ndarray]
    reference_by: str
    directory: Path


def _engine_for(prototxt: Path) -> str | None:
    """caffe when pycaffe runs every type of the net, else opencv when OpenCV does, else None (numpy).

    Without pycaffe (and without INT8CONV_REQUIRE_CAFFE=1) a net only pycaffe runs is skipped.
    """
    kinds = [kind_of(layer.type) for layer in read_prototxt(prototxt).layer]
    if all(k.caffe is True for k in kinds):
        from int8conv.engines.caffe_engine import import_caffe
        from int8conv.errors import BackendUnavailable

        try:
            import_caffe()
            return "caffe"
        except BackendUnavailable as exc:
            if os.environ.get("INT8CONV_REQUIRE_CAFFE") == "1":
                raise
            if not all(k.opencv is True for k in kinds):
                pytest.skip(f"the reference for this net is pycaffe: {exc}")
    if all(k.opencv is True for k in kinds):
        return "opencv"
    return None


def build(case: Case, directory: Path) -> Built:
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    header = f'input: "data" input_shape {{ {" ".join(f"dim: {d}" for d in case.shape)} }}\n'
    for name, array in case.extra.items():
        header += f'input: "{name}" input_shape {{ {" ".join(f"dim: {d}" for d in array.shape)} }}\n'
    weights = case.weights(rng)
    proto, model = write_caffe_model(directory, header + case.layers, weights)
    graph = load_graph(proto, model)
    batch = rng.normal(0, 1, case.shape).astype(np.float32)
    if case.positive:
        batch = np.abs(batch) + 0.1
    feeds = {"data": batch, **case.extra}
    outputs = graph.outputs
    ref_proto = proto
    if case.renamed:
        text = proto.read_text()
        for old, new in case.renamed.items():
            text = text.replace(old, new)
        ref_proto = directory / "reference.prototxt"
        ref_proto.write_text(text)
    by = case.engine or _engine_for(ref_proto)
    if by is None:
        if case.numpy is None:
            pytest.fail(f"{case.id}: neither pycaffe nor OpenCV run {case.type}, and the case has no numpy reference")
        reference = {outputs[0]: case.numpy(batch.astype(np.float64), weights).astype(np.float32)}
        by = "numpy"
    elif case.extra:  # the engines feed one input: a two-input net runs on OpenCV's DNN or pycaffe directly
        forward = _opencv_forward if by == "opencv" else _pycaffe_forward
        reference = {outputs[0]: forward(ref_proto, model, feeds)}
    else:
        try:
            reference = make_engine(by, load_graph(ref_proto, model), ref_proto, model).forward(batch, outputs)
        except ModelError as exc:  # OpenCV standing in for a missing pycaffe cannot run (or computes wrongly) this net
            if by != "opencv" or caffe_importable() or os.environ.get("INT8CONV_REQUIRE_CAFFE") == "1":
                raise
            pytest.skip(f"the reference for this net is pycaffe, which is not importable: {exc}")
    return Built(case, graph, weights, batch, feeds, reference, by, directory)


def _pycaffe_forward(prototxt: Path, caffemodel: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The last layer's output of pycaffe on the Caffe model, given every input by name."""
    from int8conv.engines.caffe_engine import import_caffe

    caffe = import_caffe()
    caffe.set_mode_cpu()
    net = caffe.Net(str(prototxt), caffe.TEST, weights=str(caffemodel))
    for name, array in feeds.items():
        net.blobs[name].data[...] = array
    return net.forward()[net.outputs[-1]].copy()


def _opencv_forward(prototxt: Path, caffemodel: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The last layer's output of OpenCV's DNN on the Caffe model, given every input by name."""
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    for name, array in feeds.items():
        net.setInput(array, name)
    return net.forward()


def relative(got: np.ndarray, want: np.ndarray) -> float:
    assert got.size == want.size, (got.shape, want.shape)
    got, want = got.reshape(-1).astype(np.float64), want.reshape(-1).astype(np.float64)
    peak = float(np.abs(want).max())
    return float(np.abs(got - want).max()) / peak if peak > 0 else float(np.abs(got).max())


def cosine(got: np.ndarray, want: np.ndarray) -> float:
    a, b = got.reshape(-1).astype(np.float64), want.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def run_ncnn(built: Built, model, name: str, int8: bool) -> dict[str, np.ndarray]:
    param, bin_path = built.directory / f"{name}.param", built.directory / f"{name}.bin"
    write_model(model, param, bin_path)
    runner = NcnnRunner(param, bin_path, int8=int8)
    return runner.run({name: array[0] for name, array in built.feeds.items()})


_BUILT: dict[str, Built] = {}
INT8_CASES = [case for case in CASES if REGISTRY[case.type].is_quantizable]


@pytest.fixture
def built(request, tmp_path_factory) -> Built:
    """The case's net and its reference output, built once per test session."""
    case = request.param
    if case.id not in _BUILT:
        _BUILT[case.id] = build(case, tmp_path_factory.mktemp(case.id))
    return _BUILT[case.id]


def _cases(cases: list[Case]):
    return pytest.mark.parametrize("built", cases, ids=lambda c: c.id, indirect=True)


@_cases(CASES)
def test_ncnn_fp32_matches_the_reference(built):
    """ncnn FP32 within 1e-4 of the reference (a declined type raises an error that gives the reason)."""
    kind = REGISTRY[built.case.type]
    if isinstance(kind.ncnn, Decline):
        with pytest.raises(ModelError, match=re.escape(kind.ncnn.reason)):
            convert_graph(built.graph)
        return
    got = run_ncnn(built, convert_graph(built.graph), "fp32", int8=False)
    for value, want in built.reference.items():
        assert relative(got[value], want) <= REL_BOUND, (value, built.reference_by)


@_cases(CASES)
def test_onnx_matches_the_reference(built, ort_cache):
    import onnxruntime as ort

    kind = REGISTRY[built.case.type]
    if isinstance(kind.onnx, Decline):
        with pytest.raises(ModelError, match=re.escape(kind.onnx.reason)):
            export_onnx(built.graph)
        return
    export = export_onnx(built.graph)
    session = ort.InferenceSession(export.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(built.reference)
    got = dict(zip(names, session.run(names, built.feeds), strict=True))
    for value, want in built.reference.items():
        assert relative(got[value], want) <= REL_BOUND, (value, built.reference_by)


#: Cases whose ONNX export takes no dynamic batch: LSTM steps along axis 0 (refused by name), a ROI blob's rows
#: are ROIs, not samples.
NO_DYNAMIC_BATCH = {"lstm", "lstm_streams", "roi_pooling", "psroi_pooling", "roi_align"}
DYNAMIC_CASES = [
    case for case in CASES if case.id not in NO_DYNAMIC_BATCH and not isinstance(REGISTRY[case.type].onnx, Decline)
]


@_cases(DYNAMIC_CASES)
def test_onnx_with_a_dynamic_batch_runs_two_samples(built, ort_cache):
    """Exported with batch N (``--batch -1``) and run on two copies of the input, each sample's output is the
    reference's: no node pins the prototxt's batch (Interp's Resize sizes did)."""
    import onnxruntime as ort

    export = export_onnx(built.graph, batch=-1)
    session = ort.InferenceSession(export.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(built.reference)
    feeds = {name: np.concatenate([array, array]) for name, array in built.feeds.items()}
    for value, got in zip(names, session.run(names, feeds), strict=True):
        want = built.reference[value]
        halves = np.split(got, 2) if value not in export.constants else [got]  # PriorBox: one set for the batch
        for half in halves:
            assert relative(half, want) <= REL_BOUND, (value, built.reference_by)


def _int8_model(built: Built):
    """The ncnn INT8 model with a table from the weights and the reference's input ranges."""
    deploy = fold_batchnorm_scale(built.graph)
    table = CalibrationTable(weight_scales=weight_scales(deploy))
    for layer in deploy.layers:
        if layer.name in table.weight_scales:
            table.activation_scales[layer.name] = 127.0 / float(np.abs(built.batch).max())
    assert set(calibration_values(deploy)) <= set(deploy.inputs)
    return quantize_model(convert_graph(built.graph), table, fp16_storage=False)


@_cases(INT8_CASES)
def test_ncnn_int8_is_close_for_quantizable_types(built):
    model = _int8_model(built)
    assert bool(int8_layers(model)) == (built.case.id != "conv_grouped")  # grouped: FP32, see ncnn.quantize
    got = run_ncnn(built, model, "int8", int8=True)
    for value, want in built.reference.items():
        assert cosine(got[value], want) >= COSINE_BOUND, value


def test_deconvolution_stays_fp32_as_ncnn2int8_and_the_runtime_do(tmp_path):
    """A table line for a Deconvolution is ignored (ncnn2int8 has no quantize_deconvolution, ncnn's Deconvolution
    has no int8_scale_term): after an INT8 convolution, run with use_int8_inference, it computes exactly what the
    FP32 Deconvolution computes on the same input."""
    rng = np.random.default_rng(11)
    text = (
        'input: "data" input_shape { dim: 1 dim: 4 dim: 6 dim: 6 }\n'
        'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
        "convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n"
        'layer { name: "l" type: "Deconvolution" bottom: "c" top: "out" '
        "convolution_param { num_output: 3 kernel_size: 4 stride: 2 pad: 1 } }\n"
    )
    weights = {
        "c": [rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), np.zeros(4, np.float32)],
        "l": [rng.normal(0, 0.5, (4, 3, 4, 4)).astype(np.float32), rng.normal(0, 0.5, 3).astype(np.float32)],
    }
    graph = load_graph(*write_caffe_model(tmp_path, text, weights))
    fp32 = convert_graph(graph)
    x = rng.normal(0, 1, (4, 6, 6)).astype(np.float32)
    table = CalibrationTable(
        weight_scales={"c": np.full(4, 40.0, np.float32), "l": np.ones(3, np.float32)},
        activation_scales={"c": 127.0 / float(np.abs(x).max()), "l": 10.0},
    )
    int8 = quantize_model(fp32, table, fp16_storage=False)
    assert int8_layers(int8) == ["c"] and 8 not in int8.layer("l").params
    write_model(int8, tmp_path / "q.param", tmp_path / "q.bin")
    runner = NcnnRunner(tmp_path / "q.param", tmp_path / "q.bin", int8=True)
    inside = runner.extract({"data": x}, ["c", "out"])
    deconv_only = convert_graph(
        load_graph(
            *write_caffe_model(
                tmp_path / "deconv",
                text.replace('bottom: "c" top: "out"', 'bottom: "data" top: "out"').replace(
                    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                    "convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n",
                    "",
                ),
                {"l": weights["l"]},
            )
        )
    )
    write_model(deconv_only, tmp_path / "d.param", tmp_path / "d.bin")
    alone = NcnnRunner(tmp_path / "d.param", tmp_path / "d.bin", int8=False).run({"data": inside["c"]})["out"]
    np.testing.assert_array_equal(inside["out"], alone)


def test_memory_data_is_the_graph_input(tmp_path):
    text = """
    layer { name: "feed" type: "MemoryData" top: "data" top: "label"
            memory_data_param { batch_size: 1 channels: 3 height: 5 width: 7 } }
    layer { name: "l" type: "ReLU" bottom: "data" top: "out" }
    """
    graph = load_graph(*write_caffe_model(tmp_path, text, {}))
    assert graph.inputs["data"] == (1, 3, 5, 7) and graph.shapes["out"] == (1, 3, 5, 7)
    params = convert_graph(graph).layers[0].params
    assert (params[0], params[1], params[2]) == (7, 5, 3)


#: One-bottom Scale and Bias whose values lie along other axes than the channels: (id, layer, value shapes).
OFF_CHANNEL_AFFINES = [
    ("scale_axis2", _one("Scale", "scale_param { axis: 2 bias_term: true }"), [(6,), (6,)]),
    ("scale_axis2_square", _one("Scale", "scale_param { axis: 2 }"), [(4,)]),  # H = C: channels would fit too
    ("scale_two_axes", _one("Scale", "scale_param { num_axes: 2 }"), [(4, 6)]),
    ("scale_all_axes", _one("Scale", "scale_param { num_axes: -1 bias_term: true }"), [(4, 6, 6), (4, 6, 6)]),
    ("bias_axis2", _one("Bias", "bias_param { axis: 2 }"), [(6,)]),
]


@pytest.mark.parametrize(("id", "layers", "shapes"), OFF_CHANNEL_AFFINES, ids=[c[0] for c in OFF_CHANNEL_AFFINES])
def test_scale_and_bias_off_the_channel_axis(id, layers, shapes, tmp_path, ort_cache):
    """Caffe's ``axis``/``num_axes`` place the values: the ONNX export broadcasts them there (it applied them per
    channel, or failed), and ncnn, which scales per channel only, declines by layer name."""
    import onnxruntime as ort

    kind = "Scale" if id.startswith("scale") else "Bias"
    built = build(
        Case(id, kind, layers, shape=(1, 4, 6, 6) if id != "scale_axis2_square" else (1, 4, 4, 3), weights=_w(*shapes)),
        tmp_path,
    )
    session = ort.InferenceSession(
        export_onnx(built.graph).model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert relative(session.run(["out"], built.feeds)[0], built.reference["out"]) <= REL_BOUND, built.reference_by
    with pytest.raises(ModelError, match=rf"layer 'l' \({kind}\): a {kind} of .* values on axis"):
        convert_graph(built.graph)


def test_mvn_within_channels_of_a_3d_blob(tmp_path, ort_cache):
    """Caffe's MVN normalizes each channel of an (N, C, L) blob over L: the ONNX export reduces that axis (its
    fixed axes 2, 3 failed shape inference) and ncnn, whose MVN would normalize the whole 2-D Mat, declines."""
    import onnxruntime as ort

    built = build(Case("mvn_3d", "MVN", _one("MVN"), shape=(1, 3, 5)), tmp_path)
    session = ort.InferenceSession(
        export_onnx(built.graph).model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert relative(session.run(["out"], built.feeds)[0], built.reference["out"]) <= REL_BOUND, built.reference_by
    with pytest.raises(ModelError, match=r"layer 'l' \(MVN\): MVN within channels of a 3-D blob"):
        convert_graph(built.graph)


@pytest.mark.parametrize("write", [convert_graph, export_onnx], ids=["ncnn", "onnx"])
@pytest.mark.parametrize("after_conv", [False, True], ids=["alone", "after_conv"])
def test_batchnorm_on_batch_statistics_is_refused_by_name(tmp_path, write, after_conv):
    """``use_global_stats: false`` normalizes by the batch's own statistics in Caffe's TEST phase (pycaffe and
    OpenCV both do, measured): no writer may apply the stored ones instead, alone or folded into a convolution."""
    conv = (
        'layer { name: "c" type: "Convolution" bottom: "data" top: "data" '
        "convolution_param { num_output: 4 kernel_size: 1 bias_term: false } }\n"
    )
    text = (
        'input: "data" input_shape { dim: 1 dim: 4 dim: 2 dim: 2 }\n'
        + (conv if after_conv else "")
        + _one("BatchNorm", "batch_norm_param { use_global_stats: false }")
    )
    weights = {
        "c": [np.ones((4, 4, 1, 1), np.float32)],
        "l": [np.zeros(4, np.float32), np.ones(4, np.float32), np.ones(1, np.float32)],
    }
    graph = load_graph(*write_caffe_model(tmp_path, text, weights))
    with pytest.raises(ModelError, match=r"layer 'l' \(BatchNorm\): use_global_stats: false normalizes each batch"):
        write(graph)


@pytest.mark.parametrize("write", [convert_graph, export_onnx], ids=["ncnn", "onnx"])
def test_max_unpooling_upsample_is_refused_by_name(tmp_path, write):
    """A two-bottom Upsample is SegNet's max unpooling (the second bottom holds the pooling indices): the writers
    compute nearest-neighbour upsampling, so they decline it instead of ignoring the indices."""
    text = (
        'input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }\n'
        'input: "mask" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }\n'
        'layer { name: "l" type: "Upsample" bottom: "data" bottom: "mask" top: "out" upsample_param { scale: 2 } }\n'
    )
    graph = load_graph(*write_caffe_model(tmp_path, text, {}))
    with pytest.raises(ModelError, match=r"layer 'l' \(Upsample\): 2 bottoms \(max unpooling by pooling indices\)"):
        write(graph)


@pytest.mark.pycaffe
def test_embed_onnx_matches_pycaffe(tmp_path, caffe, ort_cache):
    """Embed reads indices: ONNX Gathers rows of the table; ncnn declines it (its Embed reads int32 indices)."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    text = """
    input: "data" input_shape { dim: 2 dim: 3 }
    layer { name: "l" type: "Embed" bottom: "data" top: "out" embed_param { num_output: 4 input_dim: 5 } }
    """
    weights = {"l": [rng.normal(0, 1, (5, 4)).astype(np.float32), rng.normal(0, 1, 4).astype(np.float32)]}
    proto, model = write_caffe_model(tmp_path, text, weights)
    graph = load_graph(proto, model)
    batch = rng.integers(0, 5, (2, 3)).astype(np.float32)
    want = make_engine("caffe", graph, proto, model).forward(batch, ["out"])["out"]
    export = export_onnx(graph)
    session = ort.InferenceSession(export.model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert relative(session.run(["out"], {"data": batch})[0], want) <= REL_BOUND
    with pytest.raises(ModelError, match="int32"):
        convert_graph(graph)


# --------------------------------------------------------------------------------------------------- real models

#: The shared models with fork layers: the reference engine, and the prototxt edits that engine needs.
FORK_MODELS = {
    "retinaface": ("caffe", {}),  # Deconvolution, Crop
    "yoloface": ("caffe", {}),  # Upsample, two-bottom Scale
    "shufflenet_driver": ("opencv", {}),  # ShuffleChannel, ConvolutionDepthwise
    "lane": ("caffe", {'"DepthwiseConvolution"': '"Convolution"'}),  # DepthwiseConvolution, Deconvolution
}


@pytest.mark.pycaffe
@pytest.mark.parametrize("key", sorted(FORK_MODELS))
def test_fork_layer_models_match_their_reference(shared, key, tmp_path, ort_cache, request):
    """ncnn FP32 and ONNX outputs of the real fork-layer models within 1e-4 of pycaffe (or OpenCV) on a real image."""
    import onnxruntime as ort

    from int8conv.calibration.preprocess import read_image
    from int8conv.zoo import MODELS

    by, edits = FORK_MODELS[key]
    if by == "caffe":
        request.getfixturevalue("caffe")  # pycaffe, or a skip (a failure with INT8CONV_REQUIRE_CAFFE=1)
    proto, model = MODELS[key].paths(shared)
    graph = load_graph(proto, model)
    batch = MODELS[key].prep.apply(read_image(sorted((shared / "images" / "faces").glob("*.jpg"))[0]))[None]
    text = proto.read_text()
    for old, new in edits.items():
        text = text.replace(old, new)
    ref_proto = tmp_path / proto.name
    ref_proto.write_text(text)
    outputs = graph.outputs
    reference = make_engine(by, load_graph(ref_proto, model), ref_proto, model).forward(batch, outputs)

    fp32 = convert_graph(graph)
    write_model(fp32, tmp_path / "m.param", tmp_path / "m.bin")
    runner = NcnnRunner(tmp_path / "m.param", tmp_path / "m.bin", int8=False)
    got = runner.run({runner.input_names[0]: batch[0]})
    export = export_onnx(graph)
    session = ort.InferenceSession(export.model.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_out = dict(zip(outputs, session.run(outputs, {export.inputs[0]: batch}), strict=True))
    worst = {
        name: (relative(got[name], reference[name]), relative(onnx_out[name], reference[name])) for name in outputs
    }
    assert max(max(pair) for pair in worst.values()) <= REL_BOUND, worst


def test_layer_docs_are_generated_from_the_registry():
    """docs/layers.md is what scripts/make_layer_docs.py writes from today's registry."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_layer_docs", root / "scripts" / "make_layer_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rendered = module.render()
    assert (root / "docs" / "layers.md").read_text() == rendered
    assert all(f"| `{name}` |" in rendered for name in REGISTRY)


# --------------------------------------------------------------------------------------------------- calibration


def _images(tmp_path: Path, count: int = 3) -> list[Path]:
    import cv2

    rng = np.random.default_rng(5)
    paths = []
    for i in range(count):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 255, size=(8, 8, 3)).astype(np.uint8))
    return paths


def test_a_yolo_output_net_calibrates_on_ncnn_and_runs_int8(tmp_path):
    """The YOLO outputs are not quantizable and neither OpenCV nor pycaffe runs them: auto calibrates on the ncnn
    engine, the convolution before them gets its scales, and the INT8 model decodes as the FP32 one does: as many
    detections, the same labels for the five best, scores within 0.1 rank by rank (measured: 0.067)."""
    from int8conv.calibration.calibrate import build_table, collect_statistics
    from int8conv.calibration.preprocess import Preprocess

    text = """
    input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 7 kernel_size: 3 pad: 1 } }
    layer { name: "yolo" type: "Yolov3DetectionOutput" bottom: "conv" top: "out"
            yolov3_detection_output_param { num_classes: 2 num_box: 1 confidence_threshold: 0.3
            biases: 2 biases: 3 mask: 0 anchors_scale: 8 mask_group_num: 1 } }
    """
    rng = np.random.default_rng(8)
    weights = {"conv": [rng.normal(0, 0.05, (7, 3, 3, 3)).astype(np.float32), np.zeros(7, np.float32)]}
    proto, model = write_caffe_model(tmp_path, text, weights)
    graph = load_graph(proto, model)
    engine = make_engine("auto", graph, proto, model, calibration=True)
    assert engine.name == "ncnn"
    stats = collect_statistics(graph, engine, _images(tmp_path), Preprocess(size=(8, 8)), {"caffemodel_sha256": "x"})
    result = build_table(graph, stats, "kl")
    assert set(result.table.activation_scales) == {"conv"}
    fp32 = convert_graph(graph)
    int8 = quantize_model(fp32, result.table, fp16_storage=False)
    assert int8_layers(int8) == ["conv"]
    x = rng.normal(0, 20, (3, 8, 8)).astype(np.float32)
    outputs = {}
    for name, m in (("fp32", fp32), ("int8", int8)):
        write_model(m, tmp_path / f"{name}.param", tmp_path / f"{name}.bin")
        outputs[name] = NcnnRunner(tmp_path / f"{name}.param", tmp_path / f"{name}.bin", int8=name == "int8").run(
            {"data": x}
        )["out"]
    fp32_rows, int8_rows = outputs["fp32"], outputs["int8"]
    assert int8_rows.shape == fp32_rows.shape and fp32_rows.shape[1] == 6 and len(fp32_rows) >= 5
    np.testing.assert_array_equal(int8_rows[:5, 0], fp32_rows[:5, 0])
    assert np.abs(np.sort(int8_rows[:, 1]) - np.sort(fp32_rows[:, 1])).max() <= 0.1


@pytest.mark.parametrize("backend", ["auto", "ncnn", "opencv"])
def test_a_second_roi_input_is_declined_by_layer_and_engine(tmp_path, backend):
    """Calibration feeds images to one input: a ROIPooling's ROI input is named with the layer and the engine."""
    text = 'input: "data" input_shape { dim: 1 dim: 4 dim: 8 dim: 8 }\ninput: "rois" input_shape { dim: 1 dim: 5 }\n'
    proto, model = write_caffe_model(
        tmp_path, text + _roi("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 2 }"), {}
    )
    graph = load_graph(proto, model)
    engine = "opencv" if backend == "auto" else backend
    with pytest.raises(
        ModelError, match=rf"the {engine} engine feeds images to one, and rois \(read by 'l' \(ROIPooling\)\)"
    ):
        make_engine(backend, graph, proto, model, calibration=True).forward(
            np.zeros((1, 4, 8, 8), np.float32), calibration_values(graph)
        )


# --------------------------------------------------------------------------------------------------- PriorBox clip

#: A PriorBox without ``clip``: its 3-pixel boxes on a 4x4 image reach past the image border.
PRIOR_BOX_NO_CLIP = """
input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
layer { name: "l" type: "PriorBox" bottom: "data" bottom: "data" top: "out"
        prior_box_param { min_size: 3 variance: 0.1 } }
"""


def _unclipped_priors() -> np.ndarray:
    """SSD's priors for min_size 3 at step 1 on a 4x4 image, corners not clipped to [0, 1], then the variances."""
    centres = (np.arange(4) + 0.5) / 4
    half = 1.5 / 4
    boxes = [[cx - half, cy - half, cx + half, cy + half] for cy in centres for cx in centres]
    flat = np.array(boxes).reshape(-1)
    return np.stack([flat, np.full_like(flat, 0.1)])[None].astype(np.float32)


def test_prior_box_clip_defaults_to_false_as_in_ssd_caffe(tmp_path, ort_cache):
    """SSD's caffe.proto (weiliu89/caffe, ssd branch, ``clip = 5 [default = false]`` since its 2016 "change default
    value") and caffe2ncnn (``has_clip() ? clip() : 0``) leave priors unclipped when ``clip`` is not given: so do
    the ncnn model, the ONNX constant and OpenCV (the pycaffe engine: below)."""
    import onnxruntime as ort

    proto, model = write_caffe_model(tmp_path, PRIOR_BOX_NO_CLIP, {})
    graph = load_graph(proto, model)
    want = _unclipped_priors()
    assert want.min() < 0 and want.max() > 1  # clipping would change the output
    x = np.zeros((1, 2, 4, 4), np.float32)
    fp32 = convert_graph(graph)
    assert fp32.layer("l").params[8] == 0
    write_model(fp32, tmp_path / "m.param", tmp_path / "m.bin")
    got = NcnnRunner(tmp_path / "m.param", tmp_path / "m.bin", int8=False).run({"data": x[0]})["out"]
    session = ort.InferenceSession(export_onnx(graph).model.SerializeToString(), providers=["CPUExecutionProvider"])
    by_opencv = make_engine("opencv", graph, proto, model).forward(x, ["out"])["out"]
    for output in (got, session.run(["out"], {"data": x})[0], by_opencv):
        assert relative(output, want) <= REL_BOUND


@pytest.mark.pycaffe
def test_the_caffe_engine_keeps_ssd_caffe_s_clip_default(tmp_path, caffe):
    """The brocolli-caffe pycaffe keeps SSD's first default (``clip`` true); the caffe engine states ``clip: false``
    for a PriorBox that does not say, so its priors are SSD's (and the other engines')."""
    from caffe.proto import caffe_pb2 as pycaffe_pb2

    assert pycaffe_pb2.PriorBoxParameter().clip  # the fork's default, which the engine must not apply
    proto, model = write_caffe_model(tmp_path, PRIOR_BOX_NO_CLIP, {})
    graph = load_graph(proto, model)
    got = make_engine("caffe", graph, proto, model).forward(np.zeros((1, 2, 4, 4), np.float32), ["out"])["out"]
    assert relative(got, _unclipped_priors()) <= REL_BOUND


def test_ncnn_roi_pooling_bins_start_early_at_exact_multiples(tmp_path):
    """ROIPooling's note, measured: with the rounded ROI a multiple of the pooled size (6x6 into 3x2, bins of exactly
    2 rows and 3 columns), ncnn's runtime starts every bin but the first one row and one column early (its bin size
    comes out just below 2 and 3), where Caffe's bins are disjoint. On a map that falls from the top-left corner
    each bin's maximum is its first cell, which shows where it starts. When this fails, ncnn pools Caffe's bins:
    drop the note."""
    text = 'input: "data" input_shape { dim: 1 dim: 1 dim: 8 dim: 8 }\ninput: "rois" input_shape { dim: 1 dim: 5 }\n'
    proto, model = write_caffe_model(
        tmp_path, text + _roi("ROIPooling", "roi_pooling_param { pooled_h: 3 pooled_w: 2 }"), {}
    )
    fp32 = convert_graph(load_graph(proto, model))
    write_model(fp32, tmp_path / "m.param", tmp_path / "m.bin")
    x = (63.0 - np.arange(64, dtype=np.float32)).reshape(1, 8, 8)
    rois = np.array([0, 1, 2, 6, 7], np.float32)  # columns 1..6, rows 2..7
    got = NcnnRunner(tmp_path / "m.param", tmp_path / "m.bin", int8=False).run({"data": x, "rois": rois})["out"][0]
    caffe_starts = [[x[0, 2 + 2 * i, 1 + 3 * j] for j in range(2)] for i in range(3)]
    ncnn_starts = [[x[0, 2 + max(2 * i - 1, 0), 1 + max(3 * j - 1, 0)] for j in range(2)] for i in range(3)]
    np.testing.assert_array_equal(got, ncnn_starts)
    assert not np.array_equal(got, caffe_starts)


def test_a_yolov3_mask_that_ncnn_would_index_differently_is_refused(tmp_path):
    """Caffe offsets the mask by len(mask) / mask_group_num per bottom and ncnn by num_box: a layer where they
    differ (here mask_group_num left at 2 for one bottom, which Caffe's own check rejects) is an error naming it."""
    text = """
    input: "data" input_shape { dim: 1 dim: 7 dim: 4 dim: 4 }
    layer { name: "yolo" type: "Yolov3DetectionOutput" bottom: "data" top: "out"
            yolov3_detection_output_param { num_classes: 2 num_box: 1 biases: 2 biases: 3 mask: 0 anchors_scale: 8 } }
    """
    graph = load_graph(*write_caffe_model(tmp_path, text, {}))
    with pytest.raises(ModelError, match=r"layer 'yolo' \(Yolov3DetectionOutput\): 1 bottoms need mask_group_num 1"):
        convert_graph(graph)


@pytest.mark.parametrize("write", [convert_graph, export_onnx], ids=["ncnn", "onnx"])
@pytest.mark.parametrize(
    ("params", "message"),
    [("operation: PROD coeff: 2 coeff: 1", "coefficients apply to SUM only"), ("coeff: 2", "1 coefficients for 2")],
)
def test_eltwise_coefficients_caffe_rejects_are_rejected_by_both_writers(tmp_path, write, params, message):
    text = (
        'input: "data" input_shape { dim: 1 dim: 2 dim: 2 dim: 2 }\n'
        f'layer {{ name: "l" type: "Eltwise" bottom: "data" bottom: "data" top: "out" eltwise_param {{ {params} }} }}'
    )
    graph = load_graph(*write_caffe_model(tmp_path, text, {}))
    with pytest.raises(ModelError, match=rf"layer 'l' \(Eltwise\): {message}"):
        write(graph)


@pytest.mark.parametrize(
    ("kind", "blobs", "message"),
    [
        ("BatchNorm", [3, 4, 1], r"layer 'l' \(BatchNorm\): expected mean/variance of 4 values and a moving-average"),
        ("BatchNorm", [4, 4], r"layer 'l' \(BatchNorm\): expected mean/variance of 4 values and a moving-average"),
        ("Scale", [3], r"layer 'l' \(Scale\): 3 values for 4 channels"),
        ("Bias", [2], r"layer 'l' \(Bias\): 2 values for 4 channels"),
        ("PReLU", [3], r"layer 'l' \(PReLU\): 3 slopes for 4 channels"),
    ],
)
def test_per_channel_weights_that_do_not_fit_the_channels_are_named(tmp_path, kind, blobs, message):
    """BatchNorm, Scale, Bias and PReLU hold one value per channel (Scale, Bias, PReLU: or one in all)."""
    text = 'input: "data" input_shape { dim: 1 dim: 4 dim: 2 dim: 2 }\n' + _one(kind)
    weights = {"l": [np.ones(size, np.float32) for size in blobs]}
    with pytest.raises(ModelError, match=message):
        load_graph(*write_caffe_model(tmp_path, text, weights))


def test_lstm_weights_that_do_not_fit_its_input_are_named(tmp_path):
    with pytest.raises(ModelError, match=r"layer 'rnn' \(LSTM\): weights of shapes \[\(8, 5\), \(8,\), \(8, 2\)\]"):
        load_graph(*write_caffe_model(tmp_path, LSTM_NET, {"rnn": lstm_weights(inputs=5)}))
