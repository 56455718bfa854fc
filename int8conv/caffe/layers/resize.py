"""Spatial resizing: the forks' Upsample (nearest, integer scale) and Interp (PSPNet's bilinear, corners aligned)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import LayerKind, Shape, fork_layer, ncnn_layer, register, unsupported
from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer
    from int8conv.ncnn.model import NcnnLayer

FAMILY = "resize"


def upsample_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    n, c, h, w = shapes[0]
    scale = int(layer.param.upsample_param.scale)
    if scale < 1:
        raise ModelError(f"layer '{layer.name}' (Upsample): scale must be >= 1, got {scale}")
    return [(n, c, h * scale, w * scale)]


def _nearest_only(layer: Layer, writer: str) -> None:
    """Both writers compute a nearest-neighbour Upsample; a second bottom is SegNet's max unpooling (the pooling
    indices say where each value goes), which they would compute wrongly."""
    if len(layer.bottoms) != 1:
        raise unsupported(layer, f"{len(layer.bottoms)} bottoms (max unpooling by pooling indices)", writer)


def upsample_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """ncnn Interp, nearest (0=1), scale factors 1= and 2=."""
    _nearest_only(layer, "ncnn converter")
    scale = float(layer.param.upsample_param.scale)
    return ncnn_layer("Interp", layer, {0: 1, 1: scale, 2: scale})


def upsample_onnx(b, layer: Layer) -> None:
    """Resize, nearest, asymmetric coordinates with floor: output (y, x) reads input (y // s, x // s)."""
    _nearest_only(layer, "ONNX export")
    scale = float(layer.param.upsample_param.scale)
    b.node(
        "Resize",
        [layer.bottoms[0], "", b.init(f"{layer.name}/scales", [1.0, 1.0, scale, scale])],
        [layer.tops[0]],
        layer.name,
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )


def _interp_size(layer: Layer, h: int, w: int) -> tuple[int, int]:
    """PSPNet's Interp output size: zoom, shrink, both (shrink first), or an explicit height and width."""
    p = layer.param.interp_param
    if p.pad_beg or p.pad_end:
        raise unsupported(layer, "Interp with pad_beg/pad_end", "int8conv")
    if p.height and p.width:
        return int(p.height), int(p.width)
    if p.shrink_factor != 1:
        h, w = (h - 1) // p.shrink_factor + 1, (w - 1) // p.shrink_factor + 1
    if p.zoom_factor != 1:
        h, w = h + (h - 1) * (p.zoom_factor - 1), w + (w - 1) * (p.zoom_factor - 1)
    return h, w


def interp_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    n, c, h, w = shapes[0]
    return [(n, c, *_interp_size(layer, h, w))]


def interp_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """ncnn Interp, bilinear (0=2) to the output size, corners aligned (6=1) as Caffe's Interp computes."""
    out = ctx.shape(layer, layer.tops[0])
    return ncnn_layer("Interp", layer, {0: 2, 3: int(out[2]), 4: int(out[3]), 6: 1})


def interp_onnx(b, layer: Layer) -> None:
    """Resize to the input's own batch and channels (Shape, Slice) and Caffe's height and width: fixed sizes would
    pin the prototxt's batch, which a dynamic or other export batch then fails on."""
    out = b.shape(layer.tops[0])
    shape, leading, sizes = (f"{layer.name}/{k}" for k in ("shape", "batch_channels", "sizes"))
    b.node("Shape", [layer.bottoms[0]], [shape], shape)
    b.node(
        "Slice",
        [shape, b.init(f"{leading}/starts", [0], np.int64), b.init(f"{leading}/ends", [2], np.int64)],
        [leading],
        leading,
    )
    b.node("Concat", [leading, b.init(f"{sizes}/spatial", list(out[2:]), np.int64)], [sizes], sizes, axis=0)
    b.constants.update((shape, leading, sizes))
    b.node(
        "Resize",
        [layer.bottoms[0], "", "", sizes],
        [layer.tops[0]],
        layer.name,
        mode="linear",
        coordinate_transformation_mode="align_corners",
    )


register(
    LayerKind(
        "Upsample",
        FAMILY,
        upsample_shape,
        upsample_ncnn,
        upsample_onnx,
        value_preserving=True,
        head_passthrough=True,
        notes="a Caffe-fork layer (YOLOv3 ports): nearest neighbour by an integer scale; the OpenCV engine "
        "runs it as a Python layer (cv2.dnn_registerLayer); a second bottom (SegNet's max unpooling by pooling "
        "indices) is declined",
    )
)
register(
    LayerKind(
        "Interp",
        FAMILY,
        interp_shape,
        interp_ncnn,
        interp_onnx,
        caffe=fork_layer("PSPNet"),
        notes="bilinear with aligned corners; pad_beg/pad_end are declined",
    )
)
