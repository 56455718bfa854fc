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
from int8conv.caffe.layers import kind_of, types_where

log = logging.getLogger(__name__)

__all__ = ["fold_batchnorm_scale"]


def _affine(layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-channel affine a layer folds as, from its registry declaration (None: it does not fold)."""
    kind = kind_of(layer.type)
    return kind.affine(layer) if kind is not None and kind.affine is not None else None


def fold_batchnorm_scale(graph: Graph) -> Graph:
    """A new graph in which BatchNorm/Scale layers right after a Convolution/InnerProduct are folded into it."""
    reads = Counter(b for layer in graph.layers for b in layer.bottoms)
    by_bottom = {layer.bottoms[0]: layer for layer in graph.layers if len(layer.bottoms) == 1}
    hosts = types_where("folds_into")
    folded: set[str] = set()
    layers: list[Layer] = []
    for layer in graph.layers:
        if layer.name in folded:
            continue
        if layer.type not in hosts or len(layer.tops) != 1:
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
