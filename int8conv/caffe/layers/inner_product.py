"""InnerProduct (fully connected) and Embed (a lookup table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import (
    Decline,
    LayerKind,
    Shape,
    Weights,
    axis_index,
    ncnn_layer,
    opencv_lacks,
    register,
    unsupported,
    weight_and_bias,
)
from int8conv.caffe.shapes import check_weights
from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer
    from int8conv.caffe.proto import caffe_pb2
    from int8conv.ncnn.model import NcnnLayer

FAMILY = "inner_product"


def inner_product_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    p = layer.param.inner_product_param
    axis = axis_index(p.axis, len(shapes[0]))
    fan_in = int(np.prod(shapes[0][axis:]))
    check_weights(layer, (p.num_output, fan_in), p.num_output if p.bias_term else None)
    return [tuple(shapes[0][:axis]) + (int(p.num_output),)]


def inner_product_weights(proto: caffe_pb2.LayerParameter, blobs: list[np.ndarray]) -> list[np.ndarray]:
    """(num_output, fan_in) weights whatever the legacy shape; ``transpose: true`` stored (fan_in, num_output)."""
    ip = proto.inner_product_param
    weight = blobs[0].reshape(-1, blobs[0].shape[-1])
    if ip.transpose:
        weight = np.ascontiguousarray(weight.T)
    return [weight.reshape(ip.num_output, -1)] + [b.reshape(-1) for b in blobs[1:]]


def inner_product_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    p = layer.param.inner_product_param
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    if ctx.ncnn_axis(layer, p.axis, ndim) != 0:
        raise unsupported(layer, f"axis {p.axis} (ncnn's InnerProduct flattens everything after the batch)")
    weight = layer.blobs[0]
    params = {0: int(p.num_output), 1: int(len(layer.blobs) > 1), 2: int(weight.size)}
    return ncnn_layer("InnerProduct", layer, params, weight_and_bias(layer, weight))


def inner_product_onnx(b, layer: Layer) -> None:
    """Gemm (transB) after a Flatten when the input is not 2-D."""
    x = layer.bottoms[0]
    rank = len(b.shape(x))
    axis = axis_index(layer.param.inner_product_param.axis, rank)
    if axis != 1:
        raise ModelError(
            f"layer '{layer.name}' (InnerProduct): axis {axis} is not supported by the ONNX export (only axis 1)"
        )
    if rank != 2:
        flat = f"{layer.name}/flatten"
        b.node("Flatten", [x], [flat], flat, axis=1)
        b.derive(flat, x)
        x = flat
    inputs = [x, b.init(f"{layer.name}/weight", layer.blobs[0])]
    if len(layer.blobs) > 1:
        inputs.append(b.init(f"{layer.name}/bias", layer.blobs[1].reshape(-1)))
    b.node("Gemm", inputs, [layer.tops[0]], layer.name, transB=1)


def embed_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    p = layer.param.embed_param
    check_weights(layer, (p.input_dim, p.num_output), p.num_output if p.bias_term else None)
    return [tuple(shapes[0]) + (int(p.num_output),)]


def embed_onnx(b, layer: Layer) -> None:
    """Gather rows of the table (indices cast to int64), plus the bias."""
    index = f"{layer.name}/index"
    b.node("Cast", [layer.bottoms[0]], [index], index, to=7)
    out = layer.tops[0] if len(layer.blobs) == 1 else f"{layer.name}/rows"
    b.node("Gather", [b.init(f"{layer.name}/weight", layer.blobs[0]), index], [out], layer.name, axis=0)
    if len(layer.blobs) > 1:
        b.derive(out, layer.tops[0])
        b.node(
            "Add",
            [out, b.init(f"{layer.name}/bias", layer.blobs[1].reshape(-1))],
            [layer.tops[0]],
            f"{layer.name}/bias_add",
        )


register(
    LayerKind(
        "InnerProduct",
        FAMILY,
        inner_product_shape,
        inner_product_ncnn,
        inner_product_onnx,
        Weights(canonical=inner_product_weights),
        folds_into=True,
        quantizable=True,
    )
)
register(
    LayerKind(
        "Embed",
        FAMILY,
        embed_shape,
        Decline("ncnn's Embed reads int32 word indices, and the ncnn inputs int8conv feeds are float32"),
        embed_onnx,
        Weights(),
        quantizable=Decline("its input is an index, not an activation; the table stays FP32"),
        opencv=opencv_lacks("Embed"),
    )
)
