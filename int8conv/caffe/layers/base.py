"""What one Caffe layer type is, for every stage: the ``LayerKind`` declaration and the helpers its rules share.

A kind is declared once, in the module of its family, with ``register``. Each writer (ncnn, ONNX) and each FP32
engine (OpenCV, pycaffe) either handles the type or declines it with a ``Decline`` that says why; nothing is
left unsaid, and ``tests/test_layers.py`` fails on a type that a writer neither handles nor declines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnBlob, NcnnLayer, ParamValue

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer
    from int8conv.caffe.proto import caffe_pb2

Shape = tuple[int, ...]
ShapeRule = Callable[["Layer", list[Shape]], list[Shape]]
#: Caffe weights as read -> the shapes modern Caffe uses (legacy 4-D blobs reshaped).
Canonicaliser = Callable[["caffe_pb2.LayerParameter", list[np.ndarray]], list[np.ndarray]]
#: (layer, converter context) -> the ncnn layers it becomes.
NcnnEmitter = Callable[["Layer", Any], list["NcnnLayer"]]
#: (ONNX builder, layer) -> None; the builder collects nodes and initializers.
OnnxEmitter = Callable[[Any, "Layer"], None]
#: A per-channel affine ``y = a*x + b`` of a layer that folds into the convolution before it, or None.
Affine = Callable[["Layer"], tuple[np.ndarray, np.ndarray] | None]
#: A graph-input layer's parameters -> the shapes it declares for its tops.
InputShapes = Callable[["caffe_pb2.LayerParameter"], list[Shape]]


@dataclass(frozen=True)
class Decline:
    """A writer or engine that cannot handle a type, and why (shown to the user and in docs/layers.md)."""

    reason: str


def fork_layer(fork: str = "") -> Decline:
    """pycaffe's Decline of a type that only a Caffe fork (``fork``: which, e.g. YOLOv2) defines: the pycaffe that
    ``int8conv install-caffe`` builds is BVLC Caffe."""
    return Decline(f"a Caffe-fork layer{f' ({fork})' if fork else ''}: BVLC pycaffe has none")


def opencv_lacks(type_name: str, note: str = "") -> Decline:
    """OpenCV's Decline of a type its Caffe importer does not read (``note``: e.g. where OpenCV has it anyway)."""
    return Decline(f"OpenCV's Caffe importer has no {type_name} layer" + (f" ({note})" if note else ""))


@dataclass(frozen=True)
class Weights:
    """The arrays a layer takes from the caffemodel: whether they must be there, and how they are canonicalised."""

    required: bool = True
    canonical: Canonicaliser | None = None


@dataclass(frozen=True)
class LayerKind:
    """Everything the pipeline knows about one Caffe layer type.

    ``shape``: Caffe's output shapes (None: the graph builder handles it, as for Input).
    ``input_shapes``: a graph input (Input, MemoryData): the shapes of its tops; the graph builder makes them inputs.
    ``weights``: None for parameter-free layers. ``min_bottoms``: Caffe's ExactNum/MinBottomBlobs (fewer is an error).
    ``alias_of``/``rename``: a fork's type name for a standard layer (ConvolutionDepthwise); ``rename`` turns the
    layer's parameters into the standard type's, and the graph IR only ever sees ``alias_of``.
    ``folds_into``: BatchNorm/Scale after it become part of its weights. ``affine``: how this layer folds.
    ``value_preserving``: moves, copies or reorders values without arithmetic (calibration ranges pass through).
    ``head_passthrough``: between a head convolution and the network output, keeps the head a head.
    ``quantizable``: ncnn and TensorRT run it in INT8 (it gets weight scales and an activation line), or a
    Decline saying why it stays FP32.
    ``ncnn``/``onnx``: the emitters, or a Decline. ``opencv``/``caffe``: whether that FP32 engine runs it.
    """

    type: str
    family: str
    shape: ShapeRule | None
    ncnn: NcnnEmitter | Decline
    onnx: OnnxEmitter | Decline
    weights: Weights | None = None
    min_bottoms: int = 1
    alias_of: str | None = None
    rename: Callable[[caffe_pb2.LayerParameter, list[np.ndarray]], None] | None = None
    folds_into: bool = False
    affine: Affine | None = None
    value_preserving: bool = False
    head_passthrough: bool = False
    quantizable: bool | Decline = Decline("it has no weights to quantize")
    opencv: bool | Decline = True
    caffe: bool | Decline = True
    input_shapes: InputShapes | None = None
    notes: str = ""

    @property
    def is_quantizable(self) -> bool:
        return self.quantizable is True


REGISTRY: dict[str, LayerKind] = {}


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind``; a type declared twice is a programming error."""
    if kind.type in REGISTRY:
        raise ValueError(f"layer type '{kind.type}' is declared twice ({REGISTRY[kind.type].family}, {kind.family})")
    REGISTRY[kind.type] = kind
    return kind


def declined(what: str, layer: Layer, decline: Decline) -> ModelError:
    """The error a writer raises for a type it declines: layer, type, writer and reason."""
    return ModelError(
        f"layer '{layer.name}' has type '{layer.type}', which the {what} does not support: {decline.reason}"
    )


# --------------------------------------------------------------------------------------------------- shared helpers


def axis_index(axis: int, ndim: int) -> int:
    """A Caffe axis (negative counts from the end) as a non-negative index."""
    return axis + ndim if axis < 0 else axis


def channels_of(shape: Shape) -> int:
    """Caffe's channel axis 1 (a 1-D blob: one channel)."""
    return shape[1] if len(shape) > 1 else 1


def same_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """Element-wise layers: the output has the input's shape."""
    return [shapes[0]]


def f32(values) -> np.ndarray:
    """A flat contiguous float32 copy, as the .bin stores arrays."""
    return np.ascontiguousarray(np.asarray(values, dtype=np.float64).astype(np.float32).reshape(-1))


def unsupported(layer: Layer, what: str, writer: str = "ncnn converter") -> ModelError:
    """A parameter combination a writer cannot express; names the layer and the writer."""
    return ModelError(f"layer '{layer.name}' ({layer.type}): {what} is not supported by the {writer}")


def whc(shape: Shape) -> dict[int, int]:
    """A batch-less shape as ncnn's 0=w 1=h 2=c (and 11=d for 4-D Mats)."""
    dims = list(shape)
    keys = {1: (0,), 2: (1, 0), 3: (2, 1, 0), 4: (2, 11, 1, 0)}.get(len(dims))
    if keys is None:
        raise ModelError(f"ncnn Mats have 1 to 4 dimensions without the batch axis, got shape {tuple(shape)}")
    return {key: int(d) for key, d in zip(keys, dims, strict=True)}


def flat_weights(proto: caffe_pb2.LayerParameter, blobs: list[np.ndarray]) -> list[np.ndarray]:
    """Per-channel parameter layers keep every array 1-D."""
    return [b.reshape(-1) for b in blobs]


def raw_f32(values) -> NcnnBlob:
    """An untagged .bin array (biases, scales, per-channel data): raw fp32, no storage tag."""
    return NcnnBlob(f32(values), tagged=False)


def weight_and_bias(layer: Layer, weight: np.ndarray) -> list[NcnnBlob]:
    """A convolution's or InnerProduct's .bin arrays: the tagged weight, then the raw bias when the layer has one."""
    return [NcnnBlob(f32(weight))] + [raw_f32(bias) for bias in layer.blobs[1:2]]


def ncnn_layer(
    kind: str, layer: Layer, params: dict[int, ParamValue], weights: list[NcnnBlob] | None = None
) -> list[NcnnLayer]:
    """The one ncnn layer of type ``kind`` that ``layer`` becomes: its name, bottoms and tops kept."""
    return [NcnnLayer(kind, layer.name, layer.bottoms, layer.tops, params, weights or [])]


def ncnn_plain(kind: str) -> NcnnEmitter:
    """An ncnn layer of type ``kind`` with no parameters and no weights."""

    def emit(layer: Layer, ctx) -> list[NcnnLayer]:
        return ncnn_layer(kind, layer, {})

    return emit


def onnx_unary(op: str) -> OnnxEmitter:
    """An ONNX node ``op`` with one input and one output, no attributes."""

    def emit(b, layer: Layer) -> None:
        b.node(op, [layer.bottoms[0]], [layer.tops[0]], layer.name)

    return emit
