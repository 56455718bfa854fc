"""Host decoders (RetinaFace, darknet YOLO) on hand-built outputs, against the formulas of their upstream code
written out here, and the tasks ``eval`` detects from a model's outputs."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from int8conv.errors import ModelError
from int8conv.evaluation.evaluate import detect_task
from int8conv.evaluation.host_decoders import (
    decode_retinaface,
    decode_yolo,
    make_host_decoder,
    retinaface_outputs,
    yoloface_heads,
)
from int8conv.ncnn.model import NcnnLayer, NcnnModel


def _retinaface_blank(size: int = 64) -> dict[str, np.ndarray]:
    outputs = {}
    for stride in (32, 16, 8):
        cells = size // stride
        scores, boxes, marks = retinaface_outputs(stride)
        outputs[scores] = np.zeros((4, cells, cells), np.float32)
        outputs[scores][:2] = 1.0  # background everywhere
        outputs[boxes] = np.zeros((8, cells, cells), np.float32)
        outputs[marks] = np.zeros((20, cells, cells), np.float32)
    return outputs


def test_retinaface_decodes_one_anchor_as_insightface_does():
    """Stride 16, anchor 1 (side 16 * 4 = 64), cell (row 1, col 2): anchor box x1 = 2*16 + 7.5 - 31.5."""
    outputs = _retinaface_blank()
    scores, boxes, marks = retinaface_outputs(16)
    outputs[scores][3, 1, 2] = 0.9  # face channel of anchor 1
    outputs[boxes][4:8, 1, 2] = [0.1, -0.2, math.log(0.5), 0.0]  # dx, dy, dw, dh of anchor 1
    outputs[marks][10:20, 1, 2] = np.arange(10) / 20.0  # 5 points of anchor 1
    found = decode_retinaface(outputs, 64, 64)
    # insightface bbox_pred: widths = x2 - x1 + 1, ctr = x1 + 0.5 * (widths - 1), pred_w = exp(dw) * widths,
    # x1' = ctr' - 0.5 * (pred_w - 1)
    x1, y1 = 2 * 16 + 7.5 - 31.5, 1 * 16 + 7.5 - 31.5
    widths = 64.0
    ctr_x, ctr_y = x1 + 0.5 * (widths - 1) + 0.1 * widths, y1 + 0.5 * (widths - 1) - 0.2 * widths
    pred_w, pred_h = 0.5 * widths, widths
    expected = (
        np.array(
            [
                ctr_x - 0.5 * (pred_w - 1),
                ctr_y - 0.5 * (pred_h - 1),
                ctr_x + 0.5 * (pred_w - 1),
                ctr_y + 0.5 * (pred_h - 1),
            ]
        )
        / 64
    )
    assert len(found) == 1 and found.labels[0] == 1 and found.scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(found.boxes[0], expected, atol=1e-6)
    centre = np.array([x1 + 0.5 * (widths - 1), y1 + 0.5 * (widths - 1)])
    points = centre + (np.arange(10) / 20.0).reshape(5, 2) * widths
    np.testing.assert_allclose(found.landmarks[0], points / 64, atol=1e-6)


def test_retinaface_threshold_and_nms():
    """Stride 8 (anchor 0: side 32, anchor 1: side 16): overlaps of 1/3 and 1/4 survive NMS 0.4, not NMS 0.2;
    a 0.79 score is below 0.8."""
    outputs = _retinaface_blank()
    scores, _, _ = retinaface_outputs(8)
    outputs[scores][3, 3, 3], outputs[scores][3, 3, 4] = 0.95, 0.85  # side-16 anchors 8 px apart: IoU 1/3
    outputs[scores][2, 3, 3] = 0.9  # side 32 over side 16: IoU 1/4
    outputs[scores][3, 6, 6] = 0.79
    found = decode_retinaface(outputs, 64, 64)
    assert sorted(found.scores.tolist()) == pytest.approx([0.85, 0.9, 0.95])
    assert len(decode_retinaface(outputs, 64, 64, iou_threshold=0.2)) == 1


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_yolo_decodes_one_cell_as_darknet_does():
    """Stride-16 head of a 64x32 (WxH) input: 4x2 cells, anchors 3..5 of yoloface (16,24 33,25 26,41)."""
    head = np.full((18, 2, 4), -10.0, np.float32)  # objectness ~0 everywhere
    anchor, row, col = 1, 1, 2  # anchor (33, 25)
    head[anchor * 6 : anchor * 6 + 6, row, col] = [
        _logit(0.25),
        _logit(0.5),
        math.log(2.0),
        0.0,
        _logit(0.9),
        _logit(0.8),
    ]
    heads = yoloface_heads({"h16": head.shape}, height=32)
    found = decode_yolo({"h16": head}, heads, width=64, height=32)
    cx, cy = (0.25 + col) / 4, (0.5 + row) / 2
    w, h = 33 * 2.0 / 64, 25 / 32
    assert len(found) == 1 and found.scores[0] == pytest.approx(0.72, abs=1e-6)
    np.testing.assert_allclose(found.boxes[0], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], atol=1e-6)
    head[anchor * 6 + 5, row, col] = _logit(0.5)  # 0.9 * 0.5 = 0.45 < 0.5
    assert len(decode_yolo({"h16": head}, heads, width=64, height=32)) == 0
    with pytest.raises(ModelError, match="stride 4"):
        yoloface_heads({"odd": (18, 8, 16)}, height=32)


@pytest.mark.parametrize(
    "shapes, why",
    [
        ({"prob": (10,)}, "output 'prob' of shape (10,) is not a YOLO head"),  # LeNet: an IndexError
        ({"boxes": (4420, 4)}, "output 'boxes' of shape (4420, 4) is not a YOLO head"),  # UltraFace: a ValueError
        ({"h": (20, 2, 4)}, "output 'h' of shape (20, 2, 4) is not a YOLO head"),  # 20 channels: not 3 anchors
        ({"a": (18, 2, 4), "b": (21, 4, 8)}, "the heads differ in channels ([18, 21])"),
    ],
)
def test_a_forced_yoloface_task_on_other_outputs_is_a_clear_error(shapes, why):
    """eval --task yoloface on a model without YOLO heads: an error naming the output (exit 2), not an internal
    error from the decoder."""
    with pytest.raises(ModelError, match=re.escape("--task yoloface: " + why)):
        yoloface_heads(shapes, height=32)


def _model(outputs: list[tuple[str, str, dict]]) -> NcnnModel:
    layers = [NcnnLayer("Input", "data", [], ["data"], {0: 64, 1: 64, 2: 3})]
    layers += [NcnnLayer(kind, name, ["data"], [name], params) for name, kind, params in outputs]
    return NcnnModel(layers)


def test_tasks_are_detected_from_the_outputs():
    retina = [
        (name, "Softmax" if name.startswith("face_rpn_cls") else "Convolution", {0: 8})
        for stride in (32, 16, 8)
        for name in retinaface_outputs(stride)
    ]
    assert detect_task(_model(retina)) == "retinaface"
    heads = [(f"layer{i}-conv", "Convolution", {0: 18}) for i in (71, 83, 95)]
    assert detect_task(_model(heads)) == "yoloface"
    assert detect_task(_model([("map", "Convolution", {0: 1, 9: 4})])) == "segmentation"  # sigmoid fused
    assert detect_task(_model([("map", "Sigmoid", {})])) == "segmentation"
    assert detect_task(_model([("prob", "Softmax", {})])) == "classifier"
    assert detect_task(_model([(name, "Convolution", {0: 18, 9: 1}) for name, _, _ in heads])) == "classifier"


def test_host_decoder_factory_knows_its_tasks():
    decode = make_host_decoder("retinaface", [], 64, 64, 0.8)
    assert len(decode(_retinaface_blank())) == 0
    with pytest.raises(ValueError, match="no host decoder"):
        make_host_decoder("classifier", [], 64, 64, 0.5)
