"""Element-wise activations and Softmax."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import (
    LayerKind,
    Shape,
    Weights,
    channels_of,
    flat_weights,
    ncnn_layer,
    ncnn_plain,
    onnx_unary,
    opencv_lacks,
    raw_f32,
    register,
    same_shape,
)
from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer
    from int8conv.ncnn.model import NcnnLayer

FAMILY = "activation"


def prelu_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """The input's shape; one slope, or one per channel."""
    channels = channels_of(shapes[0])
    if layer.blobs[0].size not in (channels, 1):
        raise ModelError(f"layer '{layer.name}' (PReLU): {layer.blobs[0].size} slopes for {channels} channels")
    return [shapes[0]]


def relu_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    slope = float(layer.param.relu_param.negative_slope)
    return ncnn_layer("ReLU", layer, {0: slope} if slope else {})


def relu6_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("Clip", layer, {0: 0.0, 1: 6.0})


def prelu_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    slopes = layer.blobs[0].reshape(-1)
    return ncnn_layer("PReLU", layer, {0: int(slopes.size)}, [raw_f32(slopes)])


def _base_scale_shift(p) -> dict:
    return {0: float(p.base), 1: float(p.scale), 2: float(p.shift)}


def elu_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("ELU", layer, {0: float(layer.param.elu_param.alpha)})


def exp_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("Exp", layer, _base_scale_shift(layer.param.exp_param))


def log_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("Log", layer, _base_scale_shift(layer.param.log_param))


def power_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    p = layer.param.power_param
    return ncnn_layer("Power", layer, {0: float(p.power), 1: float(p.scale), 2: float(p.shift)})


def threshold_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("Threshold", layer, {0: float(layer.param.threshold_param.threshold)})


def softmax_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    axis = ctx.ncnn_axis(layer, layer.param.softmax_param.axis, ndim)
    return ncnn_layer("Softmax", layer, {0: axis, 1: 1})


# --------------------------------------------------------------------------------------------------- ONNX


def relu_onnx(b, layer: Layer) -> None:
    slope = layer.param.relu_param.negative_slope
    if slope:
        b.node("LeakyRelu", [layer.bottoms[0]], [layer.tops[0]], layer.name, alpha=float(slope))
    else:
        b.node("Relu", [layer.bottoms[0]], [layer.tops[0]], layer.name)


def relu6_onnx(b, layer: Layer) -> None:
    b.node(
        "Clip",
        [layer.bottoms[0], b.init(f"{layer.name}/min", np.float32(0)), b.init(f"{layer.name}/max", np.float32(6))],
        [layer.tops[0]],
        layer.name,
    )


def prelu_onnx(b, layer: Layer) -> None:
    rank = len(b.shape(layer.bottoms[0]))
    slope = layer.blobs[0].reshape(-1)
    slope = slope.reshape((slope.size,) + (1,) * (rank - 2)) if slope.size > 1 else slope
    b.node("PRelu", [layer.bottoms[0], b.init(f"{layer.name}/slope", slope)], [layer.tops[0]], layer.name)


def _scaled_input(b, layer: Layer, scale: float, shift: float) -> str:
    """``shift + scale * x`` as ONNX nodes (skipped where they are identities)."""
    x = layer.bottoms[0]
    if scale != 1.0:
        scaled = f"{layer.name}/scaled"
        b.node("Mul", [x, b.init(f"{scaled}/value", np.float32(scale))], [scaled], scaled)
        b.derive(scaled, x, abs(scale))
        x = scaled
    if shift != 0.0:
        shifted = f"{layer.name}/shifted"
        b.node("Add", [x, b.init(f"{shifted}/value", np.float32(shift))], [shifted], shifted)
        x = shifted
    return x


def elu_onnx(b, layer: Layer) -> None:
    b.node("Elu", [layer.bottoms[0]], [layer.tops[0]], layer.name, alpha=float(layer.param.elu_param.alpha))


def exp_onnx(b, layer: Layer) -> None:
    """Caffe: base^(shift + scale*x), base -1 meaning e; written exp(ln(base) * (shift + scale*x))."""
    p = layer.param.exp_param
    ln_base = 1.0 if p.base == -1 else math.log(p.base)
    b.node("Exp", [_scaled_input(b, layer, p.scale * ln_base, p.shift * ln_base)], [layer.tops[0]], layer.name)


def log_onnx(b, layer: Layer) -> None:
    """Caffe: log_base(shift + scale*x), base -1 meaning e."""
    p = layer.param.log_param
    x = _scaled_input(b, layer, p.scale, p.shift)
    if p.base == -1:
        b.node("Log", [x], [layer.tops[0]], layer.name)
        return
    natural = f"{layer.name}/ln"
    b.node("Log", [x], [natural], natural)
    b.node(
        "Mul",
        [natural, b.init(f"{layer.name}/inv_ln_base", np.float32(1.0 / math.log(p.base)))],
        [layer.tops[0]],
        layer.name,
    )


def power_onnx(b, layer: Layer) -> None:
    """Caffe: (shift + scale*x)^power."""
    p = layer.param.power_param
    x = _scaled_input(b, layer, p.scale, p.shift)
    if p.power == 1.0:
        b.node("Identity", [x], [layer.tops[0]], layer.name)
        return
    b.node("Pow", [x, b.init(f"{layer.name}/power", np.float32(p.power))], [layer.tops[0]], layer.name)


def threshold_onnx(b, layer: Layer) -> None:
    """Caffe: 1 where x > threshold, else 0."""
    above = f"{layer.name}/above"
    b.node(
        "Greater",
        [layer.bottoms[0], b.init(f"{above}/threshold", np.float32(layer.param.threshold_param.threshold))],
        [above],
        above,
    )
    b.node("Cast", [above], [layer.tops[0]], layer.name, to=1)


def softmax_onnx(b, layer: Layer) -> None:
    b.node("Softmax", [layer.bottoms[0]], [layer.tops[0]], layer.name, axis=int(layer.param.softmax_param.axis))


register(LayerKind("ReLU", FAMILY, same_shape, relu_ncnn, relu_onnx, notes="negative_slope: leaky ReLU"))
register(LayerKind("ReLU6", FAMILY, same_shape, relu6_ncnn, relu6_onnx, notes="ncnn Clip 0..6"))
register(LayerKind("PReLU", FAMILY, prelu_shape, prelu_ncnn, prelu_onnx, Weights(canonical=flat_weights)))
register(LayerKind("Sigmoid", FAMILY, same_shape, ncnn_plain("Sigmoid"), onnx_unary("Sigmoid"), head_passthrough=True))
register(LayerKind("TanH", FAMILY, same_shape, ncnn_plain("TanH"), onnx_unary("Tanh")))
register(LayerKind("AbsVal", FAMILY, same_shape, ncnn_plain("AbsVal"), onnx_unary("Abs")))
register(LayerKind("BNLL", FAMILY, same_shape, ncnn_plain("BNLL"), onnx_unary("Softplus")))
register(LayerKind("ELU", FAMILY, same_shape, elu_ncnn, elu_onnx))
register(LayerKind("Exp", FAMILY, same_shape, exp_ncnn, exp_onnx))
register(LayerKind("Log", FAMILY, same_shape, log_ncnn, log_onnx))
register(LayerKind("Power", FAMILY, same_shape, power_ncnn, power_onnx))
register(LayerKind("Threshold", FAMILY, same_shape, threshold_ncnn, threshold_onnx, opencv=opencv_lacks("Threshold")))


def hardswish_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """x * relu6(x + 3) / 6: ncnn's HardSwish with alpha 1/6 and beta 1/2 (its default alpha is 0.2)."""
    return ncnn_layer("HardSwish", layer, {0: 1.0 / 6.0, 1: 0.5})


register(
    LayerKind(
        "HardSwish",
        FAMILY,
        same_shape,
        hardswish_ncnn,
        onnx_unary("HardSwish"),
        opencv=opencv_lacks("HardSwish"),
        notes="MobileNetV3's x * relu6(x + 3) / 6 (brocolli-caffe)",
    )
)
register(LayerKind("Softmax", FAMILY, same_shape, softmax_ncnn, softmax_onnx, head_passthrough=True))
