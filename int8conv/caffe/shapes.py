"""Shape inference on the graph IR, as Caffe computes shapes; it also checks weights against the prototxt."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Graph, Layer

Shape = tuple[int, ...]


def conv_geometry(layer: "Layer") -> dict[str, int]:
    """Kernel, stride, pad and dilation of a (De)Convolution, with Caffe's defaults and 2-D overrides."""
    p = layer.param.convolution_param

    def pick(repeated, h_field: str, w_field: str, default: int) -> tuple[int, int]:
        if p.HasField(h_field) or p.HasField(w_field):
            return int(getattr(p, h_field)), int(getattr(p, w_field))
        values = list(repeated) or [default]
        return int(values[0]), int(values[-1] if len(values) > 1 else values[0])

    kh, kw = pick(p.kernel_size, "kernel_h", "kernel_w", 0)
    if kh == 0 or kw == 0:
        raise ModelError(f"layer '{layer.name}' ({layer.type}) has no kernel_size")
    sh, sw = pick(p.stride, "stride_h", "stride_w", 1)
    ph, pw = pick(p.pad, "pad_h", "pad_w", 0)
    dils = list(p.dilation) or [1]
    dh, dw = int(dils[0]), int(dils[-1])
    return {"kernel_h": kh, "kernel_w": kw, "stride_h": sh, "stride_w": sw, "pad_h": ph, "pad_w": pw,
            "dilation_h": dh, "dilation_w": dw, "group": int(p.group), "num_output": int(p.num_output),
            "bias_term": int(p.bias_term)}


def pool_geometry(layer: "Layer", in_shape: Shape) -> dict[str, int]:
    """Pooling kernel/stride/pad; global pooling takes the whole input plane."""
    p = layer.param.pooling_param
    if p.global_pooling:
        kh, kw = in_shape[2], in_shape[3]
    elif p.HasField("kernel_h") or p.HasField("kernel_w"):
        kh, kw = p.kernel_h, p.kernel_w
    else:
        kh = kw = p.kernel_size
    if not kh or not kw:
        raise ModelError(f"layer '{layer.name}' (Pooling) has no kernel_size")
    sh, sw = (p.stride_h, p.stride_w) if (p.HasField("stride_h") or p.HasField("stride_w")) else (p.stride, p.stride)
    ph, pw = (p.pad_h, p.pad_w) if (p.HasField("pad_h") or p.HasField("pad_w")) else (p.pad, p.pad)
    if p.global_pooling:
        sh = sw = 1
        ph = pw = 0
    return {"kernel_h": int(kh), "kernel_w": int(kw), "stride_h": int(sh), "stride_w": int(sw),
            "pad_h": int(ph), "pad_w": int(pw), "global": int(p.global_pooling), "method": int(p.pool)}


def _pool_out(size: int, k: int, s: int, pad: int) -> int:
    """Caffe's ceil-mode pooling output size, clipped so the last window starts inside the image."""
    out = int(math.ceil((size + 2 * pad - k) / s)) + 1
    if pad and (out - 1) * s >= size + pad:
        out -= 1
    return out


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _convolution(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    g = conv_geometry(layer)
    n, c, h, w = shapes[0]
    if c % g["group"]:
        raise ModelError(f"layer '{layer.name}': {c} input channels do not divide into group {g['group']}")
    expected = (g["num_output"], c // g["group"], g["kernel_h"], g["kernel_w"])
    if layer.type == "Deconvolution":
        expected = (c, g["num_output"] // g["group"], g["kernel_h"], g["kernel_w"])
    _check_weights(layer, expected, g["num_output"] if g["bias_term"] else None)
    ekh = g["dilation_h"] * (g["kernel_h"] - 1) + 1
    ekw = g["dilation_w"] * (g["kernel_w"] - 1) + 1
    if layer.type == "Deconvolution":
        oh = g["stride_h"] * (h - 1) + ekh - 2 * g["pad_h"]
        ow = g["stride_w"] * (w - 1) + ekw - 2 * g["pad_w"]
    else:
        oh = (h + 2 * g["pad_h"] - ekh) // g["stride_h"] + 1
        ow = (w + 2 * g["pad_w"] - ekw) // g["stride_w"] + 1
    if oh <= 0 or ow <= 0:
        raise ModelError(f"layer '{layer.name}': input {shapes[0]} is too small for its kernel")
    return [(n, g["num_output"], oh, ow)]


def _check_weights(layer: "Layer", weight: Shape, bias: int | None) -> None:
    """The caffemodel's weight and bias shapes must be what the prototxt implies."""
    if tuple(layer.blobs[0].shape) != tuple(weight):
        raise ModelError(f"layer '{layer.name}' ({layer.type}): caffemodel weight shape {tuple(layer.blobs[0].shape)} "
                         f"does not match the prototxt, which implies {tuple(weight)}")
    if bias is not None:
        if len(layer.blobs) < 2 or layer.blobs[1].size != bias:
            found = layer.blobs[1].size if len(layer.blobs) > 1 else "no bias"
            raise ModelError(f"layer '{layer.name}' ({layer.type}): expected a bias of {bias} values, "
                             f"the caffemodel has {found}")


def _inner_product(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    p = layer.param.inner_product_param
    axis = _axis(p.axis, len(shapes[0]))
    fan_in = int(np.prod(shapes[0][axis:]))
    _check_weights(layer, (p.num_output, fan_in), p.num_output if p.bias_term else None)
    return [tuple(shapes[0][:axis]) + (int(p.num_output),)]


def _pooling(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    n, c, h, w = shapes[0]
    g = pool_geometry(layer, shapes[0])
    if g["global"]:
        return [(n, c, 1, 1)]
    return [(n, c, _pool_out(h, g["kernel_h"], g["stride_h"], g["pad_h"]),
             _pool_out(w, g["kernel_w"], g["stride_w"], g["pad_w"]))]


def _per_channel(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    """Element-wise layers with per-channel parameters: check parameter sizes, keep the shape."""
    channels = shapes[0][1] if len(shapes[0]) > 1 else 1
    if layer.type == "BatchNorm":
        if len(layer.blobs) < 3 or layer.blobs[0].size != channels or layer.blobs[1].size != channels:
            raise ModelError(f"layer '{layer.name}' (BatchNorm): expected mean/variance of {channels} values and a "
                             f"moving-average factor, found {[b.shape for b in layer.blobs]}")
    elif layer.type in ("Scale", "Bias") and len(layer.bottoms) == 1:
        if not layer.blobs:
            raise ModelError(f"layer '{layer.name}' ({layer.type}) has no weights in the caffemodel")
        want = int(np.prod(shapes[0][1:2])) if layer.type == "Bias" or \
            layer.param.scale_param.num_axes == 1 else layer.blobs[0].size
        if layer.blobs[0].size not in (want, 1):
            raise ModelError(f"layer '{layer.name}' ({layer.type}): {layer.blobs[0].size} values for "
                             f"{channels} channels")
    elif layer.type == "PReLU":
        if layer.blobs[0].size not in (channels, 1):
            raise ModelError(f"layer '{layer.name}' (PReLU): {layer.blobs[0].size} slopes for {channels} channels")
    return [shapes[0]]


def _concat(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    p = layer.param.concat_param
    axis = _axis(p.axis if not p.HasField("concat_dim") else p.concat_dim, len(shapes[0]))
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return [tuple(out)]


def _slice(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    p = layer.param.slice_param
    axis = _axis(p.axis if not p.HasField("slice_dim") else p.slice_dim, len(shapes[0]))
    size = shapes[0][axis]
    points = list(p.slice_point) or [size * (i + 1) // len(layer.tops) for i in range(len(layer.tops) - 1)]
    bounds = [0] + points + [size]
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        s = list(shapes[0])
        s[axis] = hi - lo
        outs.append(tuple(s))
    return outs


def _flatten(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    p = layer.param.flatten_param
    nd = len(shapes[0])
    a, e = _axis(p.axis, nd), _axis(p.end_axis, nd)
    return [tuple(shapes[0][:a]) + (int(np.prod(shapes[0][a:e + 1])),) + tuple(shapes[0][e + 1:])]


def _reshape(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    p = layer.param.reshape_param
    src = shapes[0]
    nd = len(src)
    start = _axis(p.axis, nd + 1) if p.axis < 0 else p.axis
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


def _permute(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    order = list(layer.param.permute_param.order)
    nd = len(shapes[0])
    order += [i for i in range(nd) if i not in order]
    return [tuple(shapes[0][i] for i in order)]


def prior_box_aspect_ratios(p) -> list[float]:
    """Caffe's PriorBox ratio list: 1 first, then each new ratio and (with ``flip``) its inverse, duplicates dropped.

    The ONNX export, the ncnn converter and shape inference all need exactly this order and count.
    """
    ratios = [1.0]
    for r in p.aspect_ratio:
        r = float(r)
        if any(abs(r - have) < 1e-6 for have in ratios):
            continue
        ratios.append(r)
        if p.flip:
            ratios.append(1.0 / r)
    return ratios


def _prior_box(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    p = layer.param.prior_box_param
    num = len(p.min_size) * len(prior_box_aspect_ratios(p)) + len(p.max_size)
    h, w = shapes[0][2], shapes[0][3]
    return [(1, 2, h * w * num * 4)]


def _detection_output(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    keep = layer.param.detection_output_param.keep_top_k
    return [(1, 1, keep if keep > 0 else -1, 7)]


def _eltwise(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    for s in shapes[1:]:
        if s != shapes[0]:
            raise ModelError(f"layer '{layer.name}' (Eltwise): bottom shapes {shapes} differ")
    return [shapes[0]]


def _crop(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    axis = _axis(layer.param.crop_param.axis, len(shapes[0]))
    return [tuple(shapes[0][:axis]) + tuple(shapes[1][axis:])]


def _softmax_like(layer: "Layer", shapes: list[Shape]) -> list[Shape]:
    return [shapes[0]]


_SHAPE_FUNCTIONS: dict[str, Callable[["Layer", list[Shape]], list[Shape]]] = {
    "Convolution": _convolution, "Deconvolution": _convolution, "InnerProduct": _inner_product,
    "Pooling": _pooling, "BatchNorm": _per_channel, "Scale": _per_channel, "Bias": _per_channel,
    "PReLU": _per_channel, "ReLU": _softmax_like, "ReLU6": _softmax_like, "Sigmoid": _softmax_like,
    "TanH": _softmax_like, "ELU": _softmax_like, "Power": _softmax_like, "Exp": _softmax_like,
    "Log": _softmax_like, "AbsVal": _softmax_like, "BNLL": _softmax_like, "Threshold": _softmax_like,
    "Dropout": _softmax_like, "Softmax": _softmax_like, "LRN": _softmax_like, "Normalize": _softmax_like,
    "MVN": _softmax_like, "Eltwise": _eltwise, "Concat": _concat, "Slice": _slice,
    "Flatten": _flatten, "Reshape": _reshape, "Permute": _permute, "PriorBox": _prior_box,
    "DetectionOutput": _detection_output, "Crop": _crop,
}


#: bottoms a layer type reads at least (Caffe's ExactNumBottomBlobs / MinBottomBlobs); 1 for the others
MIN_BOTTOMS = {"Crop": 2, "PriorBox": 2}


def infer_shapes(graph: "Graph") -> dict[str, Shape]:
    """Shape of every value; layer types without a rule get no shape (later stages decide if that matters)."""
    shapes: dict[str, Shape] = dict(graph.inputs)
    for layer in graph.layers:
        rule = _SHAPE_FUNCTIONS.get(layer.type)
        needed = MIN_BOTTOMS.get(layer.type, 1)
        if (rule is not None or layer.type == "Split") and len(layer.bottoms) < needed:
            raise ModelError(f"layer '{layer.name}' ({layer.type}) needs {needed} bottom(s), it has "
                             f"{len(layer.bottoms)}")
        if layer.type == "Split":
            for top in layer.tops:
                if layer.bottoms[0] in shapes:
                    shapes[top] = shapes[layer.bottoms[0]]
            continue
        if rule is None or any(b not in shapes for b in layer.bottoms):
            continue
        bottoms = [shapes[b] for b in layer.bottoms]
        try:
            outs = rule(layer, bottoms)
        except IndexError:  # a bottom of fewer axes than the layer type reads (a prototxt with odd dims)
            raise ModelError(f"layer '{layer.name}' ({layer.type}): its bottom shapes {bottoms} do not fit this "
                             "layer type") from None
        for top, shape in zip(layer.tops, outs):
            shapes[top] = tuple(int(d) for d in shape)
    return shapes


def check_input_size(graph: Graph, size: tuple[int, int], flag: str = "--size") -> None:
    """Shape-check the net fed at ``size`` (H, W) before an engine sees it: pycaffe aborts the process on a
    mismatch (an InnerProduct fixed to the prototxt's size, a kernel larger than the input)."""
    import dataclasses

    name, shape = next(iter(graph.inputs.items()))
    try:
        infer_shapes(dataclasses.replace(graph, inputs={**graph.inputs, name: (*shape[:2], *size)}))
    except ModelError as exc:
        raise ModelError(f"{flag} {size[0]} {size[1]}: the network cannot run at this input size: {exc}") from exc
