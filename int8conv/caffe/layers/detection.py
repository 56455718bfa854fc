"""Detection layers: SSD's PriorBox and DetectionOutput, and the YOLO detection outputs of MobileNet-YOLO."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import (
    Decline,
    LayerKind,
    Shape,
    fork_layer,
    ncnn_layer,
    opencv_lacks,
    register,
    unsupported,
)
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


def yolo_output_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    """MobileNet-YOLO's Caffe layers write (1, 1, detections, 7); how many depends on the data."""
    return [(1, 1, -1, 7)]


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
    image, step = prior_box_image_and_step(p, layer.name)
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
    return ncnn_layer("PriorBox", layer, params)


def state_prior_box_clip(net) -> list[str]:
    """Write SSD Caffe's ``clip`` default (false: weiliu89/caffe's ssd branch since 2016, as caffe2ncnn reads it)
    into every PriorBox of ``net`` (a NetParameter of any Caffe schema) that leaves it out; OpenCV and the
    brocolli-caffe pycaffe keep SSD's first default, true. Returns the layers it changed."""
    stated = []
    for layer in net.layer:
        if layer.type == "PriorBox" and not layer.prior_box_param.HasField("clip"):
            layer.prior_box_param.clip = False
            stated.append(layer.name)
    return stated


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
    return ncnn_layer("DetectionOutput", layer, params)


def _yolo_checks(layer: Layer, ctx, num_classes: int, num_box: int, biases: int) -> None:
    """Each bottom holds num_box boxes of (x, y, w, h, objectness, classes); anchors come as (w, h) pairs."""
    for bottom in layer.bottoms:
        channels = ctx.shape(layer, bottom)[1]
        if channels != num_box * (5 + num_classes):
            raise ModelError(
                f"layer '{layer.name}' ({layer.type}): bottom '{bottom}' has {channels} channels, not "
                f"num_box * (5 + num_classes) = {num_box * (5 + num_classes)}"
            )
    if biases < 2 * num_box:
        raise ModelError(f"layer '{layer.name}' ({layer.type}): {biases} biases for {num_box} anchor boxes")


def _yolo_params(layer: Layer, ctx, p) -> dict[int, ParamValue]:
    """caffe2ncnn's parameters of both YOLO outputs (``p``: the layer's parameter message), after the checks:
    0=num_classes 1=num_box 2=confidence_threshold 3=nms_threshold 4=biases."""
    _yolo_checks(layer, ctx, int(p.num_classes), int(p.num_box), len(p.biases))
    return {
        0: int(p.num_classes),
        1: int(p.num_box),
        2: float(p.confidence_threshold),
        3: float(p.nms_threshold),
        4: [float(v) for v in p.biases],
    }


def yolo_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    return ncnn_layer("YoloDetectionOutput", layer, _yolo_params(layer, ctx, layer.param.yolo_detection_output_param))


def _yolov3_scored(layer: Layer, index: int, bottom: str, num_classes: int, num_box: int) -> list[NcnnLayer]:
    """ncnn's Yolov3DetectionOutput scores a cell 1 / (1 + e^-obj (1 + e^-cls)) where Caffe (and darknet) have
    sigmoid(obj) * sigmoid(cls) = 1 / (1 + e^-obj + e^-cls + e^-obj e^-cls). Lowering every class logit by
    softplus(obj) = log(1 + e^obj) makes ncnn's formula give Caffe's score, and keeps each cell's best class."""
    base, name = f"{bottom}_{layer.name}", f"{layer.name}_{index}"
    parts = [f"{base}_{a}_{tag}" for a in range(num_box) for tag in ("xywh", "obj", "cls")]
    layers = [NcnnLayer("Slice", f"{name}_slice", [bottom], parts, {0: [4, 1, num_classes] * num_box, 1: 0})]
    joined = []
    for a in range(num_box):
        xywh, obj, cls = parts[3 * a : 3 * a + 3]
        softplus, shifted = f"{base}_{a}_softplus", f"{base}_{a}_shifted"
        layers.append(NcnnLayer("Softplus", f"{name}_{a}_softplus", [obj], [softplus], {}))
        layers.append(NcnnLayer("BinaryOp", f"{name}_{a}_shift", [cls, softplus], [shifted], {0: 1}))  # cls - sp
        joined += [xywh, obj, shifted]
    layers.append(NcnnLayer("Concat", f"{name}_join", joined, [f"{base}_scored"], {0: 0}))
    return layers


def yolov3_ncnn(layer: Layer, ctx) -> list[NcnnLayer]:
    """caffe2ncnn's parameters (``_yolo_params``, then 5=mask 6=anchors_scale 7=mask_group_num), on inputs whose
    class logits are corrected (``_yolov3_scored``)."""
    p = layer.param.yolov3_detection_output_param
    num_classes, num_box = int(p.num_classes), int(p.num_box)
    params = _yolo_params(layer, ctx, p)
    bottoms = len(layer.bottoms)
    if p.mask_group_num != bottoms or len(p.mask) != num_box * bottoms or len(p.anchors_scale) < bottoms:
        # Caffe checks mask_group_num == bottoms and offsets the mask by len(mask) / mask_group_num per bottom,
        # ncnn by num_box: they agree when each bottom has num_box mask entries
        raise ModelError(
            f"layer '{layer.name}' (Yolov3DetectionOutput): {bottoms} bottoms need mask_group_num {bottoms}, "
            f"{num_box * bottoms} mask entries and {bottoms} anchors_scale entries (it has {p.mask_group_num}, "
            f"{len(p.mask)}, {len(p.anchors_scale)})"
        )
    if max(p.mask) >= len(p.biases) // 2:
        raise ModelError(f"layer '{layer.name}' (Yolov3DetectionOutput): mask {max(p.mask)} has no bias pair")
    layers: list[NcnnLayer] = []
    for index, bottom in enumerate(layer.bottoms):
        layers += _yolov3_scored(layer, index, bottom, num_classes, num_box)
    params.update({5: [float(v) for v in p.mask], 6: [float(v) for v in p.anchors_scale], 7: int(p.mask_group_num)})
    scored = [f"{b}_{layer.name}_scored" for b in layer.bottoms]
    return layers + [NcnnLayer("Yolov3DetectionOutput", layer.name, scored, layer.tops, params)]


def prior_box_onnx(b, layer: Layer) -> None:
    """PriorBox depends only on shapes: a constant computed on the host."""
    from int8conv.tensorrt.ssd_host import prior_boxes

    feature = b.shape(layer.bottoms[0])
    image = b.shape(layer.bottoms[1]) if len(layer.bottoms) > 1 else feature
    b.constant(layer.tops[0], prior_boxes(layer, (feature[2], feature[3]), (image[2], image[3])), layer.name)


_NO_ONNX_NMS = "NMS-based post-processing has no opset-17 mapping TensorRT runs"
_HOST_DECODED = _NO_ONNX_NMS + "; the export stops at its inputs and the host decodes them"
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
_YOLO_ONNX = Decline(
    _NO_ONNX_NMS + "; export the network without it and decode its inputs on the host "
    "(int8conv.evaluation.host_decoders has darknet's YOLO heads)"
)
_YOLO_FORK = fork_layer("MobileNet-YOLO's")
_YOLO_OPENCV = opencv_lacks("YOLO detection output")
register(
    LayerKind(
        "YoloDetectionOutput",
        FAMILY,
        yolo_output_shape,
        yolo_ncnn,
        _YOLO_ONNX,
        caffe=_YOLO_FORK,
        opencv=_YOLO_OPENCV,
        notes="ncnn: rows [label, score, x1, y1, x2, y2] (Caffe's without the image id)",
    )
)
register(
    LayerKind(
        "Yolov3DetectionOutput",
        FAMILY,
        yolo_output_shape,
        yolov3_ncnn,
        _YOLO_ONNX,
        caffe=_YOLO_FORK,
        opencv=_YOLO_OPENCV,
        notes="ncnn: class logits shifted by softplus(objectness) so ncnn's score is sigmoid(obj) * sigmoid(class)",
    )
)
