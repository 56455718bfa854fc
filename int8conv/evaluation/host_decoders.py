"""Box decoding that detectors without a DetectionOutput layer leave to the application.

- RetinaFace (insightface / clancylian/retinaface conventions): per stride 32/16/8 a softmaxed score map
  ``face_rpn_cls_prob_reshape_stride{s}`` (channels: background per anchor, then face per anchor), box deltas
  ``face_rpn_bbox_pred_stride{s}`` and 5-point landmark deltas ``face_rpn_landmark_pred_stride{s}`` against two
  square anchors per cell (insightface ``generate_anchors``: base size 16, ratio 1).
- darknet YOLOv3 heads (yoloface-500k): raw 1x1 convolution outputs of ``anchors x (x, y, w, h, objectness,
  classes)`` channels per cell, decoded as darknet's ``yolo`` layer does.

Both return ``Detections`` normalized to the network input, class 1 = face, after the one NMS of
``detection.nms``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from int8conv.errors import ModelError
from int8conv.evaluation.detection import Detections, decode_ultraface, empty_detections, nms, ultraface_priors

#: RetinaFace: stride -> anchor scales (anchor side = 16 * scale), in the order of the output channels.
RETINAFACE_SCALES = {32: (32.0, 16.0), 16: (8.0, 4.0), 8: (2.0, 1.0)}
RETINAFACE_BASE_SIZE = 16.0
RETINAFACE_SCORE = 0.8
RETINAFACE_NMS_IOU = 0.4
RETINAFACE_POINTS = 5

#: yoloface-500k v2 anchors (w, h) in input pixels, and which of them each stride's head uses.
YOLOFACE_ANCHORS = ((4, 6), (7, 10), (11, 15), (16, 24), (33, 25), (26, 41), (47, 60), (83, 97), (141, 149))
YOLOFACE_MASKS = {32: (6, 7, 8), 16: (3, 4, 5), 8: (0, 1, 2)}
YOLO_SCORE = 0.5
YOLO_NMS_IOU = 0.45


def retinaface_outputs(stride: int) -> tuple[str, str, str]:
    """The score, box and landmark output names of one RetinaFace stride."""
    return (
        f"face_rpn_cls_prob_reshape_stride{stride}",
        f"face_rpn_bbox_pred_stride{stride}",
        f"face_rpn_landmark_pred_stride{stride}",
    )


def is_retinaface(output_names: Sequence[str]) -> bool:
    """Whether a net's outputs are RetinaFace's three maps for every stride."""
    return all(set(retinaface_outputs(stride)) <= set(output_names) for stride in RETINAFACE_SCALES)


def _retinaface_anchors(rows: int, cols: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres (rows*cols*A, 2) and sides (rows*cols*A,) in pixels, ordered (row, col, anchor) as the
    outputs' channels are read after an NCHW -> NHWC transpose."""
    sides = RETINAFACE_BASE_SIZE * np.asarray(RETINAFACE_SCALES[stride])
    centre = (RETINAFACE_BASE_SIZE - 1) / 2
    cy, cx, side = np.meshgrid(
        np.arange(rows) * stride + centre, np.arange(cols) * stride + centre, sides, indexing="ij"
    )
    return np.stack([cx, cy], axis=-1).reshape(-1, 2), side.reshape(-1)


def decode_retinaface(
    outputs: Mapping[str, np.ndarray],
    width: int,
    height: int,
    threshold: float = RETINAFACE_SCORE,
    iou_threshold: float = RETINAFACE_NMS_IOU,
) -> Detections:
    """Faces with 5 landmarks each: centre = anchor centre + (dx, dy) * side, size = exp(dw, dh) * side
    (insightface's ``bbox_pred`` with ``+1`` pixel widths), landmarks = anchor centre + delta * side."""
    boxes, scores, points = [], [], []
    for stride, scales in RETINAFACE_SCALES.items():
        cls_name, box_name, mark_name = retinaface_outputs(stride)
        cls = np.asarray(outputs[cls_name], dtype=np.float64)
        rows, cols = cls.shape[-2:]
        anchors = len(scales)
        face = cls.reshape(2 * anchors, rows, cols)[anchors:].transpose(1, 2, 0).reshape(-1)
        deltas = np.asarray(outputs[box_name], dtype=np.float64).reshape(anchors * 4, rows, cols)
        deltas = deltas.transpose(1, 2, 0).reshape(-1, 4)
        marks = np.asarray(outputs[mark_name], dtype=np.float64).reshape(anchors * RETINAFACE_POINTS * 2, rows, cols)
        marks = marks.transpose(1, 2, 0).reshape(-1, RETINAFACE_POINTS, 2)
        keep = face >= threshold
        centres, sides = _retinaface_anchors(rows, cols, stride)
        centres, sides = centres[keep], sides[keep, None]
        centre = centres + deltas[keep, :2] * sides
        half = (np.exp(deltas[keep, 2:]) * sides - 1.0) / 2
        boxes.append(np.concatenate([centre - half, centre + half], axis=1))
        points.append(centres[:, None, :] + marks[keep] * sides[:, :, None])
        scores.append(face[keep])
    return _suppressed(
        np.concatenate(boxes), np.concatenate(scores), width, height, iou_threshold, np.concatenate(points)
    )


@dataclass(frozen=True)
class YoloHeads:
    """Which outputs are YOLO heads, and the anchors of each (in input pixels)."""

    anchors: Mapping[str, tuple[tuple[float, float], ...]]
    classes: int = 1


def yoloface_heads(
    shapes: Mapping[str, Sequence[int]],
    height: int,
    anchors: Sequence[tuple[float, float]] = YOLOFACE_ANCHORS,
    masks: Mapping[int, Sequence[int]] = YOLOFACE_MASKS,
) -> YoloHeads:
    """The heads by stride (input height / map height), each with its masked anchors."""
    found = {}
    per_head = len(next(iter(masks.values())))
    for name, shape in shapes.items():
        if len(shape) < 3 or shape[-3] % per_head or shape[-3] // per_head < 6:
            raise ModelError(
                f"--task yoloface: output '{name}' of shape {tuple(shape)} is not a YOLO head (a channels x rows x "
                f"columns map of {per_head} anchors x (4 box + objectness + classes) channels)"
            )
        stride = round(height / shape[-2])
        if stride not in masks:
            raise ModelError(
                f"--task yoloface: output '{name}' of shape {tuple(shape)} has stride {stride}; the YOLO heads have "
                f"strides {', '.join(map(str, sorted(masks)))}"
            )
        found[name] = tuple(anchors[i] for i in masks[stride])
    channels = {int(shape[-3]) for shape in shapes.values()}
    if len(channels) > 1:
        raise ModelError(f"--task yoloface: the heads differ in channels ({sorted(channels)}): one class count")
    return YoloHeads(found, classes=channels.pop() // per_head - 5)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def decode_yolo(
    outputs: Mapping[str, np.ndarray],
    heads: YoloHeads,
    width: int,
    height: int,
    threshold: float = YOLO_SCORE,
    iou_threshold: float = YOLO_NMS_IOU,
) -> Detections:
    """darknet: centre = (sigmoid(x, y) + cell) / grid, size = anchor * exp(w, h) / input size,
    score = sigmoid(objectness) * sigmoid(class) > threshold; NMS per class over all heads."""
    boxes, scores, labels = [], [], []
    for name, anchors in heads.anchors.items():
        head = np.asarray(outputs[name], dtype=np.float64)
        rows, cols = head.shape[-2:]
        head = head.reshape(len(anchors), 5 + heads.classes, rows, cols)
        cy, cx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        size = np.asarray(anchors, dtype=np.float64)[:, :, None, None]
        centre_x = (_sigmoid(head[:, 0]) + cx) / cols
        centre_y = (_sigmoid(head[:, 1]) + cy) / rows
        box_w = size[:, 0] * np.exp(head[:, 2]) / width
        box_h = size[:, 1] * np.exp(head[:, 3]) / height
        corners = np.stack(
            [centre_x - box_w / 2, centre_y - box_h / 2, centre_x + box_w / 2, centre_y + box_h / 2], axis=-1
        ).reshape(-1, 4)
        class_scores = (_sigmoid(head[:, 4:5]) * _sigmoid(head[:, 5:])).transpose(0, 2, 3, 1).reshape(-1, heads.classes)
        cell, label = np.nonzero(class_scores > threshold)
        boxes.append(corners[cell] * [width, height, width, height])
        scores.append(class_scores[cell, label])
        labels.append(label + 1)
    all_boxes, all_scores, all_labels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
    found = [
        _suppressed(
            all_boxes[all_labels == label], all_scores[all_labels == label], width, height, iou_threshold, label=label
        )
        for label in np.unique(all_labels)
    ]
    if not found:
        return empty_detections()
    return Detections(
        np.concatenate([f.boxes for f in found]),
        np.concatenate([f.scores for f in found]),
        np.concatenate([f.labels for f in found]),
    )


def _suppressed(
    boxes: np.ndarray,
    scores: np.ndarray,
    width: int,
    height: int,
    iou_threshold: float,
    points: np.ndarray | None = None,
    label: int = 1,
) -> Detections:
    """NMS over pixel boxes (all candidates, no top-k), then normalized to the input size."""
    kept = nms(boxes, scores, iou_threshold, top_k=-1)
    scale = np.asarray([width, height, width, height], dtype=np.float64)
    return Detections(
        (boxes[kept] / scale).astype(np.float32),
        scores[kept].astype(np.float32),
        np.full(kept.size, label, dtype=np.int64),
        None if points is None else (points[kept] / scale[:2]).astype(np.float32),
    )


#: The host-decoded detector tasks: UltraFace (``scores``/``boxes`` against host priors), RetinaFace, YOLO face.
HOST_TASKS = ("host-decoded", "retinaface", "yoloface")
#: Score threshold of each task's upstream demo, where it is not 0.5.
DEFAULT_SCORES = {"retinaface": RETINAFACE_SCORE}


def make_host_decoder(
    task: str, output_names: Sequence[str], height: int, width: int, threshold: float
) -> Callable[[Mapping[str, np.ndarray]], Detections]:
    """One image's outputs (no batch axis) -> its detections, for one of ``HOST_TASKS``."""
    if task == "host-decoded":
        priors = ultraface_priors(width, height)
        return lambda outputs: decode_ultraface(outputs["scores"], outputs["boxes"], priors, threshold)
    if task == "retinaface":
        return lambda outputs: decode_retinaface(outputs, width, height, threshold)
    if task == "yoloface":
        names = list(output_names)
        return lambda outputs: decode_yolo(
            outputs, yoloface_heads({n: outputs[n].shape for n in names}, height), width, height, threshold
        )
    raise ValueError(f"no host decoder for task '{task}' (host tasks: {', '.join(HOST_TASKS)})")
