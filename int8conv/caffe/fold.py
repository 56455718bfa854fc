"""Fold BatchNorm and Scale into the convolution before them, as ncnnoptimize does.

INT8 weight scales must be computed on the weights the runtime holds, and those are the folded ones.
Folding keeps every value's name: the convolution takes over the top of the last layer folded into it,
so the value a later layer reads is the same before and after folding.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter

import numpy as np

from int8conv.caffe.graph import Graph, Layer

log = logging.getLogger(__name__)

FOLDABLE_INTO = ("Convolution", "InnerProduct")


def batchnorm_affine(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Caffe BatchNorm as ``y = a*x + b`` per channel (mean and variance divided by the moving-average factor)."""
    mean, var, factor = layer.blobs[0].astype(np.float64), layer.blobs[1].astype(np.float64), layer.blobs[2]
    s = float(factor.reshape(-1)[0])
    s = 0.0 if s == 0 else 1.0 / s
    eps = layer.param.batch_norm_param.eps
    a = 1.0 / np.sqrt(var * s + eps)
    return a, -mean * s * a


def scale_affine(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """Caffe Scale (one bottom) as ``y = a*x + b`` per channel."""
    a = layer.blobs[0].astype(np.float64)
    b = layer.blobs[1].astype(np.float64) if layer.param.scale_param.bias_term and len(layer.blobs) > 1 \
        else np.zeros_like(a)
    return a, b


def _affine(layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
    if layer.type == "BatchNorm":
        return batchnorm_affine(layer)
    if layer.type == "Scale" and len(layer.bottoms) == 1 and layer.param.scale_param.num_axes == 1 \
            and layer.param.scale_param.axis == 1:
        return scale_affine(layer)
    return None


def fold_batchnorm_scale(graph: Graph) -> Graph:
    """A new graph in which BatchNorm/Scale layers right after a Convolution/InnerProduct are folded into it."""
    reads = Counter(b for layer in graph.layers for b in layer.bottoms)
    by_bottom = {layer.bottoms[0]: layer for layer in graph.layers if len(layer.bottoms) == 1}
    folded: set[str] = set()
    layers: list[Layer] = []
    for layer in graph.layers:
        if layer.name in folded:
            continue
        if layer.type not in FOLDABLE_INTO or len(layer.tops) != 1:
            layers.append(layer)
            continue
        conv = copy.copy(layer)
        conv.param = copy.deepcopy(layer.param)
        weight = layer.blobs[0].astype(np.float64)
        out = weight.shape[0]
        bias = layer.blobs[1].astype(np.float64) if len(layer.blobs) > 1 else np.zeros(out)
        changed = False
        while reads[conv.tops[0]] == 1 and conv.tops[0] in by_bottom:
            nxt = by_bottom[conv.tops[0]]
            affine = _affine(nxt)
            if affine is None or affine[0].size not in (1, out):
                break
            a, b = (np.broadcast_to(v, (out,)) for v in affine)
            weight = weight * a.reshape((out,) + (1,) * (weight.ndim - 1))
            bias = bias * a + b
            conv.tops = list(nxt.tops)
            folded.add(nxt.name)
            changed = True
            log.debug("folded %s (%s) into %s", nxt.name, nxt.type, layer.name)
        if changed:
            conv.blobs = [weight.astype(np.float32), bias.astype(np.float32)]
            if layer.type == "Convolution":
                conv.param.convolution_param.bias_term = True
            else:
                conv.param.inner_product_param.bias_term = True
        layers.append(conv)
    return Graph(graph.name, dict(graph.inputs), layers, dict(graph.blob_names), dict(graph.shapes))
