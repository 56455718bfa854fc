"""FP32 ncnn model + calibration table -> INT8 ncnn model: what today's ``ncnn2int8`` does, minus its traps.

For every Convolution, ConvolutionDepthWise and InnerProduct layer that has BOTH a weight line and an
activation line in the table, the weights become int8 (round half away from zero, clamp to [-127, 127], as
ncnn's ``float2int8``) and the .bin gains the weight scales and the bottom scale after the bias;
``int8_scale_term`` (8=) becomes 2, or 1 for ConvolutionDepthWise. Consecutive INT8 convolutions are fused
so the first one requantizes its output to int8 (``int8_scale_term`` + 100, top scale = the next layer's
bottom scale), directly or through a Split whose consumers are all INT8 convolutions. Weights that stay
FP32 are stored as fp16 when asked (ncnn2int8 always does). The INT8 model keeps the FP32 model's shape
hints (quantizing changes no shape), or gets them when the FP32 model had none.

Differences from ncnn2int8, on purpose:

- a layer with an activation line but no weight line stays FP32 with a warning; ncnn2int8 stops converting
  every layer after it;
- through a Split, fusion also requires every consumer to use the same bottom scale; ncnn2int8 takes the
  first consumer's scale, which would feed the others int8 data at a scale they do not expect;
- a weight that does not fit fp16 (|w| > 65504) keeps its layer's weights in fp32 instead of becoming inf;
- a grouped (not depthwise) convolution stays FP32: ncnn's x86 INT8 group path with the packing layout (on by
  default) returns garbage for it (measured with the PyPI runtime: cosine ~0 against FP32 with 8 outputs per
  group, exact with ``use_packing_layout = False``; in the ShuffleNet of ../shared, 20 outputs and 80 packed
  input channels per group give a cosine of 0.39 inside the network while the same layer alone is exact).

A weight scale of 0 marks a dead channel: its int8 weights are all 0, and the convolution and innerproduct
kernels dequantize such a channel with 0 instead of ``1 / (bottom_scale * 0)``, so it outputs its bias, as in
FP32. ncnn's x86 INT8 ConvolutionDepthWise with a channel count that is not a multiple of 8 does not: it writes
NaN for the channel (measured with the PyPI runtime on the ShuffleNet of ../shared, 54 channels). A depthwise
layer therefore stores its smallest live scale for a dead channel instead; its int8 weights stay 0 (they are below
1/1024 of the layer's largest), so it still outputs its bias.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np

from int8conv.errors import ModelError, some_names
from int8conv.ncnn.model import NcnnBlob, NcnnLayer, NcnnModel
from int8conv.ncnn.shape_hints import add_shape_hints, has_shape_hints
from int8conv.tables.ncnn_table import CalibrationTable

log = logging.getLogger(__name__)

#: ``int8_scale_term`` of a quantized layer (its keys: the ncnn types this module quantizes), and what fusion adds
#: when the layer requantizes its output.
SCALE_TERM = {"Convolution": 2, "ConvolutionDepthWise": 1, "InnerProduct": 2}
REQUANTIZE = 100
QUANTIZABLE = tuple(SCALE_TERM)
CONVOLUTIONS = ("Convolution", "ConvolutionDepthWise")
FP16_MAX = 65504.0


def float_to_int8(values: np.ndarray) -> np.ndarray:
    """ncnn's ``float2int8``: round half away from zero, then clamp to [-127, 127]."""
    rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
    return np.clip(rounded, -127, 127).astype(np.int8)


def scale_units(layer: NcnnLayer) -> int:
    """How many weight scales the runtime reads: ``group`` for ConvolutionDepthWise, else ``num_output``."""
    if layer.type == "ConvolutionDepthWise":
        return int(layer.params.get(7, 1))
    return int(layer.params.get(0, 0))


def is_int8(layer: NcnnLayer) -> bool:
    """True for a layer this module (or ncnn2int8) quantized."""
    return layer.type in QUANTIZABLE and int(layer.params.get(8, 0)) != 0


def table_layers(model: NcnnModel, table: CalibrationTable) -> list[NcnnLayer]:
    """The quantizable layers of ``model`` that ``table`` has both lines for (weights and bottom scale), in order."""
    return [
        layer
        for layer in model.layers
        if layer.type in QUANTIZABLE and layer.name in table.activation_scales and layer.name in table.weight_scales
    ]


def int8_layers(model: NcnnModel) -> list[str]:
    """Names of the quantized layers of an INT8 model, in execution order."""
    return [layer.name for layer in model.layers if is_int8(layer)]


def grouped_outputs(layer: NcnnLayer) -> int | None:
    """The outputs per group of a grouped (not depthwise) convolution, which ncnn computes wrongly in INT8
    (``GROUPED_INT8_DEFECT``); None for any other layer."""
    if layer.type != "ConvolutionDepthWise":
        return None
    num_output, group = int(layer.params.get(0, 0)), int(layer.params.get(7, 1))
    kernel = int(layer.params.get(1, 0)) * int(layer.params.get(11, layer.params.get(1, 0)))
    channels = int(layer.params.get(6, 0)) // max(kernel * num_output, 1) * group
    return None if channels == group == num_output else num_output // group


#: why the layers ``grouped_outputs`` finds stay FP32
GROUPED_INT8_DEFECT = "ncnn's x86 INT8 group path with the packing layout returns wrong results for them"


def runtime_fp32_layers(model: NcnnModel) -> list[str]:
    """The quantizable layers an INT8 model of ``model`` keeps FP32 whatever the table (``grouped_outputs``)."""
    return [layer.name for layer in model.layers if layer.type in QUANTIZABLE and grouped_outputs(layer) is not None]


def _quantize_layer(
    layer: NcnnLayer,
    weight_scales: np.ndarray,
    bottom_scale: float,
    bias: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> None:
    """Rewrite one layer in place: int8 weights (of ``weight`` when given: adjusted FP32 weights), bias kept (or
    replaced by ``bias``), scales appended."""
    units = scale_units(layer)
    scales = np.asarray(weight_scales, dtype=np.float32).reshape(-1)
    if scales.size != units:
        kind = "group" if layer.type == "ConvolutionDepthWise" else "num_output"
        raise ModelError(
            f"layer '{layer.name}' ({layer.type}): the table has {scales.size} weight scales, "
            f"ncnn reads {units} ({kind}); the table was made for another model"
        )
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ModelError(f"layer '{layer.name}': weight scales must be finite and >= 0")
    if not (math.isfinite(bottom_scale) and bottom_scale > 0):
        raise ModelError(f"layer '{layer.name}': activation scale must be finite and > 0, got {bottom_scale}")
    if int(layer.params.get(8, 0)):
        raise ModelError(f"layer '{layer.name}' is already INT8 (8={layer.params[8]}); quantize an FP32 model")
    source = layer.weights[0].data if weight is None else weight
    if source.size != layer.weights[0].data.size or not np.all(np.isfinite(source)):
        # NaN would cast to an arbitrary int8 (0 here): a silently wrong layer
        raise ModelError(
            f"layer '{layer.name}': {'adjusted ' if weight is not None else ''}weights need "
            f"{layer.weights[0].data.size} finite values, got {source.size} with "
            f"{int(np.sum(~np.isfinite(source)))} NaN or Inf"
        )
    quantized = float_to_int8(np.asarray(source, dtype=np.float32).reshape(units, -1) * scales[:, None]).reshape(-1)
    if bias is not None:
        _replace_bias(layer, np.asarray(bias, dtype=np.float32).reshape(-1))
    if layer.type == "ConvolutionDepthWise" and np.any(scales == 0) and np.any(scales > 0):
        scales = np.where(scales == 0, scales[scales > 0].min(), scales).astype(np.float32)
    layer.weights = (
        [NcnnBlob(quantized, tagged=True)]
        + layer.weights[1:]
        + [NcnnBlob(scales, tagged=False), NcnnBlob(np.array([bottom_scale], np.float32), tagged=False)]
    )
    layer.params[8] = SCALE_TERM[layer.type]


def _uncovered_layers(model: NcnnModel, table: CalibrationTable) -> list[str]:
    """Quantizable layers without an activation line that were not left out on purpose (``table.fp32_layers``).
    Those with a weight line get a warning each (a table with the line lost); the others are returned."""
    uncovered = []
    for layer in model.layers:
        if layer.type not in QUANTIZABLE or layer.name in table.activation_scales or layer.name in table.fp32_layers:
            continue
        if layer.name in table.weight_scales:
            log.warning(
                "layer '%s' (%s) has a weight line but no activation line ('%s <scale>'): it stays FP32",
                layer.name,
                layer.type,
                layer.name,
            )
        else:
            uncovered.append(layer.name)
    return uncovered


def _warn_dead_scales(layer: NcnnLayer, weight_scales: np.ndarray) -> None:
    """A weight scale of 0 is meant for a dead channel (as ``weight_scales`` counts them: negligible weights);
    on a live channel it silences that channel."""
    from int8conv.calibration.weight_scales import dead_channels

    scales = np.asarray(weight_scales, dtype=np.float32).reshape(-1)
    units = scale_units(layer)
    if scales.size != units or not np.any(scales == 0):
        return  # a size mismatch is _quantize_layer's error
    live = ~dead_channels(np.abs(layer.weights[0].data.astype(np.float32).reshape(units, -1)).max(axis=1))
    wrong = np.flatnonzero((scales == 0) & live)
    if wrong.size:
        log.warning(
            "layer '%s' (%s): weight scale 0 on %d channel(s) that have weights (e.g. channel %d): in INT8 "
            "they output only their bias",
            layer.name,
            layer.type,
            wrong.size,
            int(wrong[0]),
        )


def _replace_bias(layer: NcnnLayer, bias: np.ndarray) -> None:
    """Store a corrected FP32 bias (bias correction); a layer without bias gets one (bias_term: 1= for
    InnerProduct, 5= for convolutions)."""
    term = 1 if layer.type == "InnerProduct" else 5
    if bias.size != int(layer.params.get(0, 0)) or not np.all(np.isfinite(bias)):
        raise ModelError(
            f"layer '{layer.name}': a corrected bias needs {layer.params.get(0, 0)} finite values, got {bias.size}"
        )
    if int(layer.params.get(term, 0)):
        layer.weights[1] = NcnnBlob(bias, tagged=False)
    else:
        layer.weights.insert(1, NcnnBlob(bias, tagged=False))
        layer.params[term] = 1


def _bottom_scale(layer: NcnnLayer) -> float:
    """The bottom scale of a quantized layer: the last array, or the one before the top scale once fused."""
    return float(layer.weights[-2 if int(layer.params[8]) > REQUANTIZE else -1].data[0])


def _fuse_target(model: NcnnModel, layer: NcnnLayer) -> NcnnLayer | None:
    """The INT8 convolution whose bottom scale ``layer`` may requantize its output to, or None.

    Either the single consumer of the top is an INT8 convolution, or it is a Split whose every top feeds an
    INT8 convolution and all of them use the same bottom scale.
    """
    consumers = model.consumers(layer.tops[0])
    if len(consumers) != 1:
        return None
    nxt = consumers[0]
    if nxt.type in CONVOLUTIONS and is_int8(nxt) and len(nxt.bottoms) == 1:
        return nxt
    if nxt.type != "Split" or len(nxt.bottoms) != 1:
        return None
    targets = []
    for top in nxt.tops:
        readers = model.consumers(top)
        if len(readers) != 1 or readers[0].type not in CONVOLUTIONS or not is_int8(readers[0]):
            return None
        targets.append(readers[0])
    if len({_bottom_scale(t) for t in targets}) != 1:
        log.info(
            "not fusing requantize after %s: the convolutions after split %s use different bottom scales",
            layer.name,
            nxt.name,
        )
        return None
    return targets[0]


def _fuse_requantize(model: NcnnModel) -> list[tuple[str, str]]:
    """Let INT8 convolutions that feed INT8 convolutions write int8 directly; returns the fused pairs."""
    fused = []
    for layer in model.layers:
        if layer.type not in CONVOLUTIONS or not is_int8(layer):
            continue
        target = _fuse_target(model, layer)
        if target is None:
            continue
        layer.params[8] = int(layer.params[8]) + REQUANTIZE
        layer.weights.append(NcnnBlob(np.array([_bottom_scale(target)], np.float32), tagged=False))
        fused.append((layer.name, target.name))
        log.debug("fuse_requantize %s -> %s", layer.name, target.name)
    return fused


def _store_fp16(layer: NcnnLayer) -> None:
    """Tagged fp32 weights of a layer that stays FP32 -> fp16, unless a value does not fit fp16."""
    tagged = [blob for blob in layer.weights if blob.tagged and blob.data.dtype == np.float32]
    if not tagged:
        return
    peak = max(float(np.abs(blob.data).max(initial=0.0)) for blob in tagged)
    if peak > FP16_MAX:
        log.warning("layer '%s' keeps fp32 weights: |w| reaches %.6g, beyond fp16's %g", layer.name, peak, FP16_MAX)
        return
    for blob in tagged:
        blob.data = blob.data.astype(np.float16)


def _quantize_layers(
    model: NcnnModel, table: CalibrationTable, biases: dict[str, np.ndarray], weights: dict[str, np.ndarray]
) -> tuple[list[str], list[str]]:
    """Quantize, in place, every layer with both table lines that the runtime computes right in INT8.

    Returns the layers quantized and the layers the table covers.
    """
    quantized, covered, defective = [], [], []
    for layer in model.layers:
        if layer.type not in QUANTIZABLE or layer.name not in table.activation_scales:
            continue
        if layer.name not in table.weight_scales:
            log.warning(
                "layer '%s' (%s) has an activation line but no weight line (%s_param_0): it stays FP32",
                layer.name,
                layer.type,
                layer.name,
            )
            continue
        covered.append(layer.name)
        if layer.weights[0].data.dtype == np.int8:
            raise ModelError(f"layer '{layer.name}' already holds int8 weights; quantize an FP32 model")
        per_group = grouped_outputs(layer)
        if per_group is not None:
            defective.append(f"{layer.name} ({per_group})")
            continue
        _warn_dead_scales(layer, table.weight_scales[layer.name])
        _quantize_layer(
            layer,
            table.weight_scales[layer.name],
            table.activation_scales[layer.name],
            biases.get(layer.name),
            weights.get(layer.name),
        )
        quantized.append(layer.name)
    if defective:  # one line: the ShuffleNet has 31 of them
        log.warning(
            "%d grouped (not depthwise) convolution(s) stay FP32 (%s), layer (outputs per group): %s",
            len(defective),
            GROUPED_INT8_DEFECT,
            ", ".join(defective),
        )
    return quantized, covered


def _refuse_legacy_table(model: NcnnModel, table: CalibrationTable) -> None:
    """The original tool's format (``--legacy-table``: one scale per weight tensor, activations keyed by blob) reads
    as a table of one-channel layers: name the format, not a scale count 'made for another model'."""
    layers = {layer.name: layer for layer in model.layers if layer.type in QUANTIZABLE}
    named = [name for name in table.weight_scales if name in layers]
    if not named or any(table.weight_scales[name].size != 1 for name in named):
        return
    if any(scale_units(layers[name]) > 1 for name in named):
        raise ModelError(
            "the table holds one weight scale per layer: it is the legacy per-tensor format (--legacy-table), "
            "which ncnn's per-channel INT8 layers cannot use; calibrate again without --legacy-table"
        )


def quantize_model(
    model: NcnnModel,
    table: CalibrationTable,
    fp16_storage: bool = True,
    biases: dict[str, np.ndarray] | None = None,
    weights: dict[str, np.ndarray] | None = None,
) -> NcnnModel:
    """An INT8 copy of the FP32 ``model``: quantize the layers the table covers fully, fuse requantization.

    ``biases`` (layer -> FP32 bias, from bias correction) replaces the stored bias of those INT8 layers;
    ``weights`` (layer -> adjusted FP32 weights, from ``--adaround``) are quantized instead of the model's, so the
    .bin holds the integers they round to.
    """
    table.validate()
    _refuse_legacy_table(model, table)
    result = copy.deepcopy(model)
    if not has_shape_hints(result):
        add_shape_hints(result)  # a model from caffe2ncnn: the INT8 file gets the hints all the same
    unknown = sorted((set(table.activation_scales) | set(table.weight_scales)) - {ly.name for ly in result.layers})
    if unknown:
        log.warning(
            "the table names %d layer(s) the model does not have (ignored): %s", len(unknown), some_names(unknown)
        )
    uncovered = _uncovered_layers(result, table)
    quantized, covered = _quantize_layers(result, table, biases or {}, weights or {})
    if not covered and not table.fp32_layers:
        raise ModelError(
            f"the table quantizes no layer of this model ({len(table.weight_scales)} weight and "
            f"{len(table.activation_scales)} activation line(s); a layer needs both): the INT8 model "
            "would be the FP32 one; check that the table belongs to this model"
        )
    if uncovered and covered:
        log.warning(
            "%d quantizable layer(s) have no line in the table and stay FP32: %s", len(uncovered), some_names(uncovered)
        )
    fused = _fuse_requantize(result)
    if fp16_storage:
        for layer in result.layers:
            if not is_int8(layer):
                _store_fp16(layer)
    log.info(
        "quantized %d layer(s) to INT8, %d requantize fusion(s); %d quantizable layer(s) stay FP32",
        len(quantized),
        len(fused),
        sum(1 for layer in result.layers if layer.type in QUANTIZABLE and not is_int8(layer)),
    )
    return result
