"""Layers that move, copy, cut or reorder values without arithmetic, plus the graph's inputs.

Input, Concat, Slice, Split, Flatten, Reshape, Permute, Crop, ShuffleChannel, Reorg, Dropout, Silence, MemoryData.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import (
    LayerKind,
    Shape,
    axis_index,
    fork_layer,
    ncnn_layer,
    ncnn_plain,
    opencv_lacks,
    register,
    same_shape,
    unsupported,
    whc,
)
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnLayer

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "tensor"
#: ncnn Caffe Permute orders (4-D blobs) -> ncnn order_type on the 3-D Mat, as caffe2ncnn maps them.
PERMUTE_4D = {(0, 1, 2, 3): 0, (0, 1, 3, 2): 1, (0, 2, 1, 3): 2, (0, 2, 3, 1): 3, (0, 3, 1, 2): 4, (0, 3, 2, 1): 5}
#: Caffe Permute orders (3-D blobs) -> ncnn order_type on the 2-D Mat.
PERMUTE_3D = {(0, 1, 2): 0, (0, 2, 1): 1}


def _onnx_identity(b, layer: Layer) -> None:
    """Dropout (a no-op at inference) and Split keep their top names through Identity nodes."""
    for top in layer.tops:
        b.node("Identity", [layer.bottoms[0]], [top], f"{layer.name}/{top}" if len(layer.tops) > 1 else layer.name)


def _copies(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    return [shapes[0]] * len(layer.tops)


# --------------------------------------------------------------------------------------------------- Concat, Slice


def _concat_axis(layer: Layer) -> int:
    """Concat's Caffe axis: the legacy ``concat_dim`` when given, else ``axis``."""
    p = layer.param.concat_param
    return int(p.concat_dim if p.HasField("concat_dim") else p.axis)


def _slice_axis(layer: Layer) -> int:
    """Slice's Caffe axis: the legacy ``slice_dim`` when given, else ``axis``."""
    p = layer.param.slice_param
    return int(p.slice_dim if p.HasField("slice_dim") else p.axis)


def concat_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    axis = axis_index(_concat_axis(layer), len(shapes[0]))
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return [tuple(out)]


def concat_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    return ncnn_layer("Concat", layer, {0: ctx.ncnn_axis(layer, _concat_axis(layer), ndim)})


def concat_onnx(b, layer: Layer) -> None:
    b.node("Concat", list(layer.bottoms), [layer.tops[0]], layer.name, axis=_concat_axis(layer))
    if all(x in b.constants for x in layer.bottoms):
        b.constants.add(layer.tops[0])


def slice_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    p = layer.param.slice_param
    axis = axis_index(_slice_axis(layer), len(shapes[0]))
    size = shapes[0][axis]
    points = list(p.slice_point) or [size * (i + 1) // len(layer.tops) for i in range(len(layer.tops) - 1)]
    bounds = [0] + points + [size]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        s = list(shapes[0])
        s[axis] = hi - lo
        outs.append(tuple(s))
    return outs


def slice_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    points = list(layer.param.slice_param.slice_point)
    if points:
        if len(points) + 1 != len(layer.tops):
            raise ModelError(f"layer '{layer.name}' (Slice): {len(points)} slice points for {len(layer.tops)} tops")
        slices = [b - a for a, b in zip([0] + points[:-1], points, strict=True)] + [-233]
    else:
        slices = [-233] * len(layer.tops)
    return ncnn_layer("Slice", layer, {0: slices, 1: ctx.ncnn_axis(layer, _slice_axis(layer), ndim)})


def slice_onnx(b, layer: Layer) -> None:
    axis = _slice_axis(layer)
    sizes = [b.shape(top)[axis_index(axis, len(b.shape(top)))] for top in layer.tops]
    b.node(
        "Split",
        [layer.bottoms[0], b.init(f"{layer.name}/split", sizes, np.int64)],
        list(layer.tops),
        layer.name,
        axis=axis,
    )


# --------------------------------------------------------------------------------------------------- reshapes


def flatten_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    p = layer.param.flatten_param
    nd = len(shapes[0])
    a, e = axis_index(p.axis, nd), axis_index(p.end_axis, nd)
    return [tuple(shapes[0][:a]) + (int(np.prod(shapes[0][a : e + 1])),) + tuple(shapes[0][e + 1 :])]


def reshape_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    p = layer.param.reshape_param
    src = shapes[0]
    nd = len(src)
    start = axis_index(p.axis, nd + 1)
    end = nd if p.num_axes == -1 else start + p.num_axes
    dims = [int(d) for d in p.shape.dim]
    mid = [src[start + i] if d == 0 else d for i, d in enumerate(dims)]
    out = list(src[:start]) + mid + list(src[end:])
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        out[out.index(-1)] = int(np.prod(src)) // max(known, 1)
    if int(np.prod(out)) != int(np.prod(src)):
        raise ModelError(f"layer '{layer.name}' (Reshape): cannot reshape {src} to {tuple(out)}")
    return [tuple(out)]


def _reshape_to(layer: Layer, ctx, free_axis: int | None) -> list[NcnnLayer]:
    """A Reshape to the inferred output shape; ``free_axis`` (a Caffe axis) is written -1 so it follows the input."""
    src, out = ctx.shape(layer, layer.bottoms[0]), ctx.shape(layer, layer.tops[0])
    if out[0] != src[0]:
        raise unsupported(layer, f"a reshape that changes the batch axis ({src} -> {out})")
    dims = [int(d) for d in out[1:]]
    if free_axis is not None and free_axis >= 1:
        dims[free_axis - 1] = -1
    return ncnn_layer("Reshape", layer, whc(tuple(dims)))


def reshape_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    p = layer.param.reshape_param
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    start = axis_index(p.axis, ndim + 1)
    dims = list(p.shape.dim)
    free = start + dims.index(-1) if -1 in dims else None
    return _reshape_to(layer, ctx, free)


def flatten_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    if len(ctx.shape(layer, layer.tops[0])) == 2:
        return ncnn_layer("Flatten", layer, {})
    return _reshape_to(layer, ctx, None)


def reshape_onnx(b, layer: Layer) -> None:
    """Flatten and Reshape: the target shape from shape inference, the batch dimension copied."""
    target, source = b.shape(layer.tops[0]), b.shape(layer.bottoms[0])
    p = layer.param.flatten_param
    if (
        layer.type == "Flatten"
        and axis_index(p.axis, len(source)) == 1
        and axis_index(p.end_axis, len(source)) == len(source) - 1
    ):
        b.node("Flatten", [layer.bottoms[0]], [layer.tops[0]], layer.name, axis=1)
        return
    dims = b.keeps_batch_shape(target) if target[0] == source[0] else list(target)
    b.node("Reshape", [layer.bottoms[0], b.init(f"{layer.name}/shape", dims, np.int64)], [layer.tops[0]], layer.name)


def _permute_order(layer: Layer, ndim: int) -> list[int]:
    order = [int(o) for o in layer.param.permute_param.order]
    return order + [i for i in range(ndim) if i not in order]


def permute_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    return [tuple(shapes[0][i] for i in _permute_order(layer, len(shapes[0])))]


def permute_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    ndim = len(ctx.shape(layer, layer.bottoms[0]))
    order = _permute_order(layer, ndim)
    table = {4: PERMUTE_4D, 3: PERMUTE_3D}.get(ndim, {})
    if tuple(order) not in table:
        raise unsupported(layer, f"order {tuple(order)} on a {ndim}-D blob (the batch axis must stay first)")
    return ncnn_layer("Permute", layer, {0: table[tuple(order)]})


def permute_onnx(b, layer: Layer) -> None:
    order = _permute_order(layer, len(b.shape(layer.bottoms[0])))
    b.node("Transpose", [layer.bottoms[0]], [layer.tops[0]], layer.name, perm=order)


# --------------------------------------------------------------------------------------------------- Crop


def _crop_offsets(layer: Layer, ndim: int) -> list[int]:
    """Caffe's offset per axis: 0 before ``axis``; one value for all cropped axes, or one each."""
    p = layer.param.crop_param
    axis = axis_index(p.axis, ndim)
    given = [int(o) for o in p.offset]
    if len(given) not in (0, 1, ndim - axis):
        raise ModelError(f"layer '{layer.name}' (Crop): {len(given)} offsets for {ndim - axis} cropped axes")
    per_axis = given * (ndim - axis) if len(given) == 1 else (given or [0] * (ndim - axis))
    return [0] * axis + per_axis


def crop_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    axis = axis_index(layer.param.crop_param.axis, len(shapes[0]))
    out = tuple(shapes[0][:axis]) + tuple(shapes[1][axis:])
    for size, offset, full in zip(out, _crop_offsets(layer, len(out)), shapes[0], strict=True):
        if offset + size > full:
            raise ModelError(f"layer '{layer.name}' (Crop): offset {offset} + size {size} exceeds {full}")
    return [out]


def crop_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """ncnn's one-bottom Crop with explicit offsets and sizes: its reference-blob form would also take the
    reference's channel count, which Caffe's ``axis: 2`` keeps from the first bottom."""
    out = ctx.shape(layer, layer.tops[0])
    offsets = _crop_offsets(layer, len(out))
    if offsets[0] or len(out) != 4:
        raise unsupported(layer, f"a crop of a {len(out)}-D blob or of the batch axis")
    params = {0: offsets[3], 1: offsets[2], 2: offsets[1], 3: out[3], 4: out[2], 5: out[1]}
    return [NcnnLayer("Crop", layer.name, layer.bottoms[:1], layer.tops, params)]


def crop_onnx(b, layer: Layer) -> None:
    out = b.shape(layer.tops[0])
    offsets = _crop_offsets(layer, len(out))
    axes = [i for i in range(len(out)) if i > 0]
    starts = [offsets[i] for i in axes]
    ends = [offsets[i] + out[i] for i in axes]
    b.node(
        "Slice",
        [
            layer.bottoms[0],
            b.init(f"{layer.name}/starts", starts, np.int64),
            b.init(f"{layer.name}/ends", ends, np.int64),
            b.init(f"{layer.name}/axes", axes, np.int64),
        ],
        [layer.tops[0]],
        layer.name,
    )


# --------------------------------------------------------------------------------------------------- channel moves


def shuffle_channel_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    group = int(layer.param.shuffle_channel_param.group)
    if group < 1 or shapes[0][1] % group:
        raise ModelError(
            f"layer '{layer.name}' (ShuffleChannel): {shapes[0][1]} channels do not divide into group {group}"
        )
    return [shapes[0]]


def shuffle_channel_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("ShuffleChannel", layer, {0: int(layer.param.shuffle_channel_param.group)})


def _permute_onnx(b, layer: Layer, steps: tuple[str, str], split: list[int], perm: list[int], out: list[int]) -> None:
    """Reshape the bottom to ``split`` (tensor ``<layer>/<steps[0]>``), transpose by ``perm`` (``<layer>/<steps[1]>``),
    reshape to ``out``: a pure rearrangement, so both inner tensors keep the bottom's range."""
    inner, moved = (f"{layer.name}/{step}" for step in steps)
    b.node("Reshape", [layer.bottoms[0], b.init(f"{inner}/shape", split, np.int64)], [inner], inner)
    b.node("Transpose", [inner], [moved], moved, perm=perm)
    b.node("Reshape", [moved, b.init(f"{layer.name}/shape", out, np.int64)], [layer.tops[0]], layer.name)
    b.derive(inner, layer.bottoms[0])
    b.derive(moved, layer.bottoms[0])


def shuffle_channel_onnx(b, layer: Layer) -> None:
    """(N, g, C/g, H, W) -> swap g and C/g -> (N, C, H, W)."""
    n, c, h, w = b.shape(layer.bottoms[0])
    g = int(layer.param.shuffle_channel_param.group)
    _permute_onnx(b, layer, ("grouped", "swapped"), [0, g, c // g, h, w], [0, 2, 1, 3, 4], [0, c, h, w])


def reorg_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    n, c, h, w = shapes[0]
    s = int(layer.param.reorg_param.stride)
    if layer.param.reorg_param.reverse:
        raise ModelError(f"layer '{layer.name}' (Reorg): reverse reorg is not supported")
    if s < 1 or h % s or w % s:
        raise ModelError(f"layer '{layer.name}' (Reorg): {h}x{w} does not divide by stride {s}")
    return [(n, c * s * s, h // s, w // s)]


def reorg_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("Reorg", layer, {0: int(layer.param.reorg_param.stride)})


def reorg_onnx(b, layer: Layer) -> None:
    """ncnn's Reorg: output channel (c * s + i) * s + j at (y, x) is input channel c at (y*s + i, x*s + j)."""
    n, c, h, w = b.shape(layer.bottoms[0])
    s = int(layer.param.reorg_param.stride)
    hs, ws = h // s, w // s
    _permute_onnx(b, layer, ("split", "moved"), [0, c, hs, s, ws, s], [0, 1, 3, 5, 2, 4], [0, c * s * s, hs, ws])


# --------------------------------------------------------------------------------------------------- no-ops


def _dropout_scale(layer: Layer) -> float | None:
    """Dropout's test-time factor: 1 - ratio with ``scale_train: false`` (Caffe scaled nothing in training), else
    None (the identity)."""
    p = layer.param.dropout_param
    return 1.0 - float(p.dropout_ratio) if p.HasField("scale_train") and not p.scale_train else None


def dropout_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Identity at test time (removed later), unless ``_dropout_scale`` scales it."""
    scale = _dropout_scale(layer)
    return ncnn_layer("Dropout", layer, {} if scale is None else {0: scale})


def dropout_onnx(b, layer: Layer) -> None:
    """Identity, or a Mul by ``_dropout_scale`` (as the ncnn model and OpenCV compute)."""
    scale = _dropout_scale(layer)
    if scale is None:
        _onnx_identity(b, layer)
        return
    b.node("Mul", [layer.bottoms[0], b.init(f"{layer.name}/keep", np.float32(scale))], [layer.tops[0]], layer.name)


def silence_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    return []


def nothing_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Silence only consumes its bottoms: nothing to compute (caffe2ncnn writes a Noop)."""
    return []


def nothing_onnx(b, layer: Layer) -> None:
    """Silence: no node."""


def _graph_input_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Input and MemoryData become the graph's inputs when the graph is built; no writer ever sees them."""
    raise ModelError(f"layer '{layer.name}' ({layer.type}) is a graph input and has no ncnn layer of its own")


def _graph_input_onnx(b, layer: Layer) -> None:
    raise ModelError(f"layer '{layer.name}' ({layer.type}) is a graph input and has no ONNX node of its own")


def input_shapes(param) -> list[Shape]:
    """Input's ``input_param.shape`` entries."""
    shapes = [tuple(int(d) for d in s.dim) for s in param.input_param.shape]
    if not shapes:
        raise ModelError(f"Input layer '{param.name}' has no input_param.shape")
    return shapes


def memory_data_shapes(param) -> list[Shape]:
    """MemoryData's blob (batch_size, channels, height, width): what caffe2ncnn turns into an Input."""
    p = param.memory_data_param
    return [(int(p.batch_size) or 1, int(p.channels), int(p.height), int(p.width))]


register(
    LayerKind(
        "Input",
        FAMILY,
        None,
        _graph_input_ncnn,
        _graph_input_onnx,
        input_shapes=input_shapes,
        notes="becomes the graph's input (and ncnn's Input layer)",
    )
)
register(
    LayerKind(
        "MemoryData",
        FAMILY,
        None,
        _graph_input_ncnn,
        _graph_input_onnx,
        input_shapes=memory_data_shapes,
        opencv=opencv_lacks("MemoryData"),
        notes="becomes the graph's input, shaped (batch_size, channels, height, width), as caffe2ncnn",
    )
)
register(
    LayerKind("Concat", FAMILY, concat_shape, concat_ncnn, concat_onnx, value_preserving=True, head_passthrough=True)
)
register(LayerKind("Slice", FAMILY, slice_shape, slice_ncnn, slice_onnx, value_preserving=True))
register(
    LayerKind(
        "Split",
        FAMILY,
        _copies,
        ncnn_plain("Split"),
        _onnx_identity,
        value_preserving=True,
        head_passthrough=True,
        notes="removed; ncnn Splits are re-inserted where a blob has several readers",
    )
)
register(
    LayerKind(
        "Flatten", FAMILY, flatten_shape, flatten_ncnn, reshape_onnx, value_preserving=True, head_passthrough=True
    )
)
register(
    LayerKind(
        "Reshape", FAMILY, reshape_shape, reshape_ncnn, reshape_onnx, value_preserving=True, head_passthrough=True
    )
)
register(
    LayerKind(
        "Permute",
        FAMILY,
        permute_shape,
        permute_ncnn,
        permute_onnx,
        value_preserving=True,
        head_passthrough=True,
        notes="the batch axis must stay first",
    )
)
register(LayerKind("Crop", FAMILY, crop_shape, crop_ncnn, crop_onnx, min_bottoms=2, value_preserving=True))
register(
    LayerKind(
        "ShuffleChannel",
        FAMILY,
        shuffle_channel_shape,
        shuffle_channel_ncnn,
        shuffle_channel_onnx,
        value_preserving=True,
        caffe=fork_layer("ShuffleNet"),
    )
)
register(
    LayerKind(
        "Reorg",
        FAMILY,
        reorg_shape,
        reorg_ncnn,
        reorg_onnx,
        value_preserving=True,
        caffe=fork_layer("YOLOv2"),
        opencv=opencv_lacks("Reorg", "its Darknet importer has one"),
        notes="ncnn's channel order (space-to-depth, channel-major)",
    )
)
register(
    LayerKind(
        "Dropout",
        FAMILY,
        same_shape,
        dropout_ncnn,
        dropout_onnx,
        value_preserving=True,
        notes="identity at test time (scale_train: false scales by 1 - ratio)",
    )
)
register(LayerKind("Silence", FAMILY, silence_shape, nothing_ncnn, nothing_onnx, opencv=opencv_lacks("Silence")))
