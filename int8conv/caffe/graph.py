"""The graph IR every later stage shares (calibration, ncnn writer, ONNX export).

Caffe reuses blob names for in-place layers (``top == bottom``). The IR gives every value its own
name, following caffe2ncnn's convention so that ncnn blob names line up: the top of an in-place
layer ``L`` writing blob ``x`` becomes the value ``x_L``. ``Graph.blob_of`` maps a value back to its
Caffe blob name, and ``Graph.final_value`` gives the value pycaffe's ``net.blobs[name]`` shows after
``forward()`` (the last in-place version).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.reader import read_caffemodel, read_prototxt, weights_by_layer
from int8conv.errors import ModelError
from int8conv.layer_list import LayerList

if TYPE_CHECKING:
    from int8conv.caffe.layers.base import LayerKind

log = logging.getLogger(__name__)

#: Layers that feed data in training only; a deploy graph has none of them.
DATA_LAYER_TYPES = {"Data", "ImageData", "HDF5Data", "WindowData", "AnnotatedData", "DummyData"}


@dataclass
class Layer:
    """One Caffe layer with SSA value names and its weights as float32 arrays."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    param: caffe_pb2.LayerParameter
    blobs: list[np.ndarray] = field(default_factory=list)


@dataclass
class Graph(LayerList[Layer]):
    """A deploy network: inputs with NCHW shapes, layers in execution order, value shapes."""

    name: str
    inputs: dict[str, tuple[int, ...]]
    layers: list[Layer]
    blob_names: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _folded: Graph | None = field(default=None, init=False, repr=False, compare=False)

    def folded(self) -> Graph:
        """The deploy graph: BatchNorm/Scale folded into the convolutions before them (``caffe.fold``).

        Computed once per graph, so calibration, the ncnn converter, the ONNX export and the report of one run
        read the same folded layers instead of folding again each.
        """
        if self._folded is None:
            from int8conv.caffe.fold import fold_batchnorm_scale  # fold reads the layer registry, which reads Graph

            self._folded = fold_batchnorm_scale(self)
            self._folded._folded = self._folded  # folding a folded graph changes nothing
        return self._folded

    def missing_layer(self, name: str) -> str:
        return f"no layer named '{name}' in network '{self.name}'"

    def blob_of(self, value: str) -> str:
        """The Caffe blob name a value belongs to."""
        return self.blob_names[value]

    def final_value(self, blob: str) -> str:
        """The last value written to Caffe blob ``blob``: what pycaffe's ``net.blobs[blob]`` holds."""
        found = None
        for value in list(self.inputs) + [t for layer in self.layers for t in layer.tops]:
            if self.blob_names.get(value) == blob:
                found = value
        if found is None:
            raise ModelError(f"blob '{blob}' is not produced by any layer of network '{self.name}'")
        return found

    def image_input(self, engine: str) -> str:
        """The one input an FP32 engine feeds images to; a network with more (the ROIs of a ROIPooling, say) is a
        ModelError naming the layers that read the others and the engine."""
        if len(self.inputs) == 1:
            return next(iter(self.inputs))
        others = list(self.inputs)[1:]
        readers = ", ".join(f"'{layer.name}' ({layer.type})" for v in others for layer in self.consumers(v))
        raise ModelError(
            f"network '{self.name}' has {len(self.inputs)} inputs ({', '.join(self.inputs)}); the {engine} engine "
            f"feeds images to one, and {', '.join(others)} (read by {readers or 'no layer'}) would have no value"
        )

    @property
    def outputs(self) -> list[str]:
        """Values no layer reads: the network's outputs."""
        read = {b for layer in self.layers for b in layer.bottoms}
        return [t for layer in self.layers for t in layer.tops if t not in read]


def _included(layer: caffe_pb2.LayerParameter) -> bool:
    """Caffe's NetStateRule filter for the TEST phase (deploy)."""

    def meets(rule: caffe_pb2.NetStateRule) -> bool:
        return not rule.HasField("phase") or rule.phase == caffe_pb2.TEST

    if len(layer.include):
        return any(meets(r) for r in layer.include)
    return not any(meets(r) for r in layer.exclude)


def _header_inputs(net: caffe_pb2.NetParameter, path: Path) -> dict[str, tuple[int, ...]]:
    """Inputs declared by the legacy net-level ``input:`` header (``input_dim`` or ``input_shape``)."""
    inputs: dict[str, tuple[int, ...]] = {}
    names = list(net.input)
    if not names:
        return inputs
    if len(net.input_shape):
        if len(net.input_shape) != len(names):
            raise ModelError(f"{path}: {len(names)} 'input:' names but {len(net.input_shape)} 'input_shape' entries")
        for name, shape in zip(names, net.input_shape, strict=True):
            inputs[name] = tuple(int(d) for d in shape.dim)
    elif len(net.input_dim):
        if len(net.input_dim) != 4 * len(names):
            raise ModelError(
                f"{path}: {len(names)} 'input:' names need {4 * len(names)} 'input_dim' values, "
                f"found {len(net.input_dim)}"
            )
        for i, name in enumerate(names):
            inputs[name] = tuple(int(d) for d in net.input_dim[4 * i : 4 * i + 4])
    else:
        raise ModelError(f"{path}: 'input: {names[0]}' has no 'input_dim' or 'input_shape' to give its shape")
    return inputs


def _check_rewrite(path: Path, proto: caffe_pb2.LayerParameter, index: int, writer: dict[str, str]) -> None:
    """A layer may write a blob that exists only in place (its bottom at the same index), as Caffe's AppendTop."""
    top = proto.top[index]
    if index >= len(proto.bottom) or proto.bottom[index] != top:
        raise ModelError(
            f"{path}: layers '{writer.get(top, 'input')}' and '{proto.name}' both write blob '{top}' "
            f"(and '{proto.name}' does not read it: not in place); Caffe rejects this net (\"Top blob "
            'produced by multiple sources"); rename one top'
        )


def _layer_weights(
    proto: caffe_pb2.LayerParameter, blobs: list[np.ndarray], kind: LayerKind | None
) -> list[np.ndarray]:
    """The layer's weights in their canonical shapes, as its registry declaration (``kind``) says."""
    spec = kind.weights if kind is not None else None
    if spec is not None and spec.required and not blobs:
        raise ModelError(
            f"layer '{proto.name}' ({proto.type}) has no weights in the caffemodel: "
            "the caffemodel does not match the prototxt"
        )
    try:
        return spec.canonical(proto, blobs) if blobs and spec is not None and spec.canonical else blobs
    except ValueError as exc:
        raise ModelError(
            f"layer '{proto.name}' ({proto.type}): weight shapes {[b.shape for b in blobs]} "
            f"do not fit the prototxt: {exc}"
        ) from exc


def _check_layer(path: Path, proto: caffe_pb2.LayerParameter, seen_names: set[str]) -> None:
    """A deploy net has no training data layers and no two layers of one name."""
    if proto.type in DATA_LAYER_TYPES:
        raise ModelError(
            f"{path}: layer '{proto.name}' is a '{proto.type}' training data layer; use a deploy "
            "prototxt whose input is an 'Input' layer or an 'input:' header"
        )
    if proto.name in seen_names:
        raise ModelError(f"{path}: two layers are named '{proto.name}'; layer names must be unique")
    seen_names.add(proto.name)


def build_graph(
    net: caffe_pb2.NetParameter, weights: dict[str, list[np.ndarray]], path: Path | str = "<prototxt>"
) -> Graph:
    """Resolve in-place chains, attach weights and infer shapes; inconsistencies name the layer.

    A fork's name for a standard type (``ConvolutionDepthwise``) becomes that type here, as its registry
    declaration says, so every later stage sees only the standard type.
    """
    from int8conv.caffe.layers import kind_of
    from int8conv.caffe.shapes import infer_shapes

    path = Path(path)
    inputs = _header_inputs(net, path)
    blob_names = {name: name for name in inputs}
    current: dict[str, str] = {name: name for name in inputs}
    layers: list[Layer] = []
    seen_names: set[str] = set()
    writer: dict[str, str] = {}  # blob -> the layer that last wrote it
    for proto in net.layer:
        if not _included(proto):
            continue
        _check_layer(path, proto, seen_names)
        kind = kind_of(proto.type)
        if kind is not None and kind.input_shapes is not None:
            try:
                shapes = kind.input_shapes(proto)
            except ModelError as exc:
                raise ModelError(f"{path}: {exc}") from exc
            for i, top in enumerate(proto.top):
                inputs[top] = shapes[i] if i < len(shapes) else shapes[0]
                blob_names[top] = top
                current[top] = top
            continue
        bottoms = []
        for bottom in proto.bottom:
            if bottom not in current:
                raise ModelError(
                    f"{path}: layer '{proto.name}' ({proto.type}) reads blob '{bottom}', "
                    "which no earlier layer or input produces"
                )
            bottoms.append(current[bottom])
        in_place = len(proto.bottom) == 1 and len(proto.top) == 1 and proto.bottom[0] == proto.top[0]
        tops = []
        for index, top in enumerate(proto.top):
            value = f"{top}_{proto.name}" if in_place else top
            if value in blob_names and not in_place:
                _check_rewrite(path, proto, index, writer)
                log.debug("layer %s rewrites blob %s", proto.name, top)
                value = f"{top}_{proto.name}"
            blob_names[value] = top
            current[top] = value
            writer[top] = proto.name
            tops.append(value)
        blobs = _layer_weights(proto, weights.get(proto.name, []), kind)
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(proto)
        del param.blobs[:]
        if kind is not None and kind.rename is not None:
            kind.rename(param, blobs)
        layers.append(Layer(proto.name, param.type, bottoms, tops, param, blobs))
    if not inputs:
        raise ModelError(f"{path}: the network declares no input (no 'Input' layer and no 'input:' header)")
    graph = Graph(net.name or path.stem, inputs, layers, blob_names)
    graph.shapes = infer_shapes(graph)
    return graph


def load_graph(prototxt: str | Path, caffemodel: str | Path) -> Graph:
    """Read both files and build the IR."""
    net = read_prototxt(prototxt)
    model = read_caffemodel(caffemodel)
    weights = weights_by_layer(model, caffemodel)
    unused = set(weights) - {layer.name for layer in net.layer}
    if unused:
        log.debug("caffemodel layers not in the prototxt (ignored): %s", ", ".join(sorted(unused)))
    return build_graph(net, weights, prototxt)
