"""Per-channel (per-group for depthwise) weight scales, computed on the weights ncnn will hold.

The number and order of scales is what ncnn2int8 reads for the ncnn layer the Caffe layer becomes:
``num_output`` for Convolution and InnerProduct, ``group`` for ConvolutionDepthWise (Caffe group > 1).
"""

from __future__ import annotations

import numpy as np

from int8conv.caffe.graph import Graph, Layer
from int8conv.caffe.layers import types_where
from int8conv.caffe.shapes import conv_geometry
from int8conv.errors import ModelError

#: Caffe types ncnn runs in INT8, as the layer registry declares them (Convolution incl. depthwise, InnerProduct).
QUANTIZABLE_TYPES = types_where("quantizable")
#: A channel whose |w| max is below this fraction of its layer's max is treated as dead (scale 0, weights 0).
#: After BatchNorm folding such a channel outputs its bias plus at most 1/1024 of what the layer's main channels
#: output: below an 8-bit step of the per-tensor activation scale the next layer reads, so zeroing it is
#: invisible, while 127/absmax would explode (ncnn2table writes scales up to 1.6e9 for such channels).
DEAD_CHANNEL_RATIO = 2.0**-10


def quantizable_layers(graph: Graph) -> list[Layer]:
    """Layers ncnn can run in INT8: Convolution (incl. depthwise/grouped) and InnerProduct."""
    return [layer for layer in graph.layers if layer.type in QUANTIZABLE_TYPES]


def uses_int8_winograd(layer: Layer) -> bool:
    """ncnn's INT8 Winograd F(4,3) path takes 3x3 stride-1 dilation-1 non-grouped convolutions."""
    if layer.type != "Convolution":
        return False
    g = conv_geometry(layer)
    return (
        g["kernel_h"],
        g["kernel_w"],
        g["stride_h"],
        g["stride_w"],
        g["dilation_h"],
        g["dilation_w"],
        g["group"],
    ) == (3, 3, 1, 1, 1, 1, 1)


#: ncnn's INT8 Winograd F(4,3) (x86 and ARM) scales its weights by 24 in each direction of the 3x3 kernel, so a
#: layer's int32 result is 576 x the direct convolution's sum of int8 products before it divides. Integer wrap-around
#: in between cancels out; only that final value must fit in int32. With inputs up to 127 and weights up to L over
#: ``channels`` x 9 taps, L <= WINOGRAD_LEVEL_BUDGET / channels cannot overflow on any input.
WINOGRAD_LEVEL_BUDGET = (2**31 - 1) // (576 * 9 * 127)
#: the bound ncnn2table uses for every Winograd layer (6-bit); kept where the safe bound would be lower: wide
#: layers would lose too much, and worst-case aligned inputs are not what real activations look like
NCNN_WINOGRAD_LEVELS = 31


def winograd_levels(channels: int) -> int:
    """The weight levels of a Winograd layer with ``channels`` inputs: the most that cannot overflow (8-bit up to
    25 channels), never below ncnn's 6-bit."""
    return int(min(127, max(NCNN_WINOGRAD_LEVELS, WINOGRAD_LEVEL_BUDGET // max(channels, 1))))


def weight_levels(layer: Layer, winograd_6bit: bool = True) -> int:
    """127 levels (8-bit), or for ncnn's INT8 Winograd layers ``winograd_levels`` of their input channels (from
    8-bit for narrow layers down to ncnn2table's 6-bit from 105 channels on)."""
    if winograd_6bit and uses_int8_winograd(layer):
        return winograd_levels(int(layer.blobs[0].shape[1]))
    return 127


def dead_channels(absmax: np.ndarray) -> np.ndarray:
    """Which channels (their |w| max per channel given) count as dead: at most DEAD_CHANNEL_RATIO of the max."""
    absmax = np.asarray(absmax, dtype=np.float64)
    return absmax <= absmax.max() * DEAD_CHANNEL_RATIO


def layer_weight_scales(layer: Layer, winograd_6bit: bool = True) -> np.ndarray:
    """Scales ``levels / absmax`` per output channel (per group when grouped); 0 for a dead channel."""
    weight = layer.blobs[0]
    groups = 1
    if layer.type == "Convolution":
        groups = conv_geometry(layer)["group"]
    units = groups if groups > 1 else weight.shape[0]
    absmax = np.abs(weight.reshape(units, -1)).max(axis=1).astype(np.float64)
    if not np.all(np.isfinite(absmax)):  # one Inf would make every other channel "dead" (scale 0)
        raise ModelError(
            f"layer '{layer.name}' ({layer.type}): {int(np.sum(~np.isfinite(weight)))} weights are NaN or Inf; "
            "the caffemodel is damaged or was saved from a diverged training"
        )
    levels = weight_levels(layer, winograd_6bit)
    dead = dead_channels(absmax)
    scales = np.zeros(units, dtype=np.float64)
    scales[~dead] = levels / absmax[~dead]
    return scales.astype(np.float32)


def weight_scales(graph: Graph, winograd_6bit: bool = True) -> dict[str, np.ndarray]:
    """Layer name -> scales, for every quantizable layer of a (BatchNorm-folded) graph."""
    return {layer.name: layer_weight_scales(layer, winograd_6bit) for layer in quantizable_layers(graph)}
