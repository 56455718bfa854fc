"""Recurrent layers: BVLC Caffe's LSTM.

Caffe's LSTM reads ``x`` of shape ``(T, N, ...)`` (time first) and ``cont`` of shape ``(T, N)``, the sequence
continuation flags (0 starts a new sequence: the previous hidden and cell state are dropped), and writes
``h`` of shape ``(T, N, num_output)``. Its weights are ``W_xc (4H, D)``, ``b_c (4H)`` and ``W_hc (4H, H)`` with the
gates in the order input, forget, output, cell (IFOG).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from int8conv.caffe.layers.base import Decline, LayerKind, Shape, Weights, register, unsupported
from int8conv.errors import ModelError

if TYPE_CHECKING:
    from int8conv.caffe.graph import Layer

FAMILY = "recurrent"
#: Caffe's IFOG gate blocks in ONNX's order, input, output, forget, cell (iofc).
ONNX_GATES = (0, 2, 1, 3)


def lstm_shape(layer: Layer, shapes: list[Shape]) -> list[Shape]:
    x, cont = shapes[0], shapes[1]
    if len(x) < 3 or tuple(cont) != tuple(x[:2]):
        raise unsupported(layer, f"x of shape {tuple(x)} with cont of shape {tuple(cont)} (Caffe: (T, N, ...), (T, N))")
    if len(shapes) > 2 or layer.param.recurrent_param.expose_hidden:
        raise unsupported(layer, "a static input or exposed hidden state", "shape inference")
    hidden, inputs = int(layer.param.recurrent_param.num_output), int(np.prod(x[2:]))
    want = [(4 * hidden, inputs), (4 * hidden,), (4 * hidden, hidden)]
    got = [tuple(w.shape) for w in layer.blobs]
    if hidden <= 0 or got != want:
        raise ModelError(
            f"layer '{layer.name}' (LSTM): weights of shapes {got}; num_output {hidden} on inputs of {inputs} "
            f"values needs W_xc, b_c, W_hc of shapes {want}"
        )
    return [(x[0], x[1], hidden)]


def lstm_onnx(b, layer: Layer) -> None:
    """ONNX LSTM over Caffe's (T, N, D) layout, gates reordered to iofc; ``cont`` is not read: one sequence per
    forward from a zero state, which is what Caffe computes when cont is 0 at t = 0 and 1 after."""
    w_xc, b_c, w_hc = (np.asarray(w, np.float32) for w in layer.blobs)
    hidden = int(layer.param.recurrent_param.num_output)
    x = layer.bottoms[0]
    if len(b.shape(x)) > 3:
        flat = f"{layer.name}/x"
        b.node("Reshape", [x, b.init(f"{flat}/shape", [0, 0, -1], np.int64)], [flat], flat)
        x = flat

    def iofc(array: np.ndarray) -> np.ndarray:
        blocks = array.reshape(4, hidden, -1)
        return blocks[list(ONNX_GATES)].reshape(1, 4 * hidden, -1)

    inputs = [
        x,
        b.init(f"{layer.name}/W", iofc(w_xc)),
        b.init(f"{layer.name}/R", iofc(w_hc)),
        b.init(f"{layer.name}/B", np.concatenate([iofc(b_c).reshape(1, -1), np.zeros((1, 4 * hidden))], axis=1)),
    ]
    sequence = f"{layer.name}/Y"
    b.node("LSTM", inputs, [sequence], layer.name, hidden_size=hidden, direction="forward")
    b.node("Squeeze", [sequence, b.init(f"{layer.name}/axes", [1], np.int64)], [layer.tops[0]], f"{layer.name}/squeeze")


register(
    LayerKind(
        "LSTM",
        FAMILY,
        lstm_shape,
        Decline(
            "Caffe's LSTM steps through time along axis 0, the axis ncnn's batch-less Mats drop (ncnn's LSTM reads "
            "a (T, D) Mat, and caffe2ncnn's Permute cannot move time there), and its cont input can restart a "
            "sequence mid-way, which ncnn's LSTM cannot"
        ),
        lstm_onnx,
        weights=Weights(),
        min_bottoms=2,
        opencv=Decline("OpenCV's LSTM layer rejects Caffe's LSTM weights (OpenCV 4.14: it reads them as Wh, Wx, b)"),
        quantizable=Decline("ncnn declines it, and the Q/DQ ONNX leaves it in floating point"),
        notes=(
            "ONNX: one sequence per forward (cont 0 at t = 0, then 1), Caffe's deploy use; calibration feeds images "
            "to one input, so a net that takes cont as an input is declined by name"
        ),
    )
)
