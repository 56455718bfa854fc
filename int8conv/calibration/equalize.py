"""Cross-layer equalization (after Nagel et al. 2019, "Data-Free Quantization") of the pairs producer ->
depthwise convolution: a new caffemodel in which each depthwise layer's input channels share one range.

Why: ncnn quantizes a layer's input with one scale per tensor. A depthwise convolution mixes nothing across
channels, so its input channels keep the ranges the layer before gave them; ultraface's first depthwise layer reads
16 channels whose ranges are 89x apart, so under one scale the small ones get a few int8 levels. Dividing the
producer's output channel c by ``s_c`` and multiplying the depthwise weights of channel c by ``s_c`` changes nothing
in FP32 (ReLU and PReLU commute with a positive scale); with ``s_c = range_c / largest range`` every channel gets
the largest one's range. Both layers have per-channel weight scales, so their weight quantization is unchanged.

The ranges are measured (the per-channel |x| max of each depthwise input on calibration images), unlike the
paper's weight-only rule: the weights do not say how large a BatchNorm-shifted, ReLU-clipped channel gets.

The result is a Caffe model: every engine, writer and converter reads it as any other. Tables and models made
from it belong together: a table calibrated on it does not fit a model converted from the original.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from int8conv.caffe.graph import Graph, Layer
from int8conv.caffe.layers.convolution import DEPTHWISE_FORK_TYPES
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.shapes import conv_geometry
from int8conv.errors import ModelError

log = logging.getLogger(__name__)

#: activations f with f(x / s) = f(x) / s for s > 0, per channel: the scale passes through them
HOMOGENEOUS = ("ReLU", "PReLU")
#: layers whose output channel c is an affine map of their own parameters of channel c
CHANNEL_AFFINE = ("Convolution", "Scale", *DEPTHWISE_FORK_TYPES)
#: a channel below this share of the largest one's range is left as it is (dead, or nearly: scaling it up would
#: only magnify its noise)
LIVE_RATIO = 1e-3


@dataclass
class EqualizedPair:
    """One equalized pair: ``producer``'s output channels divided by ``scales``, ``depthwise``'s weights
    multiplied by them; ``ranges`` the per-channel |x| max of the depthwise input before."""

    producer: str
    depthwise: str
    value: str
    ranges: np.ndarray
    scales: np.ndarray

    @property
    def spread(self) -> float:
        """Largest over smallest live channel range before equalization (after: 1)."""
        live = self.ranges[self.ranges > self.ranges.max(initial=0.0) * LIVE_RATIO]
        return float(live.max() / live.min()) if live.size and live.min() > 0 else 1.0


def is_depthwise(layer: Layer) -> bool:
    """A convolution whose every output channel reads exactly its own input channel."""
    if layer.type not in ("Convolution", *DEPTHWISE_FORK_TYPES) or not layer.blobs:
        return False
    weight = layer.blobs[0]
    return weight.ndim == 4 and weight.shape[1] == 1 and conv_geometry(layer)["group"] == weight.shape[0] > 1


def _scalable_producer(graph: Graph, layer: Layer) -> Layer | None:
    """The layer whose output channels can carry the depthwise ``layer``'s scales: walking back from its input
    through ReLU/PReLU, a Convolution or a Scale whose every value on the way feeds only the next layer."""
    value = layer.bottoms[0]
    while True:
        if value in graph.inputs or len(graph.consumers(value)) != 1:
            return None
        producer = graph.producer(value)
        if producer is None or len(producer.tops) != 1:
            return None
        if producer.type in HOMOGENEOUS:
            value = producer.bottoms[0]
            continue
        if producer.type not in CHANNEL_AFFINE or not producer.blobs:
            return None
        if producer.type == "Scale" and (len(producer.bottoms) != 1 or producer.param.scale_param.axis != 1):
            return None
        return producer


def equalization_pairs(graph: Graph) -> list[tuple[Layer, Layer]]:
    """(producer, depthwise layer) for every depthwise convolution whose input can be equalized."""
    found = []
    for layer in graph.layers:
        if is_depthwise(layer):
            producer = _scalable_producer(graph, layer)
            if (
                producer is not None
                and producer.blobs[0].ndim
                and producer.blobs[0].shape[0] == layer.blobs[0].shape[0]
            ):
                found.append((producer, layer))
    return found


def channel_ranges(batches: Sequence[dict[str, np.ndarray]], values: Sequence[str]) -> dict[str, np.ndarray]:
    """Per value, the |x| max of each channel (axis 1) over every batch (NCHW arrays)."""
    ranges: dict[str, np.ndarray] = {}
    for batch in batches:
        for value in values:
            array = np.asarray(batch[value])
            peak = np.abs(array.reshape(array.shape[0], array.shape[1], -1)).max(axis=(0, 2)).astype(np.float64)
            if not np.isfinite(peak).all():
                raise ModelError(f"value '{value}': the FP32 forward produced NaN or Inf")
            ranges[value] = np.maximum(ranges[value], peak) if value in ranges else peak
    return ranges


def equalization_scales(ranges: np.ndarray) -> np.ndarray:
    """``s_c``: each live channel's range over the largest one (so that all reach the largest); 1 elsewhere."""
    peak = float(ranges.max()) if ranges.size else 0.0
    scales = np.ones_like(ranges, dtype=np.float64)
    if peak > 0:
        live = ranges > peak * LIVE_RATIO
        scales[live] = ranges[live] / peak
    return scales


def _set_blob(blob: caffe_pb2.BlobProto, array: np.ndarray) -> None:
    del blob.double_data[:]
    del blob.data[:]
    blob.data.extend(np.asarray(array, dtype=np.float32).reshape(-1).tolist())


def equalize_caffemodel(
    weights: caffe_pb2.NetParameter, pairs: Sequence[tuple[Layer, Layer]], ranges: dict[str, np.ndarray]
) -> tuple[caffe_pb2.NetParameter, list[EqualizedPair]]:
    """A copy of ``weights`` (a V2 caffemodel) with every pair equalized on the measured ``ranges`` (keyed by the
    depthwise layers' input values)."""
    if len(weights.layers) and not len(weights.layer):
        raise ModelError("equalization writes V2 caffemodels; this one has V1 'layers' (upgrade it with Caffe first)")
    net = caffe_pb2.NetParameter()
    net.CopyFrom(weights)
    by_name = {layer.name: layer for layer in net.layer}
    done = []
    for producer, depthwise in pairs:
        scales = equalization_scales(ranges[depthwise.bottoms[0]])
        for name in (producer.name, depthwise.name):
            if name not in by_name or not len(by_name[name].blobs):
                raise ModelError(f"layer '{name}': the caffemodel holds no weights for it")
        blobs = by_name[producer.name].blobs
        # output channel c of a Convolution (weights, bias) or a Scale (gamma, beta): every blob along axis 0
        for index, array in enumerate(producer.blobs[:2]):
            shaped = scales.reshape(-1, *([1] * (array.ndim - 1)))
            _set_blob(blobs[index], array / shaped)
        weight = depthwise.blobs[0]
        _set_blob(by_name[depthwise.name].blobs[0], weight * scales.reshape(-1, 1, 1, 1))
        done.append(
            EqualizedPair(producer.name, depthwise.name, depthwise.bottoms[0], ranges[depthwise.bottoms[0]], scales)
        )
        log.debug(
            "equalize %s -> %s: %d channels, range spread %.1fx -> 1x",
            producer.name,
            depthwise.name,
            scales.size,
            done[-1].spread,
        )
    return net, done
