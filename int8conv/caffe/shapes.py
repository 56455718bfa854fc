"""Shape inference on the graph IR, as Caffe computes shapes, and the geometry helpers the layer rules share.

Each type's rule lives in its ``int8conv.caffe.layers`` declaration; the rules also check weights against the prototxt.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Graph, Layer

Shape = tuple[int, ...]


def conv_geometry(layer: Layer) -> dict[str, int]:
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
    return {
        "kernel_h": kh,
        "kernel_w": kw,
        "stride_h": sh,
        "stride_w": sw,
        "pad_h": ph,
        "pad_w": pw,
        "dilation_h": dh,
        "dilation_w": dw,
        "group": int(p.group),
        "num_output": int(p.num_output),
        "bias_term": int(p.bias_term),
    }


def pool_geometry(layer: Layer, in_shape: Shape) -> dict[str, int]:
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
    return {
        "kernel_h": int(kh),
        "kernel_w": int(kw),
        "stride_h": int(sh),
        "stride_w": int(sw),
        "pad_h": int(ph),
        "pad_w": int(pw),
        "global": int(p.global_pooling),
        "method": int(p.pool),
    }


def pool_out(size: int, k: int, s: int, pad: int) -> int:
    """Caffe's ceil-mode pooling output size, clipped so the last window starts inside the image."""
    out = int(math.ceil((size + 2 * pad - k) / s)) + 1
    if pad and (out - 1) * s >= size + pad:
        out -= 1
    return out


def check_weights(layer: Layer, weight: Shape, bias: int | None) -> None:
    """The caffemodel's weight and bias shapes must be what the prototxt implies."""
    if tuple(layer.blobs[0].shape) != tuple(weight):
        raise ModelError(
            f"layer '{layer.name}' ({layer.type}): caffemodel weight shape {tuple(layer.blobs[0].shape)} "
            f"does not match the prototxt, which implies {tuple(weight)}"
        )
    if bias is not None and (len(layer.blobs) < 2 or layer.blobs[1].size != bias):
        found = layer.blobs[1].size if len(layer.blobs) > 1 else "no bias"
        raise ModelError(
            f"layer '{layer.name}' ({layer.type}): expected a bias of {bias} values, the caffemodel has {found}"
        )


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


def prior_box_image_and_step(p, layer: str) -> tuple[tuple[int, int] | None, tuple[float, float] | None]:
    """PriorBox's image size (``img_h``/``img_w`` or ``img_size``) and step (``step_h``/``step_w`` or ``step``),
    each as (h, w), or None where the prototxt leaves it to the image blob and the feature map size (Caffe's 0).

    The ncnn converter writes these, the SSD host decoder computes the priors from them. Caffe refuses half a
    pair (``CHECK_GT(img_w_, 0)``, ``CHECK_GT(step_w_, 0.)``): a zero image side would divide the priors by 0 and a
    zero step stack every cell's priors at the origin, so it is refused here too, naming ``layer``.
    """
    image = (p.img_h, p.img_w) if p.img_h or p.img_w else (p.img_size, p.img_size)
    step = (p.step_h, p.step_w) if p.step_h or p.step_w else (p.step, p.step)
    for what, pair in (("img_h/img_w", image), ("step_h/step_w", step)):
        if any(pair) and not all(v > 0 for v in pair):
            raise ModelError(
                f"layer '{layer}' (PriorBox): {what} is {pair[0]:g}/{pair[1]:g}; Caffe needs both positive "
                "(or neither, to take them from the image and the feature map)"
            )
    image_hw = (int(image[0]), int(image[1])) if any(image) else None
    step_hw = (float(step[0]), float(step[1])) if any(step) else None
    return image_hw, step_hw


def infer_shapes(graph: Graph) -> dict[str, Shape]:
    """Shape of every value by each type's rule in the layer registry; types without one get no shape (later
    stages decide if that matters)."""
    from int8conv.caffe.layers import kind_of

    shapes: dict[str, Shape] = dict(graph.inputs)
    for layer in graph.layers:
        kind = kind_of(layer.type)
        if kind is None or kind.shape is None:
            continue
        if len(layer.bottoms) < kind.min_bottoms:
            raise ModelError(
                f"layer '{layer.name}' ({layer.type}) needs {kind.min_bottoms} bottom(s), it has {len(layer.bottoms)}"
            )
        if any(b not in shapes for b in layer.bottoms):
            continue
        bottoms = [shapes[b] for b in layer.bottoms]
        try:
            outs = kind.shape(layer, bottoms)
        except IndexError:  # a bottom of fewer axes than the layer type reads (a prototxt with odd dims)
            raise ModelError(
                f"layer '{layer.name}' ({layer.type}): its bottom shapes {bottoms} do not fit this layer type"
            ) from None
        if len(outs) != len(layer.tops):
            raise ModelError(
                f"layer '{layer.name}' ({layer.type}) has {len(layer.tops)} top(s), but its bottoms and parameters "
                f"give {len(outs)} output(s)"
            )
        for top, shape in zip(layer.tops, outs, strict=True):
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
