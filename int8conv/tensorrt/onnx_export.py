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

from int8conv.caffe.fold import batchnorm_affine, fold_batchnorm_scale, scale_affine
from int8conv.caffe.graph import Graph, Layer
from int8conv.caffe.shapes import conv_geometry, pool_geometry
from int8conv.errors import ModelError
from int8conv.tensorrt.ssd_host import SsdHead, prior_boxes, ssd_heads

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
    """Collects nodes and initializers; one method per Caffe layer type."""

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

    # layers --------------------------------------------------------------------------------------------
    def convolution(self, layer: Layer) -> None:
        g = conv_geometry(layer)
        inputs = [layer.bottoms[0], self.init(f"{layer.name}/weight", layer.blobs[0])]
        if len(layer.blobs) > 1 and (g["bias_term"] or layer.type == "Convolution"):
            inputs.append(self.init(f"{layer.name}/bias", layer.blobs[1].reshape(-1)))
        op = "Conv" if layer.type == "Convolution" else "ConvTranspose"
        self.node(op, inputs, [layer.tops[0]], layer.name,
                  kernel_shape=[g["kernel_h"], g["kernel_w"]], strides=[g["stride_h"], g["stride_w"]],
                  pads=[g["pad_h"], g["pad_w"], g["pad_h"], g["pad_w"]],
                  dilations=[g["dilation_h"], g["dilation_w"]], group=g["group"])

    def inner_product(self, layer: Layer) -> None:
        x = layer.bottoms[0]
        rank = len(self.shape(x))
        axis = layer.param.inner_product_param.axis
        axis = axis + rank if axis < 0 else axis
        if axis != 1:
            raise ModelError(f"layer '{layer.name}' (InnerProduct): axis {axis} is not supported by the ONNX "
                             "export (only axis 1)")
        if rank != 2:
            flat = f"{layer.name}/flatten"
            self.node("Flatten", [x], [flat], flat, axis=1)
            self.derived[flat] = Derived(x)
            x = flat
        inputs = [x, self.init(f"{layer.name}/weight", layer.blobs[0])]
        if len(layer.blobs) > 1:
            inputs.append(self.init(f"{layer.name}/bias", layer.blobs[1].reshape(-1)))
        self.node("Gemm", inputs, [layer.tops[0]], layer.name, transB=1)

    def affine(self, layer: Layer) -> None:
        """BatchNorm or single-bottom Scale that was not folded: a BatchNormalization with mean 0, var 1."""
        if layer.type == "Scale" and len(layer.bottoms) != 1:
            raise ModelError(f"layer '{layer.name}' (Scale) with two bottoms is not supported by the ONNX export")
        a, b = batchnorm_affine(layer) if layer.type == "BatchNorm" else scale_affine(layer)
        channels = self.shape(layer.bottoms[0])[1]
        a, b = (np.broadcast_to(v.reshape(-1), (channels,)) for v in (a, b))
        names = [self.init(f"{layer.name}/{k}", v) for k, v in
                 (("scale", a), ("bias", b), ("mean", np.zeros(channels)), ("var", np.ones(channels)))]
        self.node("BatchNormalization", [layer.bottoms[0]] + names, [layer.tops[0]], layer.name, epsilon=0.0)

    def relu(self, layer: Layer) -> None:
        slope = layer.param.relu_param.negative_slope
        if slope:
            self.node("LeakyRelu", [layer.bottoms[0]], [layer.tops[0]], layer.name, alpha=float(slope))
        else:
            self.node("Relu", [layer.bottoms[0]], [layer.tops[0]], layer.name)

    def prelu(self, layer: Layer) -> None:
        rank = len(self.shape(layer.bottoms[0]))
        slope = layer.blobs[0].reshape(-1)
        slope = slope.reshape((slope.size,) + (1,) * (rank - 2)) if slope.size > 1 else slope
        self.node("PRelu", [layer.bottoms[0], self.init(f"{layer.name}/slope", slope)], [layer.tops[0]], layer.name)

    def unary(self, op: str):
        def emit(layer: Layer) -> None:
            self.node(op, [layer.bottoms[0]], [layer.tops[0]], layer.name)
        return emit

    def identity(self, layer: Layer) -> None:
        """Dropout (a no-op at inference) and Split keep their top names through Identity nodes."""
        for top in layer.tops:
            self.node("Identity", [layer.bottoms[0]], [top], f"{layer.name}/{top}" if len(layer.tops) > 1
                      else layer.name)

    def pooling(self, layer: Layer) -> None:
        """Caffe pooling rounds up and drops a last window that starts in the right padding.

        The exact Caffe output size is reached with floor rounding and an enlarged end pad; average
        pooling that would then count the enlarged pad gets an explicit zero Pad first (Caffe's divisor
        counts the declared padding but not the overhang).
        """
        x = layer.bottoms[0]
        shape = self.shape(x)
        out = self.shape(layer.tops[0])
        g = pool_geometry(layer, shape)
        ave = g["method"] == 1
        if g["method"] not in (0, 1):
            raise ModelError(f"layer '{layer.name}' (Pooling): STOCHASTIC pooling is not supported")
        if g["global"]:
            self.node("GlobalAveragePool" if ave else "GlobalMaxPool", [x], [layer.tops[0]], layer.name)
            return
        kernel = [g["kernel_h"], g["kernel_w"]]
        strides = [g["stride_h"], g["stride_w"]]
        pads = [g["pad_h"], g["pad_w"]]
        extra = [max((o - 1) * s + k - (size + 2 * p), 0)
                 for o, s, k, size, p in zip(out[2:], strides, kernel, shape[2:], pads)]
        if not ave:
            self.node("MaxPool", [x], [layer.tops[0]], layer.name, kernel_shape=kernel, strides=strides,
                      pads=pads + [p + e for p, e in zip(pads, extra)])
            return
        if any(pads) and any(extra):
            padded = f"{layer.name}/pad"
            self.node("Pad", [x, self.init(f"{padded}/pads", [0, 0, pads[0], pads[1], 0, 0, pads[0], pads[1]],
                                           np.int64)], [padded], padded, mode="constant")
            self.derived[padded] = Derived(x)
            self.node("AveragePool", [padded], [layer.tops[0]], layer.name, kernel_shape=kernel, strides=strides,
                      pads=[0, 0] + extra, count_include_pad=0)
            return
        self.node("AveragePool", [x], [layer.tops[0]], layer.name, kernel_shape=kernel, strides=strides,
                  pads=pads + [p + e for p, e in zip(pads, extra)], count_include_pad=int(any(pads)))

    def eltwise(self, layer: Layer) -> None:
        p = layer.param.eltwise_param
        inputs = list(layer.bottoms)
        if p.operation == p.SUM:
            coeffs = list(p.coeff) or [1.0] * len(inputs)
            if len(coeffs) != len(inputs):
                raise ModelError(f"layer '{layer.name}' (Eltwise): {len(coeffs)} coeff for {len(inputs)} bottoms")
            for i, c in enumerate(coeffs):
                if c != 1.0:
                    scaled = f"{layer.name}/coeff{i}"
                    self.node("Mul", [inputs[i], self.init(f"{scaled}/value", np.float32(c))], [scaled], scaled)
                    self.derived[scaled] = Derived(inputs[i], abs(float(c)))
                    inputs[i] = scaled
            self.node("Add" if len(inputs) == 2 else "Sum", inputs, [layer.tops[0]], layer.name)
        elif p.operation == p.MAX:
            self.node("Max", inputs, [layer.tops[0]], layer.name)
        else:
            acc = inputs[0]
            for i, other in enumerate(inputs[1:], start=1):
                out = layer.tops[0] if i == len(inputs) - 1 else f"{layer.name}/prod{i}"
                self.node("Mul", [acc, other], [out], layer.name if out == layer.tops[0] else out)
                acc = out

    def concat(self, layer: Layer) -> None:
        p = layer.param.concat_param
        axis = p.concat_dim if p.HasField("concat_dim") else p.axis
        self.node("Concat", list(layer.bottoms), [layer.tops[0]], layer.name, axis=int(axis))
        if all(b in self.constants for b in layer.bottoms):
            self.constants.add(layer.tops[0])

    def slice(self, layer: Layer) -> None:
        p = layer.param.slice_param
        axis = int(p.slice_dim if p.HasField("slice_dim") else p.axis)
        sizes = [self.shape(top)[axis if axis >= 0 else axis + len(self.shape(top))] for top in layer.tops]
        self.node("Split", [layer.bottoms[0], self.init(f"{layer.name}/split", sizes, np.int64)],
                  list(layer.tops), layer.name, axis=axis)

    def softmax(self, layer: Layer) -> None:
        self.node("Softmax", [layer.bottoms[0]], [layer.tops[0]], layer.name,
                  axis=int(layer.param.softmax_param.axis))

    def lrn(self, layer: Layer) -> None:
        p = layer.param.lrn_param
        if p.norm_region != p.ACROSS_CHANNELS:
            raise ModelError(f"layer '{layer.name}' (LRN): WITHIN_CHANNEL has no ONNX operator")
        self.node("LRN", [layer.bottoms[0]], [layer.tops[0]], layer.name, size=int(p.local_size),
                  alpha=float(p.alpha), beta=float(p.beta), bias=float(p.k))

    def reshape_to(self, layer: Layer) -> None:
        """Flatten and Reshape: the target shape from shape inference, the batch dimension copied."""
        target = self.shape(layer.tops[0])
        if layer.type == "Flatten" and layer.param.flatten_param.end_axis in (-1, len(self.shape(layer.bottoms[0])) - 1) \
                and layer.param.flatten_param.axis in (1, -len(self.shape(layer.bottoms[0])) + 1):
            self.node("Flatten", [layer.bottoms[0]], [layer.tops[0]], layer.name, axis=1)
            return
        source = self.shape(layer.bottoms[0])
        dims = self.keeps_batch_shape(target) if target[0] == source[0] else list(target)
        self.node("Reshape", [layer.bottoms[0], self.init(f"{layer.name}/shape", dims, np.int64)],
                  [layer.tops[0]], layer.name)

    def permute(self, layer: Layer) -> None:
        order = [int(i) for i in layer.param.permute_param.order]
        rank = len(self.shape(layer.bottoms[0]))
        order += [i for i in range(rank) if i not in order]
        self.node("Transpose", [layer.bottoms[0]], [layer.tops[0]], layer.name, perm=order)

    def normalize(self, layer: Layer) -> None:
        """SSD Normalize: x / sqrt(sum x^2 + eps) * scale, with the sum over channels or over C*H*W.

        ONNX's LpNormalization (p=2) has no eps: it equals Caffe's result up to eps (1e-10 by default) and,
        like Caffe, gives 0 for an all-zero vector (onnxruntime checked).
        """
        p = layer.param.norm_param
        x = layer.bottoms[0]
        shape = self.shape(x)
        unit = f"{layer.name}/unit"
        if p.across_spatial:
            flat = f"{layer.name}/flatten"
            self.node("Flatten", [x], [flat], flat, axis=1)
            self.derived[flat] = Derived(x)
            flat_unit = f"{layer.name}/unit_flat"
            self.node("LpNormalization", [flat], [flat_unit], flat_unit, axis=1, p=2)
            self.derived[flat_unit] = Derived(None, amax=1.0)
            self.node("Reshape", [flat_unit, self.init(f"{unit}/shape", self.keeps_batch_shape(shape), np.int64)],
                      [unit], unit)
        else:
            self.node("LpNormalization", [x], [unit], unit, axis=1, p=2)
        self.derived[unit] = Derived(None, amax=1.0)
        scale = layer.blobs[0].reshape(-1)
        scale = scale.reshape(-1, 1, 1) if not p.channel_shared and scale.size > 1 else scale[:1]
        self.node("Mul", [unit, self.init(f"{layer.name}/scale", scale)], [layer.tops[0]], layer.name)

    def prior_box(self, layer: Layer) -> None:
        """PriorBox depends only on shapes: a constant computed on the host."""
        feature = self.shape(layer.bottoms[0])
        image = self.shape(layer.bottoms[1]) if len(layer.bottoms) > 1 else feature
        priors = prior_boxes(layer, (feature[2], feature[3]), (image[2], image[3]))
        self.node("Constant", [], [layer.tops[0]], layer.name, value=numpy_helper.from_array(priors, layer.tops[0]))
        self.constants.add(layer.tops[0])


def export_onnx(graph: Graph, batch: int | None = None) -> OnnxExport:
    """The FP32 ONNX model of ``graph``, BatchNorm/Scale folded into the convolutions before them.

    ``batch``: None keeps the prototxt's batch, a positive int fixes it, -1 makes it the symbolic ``N``.
    """
    original = graph
    graph = fold_batchnorm_scale(graph)
    b = _Builder(graph)
    handlers = {
        "Convolution": b.convolution, "Deconvolution": b.convolution, "InnerProduct": b.inner_product,
        "BatchNorm": b.affine, "Scale": b.affine, "ReLU": b.relu, "PReLU": b.prelu,
        "Sigmoid": b.unary("Sigmoid"), "TanH": b.unary("Tanh"), "AbsVal": b.unary("Abs"),
        "Pooling": b.pooling, "Eltwise": b.eltwise, "Concat": b.concat, "Slice": b.slice,
        "Softmax": b.softmax, "LRN": b.lrn, "Dropout": b.identity, "Split": b.identity,
        "Flatten": b.reshape_to, "Reshape": b.reshape_to, "Permute": b.permute, "Normalize": b.normalize,
        "PriorBox": b.prior_box,
    }
    heads = ssd_heads(graph)
    for layer in graph.layers:
        if layer.type == "DetectionOutput":
            continue
        handler = handlers.get(layer.type)
        if handler is None:
            raise ModelError(f"layer '{layer.name}' has type '{layer.type}', which the ONNX export does not support")
        handler(layer)

    produced = {o for n in b.nodes for o in n.output}
    read = {i for n in b.nodes for i in n.input}
    outputs = [v for v in graph.outputs if v in produced]
    for head in heads:
        outputs += [v for v in (head.loc, head.conf, head.priors) if v not in outputs]
    outputs += [o for n in b.nodes for o in n.output if o not in read and o not in outputs and o not in b.constants]

    def value_info(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
        dims: list[int | str] = list(shape)
        if name not in b.constants:
            dims[0] = DYNAMIC_BATCH if batch == -1 else (batch or shape[0])
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph_proto = helper.make_graph(
        b.nodes, graph.name,
        [value_info(name, shape) for name, shape in graph.inputs.items()],
        [value_info(name, graph.shapes[name]) for name in outputs], b.inits)
    model = helper.make_model(graph_proto, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="int8conv")
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    present = set(graph.inputs) | produced
    dropped = {head.output for head in heads}
    folded = {v: _folded_into(original, v, present) for layer in original.layers for v in layer.tops
              if v not in present and v not in dropped}
    return OnnxExport(model, outputs, b.derived, folded, b.constants, heads)


def _folded_into(original: Graph, value: str, present: set[str]) -> str:
    """The exported tensor that now carries a value folded away (the output of the convolution it joined)."""
    current = value
    while current not in present:
        consumers = original.consumers(current)
        if len(consumers) != 1:
            raise ModelError(f"value '{value}' vanished from the export without being folded")
        current = consumers[0].tops[0]
    return current
