"""Detections from detector outputs, and how well INT8 detections match FP32 ones.

Two output styles are handled: SSD networks whose DetectionOutput layer already decoded and suppressed
boxes (Caffe ``1x1xNx7`` or ncnn ``Nx6``), and host-decoded detectors such as UltraFace that output raw
``scores`` and ``boxes`` against priors generated on the host (RFB-320 / slim-320 conventions of
Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB). INT8 quality is measured as precision and recall of the
INT8 detections against the FP32 detections of the same image (same class, IoU >= 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: UltraFace (RFB-320 / slim-320) prior boxes: sizes in pixels per feature level, and the level strides.
ULTRAFACE_MIN_BOXES = ((10.0, 16.0, 24.0), (32.0, 48.0), (64.0, 96.0), (128.0, 192.0, 256.0))
ULTRAFACE_STRIDES = (8.0, 16.0, 32.0, 64.0)
ULTRAFACE_CENTER_VARIANCE = 0.1
ULTRAFACE_SIZE_VARIANCE = 0.2
ULTRAFACE_NMS_IOU = 0.3


@dataclass
class Detections:
    """Boxes of one image: corners (x1, y1, x2, y2) normalized to [0, 1], scores and class labels, and for
    detectors that give them, landmark points (N, P, 2) normalized the same way."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    landmarks: np.ndarray | None = None

    def above(self, threshold: float) -> Detections:
        """Only the detections scoring at least ``threshold``."""
        keep = self.scores >= threshold
        return Detections(
            self.boxes[keep],
            self.scores[keep],
            self.labels[keep],
            None if self.landmarks is None else self.landmarks[keep],
        )

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def empty_detections() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def from_detection_output(output: np.ndarray) -> Detections:
    """DetectionOutput rows: Caffe/OpenCV ``[img, label, score, x1, y1, x2, y2]`` or ncnn ``[label, score, ...]``.

    ncnn returns an empty blob when nothing was detected; Caffe pads with rows whose label is -1.
    """
    array = np.asarray(output, dtype=np.float32)
    if array.size == 0:
        return empty_detections()
    width = array.shape[-1]
    if width not in (6, 7):
        raise ValueError(f"a DetectionOutput blob has 6 or 7 values per row, this one has shape {array.shape}")
    rows = array.reshape(-1, width)[:, width - 6 :]
    rows = rows[rows[:, 0] >= 0]
    return Detections(rows[:, 2:6].copy(), rows[:, 1].copy(), rows[:, 0].astype(np.int64))


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), corner form."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(1, -1, 4)
    inter_wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0.0, None)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    area_a = np.prod(np.clip(a[..., 2:] - a[..., :2], 0.0, None), axis=-1)
    area_b = np.prod(np.clip(b[..., 2:] - b[..., :2], 0.0, None), axis=-1)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    top_k: int = 200,
    score_threshold: float = -math.inf,
    eta: float = 1.0,
) -> np.ndarray:
    """Caffe's ApplyNMSFast: indices kept, best score first (stable on ties).

    Boxes scoring above ``score_threshold`` are sorted, the ``top_k`` best (all for -1) considered, and each is
    kept when its IoU with every box kept before it is <= the threshold (which ``eta`` < 1 lowers adaptively).
    """
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    if top_k > -1:
        order = order[:top_k]
    overlap = iou_matrix(boxes[order], boxes[order])
    kept: list[int] = []
    threshold = iou_threshold
    for i in range(order.size):  # greedy and sequential by definition; the IoUs are computed at once
        if overlap[i, kept].max(initial=0.0) <= threshold:
            kept.append(i)
            if eta < 1 and threshold > 0.5:
                threshold *= eta
    return order[np.asarray(kept, dtype=np.int64)]


def ultraface_priors(
    width: int,
    height: int,
    min_boxes: Sequence[Sequence[float]] = ULTRAFACE_MIN_BOXES,
    strides: Sequence[float] = ULTRAFACE_STRIDES,
) -> np.ndarray:
    """Prior boxes (cx, cy, w, h), normalized, in the order the network's outputs use.

    Per level: rows of the feature map, then columns, then the level's box sizes; centers sit at cell middles
    of a ``ceil(size / stride)`` grid and everything is clipped to [0, 1].
    """
    levels = []
    for sizes, stride in zip(min_boxes, strides, strict=True):
        cols, rows = math.ceil(width / stride), math.ceil(height / stride)
        cy, cx, size = np.meshgrid(
            (np.arange(rows) + 0.5) * stride / height,
            (np.arange(cols) + 0.5) * stride / width,
            np.asarray(sizes, dtype=np.float64),
            indexing="ij",
        )
        levels.append(np.stack([cx, cy, size / width, size / height], axis=-1).reshape(-1, 4))
    return np.clip(np.concatenate(levels), 0.0, 1.0)


def decode_ultraface(
    scores: np.ndarray,
    boxes: np.ndarray,
    priors: np.ndarray,
    threshold: float,
    iou_threshold: float = ULTRAFACE_NMS_IOU,
    center_variance: float = ULTRAFACE_CENTER_VARIANCE,
    size_variance: float = ULTRAFACE_SIZE_VARIANCE,
) -> Detections:
    """Raw ``scores`` (P, classes) and ``boxes`` (P, 4) regressions -> per-class NMS'd detections.

    Class 0 is the background."""
    scores = np.asarray(scores, dtype=np.float64).reshape(priors.shape[0], -1)
    loc = np.asarray(boxes, dtype=np.float64).reshape(priors.shape[0], 4)
    centers = loc[:, :2] * center_variance * priors[:, 2:] + priors[:, :2]
    sizes = np.exp(loc[:, 2:] * size_variance) * priors[:, 2:]
    corners = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    found = []
    for label in range(1, scores.shape[1]):
        mask = scores[:, label] >= threshold
        class_boxes, class_scores = corners[mask], scores[mask, label]
        kept = nms(class_boxes, class_scores, iou_threshold)
        found.append((class_boxes[kept], class_scores[kept], np.full(kept.size, label, dtype=np.int64)))
    if not found:
        return empty_detections()
    return Detections(
        np.concatenate([f[0] for f in found]).astype(np.float32),
        np.concatenate([f[1] for f in found]).astype(np.float32),
        np.concatenate([f[2] for f in found]),
    )


@dataclass
class MatchTally:
    """Matches of candidate (INT8) detections against reference (FP32) detections, summed over images."""

    matched: int = 0
    reference: int = 0
    candidate: int = 0
    ious: list[float] = field(default_factory=list)

    def add(self, reference: Detections, candidate: Detections, iou_threshold: float = 0.5) -> None:
        """Greedy one-to-one matching, best-scoring candidate first, same class and IoU >= ``iou_threshold``."""
        self.reference += len(reference)
        self.candidate += len(candidate)
        if not len(reference) or not len(candidate):
            return
        overlap = iou_matrix(candidate.boxes, reference.boxes)
        overlap[candidate.labels[:, None] != reference.labels[None, :]] = -1.0
        free = np.ones(len(reference), dtype=bool)
        for index in np.argsort(-candidate.scores, kind="stable"):
            row = np.where(free, overlap[index], -1.0)
            best = int(np.argmax(row))
            if row[best] >= iou_threshold:
                free[best] = False
                self.matched += 1
                self.ious.append(float(row[best]))

    @property
    def precision(self) -> float:
        """Share of candidate detections that match a reference one (1.0 when there are none)."""
        return self.matched / self.candidate if self.candidate else 1.0

    @property
    def recall(self) -> float:
        """Share of reference detections that were found (1.0 when there are none)."""
        return self.matched / self.reference if self.reference else 1.0

    @property
    def mean_iou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else float("nan")
