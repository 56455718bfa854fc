"""Region-of-interest poolings of two-stage detectors: ROIPooling (Fast R-CNN), ROIAlign and PSROIPooling (R-FCN).

Each reads a feature map and Caffe's ROI blob ``(R, 5)``, rows ``[batch index, x1, y1, x2, y2]`` in image pixels,
and pools every ROI to ``(R, C, pooled_h, pooled_w)``. ncnn's layers pool one ROI per run and read it as
``[x1, y1, x2, y2]``: the ncnn emitters crop the batch index off (as the image's single batch, it must be 0) and
decline more than one ROI. The parameter ids are caffe2ncnn's. Calibration feeds images to one input: a net that
takes its ROIs as a second input is declined by name (``Graph.image_input``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import Decline, LayerKind, Shape, fork_layer, opencv_lacks, register, unsupported
from int8conv.ncnn.model import NcnnLayer

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "roi"


def _pooled(layer: Layer) -> tuple[int, int, float]:
    """(pooled_h, pooled_w, spatial_scale) of ROIPooling / ROIAlign / PSROIPooling."""
    if layer.type == "PSROIPooling":
        p = layer.param.psroi_pooling_param
        return int(p.group_size), int(p.group_size), float(p.spatial_scale)
    p = layer.param.roi_pooling_param if layer.type == "ROIPooling" else layer.param.roi_align_param
    return int(p.pooled_h), int(p.pooled_w), float(p.spatial_scale)


def roi_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """``(R, C, pooled_h, pooled_w)``; PSROIPooling's C is output_dim (its input has output_dim * group_size^2)."""
    feature, rois = shapes[0], shapes[1]
    if int(np.prod(rois[1:])) != 5:
        raise unsupported(layer, f"a ROI blob of shape {tuple(rois)} (Caffe's is (R, 5))", "shape inference")
    pooled_h, pooled_w, _ = _pooled(layer)
    if pooled_h <= 0 or pooled_w <= 0:
        raise unsupported(layer, f"pooled size {pooled_h}x{pooled_w}", "shape inference")
    channels = feature[1]
    if layer.type == "PSROIPooling":
        channels = int(layer.param.psroi_pooling_param.output_dim)
        if feature[1] != channels * pooled_h * pooled_w:
            raise unsupported(
                layer,
                f"{feature[1]} input channels for output_dim {channels} and group_size {pooled_h}",
                "shape inference",
            )
    return [(rois[0], channels, pooled_h, pooled_w)]


def _ncnn_roi_corners(layer: Layer, ctx) -> tuple[list[NcnnLayer], str]:
    """The layers that turn Caffe's one-ROI blob ``[0, x1, y1, x2, y2]`` into ncnn's ``[x1, y1, x2, y2]``."""
    rois = layer.bottoms[1]
    shape = ctx.shape(layer, rois)
    if shape[0] != 1:
        raise unsupported(layer, f"{shape[0]} ROIs per run (ncnn's {layer.type} pools one)")
    prefix: list[NcnnLayer] = []
    source = rois
    if len(shape) != 2:  # a (1, 5, 1, 1) blob: make it the 1-D Mat the ROI layer reads from its first floats
        source = f"{rois}_{layer.name}_flat"
        prefix.append(NcnnLayer("Reshape", f"{layer.name}_rois_flat", [rois], [source], {0: 5}))
    corners = f"{rois}_{layer.name}_corners"
    prefix.append(NcnnLayer("Crop", f"{layer.name}_rois", [source], [corners], {0: 1, 3: 4}))
    return prefix, corners


def roi_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """caffe2ncnn's parameters: ROIPooling 0=pooled_w 1=pooled_h 2=spatial_scale; ROIAlign adds 3=0 (adaptive
    sampling), 4=0 (not aligned), 5=0 (version 0); PSROIPooling 0=1=group_size 2=spatial_scale 3=output_dim."""
    prefix, corners = _ncnn_roi_corners(layer, ctx)
    pooled_h, pooled_w, scale = _pooled(layer)
    params: dict = {0: pooled_w, 1: pooled_h, 2: scale}
    if layer.type == "ROIAlign":
        params.update({3: 0, 4: 0, 5: 0})
    elif layer.type == "PSROIPooling":
        params[3] = int(layer.param.psroi_pooling_param.output_dim)
    return prefix + [NcnnLayer(layer.type, layer.name, [layer.bottoms[0], corners], layer.tops, params)]


def _onnx_rois(b, layer: Layer) -> str:
    """Caffe's ROI blob as the ``(R, 5)`` tensor ONNX's ROI operators read."""
    rois = layer.bottoms[1]
    if len(b.shape(rois)) == 2:
        return rois
    flat = f"{layer.name}/rois"
    b.node("Flatten", [rois], [flat], flat, axis=1)
    return flat


def roi_pooling_onnx(b, layer: Layer) -> None:
    """MaxRoiPool has Caffe's ROI layout and its rounding (Fast R-CNN's ROI pooling)."""
    pooled_h, pooled_w, scale = _pooled(layer)
    rois = _onnx_rois(b, layer)
    b.node(
        "MaxRoiPool",
        [layer.bottoms[0], rois],
        [layer.tops[0]],
        layer.name,
        pooled_shape=[pooled_h, pooled_w],
        spatial_scale=scale,
    )


def roi_align_onnx(b, layer: Layer) -> None:
    """RoiAlign with output_half_pixel coordinates (no half-pixel shift: Mask R-CNN's original ROIAlign), average
    of an adaptive sampling grid; the batch index column becomes its int64 batch_indices input."""
    pooled_h, pooled_w, scale = _pooled(layer)
    rois = _onnx_rois(b, layer)
    axis = b.init(f"{layer.name}/axis", [1], np.int64)

    def columns(tag: str, start: int, end: int) -> str:
        out = f"{layer.name}/{tag}"
        ends = [b.init(f"{out}/start", [start], np.int64), b.init(f"{out}/end", [end], np.int64)]
        b.node("Slice", [rois, *ends, axis], [out], out)
        return out

    boxes, column = columns("boxes", 1, 5), columns("batch_column", 0, 1)
    flat, index = f"{layer.name}/batch_flat", f"{layer.name}/batch_index"
    b.node("Reshape", [column, b.init(f"{flat}/shape", [-1], np.int64)], [flat], flat)
    b.node("Cast", [flat], [index], index, to=7)  # TensorProto.INT64
    b.node(
        "RoiAlign",
        [layer.bottoms[0], boxes, index],
        [layer.tops[0]],
        layer.name,
        mode="avg",
        output_height=pooled_h,
        output_width=pooled_w,
        sampling_ratio=0,
        spatial_scale=scale,
        coordinate_transformation_mode="output_half_pixel",
    )


_FORK = fork_layer()
register(
    LayerKind(
        "ROIPooling",
        FAMILY,
        roi_shape,
        roi_ncnn,
        roi_pooling_onnx,
        min_bottoms=2,
        caffe=_FORK,
        notes=(
            "ncnn: one ROI per run; ncnn's runtime (1.0.20261020, measured) divides the ROI into bins inexactly, so "
            "when the rounded ROI size is a multiple of the pooled size a bin reaches one row or column into the "
            "one before it"
        ),
    )
)
register(
    LayerKind(
        "ROIAlign",
        FAMILY,
        roi_shape,
        roi_ncnn,
        roi_align_onnx,
        min_bottoms=2,
        caffe=_FORK,
        opencv=opencv_lacks("ROIAlign"),
        notes=(
            "ncnn: one ROI per run; caffe2ncnn's version 0, which clips each bin to the feature map before "
            "sampling: equal to ONNX RoiAlign (Mask R-CNN's) for ROIs inside the map"
        ),
    )
)
register(
    LayerKind(
        "PSROIPooling",
        FAMILY,
        roi_shape,
        roi_ncnn,
        Decline("ONNX has no position-sensitive ROI pooling operator (opset 17)"),
        min_bottoms=2,
        caffe=Decline("pycaffe's PSROIPooling (R-FCN's) has no CPU forward: it aborts with NOT_IMPLEMENTED"),
        notes="ncnn: one ROI per run",
    )
)
