"""Detection layers: SSD's PriorBox and DetectionOutput, the YOLO outputs and the ROI poolings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import Decline, LayerKind, Shape, register, unsupported
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.shapes import prior_box_aspect_ratios, prior_box_image_and_step
from int8conv.errors import ModelError
from int8conv.ncnn.model import NcnnLayer, ParamValue

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "detection"


def prior_box_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    p = layer.param.prior_box_param
    num = len(p.min_size) * len(prior_box_aspect_ratios(p)) + len(p.max_size)
    h, w = shapes[0][2], shapes[0][3]
    return [(1, 2, h * w * num * 4)]


def detection_output_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    keep = layer.param.detection_output_param.keep_top_k
    return [(1, 1, keep if keep > 0 else -1, 7)]


def prior_box_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """Caffe's aspect ratio list (1 first, duplicates dropped, 1/r after r when flipping) written out in full,
    so ncnn's own flipping (which does not drop duplicates) stays off."""
    p = layer.param.prior_box_param
    if len(p.max_size) and len(p.max_size) != len(p.min_size):
        raise ModelError(f"layer '{layer.name}' (PriorBox): {len(p.max_size)} max_size for {len(p.min_size)} min_size")
    ratios = prior_box_aspect_ratios(p)
    variance = list(p.variance) or [0.1]
    if len(variance) not in (1, 4):
        raise ModelError(f"layer '{layer.name}' (PriorBox): variance needs 1 or 4 values, got {len(variance)}")
    variance = variance * 4 if len(variance) == 1 else variance
    image, step = prior_box_image_and_step(p)
    img_h, img_w = image or (-233, -233)  # ncnn's -233: from the image blob / the feature map
    step_h, step_w = step or (-233.0, -233.0)
    if (img_w == -233) != (img_h == -233) or len(layer.bottoms) < 2 and img_w == -233:
        raise ModelError(f"layer '{layer.name}' (PriorBox): needs the image size (img_size or a second bottom)")
    params: dict[int, ParamValue] = {
        0: [float(v) for v in p.min_size],
        1: [float(v) for v in p.max_size],
        2: [float(r) for r in ratios[1:]],
        3: float(variance[0]),
        4: float(variance[1]),
        5: float(variance[2]),
        6: float(variance[3]),
        7: 0,
        8: int(p.clip),
        9: img_w,
        10: img_h,
        11: step_w,
        12: step_h,
        13: float(p.offset),
    }
    if not params[1]:
        del params[1]
    if not params[2]:
        del params[2]
    return [NcnnLayer("PriorBox", layer.name, layer.bottoms, layer.tops, params)]


def detection_output_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    p = layer.param.detection_output_param
    nms = p.nms_param
    if (
        not p.share_location
        or p.background_label_id != 0
        or p.variance_encoded_in_target
        or p.code_type != caffe_pb2.PriorBoxParameter.CENTER_SIZE
        or nms.eta != 1.0
    ):
        raise unsupported(
            layer,
            "anything but share_location, background_label_id 0, CENTER_SIZE boxes, "
            "variances in the priors and plain NMS (eta 1)",
        )
    if len(layer.bottoms) != 3:
        raise unsupported(layer, f"{len(layer.bottoms)} bottoms (ncnn reads location, confidence, priors)")
    keep_all = 2**31 - 1  # Caffe: no top_k / keep_top_k -1 keeps every candidate
    top_k = int(nms.top_k) if nms.HasField("top_k") and nms.top_k >= 0 else keep_all
    keep_top_k = int(p.keep_top_k) if p.keep_top_k >= 0 else keep_all
    # Caffe's threshold when none is given is -FLT_MAX: every score passes.
    threshold = (
        float(p.confidence_threshold) if p.HasField("confidence_threshold") else -float(np.finfo(np.float32).max)
    )
    params = {0: int(p.num_classes), 1: float(nms.nms_threshold), 2: top_k, 3: keep_top_k, 4: threshold}
    return [NcnnLayer("DetectionOutput", layer.name, layer.bottoms, layer.tops, params)]


def prior_box_onnx(b, layer: Layer) -> None:
    """PriorBox depends only on shapes: a constant computed on the host."""
    from int8conv.tensorrt.ssd_host import prior_boxes

    feature = b.shape(layer.bottoms[0])
    image = b.shape(layer.bottoms[1]) if len(layer.bottoms) > 1 else feature
    b.constant(layer.tops[0], prior_boxes(layer, (feature[2], feature[3]), (image[2], image[3])), layer.name)


_HOST_DECODED = (
    "NMS-based post-processing has no opset-17 mapping TensorRT runs; the export stops at its inputs "
    "and the host decodes them"
)
_NOT_WRITTEN = "not written yet in int8conv (no test model uses it)"
register(
    LayerKind(
        "PriorBox",
        FAMILY,
        prior_box_shape,
        prior_box_ncnn,
        prior_box_onnx,
        min_bottoms=2,
        notes="exported to ONNX as a constant",
    )
)
register(
    LayerKind(
        "DetectionOutput",
        FAMILY,
        detection_output_shape,
        detection_output_ncnn,
        Decline(_HOST_DECODED + " (int8conv.tensorrt.ssd_host)"),
        notes="ncnn: share_location, background 0, CENTER_SIZE, plain NMS only",
    )
)
_NOT_WRITTEN_NCNN = Decline(_NOT_WRITTEN)
_FORK = Decline("a Caffe-fork layer: BVLC pycaffe has none")
_UNCHECKED = Decline("not checked: int8conv has no emitter for it")
for _name in ("YoloDetectionOutput", "Yolov3DetectionOutput"):
    register(LayerKind(_name, FAMILY, None, _NOT_WRITTEN_NCNN, Decline(_HOST_DECODED), caffe=_FORK, opencv=_UNCHECKED))
for _name in ("ROIPooling", "ROIAlign"):
    register(LayerKind(_name, FAMILY, None, _NOT_WRITTEN_NCNN, Decline(_NOT_WRITTEN), caffe=_FORK, opencv=_UNCHECKED))
register(LayerKind("PSROIPooling", FAMILY, None, _NOT_WRITTEN_NCNN, Decline(_NOT_WRITTEN), opencv=_UNCHECKED))
