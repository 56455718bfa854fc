"""Convolution, Deconvolution, and the fork type names for depthwise convolution."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import Decline, LayerKind, Shape, Weights, ncnn_layer, register, weight_and_bias
from int8conv.caffe.shapes import check_weights, conv_geometry
from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer
    from int8conv.caffe.proto import caffe_pb2
    from int8conv.ncnn.model import NcnnLayer, ParamValue

FAMILY = "convolution"


def conv_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """Caffe's output size; checks the weights against the prototxt (Deconvolution keeps (in, out/group, kh, kw))."""
    g = conv_geometry(layer)
    n, c, h, w = shapes[0]
    if c % g["group"]:
        raise ModelError(f"layer '{layer.name}': {c} input channels do not divide into group {g['group']}")
    expected = (g["num_output"], c // g["group"], g["kernel_h"], g["kernel_w"])
    if layer.type == "Deconvolution":
        expected = (c, g["num_output"] // g["group"], g["kernel_h"], g["kernel_w"])
    check_weights(layer, expected, g["num_output"] if g["bias_term"] else None)
    ekh = g["dilation_h"] * (g["kernel_h"] - 1) + 1
    ekw = g["dilation_w"] * (g["kernel_w"] - 1) + 1
    if layer.type == "Deconvolution":
        oh = g["stride_h"] * (h - 1) + ekh - 2 * g["pad_h"]
        ow = g["stride_w"] * (w - 1) + ekw - 2 * g["pad_w"]
    else:
        oh = (h + 2 * g["pad_h"] - ekh) // g["stride_h"] + 1
        ow = (w + 2 * g["pad_w"] - ekw) // g["stride_w"] + 1
    if oh <= 0 or ow <= 0:
        raise ModelError(f"layer '{layer.name}': input {shapes[0]} is too small for its kernel")
    return [(n, g["num_output"], oh, ow)]


def conv_weights(proto: caffe_pb2.LayerParameter, blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Legacy 4-D (1, 1, out, in*k*k) weights -> (out, in/group, kh, kw); biases 1-D."""
    conv = proto.convolution_param
    kind = proto.type
    out = blobs[0].shape[0] if blobs[0].ndim == 4 and blobs[0].shape[0] != 1 else conv.num_output
    kernel = blobs[0].shape[-2:]
    weights = [blobs[0].reshape(out if kind != "Deconvolution" else blobs[0].shape[0], -1, *kernel)]
    return weights + [b.reshape(-1) for b in blobs[1:]]


def conv_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """caffe2ncnn's (De)Convolution[DepthWise]; Deconvolution weights regrouped to ncnn's order."""
    g = conv_geometry(layer)
    deconv = layer.type == "Deconvolution"
    weight = layer.blobs[0]
    if deconv:
        # Caffe keeps (in, out/group, kh, kw); ncnn wants, group by group, (out/group, in/group, kh, kw).
        cin, out_g, kh, kw = weight.shape
        weight = weight.reshape(g["group"], cin // g["group"], out_g, kh, kw).transpose(0, 2, 1, 3, 4)
    kind = ("Deconvolution" if deconv else "Convolution") + ("DepthWise" if g["group"] > 1 else "")
    params: dict[int, ParamValue] = {
        0: g["num_output"],
        1: g["kernel_w"],
        2: g["dilation_w"],
        3: g["stride_w"],
        4: g["pad_w"],
    }
    for key, h_name, w_name in (
        (11, "kernel_h", "kernel_w"),
        (12, "dilation_h", "dilation_w"),
        (13, "stride_h", "stride_w"),
        (14, "pad_h", "pad_w"),
    ):
        if g[h_name] != g[w_name]:
            params[key] = g[h_name]
    params[5] = int(len(layer.blobs) > 1)
    params[6] = int(weight.size)
    if g["group"] > 1:
        params[7] = g["group"]
    return ncnn_layer(kind, layer, params, weight_and_bias(layer, weight))


def conv_onnx(b, layer: Layer) -> None:
    """Conv / ConvTranspose with Caffe's symmetric pads."""
    g = conv_geometry(layer)
    inputs = [layer.bottoms[0], b.init(f"{layer.name}/weight", layer.blobs[0])]
    if len(layer.blobs) > 1 and (g["bias_term"] or layer.type == "Convolution"):
        inputs.append(b.init(f"{layer.name}/bias", layer.blobs[1].reshape(-1)))
    op = "Conv" if layer.type == "Convolution" else "ConvTranspose"
    b.node(
        op,
        inputs,
        [layer.tops[0]],
        layer.name,
        kernel_shape=[g["kernel_h"], g["kernel_w"]],
        strides=[g["stride_h"], g["stride_w"]],
        pads=[g["pad_h"], g["pad_w"], g["pad_h"], g["pad_w"]],
        dilations=[g["dilation_h"], g["dilation_w"]],
        group=g["group"],
    )


def depthwise_rename(param: caffe_pb2.LayerParameter, blobs: list[np.ndarray]) -> None:
    """Fork depthwise layers mean group = num_output (caffe2ncnn: ``num_group = num_output``)."""
    param.type = "Convolution"
    param.convolution_param.group = param.convolution_param.num_output


register(
    LayerKind(
        "Convolution",
        FAMILY,
        conv_shape,
        conv_ncnn,
        conv_onnx,
        Weights(canonical=conv_weights),
        folds_into=True,
        quantizable=True,
        notes="group > 1 becomes ncnn ConvolutionDepthWise; a grouped (not depthwise) one stays FP32 in ncnn INT8 "
        "models (ncnn's x86 INT8 group path with the packing layout returns garbage for it), and so in the Q/DQ ONNX",
    )
)
register(
    LayerKind(
        "Deconvolution",
        FAMILY,
        conv_shape,
        conv_ncnn,
        conv_onnx,
        Weights(canonical=conv_weights),
        quantizable=Decline(
            "ncnn2int8 does not quantize it and ncnn's Deconvolution/DeconvolutionDepthWise have no "
            "int8_scale_term: the runtime computes them in FP32"
        ),
        notes="group > 1 becomes ncnn DeconvolutionDepthWise",
    )
)
#: Fork type names of depthwise convolution (ConvolutionDepthwise: caffe-adas and ShuffleNet ports;
#: DepthwiseConvolution: MobileNet-YOLO).
DEPTHWISE_FORK_TYPES = ("ConvolutionDepthwise", "DepthwiseConvolution")
_FORK_DEPTHWISE = Decline("a Caffe-fork type name: BVLC pycaffe does not know it")
for _name in DEPTHWISE_FORK_TYPES:
    register(
        LayerKind(
            _name,
            FAMILY,
            conv_shape,
            conv_ncnn,
            conv_onnx,
            Weights(canonical=conv_weights),
            alias_of="Convolution",
            rename=depthwise_rename,
            folds_into=True,
            quantizable=True,
            caffe=_FORK_DEPTHWISE,
            notes="a fork's depthwise convolution: read as Convolution with group = num_output (the OpenCV engine "
            "renames it so too)",
        )
    )
