"""SSD PriorBox and DetectionOutput on the host, with Caffe's semantics.

The ONNX export stops at the inputs of DetectionOutput: ONNX has no such operator and TensorRT's
NMS plugins differ between versions. The priors are constants (they depend only on the shapes), so
they are computed here and embedded in the ONNX; decoding and per-class NMS also run here, on the
exported heads (``loc``, ``conf``, ``priors``), giving the same ``[image, label, score, x1, y1, x2, y2]``
rows as Caffe's and OpenCV's DetectionOutput.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from int8conv.caffe.graph import Graph, Layer
from int8conv.caffe.proto import caffe_pb2
from int8conv.caffe.shapes import prior_box_aspect_ratios, prior_box_image_and_step
from int8conv.errors import ModelError
from int8conv.evaluation.detection import nms

log = logging.getLogger(__name__)

CORNER = caffe_pb2.PriorBoxParameter.CORNER
CENTER_SIZE = caffe_pb2.PriorBoxParameter.CENTER_SIZE
CORNER_SIZE = caffe_pb2.PriorBoxParameter.CORNER_SIZE


def prior_boxes(layer: Layer, feature_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """The ``[1, 2, H*W*num_priors*4]`` output of a Caffe PriorBox layer: boxes, then their variances.

    Order per cell: for each min_size the square box, the sqrt(min*max) box, then the other ratios,
    exactly as Caffe (and OpenCV) write them, so the loc/conf channels line up with the priors.
    """
    p = layer.param.prior_box_param
    if not len(p.min_size):
        raise ModelError(f"layer '{layer.name}' (PriorBox) has no min_size")
    if len(p.max_size) and len(p.max_size) != len(p.min_size):
        raise ModelError(
            f"layer '{layer.name}' (PriorBox): {len(p.max_size)} max_size for {len(p.min_size)} min_size values"
        )
    if len(p.variance) not in (0, 1, 4):
        raise ModelError(f"layer '{layer.name}' (PriorBox): {len(p.variance)} variances; Caffe needs 1 or 4")
    fh, fw = feature_hw
    image, step = prior_box_image_and_step(p, layer.name)
    img_h, img_w = image or image_hw
    step_h, step_w = step or (img_h / fh, img_w / fw)
    sizes: list[tuple[float, float]] = []  # (box width, box height) per prior of one cell
    for i, min_size in enumerate(p.min_size):
        sizes.append((float(min_size), float(min_size)))
        if len(p.max_size):
            side = math.sqrt(float(min_size) * float(p.max_size[i]))
            sizes.append((side, side))
        for r in prior_box_aspect_ratios(p)[1:]:
            sizes.append((float(min_size) * math.sqrt(r), float(min_size) / math.sqrt(r)))
    wh = np.asarray(sizes, dtype=np.float32)
    cy, cx = np.meshgrid(
        (np.arange(fh, dtype=np.float32) + np.float32(p.offset)) * np.float32(step_h),
        (np.arange(fw, dtype=np.float32) + np.float32(p.offset)) * np.float32(step_w),
        indexing="ij",
    )
    cx = cx[:, :, None]
    cy = cy[:, :, None]
    half_w, half_h = wh[:, 0] / 2, wh[:, 1] / 2
    boxes = np.stack(
        [(cx - half_w) / img_w, (cy - half_h) / img_h, (cx + half_w) / img_w, (cy + half_h) / img_h], axis=-1
    ).astype(np.float32)
    if p.clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    boxes = boxes.reshape(-1)
    variance = np.asarray(list(p.variance) or [0.1], dtype=np.float32)
    variances = np.broadcast_to(np.tile(variance, 4 // variance.size), (boxes.size // 4, 4)).reshape(-1)
    return np.stack([boxes, variances])[None].astype(np.float32)


@dataclass
class SsdHead:
    """One DetectionOutput layer: the value names of its three inputs and its parameters."""

    layer: str
    loc: str
    conf: str
    priors: str
    output: str
    param: caffe_pb2.DetectionOutputParameter


def ssd_heads(graph: Graph) -> list[SsdHead]:
    """Every DetectionOutput layer of the graph, with the values that feed it."""
    heads = []
    for layer in graph.layers:
        if layer.type != "DetectionOutput":
            continue
        if len(layer.bottoms) != 3:
            raise ModelError(
                f"layer '{layer.name}' (DetectionOutput) has {len(layer.bottoms)} bottoms; "
                "only the loc/conf/priors form is supported"
            )
        heads.append(SsdHead(layer.name, *layer.bottoms, layer.tops[0], layer.param.detection_output_param))
    return heads


def decode_boxes(
    loc: np.ndarray, priors: np.ndarray, variances: np.ndarray, code_type: int, variance_encoded_in_target: bool = False
) -> np.ndarray:
    """Caffe's DecodeBBox for ``[P, 4]`` arrays of normalized corner priors."""
    var = np.ones_like(variances) if variance_encoded_in_target else variances
    if code_type == CORNER:
        return priors + var * loc
    pw = priors[:, 2] - priors[:, 0]
    ph = priors[:, 3] - priors[:, 1]
    if code_type == CORNER_SIZE:
        return priors + var * loc * np.stack([pw, ph, pw, ph], axis=1)
    if code_type != CENTER_SIZE:
        raise ModelError(f"DetectionOutput code_type {code_type} is not one of CORNER, CENTER_SIZE, CORNER_SIZE")
    pcx = (priors[:, 0] + priors[:, 2]) / 2
    pcy = (priors[:, 1] + priors[:, 3]) / 2
    cx = var[:, 0] * loc[:, 0] * pw + pcx
    cy = var[:, 1] * loc[:, 1] * ph + pcy
    w = np.exp(var[:, 2] * loc[:, 2]) * pw
    h = np.exp(var[:, 3] * loc[:, 3]) * ph
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def detection_output(
    loc: np.ndarray, conf: np.ndarray, priors: np.ndarray, param: caffe_pb2.DetectionOutputParameter
) -> np.ndarray:
    """Detections ``[1, 1, K, 7]`` (image, label, score, x1, y1, x2, y2) from a batch of SSD heads.

    ``loc`` is ``[N, P*4*L]`` (L = 1 with share_location, else num_classes), ``conf`` ``[N, P*C]``
    after softmax, ``priors`` the ``[1, 2, P*4]`` PriorBox constant.
    """
    num_classes = int(param.num_classes)
    if num_classes <= 0:
        raise ModelError("DetectionOutput has no num_classes")
    priors = np.asarray(priors, dtype=np.float32).reshape(2, -1, 4)
    num_priors = priors.shape[1]
    batch = loc.shape[0]
    num_loc = 1 if param.share_location else num_classes
    loc = np.asarray(loc, dtype=np.float32).reshape(batch, num_priors, num_loc, 4)
    conf = np.asarray(conf, dtype=np.float32).reshape(batch, num_priors, num_classes)
    nms_param = param.nms_param
    top_k = int(nms_param.top_k) if nms_param.HasField("top_k") else -1
    # Caffe: an unset confidence_threshold is -FLT_MAX (every score is a candidate), not the proto's 0
    threshold = float(param.confidence_threshold) if param.HasField("confidence_threshold") else -math.inf
    rows = []
    for n in range(batch):
        picked: list[tuple[int, np.ndarray, np.ndarray]] = []
        decoded = [
            decode_boxes(loc[n, :, c], priors[0], priors[1], param.code_type, param.variance_encoded_in_target)
            for c in range(num_loc)
        ]
        for label in range(num_classes):
            if label == param.background_label_id:
                continue
            boxes = decoded[0 if param.share_location else label]
            scores = conf[n, :, label]
            keep = nms(boxes, scores, nms_param.nms_threshold, top_k, threshold, nms_param.eta)
            picked.append((label, scores[keep], boxes[keep]))
        labels = (
            np.concatenate([np.full(s.size, lab, dtype=np.float32) for lab, s, _ in picked])
            if picked
            else np.zeros(0, np.float32)
        )
        scores = np.concatenate([s for _, s, _ in picked]) if picked else np.zeros(0, np.float32)
        boxes = np.concatenate([b for _, _, b in picked]) if picked else np.zeros((0, 4), np.float32)
        if param.keep_top_k > -1 and scores.size > param.keep_top_k:
            best = np.argsort(-scores, kind="stable")[: param.keep_top_k]
            best = best[np.lexsort((-scores[best], labels[best]))]  # Caffe writes by label, then score
            labels, scores, boxes = labels[best], scores[best], boxes[best]
        rows.append(np.column_stack([np.full(scores.size, n, np.float32), labels, scores, boxes]))
    out = np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 7), np.float32)
    return out.reshape(1, 1, -1, 7)


def decode_head(head: SsdHead, outputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run DetectionOutput for one head on a dict of exported outputs (ONNX Runtime, TensorRT, ...)."""
    missing = [name for name in (head.loc, head.conf, head.priors) if name not in outputs]
    if missing:
        raise ModelError(f"DetectionOutput '{head.layer}' needs the outputs {missing}, which are not in the results")
    return detection_output(outputs[head.loc], outputs[head.conf], outputs[head.priors], head.param)
