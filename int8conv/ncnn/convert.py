"""Caffe graph IR -> FP32 ncnn model: what ``caffe2ncnn`` followed by ``ncnnoptimize`` produce, without their bugs.

Steps, each on plain data:

1. ``fold_batchnorm_scale``: BatchNorm/Scale after a Convolution/InnerProduct become part of its weights, so the
   INT8 step computes weight scales on the weights the runtime holds.
2. One Caffe layer -> its ncnn layers, by the ncnn emitter of its ``int8conv.caffe.layers`` declaration (mostly
   one; Pooling may get a Padding layer in front, Axpy becomes Scale + Eltwise); layer names
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

import numpy as np

from int8conv.caffe.graph import Graph, Layer
from int8conv.caffe.layers import REGISTRY, Decline, declined, kind_of
from int8conv.caffe.layers.base import axis_index, raw_f32, unsupported, whc
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnLayer, NcnnModel
from int8conv.ncnn.shape_hints import add_shape_hints

log = logging.getLogger(__name__)

Shape = tuple[int, ...]
#: Layer types that take a fused activation (``9=activation_type``, ``10=activation_params``).
ACTIVATION_HOSTS = ("Convolution", "ConvolutionDepthWise", "Deconvolution", "DeconvolutionDepthWise", "InnerProduct")


class _Context:
    """Shapes of the graph, and the axis/shape helpers every layer rule needs."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def shape(self, layer: Layer, value: str) -> Shape:
        if value not in self.graph.shapes:
            raise ModelError(
                f"layer '{layer.name}' ({layer.type}): the shape of '{value}' is unknown, "
                "so it cannot be converted to ncnn"
            )
        return self.graph.shapes[value]

    def ncnn_axis(self, layer: Layer, axis: int, ndim: int) -> int:
        """Caffe axis on an ``ndim``-D blob -> ncnn axis on the batch-less Mat."""
        positive = axis_index(axis, ndim)
        if not 1 <= positive < ndim:
            raise unsupported(layer, f"axis {axis} on a {ndim}-D blob (ncnn has no batch axis)")
        return positive - 1


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
        bn.weights = [raw_f32(a) for a in (slope * s, mean, var, bias * s + t)]
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
    vectors = {
        top
        for layer in layers
        for top in layer.tops
        if layer.type == "InnerProduct" or (layer.type == "Pooling" and int(layer.params.get(4, 0)))
    }
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
        layers.append(NcnnLayer("Input", name, [], [value], whc(tuple(shape[1:]))))
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
                result.append(
                    NcnnLayer(
                        "Split", f"splitncnn_{count}", [top], [f"{top}_splitncnn_{k}" for k in range(refs[top])], {}
                    )
                )
                count += 1
    return result


def convert_graph(graph: Graph) -> NcnnModel:
    """The FP32 ncnn model of a Caffe graph; an unsupported layer is a ``ModelError`` naming it and its type."""
    folded = graph.folded()
    ctx = _Context(folded)
    layers: list[NcnnLayer] = []
    for layer in folded.layers:
        kind = kind_of(layer.type)
        if kind is None:
            supported = sorted(name for name, k in REGISTRY.items() if not isinstance(k.ncnn, Decline))
            raise ModelError(
                f"layer '{layer.name}' has type '{layer.type}', which the ncnn converter does not "
                f"support (supported: {', '.join(supported)})"
            )
        if isinstance(kind.ncnn, Decline):
            raise declined("ncnn converter", layer, kind.ncnn)
        layers.extend(kind.ncnn(layer, ctx))
    _remove_identities(layers, set(folded.inputs))
    _fuse_batchnorm_scale(layers)
    _shared_prelu_to_leaky_relu(layers)
    _fuse_activations(layers)
    _vector_convolutions_to_inner_product(layers)
    layers = _input_layers(folded, {layer.name for layer in layers}) + layers
    model = add_shape_hints(NcnnModel(_insert_splits(layers)))
    log.info("converted '%s': %d Caffe layers -> %d ncnn layers", graph.name, len(graph.layers), len(model.layers))
    return model
