"""Caffe graph IR -> FP32 ONNX, the network TensorRT's ONNX parser reads (TensorRT has no Caffe parser since 9.0).

Every Caffe value keeps its IR name as the ONNX tensor name (in-place tops are ``x_L``), so the calibration
cache, the range files and the Q/DQ model speak the same names as the ncnn table. Layers that ONNX
expresses with several nodes name their inner tensors ``<layer>/<what>``; ``OnnxExport.derived`` says how
the range of each inner tensor follows from a Caffe value. BatchNorm/Scale after a convolution are folded
first (as TensorRT and ncnn do): the convolution's output takes the name of the last folded value and the
folded values are listed in ``OnnxExport.folded``. DetectionOutput is not exported: its three inputs
become graph outputs and :mod:`int8conv.tensorrt.ssd_host` decodes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from int8conv.caffe.graph import Graph
from int8conv.caffe.layers import Decline, declined, kind_of
from int8conv.errors import ModelError
from int8conv.tensorrt.ssd_host import SsdHead, ssd_heads

log = logging.getLogger(__name__)

#: Opset 17: supported by TensorRT 8.6-11 and TensorRT-RTX; attribute-style reduce axes.
OPSET = 17
#: Name of the symbolic batch dimension when the batch is exported as dynamic.
DYNAMIC_BATCH = "N"


@dataclass(frozen=True)
class Derived:
    """The range of an inner tensor: ``factor * amax(source)``, or the fixed ``amax`` when source is None."""

    source: str | None
    factor: float = 1.0
    amax: float = 0.0


@dataclass
class OnnxExport:
    """An exported model plus what a caller needs to map its tensors back to Caffe values."""

    model: onnx.ModelProto
    outputs: list[str]
    derived: dict[str, Derived] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    heads: list[SsdHead] = field(default_factory=list)

    @property
    def inputs(self) -> list[str]:
        return [v.name for v in self.model.graph.input]

    def activations(self) -> list[str]:
        """Network inputs and every node output that is not a constant, in graph order."""
        names = list(self.inputs)
        for node in self.model.graph.node:
            names += [o for o in node.output if o and o not in self.constants]
        return names


class _Builder:
    """Collects nodes and initializers for the layers' ONNX emitters (declared in ``int8conv.caffe.layers``)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.derived: dict[str, Derived] = {}
        self.constants: set[str] = set()

    # helpers -------------------------------------------------------------------------------------------
    def init(self, name: str, array: np.ndarray, dtype=np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def shape(self, value: str) -> tuple[int, ...]:
        if value not in self.graph.shapes:
            raise ModelError(f"value '{value}' has no inferred shape; the ONNX export needs every shape")
        return self.graph.shapes[value]

    def keeps_batch_shape(self, shape: tuple[int, ...]) -> list[int]:
        """A Reshape target whose batch dimension is copied (0), so a dynamic batch works."""
        return [0] + [int(d) for d in shape[1:]]

    def derive(self, name: str, source: str | None, factor: float = 1.0, amax: float = 0.0) -> None:
        """The range of inner tensor ``name`` follows from ``source`` (see ``Derived``)."""
        self.derived[name] = Derived(source, factor, amax)

    def constant(self, name: str, array: np.ndarray, node_name: str) -> None:
        """A Constant node: a tensor that depends on shapes only (TensorRT gets no range for it)."""
        self.node("Constant", [], [name], node_name, value=numpy_helper.from_array(array, name))
        self.constants.add(name)


def export_onnx(graph: Graph, batch: int | None = None) -> OnnxExport:
    """The FP32 ONNX model of ``graph``, BatchNorm/Scale folded into the convolutions before them.

    ``batch``: None keeps the prototxt's batch, a positive int fixes it, -1 makes it the symbolic ``N``.
    """
    _check_batch_axis(graph, batch)
    original = graph
    graph = graph.folded()
    b = _Builder(graph)
    heads = ssd_heads(graph)
    for layer in graph.layers:
        if layer.type == "DetectionOutput":
            continue
        kind = kind_of(layer.type)
        if kind is None:
            raise ModelError(f"layer '{layer.name}' has type '{layer.type}', which the ONNX export does not support")
        if isinstance(kind.onnx, Decline):
            raise declined("ONNX export", layer, kind.onnx)
        kind.onnx(b, layer)

    prototxt_batch = _prototxt_batch(graph)
    _check_batch_follows(b, graph, batch, prototxt_batch)
    produced = {o for n in b.nodes for o in n.output}
    read = {i for n in b.nodes for i in n.input}
    outputs = [v for v in graph.outputs if v in produced]
    for head in heads:
        outputs += [v for v in (head.loc, head.conf, head.priors) if v not in outputs]
    outputs += [o for n in b.nodes for o in n.output if o not in read and o not in outputs and o not in b.constants]

    def value_info(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
        dims: list[int | str] = list(shape)
        if name not in b.constants and batch not in (None, prototxt_batch):  # else each keeps its own axis 0
            dims[0] = DYNAMIC_BATCH if batch == -1 else batch
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph_proto = helper.make_graph(
        b.nodes,
        graph.name,
        [value_info(name, shape) for name, shape in graph.inputs.items()],
        [value_info(name, graph.shapes[name]) for name in outputs],
        b.inits,
    )
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="int8conv")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    present = set(graph.inputs) | produced
    dropped = {head.output for head in heads}
    folded = {
        v: _folded_into(original, v, present)
        for layer in original.layers
        for v in layer.tops
        if v not in present and v not in dropped
    }
    return OnnxExport(model, outputs, b.derived, folded, b.constants, heads)


def _batch_label(batch: int) -> str:
    """An export batch as a message names it (-1: the symbolic one)."""
    return "N (dynamic)" if batch == -1 else str(batch)


def _check_batch_axis(graph: Graph, batch: int | None) -> None:
    """The batch rewrites axis 0 of every input and output, and an LSTM steps through time along axis 0: a batch
    that would change that axis would silently export a net of another sequence length."""
    if batch is None:
        return
    for layer in graph.layers:
        if layer.type == "LSTM":
            steps = graph.shapes[layer.bottoms[0]][0]
            if batch != steps:
                raise ModelError(
                    f"layer '{layer.name}' (LSTM) steps through time along axis 0 ({steps} steps), the axis the ONNX "
                    f"batch sets: a batch of {_batch_label(batch)} would change the sequence "
                    f"length; --batch {steps} keeps the prototxt's shapes (this net's batch is axis 1)"
                )


def _prototxt_batch(graph: Graph) -> int | None:
    """Axis 0 of the first network input: the batch the prototxt was written for."""
    return next((shape[0] for shape in graph.inputs.values() if shape), None)


def _check_batch_follows(b: _Builder, graph: Graph, batch: int | None, first: int | None) -> None:
    """A batch other than the prototxt's rewrites axis 0 of the inputs and outputs only: that is right when every
    value keeps the batch on axis 0. A layer that works along axis 0 (Concat, Slice, Flatten or Permute of axis
    0, a Reshape with -1 there) would compute something else, or fail in TensorRT or onnxruntime. ONNX shape
    inference of the nodes, inputs at the new batch, finds it: each Caffe value must then be (batch, its other
    prototxt dims). ``first``: the prototxt's batch (``_prototxt_batch``)."""
    if batch is None or first is None or batch == first:
        return
    probe_batch = batch if batch > 0 else first + 1
    asked = _batch_label(batch)
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [probe_batch, *s[1:]]) for n, s in graph.inputs.items()
    ]
    probe = helper.make_model(
        helper.make_graph(b.nodes, "probe", inputs, [], b.inits), opset_imports=[helper.make_opsetid("", OPSET)]
    )
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True).graph.value_info
    except onnx.shape_inference.InferenceError as exc:
        raise ModelError(
            f"--batch {asked}: a layer works along axis 0, the batch axis, so the network does not take another "
            f"batch (ONNX shape inference at batch {probe_batch}: {exc}); the prototxt's batch is {first}"
        ) from exc
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in inferred
    }
    for node in b.nodes:
        for value in node.output:
            prototxt = graph.shapes.get(value)
            got = shapes.get(value)
            if value in b.constants or prototxt is None or got is None or None in got or min(prototxt, default=0) < 0:
                continue
            if got != [probe_batch, *prototxt[1:]]:
                raise ModelError(
                    f"--batch {asked}: layer '{node.name}' works along axis 0, the batch axis: its output '{value}' "
                    f"is {tuple(prototxt)} at the prototxt's batch {first} but {tuple(got)} at batch {probe_batch}, "
                    f"not {(probe_batch, *prototxt[1:])}; export it at --batch {first}"
                )


def _folded_into(original: Graph, value: str, present: set[str]) -> str:
    """The exported tensor that now carries a value folded away (the output of the convolution it joined)."""
    current = value
    while current not in present:
        consumers = original.consumers(current)
        if len(consumers) != 1:
            raise ModelError(f"value '{value}' vanished from the export without being folded")
        current = consumers[0].tops[0]
    return current
