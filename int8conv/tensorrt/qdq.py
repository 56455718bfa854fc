"""Explicit quantization: the FP32 ONNX with QuantizeLinear/DequantizeLinear pairs, as TensorRT 10/11 expect.

TensorRT 11 has no calibrators and no dynamic ranges; it reads INT8 only from Q/DQ pairs. Its rules
(TensorRT docs, and what the TensorRT-RTX parser rejects): int8 with zero-point 0, positive float32
scales, activations per tensor on the inputs of Conv/Gemm, weights per output channel (axis 0) with the
Q/DQ on the float initializer, and never an int8 tensor fed straight into a Conv. TensorRT moves and
fuses the pairs itself; placing them on the inputs of the weighted layers is NVIDIA's recommended recipe.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from int8conv.errors import ModelError
from int8conv.evaluation.fp32_search import Fp32Choice, search_fp32_layers
from int8conv.evaluation.metrics import blob_cosine, lowest
from int8conv.tables.tensorrt_files import LEVELS, MIN_AMAX
from int8conv.tensorrt.onnx_export import OnnxExport

log = logging.getLogger(__name__)

#: ONNX operators that get Q/DQ on their activation input and weight (TensorRT's INT8 GEMM/conv kernels).
QUANTIZED_OPS = ("Conv", "Gemm")


def weight_amax(weight: np.ndarray) -> np.ndarray:
    """max |w| per output channel (axis 0); a dead channel gets MIN_AMAX so its scale stays positive."""
    amax = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1).astype(np.float64)
    return np.maximum(amax, MIN_AMAX)


def quantization_scale(amax: np.ndarray | float) -> np.ndarray:
    """``amax / 127`` as float32, never below the scale of MIN_AMAX."""
    return (np.maximum(np.asarray(amax, dtype=np.float64), MIN_AMAX) / LEVELS).astype(np.float32)


def quantized_layers(export: OnnxExport) -> list[str]:
    """Names of the Conv/Gemm nodes (= Caffe layer names) that Q/DQ can be put on, in graph order."""
    return [node.name for node in export.model.graph.node if node.op_type in QUANTIZED_OPS]


def _q_dq_nodes(
    tensor: str, quantized: str, out: str, scale: str, zero: str, fresh: Callable[[str], str], attrs: dict
) -> list[onnx.NodeProto]:
    """QuantizeLinear ``tensor`` -> ``quantized`` and DequantizeLinear -> ``out``, with one scale and zero point."""
    return [
        helper.make_node(op, [source, scale, zero], [target], name=fresh(f"{tensor}/{op}"), **attrs)
        for op, source, target in (("QuantizeLinear", tensor, quantized), ("DequantizeLinear", quantized, out))
    ]


def check_fp32_layers(export: OnnxExport, fp32_layers: Iterable[str]) -> None:
    """``--fp32-layers`` names quantizable layers of the model (checked before the calibration, too)."""
    unknown = set(fp32_layers) - set(quantized_layers(export))
    if unknown:
        raise ModelError(
            f"--fp32-layers names {', '.join(sorted(unknown))}, which are not Convolution or "
            "InnerProduct layers of the model"
        )


def insert_qdq(
    export: OnnxExport,
    ranges: Mapping[str, float],
    fp32_layers: Iterable[str] = (),
    layer_ranges: Mapping[str, float] | None = None,
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> onnx.ModelProto:
    """A copy of ``export.model`` with Q/DQ on the inputs and weights of every Conv/Gemm whose input has a range.

    ``ranges`` is ``{tensor: amax}`` (see :func:`int8conv.tensorrt.ranges.tensor_ranges`); ``layer_ranges``
    (``{layer: amax}``, the ncnn table's) overrides it per layer, so two layers reading one tensor with
    different thresholds each get their own Q/DQ pair, as in ncnn. A layer whose input has no range stays
    FP32 (logged), as do the layers named in ``fp32_layers``. ConvTranspose (Caffe Deconvolution) is not
    quantized. ``weights`` (``{layer: (FP32 weights, per-output-channel scale)}``, from ``--adaround``) replace a
    layer's weights, quantized with ``1 / scale`` instead of their absmax: they round to the integers of the
    ncnn INT8 model.
    """
    layer_ranges = layer_ranges or {}
    weights = weights or {}
    keep_fp32 = set(fp32_layers)
    check_fp32_layers(export, keep_fp32)
    model = onnx.ModelProto()
    model.CopyFrom(export.model)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    dequantized: dict[tuple[str, float], str] = {}
    unquantized: list[str] = []
    taken = (
        {init.name for init in graph.initializer}
        | {v.name for v in graph.input}
        | {name for node in graph.node for name in list(node.input) + list(node.output) + [node.name]}
    )

    def fresh(name: str) -> str:
        """``name``, or ``name_<k>`` when the model already uses it (a Caffe value may be called anything)."""
        candidate, k = name, 0
        while candidate in taken:
            k += 1
            candidate = f"{name}_{k}"
        taken.add(candidate)
        return candidate

    def pair(tensor: str, scale: np.ndarray, axis: int | None) -> str:
        """Q -> DQ of ``tensor``; returns the name of the dequantized tensor."""
        scale_name, zero_name = fresh(f"{tensor}/qdq_scale"), fresh(f"{tensor}/qdq_zero_point")
        new_inits.append(numpy_helper.from_array(scale, scale_name))
        new_inits.append(numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), zero_name))
        attrs = {} if axis is None else {"axis": axis}
        quantized, out = fresh(f"{tensor}/quantized"), fresh(f"{tensor}/dequantized")
        nodes.extend(_q_dq_nodes(tensor, quantized, out, scale_name, zero_name, fresh, attrs))
        return out

    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            nodes.append(node)
            continue
        activation, weight = node.input[0], node.input[1]
        if node.name in keep_fp32:
            nodes.append(node)
            continue
        amax = layer_ranges.get(node.name, ranges.get(activation))
        if amax is None:
            unquantized.append(node.name)
            nodes.append(node)
            continue
        if weight not in initializers:
            raise ModelError(f"node '{node.name}': weight '{weight}' is not an initializer")
        scale = quantization_scale(amax)
        key = (activation, float(scale))
        if key not in dequantized:
            dequantized[key] = pair(activation, scale, None)
        node.input[0] = dequantized[key]
        node.input[1] = pair(weight, _weight_scale(initializers[weight], weights.get(node.name)), 0)
        nodes.append(node)
    if unquantized:
        log.warning(
            "no range for the input of %d layer(s), kept FP32 in the Q/DQ model: %s",
            len(unquantized),
            ", ".join(unquantized),
        )
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    del graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _weight_scale(initializer: onnx.TensorProto, learned: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """The per-output-channel Q/DQ scale of a weight: its absmax / 127, or, for ``--adaround``'s weights (which
    replace the initializer's), ``1 / scale`` of the ncnn table, so both round to the same integers."""
    w = numpy_helper.to_array(initializer)
    if learned is None:
        return quantization_scale(weight_amax(w))
    weight, scales = learned
    initializer.CopyFrom(numpy_helper.from_array(weight.reshape(w.shape).astype(np.float32), initializer.name))
    return np.where(scales > 0, 1.0 / np.where(scales > 0, scales, 1.0), MIN_AMAX / LEVELS).astype(np.float32)


@dataclass(frozen=True)
class QdqCheck:
    """The Q/DQ model's output cosine against the FP32 model under onnxruntime (CPU), per check image: what
    export-trt reports on its ``check`` line (``OutputCosine.check``; the worst is ``metrics.output_cosine``)."""

    cosines: tuple[float, ...]

    @property
    def worst(self) -> float:
        return lowest(self.cosines)

    @property
    def mean(self) -> float:
        return float(np.mean(self.cosines))


class OutputCosine:
    """``metrics.blob_cosine`` per image of a Q/DQ variant against the FP32 model, both run by onnxruntime (the
    worst image's is ``metrics.output_cosine``)."""

    def __init__(self, export: OnnxExport, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        import onnxruntime

        self.ort = onnxruntime
        self.outputs = [o for o in export.outputs if o not in export.constants]
        self.feeds = list(feeds)
        self.reference = self.outputs_of(export.model)

    def outputs_of(self, model: onnx.ModelProto) -> list[list[np.ndarray]]:
        options = self.ort.SessionOptions()
        options.log_severity_level = 3
        session = self.ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return [session.run(self.outputs, dict(feed)) for feed in self.feeds]

    def per_image(self, model: onnx.ModelProto) -> list[float]:
        return [blob_cosine(r, c) for r, c in zip(self.reference, self.outputs_of(model), strict=True)]

    def check(self, model: onnx.ModelProto) -> QdqCheck:
        return QdqCheck(tuple(self.per_image(model)))


def choose_fp32_layers(
    export: OnnxExport,
    ranges: Mapping[str, float],
    feeds: Sequence[Mapping[str, np.ndarray]],
    target: float,
    layer_ranges: Mapping[str, float] | None = None,
    weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    fixed_fp32: Sequence[str] = (),
) -> tuple[Fp32Choice, QdqCheck]:
    """The fewest Conv/Gemm layers to keep FP32, beyond ``fixed_fp32``, so the Q/DQ model's output cosine reaches
    ``target``, and the chosen model's per-image cosines (the search measured them: no second run).

    Scored by ``metrics.output_cosine`` over ``feeds`` (DetectionOutput inputs for SSD models, priors
    excluded); the search is ``fp32_search.search_fp32_layers``.
    """
    score = OutputCosine(export, feeds)
    fixed = list(fixed_fp32)
    scored: dict[frozenset[str], QdqCheck] = {}  # every choice the search returns was scored

    def cosine(fp32: list[str]) -> float:
        check = score.check(insert_qdq(export, ranges, fixed + fp32, layer_ranges, weights))
        scored[frozenset(fp32)] = check
        return check.worst

    choice = search_fp32_layers([name for name in quantized_layers(export) if name not in fixed], cosine, target)
    log.info(
        "Q/DQ: %d layer(s) kept FP32 for output cosine %.5f (all INT8: %.5f, target %.4f)",
        len(choice.fp32_layers),
        choice.cosine,
        choice.cosine_all_int8,
        target,
    )
    return choice, scored[frozenset(choice.fp32_layers)]
