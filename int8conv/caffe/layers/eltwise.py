"""Element-wise combinations of several blobs: Eltwise (SUM with coefficients, PROD, MAX) and the fork's Axpy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import LayerKind, Shape, fork_layer, ncnn_layer, opencv_lacks, register
from int8conv.caffe.proto import caffe_pb2
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnLayer, ParamValue

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "eltwise"


def eltwise_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    for s in shapes[1:]:
        if s != shapes[0]:
            raise ModelError(f"layer '{layer.name}' (Eltwise): bottom shapes {shapes} differ")
    return [shapes[0]]


def _coefficients(layer: Layer) -> list[float]:
    """The SUM coefficients, one per bottom (none given: []); Caffe's checks, which both writers apply."""
    p = layer.param.eltwise_param
    if len(p.coeff) and p.operation != caffe_pb2.EltwiseParameter.SUM:
        raise ModelError(
            f"layer '{layer.name}' (Eltwise): coefficients apply to SUM only (Caffe rejects them for PROD and MAX)"
        )
    if len(p.coeff) and len(p.coeff) != len(layer.bottoms):
        raise ModelError(
            f"layer '{layer.name}' (Eltwise): {len(p.coeff)} coefficients for {len(layer.bottoms)} bottoms"
        )
    return [float(c) for c in p.coeff]


def eltwise_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    params: dict[int, ParamValue] = {0: int(layer.param.eltwise_param.operation)}
    coeffs = _coefficients(layer)
    if coeffs:
        params[1] = coeffs
    return ncnn_layer("Eltwise", layer, params)


def eltwise_onnx(b, layer: Layer) -> None:
    p = layer.param.eltwise_param
    inputs = list(layer.bottoms)
    coeffs = _coefficients(layer)
    if p.operation == p.SUM:
        for i, c in enumerate(coeffs):
            if c != 1.0:
                scaled = f"{layer.name}/coeff{i}"
                b.node("Mul", [inputs[i], b.init(f"{scaled}/value", np.float32(c))], [scaled], scaled)
                b.derive(scaled, inputs[i], abs(float(c)))
                inputs[i] = scaled
        b.node("Add" if len(inputs) == 2 else "Sum", inputs, [layer.tops[0]], layer.name)
    elif p.operation == p.MAX:
        b.node("Max", inputs, [layer.tops[0]], layer.name)
    else:
        acc = inputs[0]
        for i, other in enumerate(inputs[1:], start=1):
            out = layer.tops[0] if i == len(inputs) - 1 else f"{layer.name}/prod{i}"
            b.node("Mul", [acc, other], [out], layer.name if out == layer.tops[0] else out)
            acc = out


def axpy_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """Axpy (SENet forks): ``a * x + y`` with a of (N, C, 1, 1) and x, y of (N, C, H, W)."""
    if (
        len(shapes) != 3
        or shapes[1] != shapes[2]
        or tuple(shapes[0][:2]) != tuple(shapes[1][:2])
        or any(d != 1 for d in shapes[0][2:])
    ):
        raise ModelError(
            f"layer '{layer.name}' (Axpy): needs bottoms a (N, C, 1, 1), x and y (N, C, H, W), got {shapes}"
        )
    return [shapes[1]]


def axpy_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """ncnn has no Axpy: a two-bottom Scale (x by a, per channel) and an Eltwise SUM with y."""
    a, x, y = layer.bottoms
    scaled = f"{layer.name}_ax"
    return [
        NcnnLayer("Scale", f"{layer.name}_scale", [x, a], [scaled], {0: -233, 1: 0}),
        NcnnLayer("Eltwise", layer.name, [scaled, y], layer.tops, {0: 1}),
    ]


def axpy_onnx(b, layer: Layer) -> None:
    a, x, y = layer.bottoms
    scaled = f"{layer.name}/ax"
    b.node("Mul", [x, a], [scaled], scaled)
    b.node("Add", [scaled, y], [layer.tops[0]], layer.name)


register(
    LayerKind(
        "Eltwise",
        FAMILY,
        eltwise_shape,
        eltwise_ncnn,
        eltwise_onnx,
        notes="coefficients apply to SUM only: Caffe rejects them for PROD and MAX, and so do both writers",
    )
)
register(
    LayerKind(
        "Axpy", FAMILY, axpy_shape, axpy_ncnn, axpy_onnx, min_bottoms=3, caffe=fork_layer(), opencv=opencv_lacks("Axpy")
    )
)
