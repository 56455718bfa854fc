"""Per-channel affine and normalisation layers: BatchNorm, BN, Scale, Bias, Normalize, LRN, MVN."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import (
    LayerKind,
    Shape,
    Weights,
    axis_index,
    channels_of,
    flat_weights,
    fork_layer,
    ncnn_layer,
    opencv_lacks,
    raw_f32,
    register,
    same_shape,
    unsupported,
)
from int8conv.caffe.proto import caffe_pb2
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnLayer

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "normalization"


# --------------------------------------------------------------------------------------------------- affine


def _batchnorm_statistics(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Caffe BatchNorm's mean and variance + eps, both divided by the moving-average factor (a factor 0: zeros).

    ``use_global_stats: false`` makes Caffe normalize by the batch's own statistics even in the TEST phase: no
    writer or fold expresses that, so it is refused here, where every one of them reads the statistics.
    """
    p = layer.param.batch_norm_param
    if p.HasField("use_global_stats") and not p.use_global_stats:
        raise ModelError(
            f"layer '{layer.name}' (BatchNorm): use_global_stats: false normalizes each batch by its own mean and "
            "variance (Caffe does so in the TEST phase too), which int8conv does not convert; remove the line to "
            "use the stored statistics"
        )
    mean, var, factor = layer.blobs[0].astype(np.float64), layer.blobs[1].astype(np.float64), layer.blobs[2]
    s = float(factor.reshape(-1)[0])
    s = 0.0 if s == 0 else 1.0 / s
    return mean * s, var * s + layer.param.batch_norm_param.eps


def batchnorm_affine(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Caffe BatchNorm as ``y = a*x + b`` per channel."""
    mean, var = _batchnorm_statistics(layer)
    a = 1.0 / np.sqrt(var)
    return a, -mean * a


def scale_affine(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Caffe Scale (one bottom) as ``y = a*x + b`` per channel."""
    a = layer.blobs[0].astype(np.float64)
    b = (
        layer.blobs[1].astype(np.float64)
        if layer.param.scale_param.bias_term and len(layer.blobs) > 1
        else np.zeros_like(a)
    )
    return a, b


def _scale_folds(layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
    """Only a one-bottom, per-channel Scale folds into the convolution before it."""
    p = layer.param.scale_param
    if len(layer.bottoms) == 1 and p.num_axes == 1 and p.axis == 1:
        return scale_affine(layer)
    return None


def batchnorm_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """The input's shape; the caffemodel must hold a mean and a variance per channel and the factor."""
    channels = channels_of(shapes[0])
    if len(layer.blobs) < 3 or layer.blobs[0].size != channels or layer.blobs[1].size != channels:
        raise ModelError(
            f"layer '{layer.name}' (BatchNorm): expected mean/variance of {channels} values and a "
            f"moving-average factor, found {[b.shape for b in layer.blobs]}"
        )
    return [shapes[0]]


def _values_span(layer: Layer, shape: Shape) -> tuple[int, int]:
    """The axes ``[start, end)`` a one-bottom Scale's or Bias's values lie along: Caffe's ``axis`` and ``num_axes``."""
    p = layer.param.scale_param if layer.type == "Scale" else layer.param.bias_param
    start = axis_index(p.axis, len(shape))
    return start, len(shape) if p.num_axes == -1 else start + p.num_axes


def _per_channel(layer: Layer, shape: Shape) -> bool:
    """Values along the channel axis only (Caffe's default), which ncnn's Scale/Bias and a folded affine apply."""
    return _values_span(layer, shape) == (1, 2)


def _check_values(layer: Layer, shapes: list[Shape]) -> None:
    """A one-bottom Scale or Bias holds one value, or one per position of the axes it spans."""
    if not layer.blobs:
        raise ModelError(f"layer '{layer.name}' ({layer.type}) has no weights in the caffemodel")
    start, end = _values_span(layer, shapes[0])
    size, span = layer.blobs[0].size, shapes[0][start:end]
    if size not in (int(np.prod(span)), 1):
        where = f"{channels_of(shapes[0])} channels" if (start, end) == (1, 2) else f"axes {start}..{end - 1} {span}"
        raise ModelError(f"layer '{layer.name}' ({layer.type}): {size} values for {where}")


def _broadcast_values(layer: Layer, shape: Shape, values: np.ndarray) -> np.ndarray:
    """One-bottom Scale/Bias values shaped to broadcast (right-aligned, as ONNX does) against a blob of ``shape``."""
    start, end = _values_span(layer, shape)
    if values.size == 1:
        return values.reshape(1)
    return values.reshape(tuple(shape[start:end]) + (1,) * (len(shape) - end))


def affine_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """Scale and Bias: the first input's shape; checks a one-bottom layer's values, or where a two-bottom Scale's
    second bottom broadcasts."""
    if len(layer.bottoms) == 1:
        _check_values(layer, shapes)
    elif layer.type == "Scale":
        _broadcast_shape(layer, shapes)
    return [shapes[0]]


def _broadcast_shape(layer: Layer, shapes: list[Shape]) -> list[int]:
    """Where a two-bottom Scale's second bottom lies in the first: its shape padded with 1s, Caffe's ``axis``.

    Trailing 1s of the second bottom that Caffe would reject (an (N, C, 1, 1) gate at axis 0) are dropped, as
    OpenCV does: the product is the same.
    """
    first, second = shapes[0], list(shapes[1])
    axis = axis_index(layer.param.scale_param.axis, len(first))
    while len(second) > 1 and second[-1] == 1 and tuple(first[axis : axis + len(second)]) != tuple(second):
        second.pop()
    if tuple(first[axis : axis + len(second)]) != tuple(second):
        raise ModelError(
            f"layer '{layer.name}' (Scale): the second bottom {shapes[1]} does not match axes "
            f"{axis}..{axis + len(second) - 1} of the first {first}"
        )
    return [1] * axis + list(second) + [1] * (len(first) - axis - len(second))


# --------------------------------------------------------------------------------------------------- ncnn


def batchnorm_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """As caffe2ncnn: slope 1, mean/s, var/s + eps, bias 0 (s = Caffe's moving-average factor), eps folded in."""
    mean, var = _batchnorm_statistics(layer)
    channels = mean.size
    arrays = [np.ones(channels), mean, var, np.zeros(channels)]
    return ncnn_layer("BatchNorm", layer, {0: channels}, [raw_f32(a) for a in arrays])


def scale_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Per-channel Scale; with a second bottom, ncnn's Scale ``0=-233`` multiplies by that blob per channel."""
    p = layer.param.scale_param
    if len(layer.bottoms) == 2:
        first, second = ctx.shape(layer, layer.bottoms[0]), ctx.shape(layer, layer.bottoms[1])
        per_channel = _broadcast_shape(layer, [first, second])
        if (
            len(first) != 4
            or [d for i, d in enumerate(per_channel) if i != 1 and d != 1] not in ([], [first[0]])
            or per_channel[1] != first[1]
            or first[0] != 1
        ):
            raise unsupported(layer, f"a two-bottom Scale of {first} by {second} (ncnn multiplies per channel)")
        if p.bias_term:
            raise unsupported(layer, "a two-bottom Scale with a bias")
        if len(second) == 2:
            return ncnn_layer("Scale", layer, {0: -233, 1: 0})
        # ncnn reads the scale blob as contiguous floats: a (C, 1, 1) Mat is padded per channel, so flatten it
        flat = f"{layer.bottoms[1]}_{layer.name}_flat"
        return [
            NcnnLayer("Reshape", f"{layer.name}_flat", [layer.bottoms[1]], [flat], {0: first[1]}),
            NcnnLayer("Scale", layer.name, [layer.bottoms[0], flat], layer.tops, {0: -233, 1: 0}),
        ]
    shape = ctx.shape(layer, layer.bottoms[0])
    channels = shape[1]
    scale = layer.blobs[0].reshape(-1)
    if scale.size != 1 and not _per_channel(layer, shape):
        raise unsupported(layer, f"a Scale of {scale.size} values on axis {p.axis} (ncnn scales per channel)")
    has_bias = bool(p.bias_term) and len(layer.blobs) > 1
    arrays = [np.broadcast_to(scale, (channels,))]
    if has_bias:
        arrays.append(np.broadcast_to(layer.blobs[1].reshape(-1), (channels,)))
    return ncnn_layer("Scale", layer, {0: channels, 1: int(has_bias)}, [raw_f32(a) for a in arrays])


def bias_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    if len(layer.bottoms) != 1:
        raise unsupported(layer, "a Bias with a second bottom")
    shape = ctx.shape(layer, layer.bottoms[0])
    channels, values = shape[1], layer.blobs[0].reshape(-1)
    if values.size != 1 and not _per_channel(layer, shape):
        raise unsupported(
            layer, f"a Bias of {values.size} values on axis {layer.param.bias_param.axis} (ncnn adds per channel)"
        )
    bias = np.broadcast_to(values, (channels,))
    if len(shape) < 4:  # ncnn's Bias adds per Mat channel, and a (N, C) or (N, C, L) blob's C is not one: Scale by 1
        return ncnn_layer("Scale", layer, {0: channels, 1: 1}, [raw_f32(np.ones(channels)), raw_f32(bias)])
    return ncnn_layer("Bias", layer, {0: channels}, [raw_f32(bias)])


def normalize_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    p = layer.param.norm_param
    scale = layer.blobs[0].reshape(-1)
    params = {0: int(p.across_spatial), 1: int(p.channel_shared), 2: float(p.eps), 3: int(scale.size)}
    return ncnn_layer("Normalize", layer, params, [raw_f32(scale)])


def lrn_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Caffe adds ``k`` across channels only; its WITHIN_CHANNEL form always adds 1 (OpenCV ignores ``k``)."""
    p = layer.param.lrn_param
    across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
    params = {
        0: int(p.norm_region),
        1: int(p.local_size),
        2: float(p.alpha),
        3: float(p.beta),
        4: float(p.k) if across else 1.0,
    }
    return ncnn_layer("LRN", layer, params)


def mvn_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Caffe normalizes each channel over the rest of the blob; ncnn's MVN over each Mat channel, which only a
    4-D blob's channels are (a 3-D blob is one 2-D Mat: it normalized the whole of it)."""
    p = layer.param.mvn_param
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    if not p.across_channels and ndim != 4:
        raise unsupported(layer, f"MVN within channels of a {ndim}-D blob (ncnn normalizes per Mat channel)")
    return ncnn_layer("MVN", layer, {0: int(p.normalize_variance), 1: int(p.across_channels), 2: float(p.eps)})


# --------------------------------------------------------------------------------------------------- ONNX


def affine_onnx(b, layer: Layer) -> None:
    """BatchNorm or single-bottom Scale that was not folded: a BatchNormalization with mean 0, var 1;
    a two-bottom Scale: a Mul by the second bottom reshaped to broadcast at Caffe's ``axis``."""
    if layer.type == "Scale" and len(layer.bottoms) == 2:
        shape = _broadcast_shape(layer, [b.shape(layer.bottoms[0]), b.shape(layer.bottoms[1])])
        if layer.param.scale_param.bias_term:
            raise unsupported(layer, "a two-bottom Scale with a bias", "ONNX export")
        factor = f"{layer.name}/factor"
        dims = [0] + shape[1:] if layer.param.scale_param.axis == 0 else shape
        b.node("Reshape", [layer.bottoms[1], b.init(f"{factor}/shape", dims, np.int64)], [factor], factor)
        b.derive(factor, layer.bottoms[1])
        b.node("Mul", [layer.bottoms[0], factor], [layer.tops[0]], layer.name)
        return
    shape = b.shape(layer.bottoms[0])
    a, c = batchnorm_affine(layer) if layer.type == "BatchNorm" else scale_affine(layer)
    if layer.type == "Scale" and not _per_channel(layer, shape):  # values along other axes: Mul (and Add)
        has_bias = layer.param.scale_param.bias_term
        scaled = f"{layer.name}/scaled" if has_bias else layer.tops[0]
        scale = b.init(f"{layer.name}/scale", _broadcast_values(layer, shape, a))
        b.node("Mul", [layer.bottoms[0], scale], [scaled], scaled if has_bias else layer.name)
        if has_bias:
            b.derive(scaled, layer.bottoms[0], float(np.abs(a).max()))
            _add_values(b, layer, scaled, shape, c)
        return
    channels = shape[1]
    a, c = (np.broadcast_to(v.reshape(-1), (channels,)) for v in (a, c))
    names = [
        b.init(f"{layer.name}/{k}", v)
        for k, v in (("scale", a), ("bias", c), ("mean", np.zeros(channels)), ("var", np.ones(channels)))
    ]
    b.node("BatchNormalization", [layer.bottoms[0]] + names, [layer.tops[0]], layer.name, epsilon=0.0)


def _add_values(b, layer: Layer, x: str, shape: Shape, values: np.ndarray) -> None:
    """The layer's top: ``x`` plus a one-bottom Scale's bias or Bias's values, broadcast where Caffe adds them."""
    bias = b.init(f"{layer.name}/bias", _broadcast_values(layer, shape, values))
    b.node("Add", [x, bias], [layer.tops[0]], layer.name)


def bias_onnx(b, layer: Layer) -> None:
    if len(layer.bottoms) != 1:
        raise unsupported(layer, "a Bias with a second bottom", "ONNX export")
    _add_values(b, layer, layer.bottoms[0], b.shape(layer.bottoms[0]), layer.blobs[0])


def normalize_onnx(b, layer: Layer) -> None:
    """SSD Normalize: x / sqrt(sum x^2 + eps) * scale, with the sum over channels or over C*H*W.

    ONNX's LpNormalization (p=2) has no eps: it equals Caffe's result up to the default eps (1e-10) and,
    like Caffe, gives 0 for an all-zero vector (onnxruntime checked). A stated eps is applied as Caffe does,
    with explicit nodes (an eps of 0.5 moved LpNormalization's result by 20%).
    """
    p = layer.param.norm_param
    x = layer.bottoms[0]
    shape = b.shape(x)
    unit = f"{layer.name}/unit"
    if p.HasField("eps"):
        square, total, padded, norm = (f"{layer.name}/{k}" for k in ("square", "sum", "sum_eps", "norm"))
        axes = list(range(1, len(shape))) if p.across_spatial else [1]
        b.node("Mul", [x, x], [square], square)
        b.node("ReduceSum", [square, b.init(f"{total}/axes", axes, np.int64)], [total], total, keepdims=1)
        b.node("Add", [total, b.init(f"{padded}/eps", np.float32(p.eps))], [padded], padded)
        b.node("Sqrt", [padded], [norm], norm)
        b.node("Div", [x, norm], [unit], unit)
    elif p.across_spatial:
        flat = f"{layer.name}/flatten"
        b.node("Flatten", [x], [flat], flat, axis=1)
        b.derive(flat, x)
        flat_unit = f"{layer.name}/unit_flat"
        b.node("LpNormalization", [flat], [flat_unit], flat_unit, axis=1, p=2)
        b.derive(flat_unit, None, amax=1.0)
        b.node("Reshape", [flat_unit, b.init(f"{unit}/shape", b.keeps_batch_shape(shape), np.int64)], [unit], unit)
    else:
        b.node("LpNormalization", [x], [unit], unit, axis=1, p=2)
    b.derive(unit, None, amax=1.0)
    scale = layer.blobs[0].reshape(-1)
    scale = scale.reshape(-1, 1, 1) if not p.channel_shared and scale.size > 1 else scale[:1]
    b.node("Mul", [unit, b.init(f"{layer.name}/scale", scale)], [layer.tops[0]], layer.name)


def lrn_onnx(b, layer: Layer) -> None:
    p = layer.param.lrn_param
    if p.norm_region != p.ACROSS_CHANNELS:
        raise ModelError(f"layer '{layer.name}' (LRN): WITHIN_CHANNEL has no ONNX operator")
    b.node(
        "LRN",
        [layer.bottoms[0]],
        [layer.tops[0]],
        layer.name,
        size=int(p.local_size),
        alpha=float(p.alpha),
        beta=float(p.beta),
        bias=float(p.k),
    )


def mvn_onnx(b, layer: Layer) -> None:
    """(x - mean) [/ (std + eps)] over H, W (and C when across_channels), per sample, as Caffe's MVN."""
    p = layer.param.mvn_param
    axes = list(range(1 if p.across_channels else 2, len(b.shape(layer.bottoms[0]))))
    if not axes:
        raise unsupported(layer, "MVN within channels of a 2-D blob (one value per channel)", "ONNX export")
    x, name = layer.bottoms[0], layer.name
    mean, centred = f"{name}/mean", f"{name}/centred" if p.normalize_variance else layer.tops[0]
    b.node("ReduceMean", [x], [mean], mean, axes=axes, keepdims=1)
    b.derive(mean, x)
    b.node("Sub", [x, mean], [centred], centred if centred != layer.tops[0] else name)
    if not p.normalize_variance:
        return
    b.derive(centred, x, 2.0)
    square, var, std, denom = (f"{name}/{k}" for k in ("square", "var", "std", "denom"))
    b.node("Mul", [centred, centred], [square], square)
    b.node("ReduceMean", [square], [var], var, axes=axes, keepdims=1)
    b.node("Sqrt", [var], [std], std)
    b.node("Add", [std, b.init(f"{denom}/eps", np.float32(p.eps))], [denom], denom)
    b.node("Div", [centred, denom], [layer.tops[0]], name)


def bn_rename(param: caffe_pb2.LayerParameter, blobs: list[np.ndarray]) -> None:
    """The fork's BN (scale and shift blobs, test phase) is caffe2ncnn's Scale with a bias."""
    param.type = "Scale"
    param.scale_param.bias_term = True


_NOT_FOLDED_TWO_BOTTOMS = "only a one-bottom per-channel Scale folds"
register(
    LayerKind(
        "BatchNorm",
        FAMILY,
        batchnorm_shape,
        batchnorm_ncnn,
        affine_onnx,
        Weights(canonical=flat_weights),
        affine=batchnorm_affine,
        notes="use_global_stats: false (the batch's own statistics, even in TEST) is declined",
    )
)
register(
    LayerKind(
        "Scale",
        FAMILY,
        affine_shape,
        scale_ncnn,
        affine_onnx,
        Weights(required=False, canonical=flat_weights),
        affine=_scale_folds,
        notes="with a second bottom (SE channel attention) it multiplies by that blob, broadcast at "
        "Caffe's axis; " + _NOT_FOLDED_TWO_BOTTOMS + "; one-bottom values off the channel axis (axis, num_axes): "
        "ONNX only",
    )
)
register(
    LayerKind(
        "BN",
        FAMILY,
        affine_shape,
        scale_ncnn,
        affine_onnx,
        Weights(canonical=flat_weights),
        alias_of="Scale",
        rename=bn_rename,
        affine=_scale_folds,
        caffe=fork_layer("SegNet's BN"),
        opencv=opencv_lacks("BN"),
        notes="read as Scale with a bias, as caffe2ncnn does",
    )
)
register(
    LayerKind(
        "Bias",
        FAMILY,
        affine_shape,
        bias_ncnn,
        bias_onnx,
        Weights(canonical=flat_weights),
        opencv=opencv_lacks("Bias"),
        notes="values off the channel axis (axis, num_axes): ONNX only",
    )
)
register(LayerKind("Normalize", FAMILY, same_shape, normalize_ncnn, normalize_onnx, Weights(canonical=flat_weights)))
register(LayerKind("LRN", FAMILY, same_shape, lrn_ncnn, lrn_onnx))
register(
    LayerKind(
        "MVN", FAMILY, same_shape, mvn_ncnn, mvn_onnx, notes="within channels: ncnn needs a 4-D blob, ONNX 3-D or more"
    )
)
