"""Pooling (MAX and AVE, global or windowed) with Caffe's rounding."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import LayerKind, Shape, ncnn_layer, register, unsupported
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.shapes import pool_geometry, pool_out
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnLayer, ParamValue

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "pooling"


def pooling_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    n, c, h, w = shapes[0]
    g = pool_geometry(layer, shapes[0])
    if g["global"]:
        return [(n, c, 1, 1)]
    return [
        (
            n,
            c,
            pool_out(h, g["kernel_h"], g["stride_h"], g["pad_h"]),
            pool_out(w, g["kernel_w"], g["stride_w"], g["pad_w"]),
        )
    ]


def _pool_out_full(size: int, k: int, s: int, pad: int) -> tuple[int, int]:
    """ncnn's pad_mode 0 ("full"): (output size, tail padding added after ``pad``).

    ncnn computes the tail with C's ``%``, which keeps the sign: a window larger than the padded input (a 2x2 map
    under a 3x3 kernel at stride 2) gets a tail of s + 1 and two outputs where Caffe has one.
    """
    tail = int(math.fmod(size + 2 * pad - k, s))
    tailpad = s - tail if tail else 0
    return (size + 2 * pad + tailpad - k) // s + 1, tailpad


def pooling_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
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
        raise unsupported(layer, "STOCHASTIC pooling")
    method = 0 if g["method"] == caffe_pb2.PoolingParameter.MAX else 1
    if g["global"]:
        return ncnn_layer("Pooling", layer, {0: method, 4: 1})
    h, w = in_shape[2], in_shape[3]
    kh, kw, sh, sw, ph, pw = (g[k] for k in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w"))
    prefix: list[NcnnLayer] = []
    bottoms = list(layer.bottoms)
    if method == 1 and (ph or pw):
        (out_h, tail_h), (out_w, tail_w) = _pool_out_full(h, kh, sh, ph), _pool_out_full(w, kw, sw, pw)
        if tail_h or tail_w or (out_h, out_w) != tuple(ctx.shape(layer, layer.tops[0])[2:]):
            padded = f"{layer.bottoms[0]}_{layer.name}_pad"
            prefix.append(
                NcnnLayer("Padding", f"{layer.name}_pad", bottoms, [padded], {0: ph, 1: ph, 2: pw, 3: pw, 4: 0, 5: 0.0})
            )
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


def pooling_onnx(b, layer: Layer) -> None:
    """Caffe pooling rounds up and drops a last window that starts in the right padding.

    The exact Caffe output size is reached with floor rounding and an enlarged end pad; average
    pooling that would then count the enlarged pad gets an explicit zero Pad first (Caffe's divisor
    counts the declared padding but not the overhang).
    """
    x = layer.bottoms[0]
    shape = b.shape(x)
    out = b.shape(layer.tops[0])
    g = pool_geometry(layer, shape)
    ave = g["method"] == 1
    if g["method"] not in (0, 1):
        raise ModelError(f"layer '{layer.name}' (Pooling): STOCHASTIC pooling is not supported")
    if g["global"]:
        b.node("GlobalAveragePool" if ave else "GlobalMaxPool", [x], [layer.tops[0]], layer.name)
        return
    kernel = [g["kernel_h"], g["kernel_w"]]
    strides = [g["stride_h"], g["stride_w"]]
    pads = [g["pad_h"], g["pad_w"]]
    extra = [
        max((o - 1) * s + k - (size + 2 * p), 0)
        for o, s, k, size, p in zip(out[2:], strides, kernel, shape[2:], pads, strict=True)
    ]
    tail_pads = pads + [p + e for p, e in zip(pads, extra, strict=True)]
    if not ave:
        b.node("MaxPool", [x], [layer.tops[0]], layer.name, kernel_shape=kernel, strides=strides, pads=tail_pads)
        return
    source, node_pads, include_pad = x, tail_pads, int(any(pads))
    if any(pads) and any(extra):  # Caffe counts the padding but not the tail: pad explicitly, count nothing
        source = f"{layer.name}/pad"
        b.node(
            "Pad",
            [x, b.init(f"{source}/pads", [0, 0, pads[0], pads[1], 0, 0, pads[0], pads[1]], np.int64)],
            [source],
            source,
            mode="constant",
        )
        b.derive(source, x)
        node_pads, include_pad = [0, 0] + extra, 0
    b.node(
        "AveragePool",
        [source],
        [layer.tops[0]],
        layer.name,
        kernel_shape=kernel,
        strides=strides,
        pads=node_pads,
        count_include_pad=include_pad,
    )


register(
    LayerKind(
        "Pooling",
        FAMILY,
        pooling_shape,
        pooling_ncnn,
        pooling_onnx,
        notes="STOCHASTIC pooling is declined by both writers",
    )
)
