"""Caffe graph IR -> FP32 ncnn model: what ``caffe2ncnn`` followed by ``ncnnoptimize`` produce, without their bugs.

Steps, each on plain data:

1. ``fold_batchnorm_scale``: BatchNorm/Scale after a Convolution/InnerProduct become part of its weights, so the
   INT8 step computes weight scales on the weights the runtime holds.
2. One Caffe layer -> one ncnn layer (Pooling may get a Padding layer in front, see ``_pooling``); layer names
   are kept because calibration tables are keyed by them, and blob names are the IR's values (``x_L`` for the
   top of in-place layer ``L``, caffe2ncnn's convention).
3. Graph clean-up as ncnnoptimize does it: Dropout and Caffe Split layers disappear, a BatchNorm followed by a
   Scale becomes one BatchNorm, a one-slope PReLU becomes a leaky ReLU, ReLU/leaky ReLU/ReLU6/Sigmoid after a
   convolution or InnerProduct become its ``activation_type`` when the convolution's output feeds nothing else,
   and a 1x1 Convolution on a 1-D blob (after global pooling or InnerProduct) becomes an InnerProduct.
4. ``Input`` layers for the network inputs (also for legacy ``input:`` headers, which caffe2ncnn breaks on), and a
   ``Split`` layer ``splitncnn_N`` after every blob read more than once, its tops named ``<blob>_splitncnn_K``.
5. Shape hints on every layer, as ncnnoptimize writes them (``shape_hints``).

ncnn drops the batch axis: a Caffe blob (N, C, H, W) is an ncnn Mat (c, h, w), so Caffe axis ``a`` is ncnn axis
``a - 1`` and shapes are written without N.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Callable

import numpy as np

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import Graph, Layer
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.shapes import conv_geometry, pool_geometry, prior_box_aspect_ratios
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnBlob, NcnnLayer, NcnnModel, ParamValue
from int8conv.ncnn.shape_hints import add_shape_hints

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
#: Layer types that take a fused activation (``9=activation_type``, ``10=activation_params``).
ACTIVATION_HOSTS = ("Convolution", "ConvolutionDepthWise", "Deconvolution", "DeconvolutionDepthWise", "InnerProduct")
#: Caffe Permute orders (4-D blobs) -> ncnn order_type on the 3-D Mat, as caffe2ncnn maps them.
PERMUTE_4D = {(0, 1, 2, 3): 0, (0, 1, 3, 2): 1, (0, 2, 1, 3): 2, (0, 2, 3, 1): 3, (0, 3, 1, 2): 4, (0, 3, 2, 1): 5}
#: Caffe Permute orders (3-D blobs) -> ncnn order_type on the 2-D Mat.
PERMUTE_3D = {(0, 1, 2): 0, (0, 2, 1): 1}


def _f32(values) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).astype(np.float32).reshape(-1))


def _unsupported(layer: Layer, what: str) -> ModelError:
    return ModelError(f"layer '{layer.name}' ({layer.type}): {what} is not supported by the ncnn converter")


class _Context:
    """Shapes of the graph, and the axis/shape helpers every layer rule needs."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def shape(self, layer: Layer, value: str) -> Shape:
        if value not in self.graph.shapes:
            raise ModelError(f"layer '{layer.name}' ({layer.type}): the shape of '{value}' is unknown, "
                             "so it cannot be converted to ncnn")
        return self.graph.shapes[value]

    def ncnn_axis(self, layer: Layer, axis: int, ndim: int) -> int:
        """Caffe axis on an ``ndim``-D blob -> ncnn axis on the batch-less Mat."""
        positive = axis + ndim if axis < 0 else axis
        if not 1 <= positive < ndim:
            raise _unsupported(layer, f"axis {axis} on a {ndim}-D blob (ncnn has no batch axis)")
        return positive - 1


def _whc(shape: Shape) -> dict[int, ParamValue]:
    """A batch-less shape as ncnn's 0=w 1=h 2=c (and 11=d for 4-D Mats)."""
    dims = list(shape)
    keys = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (2, 11, 1, 0)}.get(len(dims))
    if keys is None:
        raise ModelError(f"ncnn Mats have 1 to 4 dimensions without the batch axis, got shape {tuple(shape)}")
    return {key: int(d) for key, d in zip(keys, dims)}


# --------------------------------------------------------------------------------------------------- layer rules

def _convolution(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    g = conv_geometry(layer)
    deconv = layer.type == "Deconvolution"
    weight = layer.blobs[0]
    if deconv:
        # Caffe keeps (in, out/group, kh, kw); ncnn wants, group by group, (out/group, in/group, kh, kw).
        cin, out_g, kh, kw = weight.shape
        weight = weight.reshape(g["group"], cin // g["group"], out_g, kh, kw).transpose(0, 2, 1, 3, 4)
    kind = ("Deconvolution" if deconv else "Convolution") + ("DepthWise" if g["group"] > 1 else "")
    params: dict[int, ParamValue] = {0: g["num_output"], 1: g["kernel_w"], 2: g["dilation_w"], 3: g["stride_w"],
                                     4: g["pad_w"]}
    for key, h_name, w_name in ((11, "kernel_h", "kernel_w"), (12, "dilation_h", "dilation_w"),
                                (13, "stride_h", "stride_w"), (14, "pad_h", "pad_w")):
        if g[h_name] != g[w_name]:
            params[key] = g[h_name]
    has_bias = len(layer.blobs) > 1
    params[5] = int(has_bias)
    params[6] = int(weight.size)
    if g["group"] > 1:
        params[7] = g["group"]
    weights = [NcnnBlob(_f32(weight))] + ([NcnnBlob(_f32(layer.blobs[1]), tagged=False)] if has_bias else [])
    return [NcnnLayer(kind, layer.name, layer.bottoms, layer.tops, params, weights)]


def _inner_product(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.inner_product_param
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    if ctx.ncnn_axis(layer, p.axis, ndim) != 0:
        raise _unsupported(layer, f"axis {p.axis} (ncnn's InnerProduct flattens everything after the batch)")
    weight = layer.blobs[0]
    has_bias = len(layer.blobs) > 1
    weights = [NcnnBlob(_f32(weight))] + ([NcnnBlob(_f32(layer.blobs[1]), tagged=False)] if has_bias else [])
    params = {0: int(p.num_output), 1: int(has_bias), 2: int(weight.size)}
    return [NcnnLayer("InnerProduct", layer.name, layer.bottoms, layer.tops, params, weights)]


def _batchnorm(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    """As caffe2ncnn: slope 1, mean/s, var/s + eps, bias 0 (s = Caffe's moving-average factor), eps folded in."""
    mean, var, factor = layer.blobs[0].astype(np.float64), layer.blobs[1].astype(np.float64), layer.blobs[2]
    s = float(factor.reshape(-1)[0])
    s = 0.0 if s == 0 else 1.0 / s
    channels = mean.size
    arrays = [np.ones(channels), mean * s, var * s + layer.param.batch_norm_param.eps, np.zeros(channels)]
    return [NcnnLayer("BatchNorm", layer.name, layer.bottoms, layer.tops, {0: channels},
                      [NcnnBlob(_f32(a), tagged=False) for a in arrays])]


def _scale(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.scale_param
    if len(layer.bottoms) != 1:
        raise _unsupported(layer, "a Scale with a second bottom (scale from a blob)")
    channels = ctx.shape(layer, layer.bottoms[0])[1]
    scale = layer.blobs[0].reshape(-1)
    if p.axis not in (1, -len(ctx.shape(layer, layer.bottoms[0])) + 1) or scale.size not in (1, channels):
        raise _unsupported(layer, f"a Scale of {scale.size} values on axis {p.axis} (ncnn scales per channel)")
    has_bias = bool(p.bias_term) and len(layer.blobs) > 1
    arrays = [np.broadcast_to(scale, (channels,))]
    if has_bias:
        arrays.append(np.broadcast_to(layer.blobs[1].reshape(-1), (channels,)))
    return [NcnnLayer("Scale", layer.name, layer.bottoms, layer.tops, {0: channels, 1: int(has_bias)},
                      [NcnnBlob(_f32(a), tagged=False) for a in arrays])]


def _relu(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    slope = float(layer.param.relu_param.negative_slope)
    return [NcnnLayer("ReLU", layer.name, layer.bottoms, layer.tops, {0: slope} if slope else {})]


def _relu6(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    return [NcnnLayer("Clip", layer.name, layer.bottoms, layer.tops, {0: 0.0, 1: 6.0})]


def _prelu(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    slopes = layer.blobs[0].reshape(-1)
    return [NcnnLayer("PReLU", layer.name, layer.bottoms, layer.tops, {0: int(slopes.size)},
                      [NcnnBlob(_f32(slopes), tagged=False)])]


def _plain(kind: str) -> Callable[[Layer, _Context], list[NcnnLayer]]:
    def rule(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
        return [NcnnLayer(kind, layer.name, layer.bottoms, layer.tops, {})]
    return rule


def _dropout(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    """Identity at test time (removed later), unless ``scale_train: false``, where Caffe scales by 1 - ratio."""
    p = layer.param.dropout_param
    params = {0: 1.0 - float(p.dropout_ratio)} if p.HasField("scale_train") and not p.scale_train else {}
    return [NcnnLayer("Dropout", layer.name, layer.bottoms, layer.tops, params)]


def _pool_out_full(size: int, k: int, s: int, pad: int) -> tuple[int, int]:
    """ncnn's pad_mode 0 ("full"): (output size, tail padding added after ``pad``)."""
    tail = (size + 2 * pad - k) % s
    tailpad = s - tail if tail else 0
    return (size + 2 * pad + tailpad - k) // s + 1, tailpad


def _pooling(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    """Pooling with Caffe's rounding and averaging, expressed in ncnn's terms.

    ncnn's default pad_mode 0 pads the tail so the output size is Caffe's ceil; it differs from Caffe when Caffe
    drops a last window that would start in the padding, where explicit pads (pad_mode 1) are written instead.
    Caffe's AVE divides by the window clipped to the padded image, padding included but tail excluded. ncnn
    either excludes all padding (6=0, right when pad is 0) or includes all of it, tail too (6=1, right when
    there is no tail); otherwise a zero Padding layer goes in front and the pooling excludes only the tail.
    """
    in_shape = ctx.shape(layer, layer.bottoms[0])
    g = pool_geometry(layer, in_shape)
    if g["method"] not in (caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE):
        raise _unsupported(layer, "STOCHASTIC pooling")
    method = 0 if g["method"] == caffe_pb2.PoolingParameter.MAX else 1
    if g["global"]:
        return [NcnnLayer("Pooling", layer.name, layer.bottoms, layer.tops, {0: method, 4: 1})]
    h, w = in_shape[2], in_shape[3]
    kh, kw, sh, sw, ph, pw = (g[k] for k in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"))
    prefix: list[NcnnLayer] = []
    bottoms = list(layer.bottoms)
    if method == 1 and (ph or pw):
        (out_h, tail_h), (out_w, tail_w) = _pool_out_full(h, kh, sh, ph), _pool_out_full(w, kw, sw, pw)
        if tail_h or tail_w or (out_h, out_w) != tuple(ctx.shape(layer, layer.tops[0])[2:]):
            padded = f"{layer.bottoms[0]}_{layer.name}_pad"
            prefix.append(NcnnLayer("Padding", f"{layer.name}_pad", bottoms, [padded],
                                    {0: ph, 1: ph, 2: pw, 3: pw, 4: 0, 5: 0.0}))
            bottoms, h, w, ph, pw = [padded], h + 2 * ph, w + 2 * pw, 0, 0
    params: dict[int, ParamValue] = {0: method, 1: kw, 2: sw, 3: pw}
    if kh != kw:
        params[11] = kh
    if sh != sw:
        params[12] = sh
    if ph != pw:
        params[13] = ph
    want = tuple(ctx.shape(layer, layer.tops[0])[2:])
    if want != (_pool_out_full(h, kh, sh, ph)[0], _pool_out_full(w, kw, sw, pw)[0]):
        pad_bottom = max(0, (want[0] - 1) * sh + kh - h - ph)
        pad_right = max(0, (want[1] - 1) * sw + kw - w - pw)
        params.update({5: 1, 13: ph, 14: pad_right, 15: pad_bottom})
        got = ((h + ph + pad_bottom - kh) // sh + 1, (w + pw + pad_right - kw) // sw + 1)
        if got != want:
            raise ModelError(f"layer '{layer.name}' (Pooling): no ncnn padding reproduces Caffe's output size {want}")
    if method == 1 and (ph or pw):
        params[6] = 1  # no tail here: count the padding, as Caffe does
    return prefix + [NcnnLayer("Pooling", layer.name, bottoms, layer.tops, params)]


def _eltwise(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.eltwise_param
    params: dict[int, ParamValue] = {0: int(p.operation)}
    if len(p.coeff):
        if p.operation != caffe_pb2.EltwiseParameter.SUM:
            raise ModelError(f"layer '{layer.name}' (Eltwise): coefficients apply to SUM only (Caffe rejects them "
                             "for PROD and MAX)")
        if len(p.coeff) != len(layer.bottoms):
            raise ModelError(f"layer '{layer.name}' (Eltwise): {len(p.coeff)} coefficients for "
                             f"{len(layer.bottoms)} bottoms")
        params[1] = [float(c) for c in p.coeff]
    return [NcnnLayer("Eltwise", layer.name, layer.bottoms, layer.tops, params)]


def _concat(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.concat_param
    axis = p.concat_dim if p.HasField("concat_dim") else p.axis
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    return [NcnnLayer("Concat", layer.name, layer.bottoms, layer.tops, {0: ctx.ncnn_axis(layer, axis, ndim)})]


def _slice(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.slice_param
    axis = p.slice_dim if p.HasField("slice_dim") else p.axis
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    points = list(p.slice_point)
    if points:
        if len(points) + 1 != len(layer.tops):
            raise ModelError(f"layer '{layer.name}' (Slice): {len(points)} slice points for {len(layer.tops)} tops")
        slices = [b - a for a, b in zip([0] + points[:-1], points)] + [-233]
    else:
        slices = [-233] * len(layer.tops)
    return [NcnnLayer("Slice", layer.name, layer.bottoms, layer.tops,
                      {0: slices, 1: ctx.ncnn_axis(layer, axis, ndim)})]


def _softmax(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    axis = ctx.ncnn_axis(layer, layer.param.softmax_param.axis, ndim)
    return [NcnnLayer("Softmax", layer.name, layer.bottoms, layer.tops, {0: axis, 1: 1})]


def _lrn(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    """Caffe adds ``k`` across channels only; its WITHIN_CHANNEL form always adds 1 (OpenCV ignores ``k``)."""
    p = layer.param.lrn_param
    across = p.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS
    params = {0: int(p.norm_region), 1: int(p.local_size), 2: float(p.alpha), 3: float(p.beta),
              4: float(p.k) if across else 1.0}
    return [NcnnLayer("LRN", layer.name, layer.bottoms, layer.tops, params)]


def _reshape_to(layer: Layer, ctx: _Context, free_axis: int | None) -> list[NcnnLayer]:
    """A Reshape to the inferred output shape; ``free_axis`` (a Caffe axis) is written -1 so it follows the input."""
    src, out = ctx.shape(layer, layer.bottoms[0]), ctx.shape(layer, layer.tops[0])
    if out[0] != src[0]:
        raise _unsupported(layer, f"a reshape that changes the batch axis ({src} -> {out})")
    dims = [int(d) for d in out[1:]]
    if free_axis is not None and free_axis >= 1:
        dims[free_axis - 1] = -1
    return [NcnnLayer("Reshape", layer.name, layer.bottoms, layer.tops, _whc(tuple(dims)))]


def _reshape(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.reshape_param
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    start = p.axis + ndim + 1 if p.axis < 0 else p.axis
    dims = list(p.shape.dim)
    free = start + dims.index(-1) if -1 in dims else None
    return _reshape_to(layer, ctx, free)


def _flatten(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    if len(ctx.shape(layer, layer.tops[0])) == 2:
        return [NcnnLayer("Flatten", layer.name, layer.bottoms, layer.tops, {})]
    return _reshape_to(layer, ctx, None)


def _permute(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    order = [int(o) for o in layer.param.permute_param.order]
    order += [i for i in range(ndim) if i not in order]
    table = {4: PERMUTE_4D, 3: PERMUTE_3D}.get(ndim, {})
    if tuple(order) not in table:
        raise _unsupported(layer, f"order {tuple(order)} on a {ndim}-D blob (the batch axis must stay first)")
    return [NcnnLayer("Permute", layer.name, layer.bottoms, layer.tops, {0: table[tuple(order)]})]


def _normalize(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.norm_param
    scale = layer.blobs[0].reshape(-1)
    params = {0: int(p.across_spatial), 1: int(p.channel_shared), 2: float(p.eps), 3: int(scale.size)}
    return [NcnnLayer("Normalize", layer.name, layer.bottoms, layer.tops, params,
                      [NcnnBlob(_f32(scale), tagged=False)])]


def _prior_box(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    """Caffe's aspect ratio list (1 first, duplicates dropped, 1/r after r when flipping) written out in full,
    so ncnn's own flipping (which does not drop duplicates) stays off."""
    p = layer.param.prior_box_param
    if len(p.max_size) and len(p.max_size) != len(p.min_size):
        raise ModelError(f"layer '{layer.name}' (PriorBox): {len(p.max_size)} max_size for {len(p.min_size)} min_size")
    ratios = prior_box_aspect_ratios(p)
    variance = list(p.variance) or [0.1]
    if len(variance) not in (1, 4):
        raise ModelError(f"layer '{layer.name}' (PriorBox): variance needs 1 or 4 values, got {len(variance)}")
    variance = variance * 4 if len(variance) == 1 else variance
    if p.HasField("img_size"):
        img_w = img_h = int(p.img_size)
    elif p.HasField("img_w") or p.HasField("img_h"):
        img_w, img_h = int(p.img_w), int(p.img_h)
    else:
        img_w = img_h = -233
    if p.HasField("step"):
        step_w = step_h = float(p.step)
    elif p.HasField("step_w") or p.HasField("step_h"):
        step_w, step_h = float(p.step_w), float(p.step_h)
    else:
        step_w = step_h = -233.0
    if (img_w == -233) != (img_h == -233) or len(layer.bottoms) < 2 and img_w == -233:
        raise ModelError(f"layer '{layer.name}' (PriorBox): needs the image size (img_size or a second bottom)")
    params: dict[int, ParamValue] = {
        0: [float(v) for v in p.min_size], 1: [float(v) for v in p.max_size], 2: [float(r) for r in ratios[1:]],
        3: float(variance[0]), 4: float(variance[1]), 5: float(variance[2]), 6: float(variance[3]),
        7: 0, 8: int(p.clip), 9: img_w, 10: img_h, 11: step_w, 12: step_h, 13: float(p.offset)}
    if not params[1]:
        del params[1]
    if not params[2]:
        del params[2]
    return [NcnnLayer("PriorBox", layer.name, layer.bottoms, layer.tops, params)]


def _detection_output(layer: Layer, ctx: _Context) -> list[NcnnLayer]:
    p = layer.param.detection_output_param
    nms = p.nms_param
    if not p.share_location or p.background_label_id != 0 or p.variance_encoded_in_target \
            or p.code_type != caffe_pb2.PriorBoxParameter.CENTER_SIZE or nms.eta != 1.0:
        raise _unsupported(layer, "anything but share_location, background_label_id 0, CENTER_SIZE boxes, "
                                  "variances in the priors and plain NMS (eta 1)")
    if len(layer.bottoms) != 3:
        raise _unsupported(layer, f"{len(layer.bottoms)} bottoms (ncnn reads location, confidence, priors)")
    keep_all = 2 ** 31 - 1  # Caffe: no top_k / keep_top_k -1 keeps every candidate
    top_k = int(nms.top_k) if nms.HasField("top_k") and nms.top_k >= 0 else keep_all
    keep_top_k = int(p.keep_top_k) if p.keep_top_k >= 0 else keep_all
    # Caffe's threshold when none is given is -FLT_MAX: every score passes.
    threshold = float(p.confidence_threshold) if p.HasField("confidence_threshold") \
        else -float(np.finfo(np.float32).max)
    params = {0: int(p.num_classes), 1: float(nms.nms_threshold), 2: top_k, 3: keep_top_k, 4: threshold}
    return [NcnnLayer("DetectionOutput", layer.name, layer.bottoms, layer.tops, params)]


RULES: dict[str, Callable[[Layer, _Context], list[NcnnLayer]]] = {
    "Convolution": _convolution, "Deconvolution": _convolution, "InnerProduct": _inner_product,
    "BatchNorm": _batchnorm, "Scale": _scale, "ReLU": _relu, "ReLU6": _relu6, "PReLU": _prelu,
    "Sigmoid": _plain("Sigmoid"), "TanH": _plain("TanH"), "Pooling": _pooling, "Eltwise": _eltwise,
    "Concat": _concat, "Slice": _slice, "Split": _plain("Split"), "Softmax": _softmax, "LRN": _lrn,
    "Dropout": _dropout, "Flatten": _flatten, "Reshape": _reshape, "Permute": _permute, "Normalize": _normalize,
    "PriorBox": _prior_box, "DetectionOutput": _detection_output,
}


# --------------------------------------------------------------------------------------------------- graph passes

def _rename_bottoms(layers: list[NcnnLayer], old: str, new: str) -> None:
    for layer in layers:
        layer.bottoms = [new if b == old else b for b in layer.bottoms]


def _bypass(layers: list[NcnnLayer], index: int, inputs: set[str]) -> None:
    """Remove the one-bottom layer at ``index``; its producer takes over its top name when nothing else reads
    the bottom (as ncnnoptimize does, so output names survive), else its readers read its bottom."""
    layer = layers.pop(index)
    bottom = layer.bottoms[0]
    readers = sum(b == bottom for other in layers for b in other.bottoms)
    producer = next((other for other in layers if bottom in other.tops), None)
    if len(layer.tops) == 1 and readers == 0 and producer is not None and bottom not in inputs:
        producer.tops = [layer.tops[0] if t == bottom else t for t in producer.tops]
        return
    for top in layer.tops:
        _rename_bottoms(layers, top, bottom)


def _remove_identities(layers: list[NcnnLayer], inputs: set[str]) -> None:
    """Caffe Split layers (re-inserted later where needed) and test-time Dropout are identities."""
    i = 0
    while i < len(layers):
        layer = layers[i]
        if layer.type == "Split" or (layer.type == "Dropout" and float(layer.params.get(0, 1.0)) == 1.0):
            log.debug("removing %s (%s)", layer.name, layer.type)
            _bypass(layers, i, inputs)
        else:
            i += 1


def _single_reader(layers: list[NcnnLayer], blob: str) -> NcnnLayer | None:
    readers = [layer for layer in layers if blob in layer.bottoms]
    if len(readers) == 1 and readers[0].bottoms.count(blob) == 1 and len(readers[0].bottoms) == 1:
        return readers[0]
    return None


def _fuse_batchnorm_scale(layers: list[NcnnLayer]) -> None:
    """BatchNorm then Scale -> one BatchNorm (slope *= scale, bias = bias * scale + scale bias), as ncnnoptimize."""
    for bn in list(layers):
        if bn.type != "BatchNorm":
            continue
        scale = _single_reader(layers, bn.tops[0])
        if scale is None or scale.type != "Scale" or scale.params[0] != bn.params[0]:
            continue
        slope, mean, var, bias = (b.data for b in bn.weights)
        s = scale.weights[0].data
        t = scale.weights[1].data if int(scale.params.get(1, 0)) else np.zeros_like(s)
        bn.weights = [NcnnBlob(_f32(a), tagged=False) for a in (slope * s, mean, var, bias * s + t)]
        bn.tops = list(scale.tops)
        layers.remove(scale)
        log.debug("fused Scale %s into BatchNorm %s", scale.name, bn.name)


def _shared_prelu_to_leaky_relu(layers: list[NcnnLayer]) -> None:
    """A PReLU with one shared slope is a leaky ReLU, which can then fuse into a convolution (as ncnnoptimize)."""
    for i, layer in enumerate(layers):
        if layer.type == "PReLU" and int(layer.params[0]) == 1:
            slope = float(layer.weights[0].data[0])
            layers[i] = NcnnLayer("ReLU", layer.name, layer.bottoms, layer.tops, {0: slope} if slope else {})


def _activation(layer: NcnnLayer) -> tuple[int, list[float] | None] | None:
    """The ``activation_type`` and params that replace an activation layer, or None if it has none."""
    if layer.type == "ReLU":
        slope = float(layer.params.get(0, 0.0))
        return (2, [slope]) if slope else (1, None)
    if layer.type == "Clip":
        return 3, [float(layer.params[0]), float(layer.params[1])]
    if layer.type == "Sigmoid":
        return 4, None
    return None


def _fuse_activations(layers: list[NcnnLayer]) -> None:
    """An activation right after a convolution/InnerProduct that nothing else reads becomes its activation_type."""
    for host in list(layers):
        if host.type not in ACTIVATION_HOSTS or int(host.params.get(9, 0)):
            continue
        act = _single_reader(layers, host.tops[0])
        fused = _activation(act) if act is not None else None
        if fused is None:
            continue
        host.params[9] = fused[0]
        if fused[1] is not None:
            host.params[10] = fused[1]
        host.tops = list(act.tops)
        layers.remove(act)
        log.debug("fused %s (%s) into %s", act.name, act.type, host.name)


def _vector_convolutions_to_inner_product(layers: list[NcnnLayer]) -> None:
    """A 1x1 Convolution reading a global Pooling or InnerProduct output (a 1-D Mat in ncnn) becomes an
    InnerProduct with the same name and weights: ncnn's 1-D convolution path is deprecated (ncnnoptimize's
    replace_convolution_with_innerproduct_after_global_pooling / _after_innerproduct)."""
    vectors = {top for layer in layers for top in layer.tops
               if layer.type == "InnerProduct" or (layer.type == "Pooling" and int(layer.params.get(4, 0)))}
    for i, layer in enumerate(layers):
        p = layer.params
        if layer.type != "Convolution" or len(layer.bottoms) != 1 or layer.bottoms[0] not in vectors:
            continue
        if p[1] != 1 or p.get(11, 1) != 1 or p.get(4, 0) or p.get(14, 0):
            continue
        params = {0: p[0], 1: p[5], 2: p[6]}
        params.update({k: p[k] for k in (9, 10) if k in p})
        layers[i] = NcnnLayer("InnerProduct", layer.name, layer.bottoms, layer.tops, params, layer.weights)
        vectors.update(layer.tops)
        log.debug("Convolution %s after a 1-D blob becomes InnerProduct", layer.name)


def _input_layers(graph: Graph, taken: set[str]) -> list[NcnnLayer]:
    """One Input layer per network input, named after its blob (the IR keeps no Input layer names)."""
    layers = []
    for value, shape in graph.inputs.items():
        name = value if value not in taken else f"{value}_input"
        layers.append(NcnnLayer("Input", name, [], [value], _whc(tuple(shape[1:]))))
    return layers


def _insert_splits(layers: list[NcnnLayer]) -> list[NcnnLayer]:
    """caffe2ncnn's Split layers: after the producer of every blob read more than once, ``splitncnn_N`` with tops
    ``<blob>_splitncnn_K``; the first reader gets the highest K, as caffe2ncnn hands them out."""
    refs = Counter(b for layer in layers for b in layer.bottoms)
    remaining = {blob: count for blob, count in refs.items() if count > 1}
    result: list[NcnnLayer] = []
    for layer in layers:
        new_bottoms = []
        for blob in layer.bottoms:
            if blob in remaining:
                remaining[blob] -= 1
                blob = f"{blob}_splitncnn_{remaining[blob]}"
            new_bottoms.append(blob)
        layer.bottoms = new_bottoms
    count = 0
    for layer in layers:
        result.append(layer)
        for top in layer.tops:
            if refs.get(top, 0) > 1:
                result.append(NcnnLayer("Split", f"splitncnn_{count}", [top],
                                        [f"{top}_splitncnn_{k}" for k in range(refs[top])], {}))
                count += 1
    return result


def convert_graph(graph: Graph) -> NcnnModel:
    """The FP32 ncnn model of a Caffe graph; an unsupported layer is a ``ModelError`` naming it and its type."""
    folded = fold_batchnorm_scale(graph)
    ctx = _Context(folded)
    layers: list[NcnnLayer] = []
    for layer in folded.layers:
        rule = RULES.get(layer.type)
        if rule is None:
            raise ModelError(f"layer '{layer.name}' has type '{layer.type}', which the ncnn converter does not "
                             f"support (supported: {', '.join(sorted(RULES))})")
        layers.extend(rule(layer, ctx))
    _remove_identities(layers, set(folded.inputs))
    _fuse_batchnorm_scale(layers)
    _shared_prelu_to_leaky_relu(layers)
    _fuse_activations(layers)
    _vector_convolutions_to_inner_product(layers)
    layers = _input_layers(folded, {layer.name for layer in layers}) + layers
    model = add_shape_hints(NcnnModel(_insert_splits(layers)))
    log.info("converted '%s': %d Caffe layers -> %d ncnn layers", graph.name, len(graph.layers), len(model.layers))
    return model
