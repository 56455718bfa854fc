"""Synthetic Caffe models written by the tests through the project's own schema, plus a numpy reference forward.

The reference is deliberately naive (explicit loops over kernel offsets) so that it is obviously correct.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from google.protobuf import text_format

from int8conv.caffe.proto import caffe_pb2

#: one LSTM layer "rnn" (2 hidden units) over a sequence of 3 steps of 4 values, with its continuation flags
LSTM_NET = """
input: "data" input_shape { dim: 3 dim: 1 dim: 4 }
input: "cont" input_shape { dim: 3 dim: 1 }
layer { name: "rnn" type: "LSTM" bottom: "data" bottom: "cont" top: "rnn" recurrent_param { num_output: 2 } }
"""


def lstm_weights(inputs: int = 4) -> list[np.ndarray]:
    """Zero weights for LSTM_NET's layer: input-to-gates (8, ``inputs``; 4 fits its data), bias, hidden-to-gates."""
    return [np.zeros((8, inputs), np.float32), np.zeros(8, np.float32), np.zeros((8, 2), np.float32)]


def write_caffe_model(
    directory: Path, prototxt: str, weights: dict[str, list[np.ndarray]], name: str = "net"
) -> tuple[Path, Path]:
    """Write ``name.prototxt`` and ``name.caffemodel`` (weights keyed by layer name)."""
    directory.mkdir(parents=True, exist_ok=True)
    net = caffe_pb2.NetParameter()
    text_format.Parse(prototxt, net)
    for layer in net.layer:
        for array in weights.get(layer.name, []):
            blob = layer.blobs.add()
            blob.shape.dim.extend(array.shape)
            blob.data.extend(np.asarray(array, dtype=np.float32).reshape(-1).tolist())
    proto_path = directory / f"{name}.prototxt"
    model_path = directory / f"{name}.caffemodel"
    proto_path.write_text(prototxt)
    model_path.write_bytes(net.SerializeToString())
    return proto_path, model_path


def conv2d(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride=(1, 1), pad=(0, 0), dilation=(1, 1), group: int = 1
) -> np.ndarray:
    """Caffe convolution, NCHW, by summing shifted slices: one loop per kernel offset."""
    n, c, h, wd = x.shape
    out_c, cin_g, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    ow = (wd + 2 * pad[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    out = np.zeros((n, out_c, oh, ow), dtype=np.float64)
    per_group = out_c // group
    for g in range(group):
        xs = xp[:, g * cin_g : (g + 1) * cin_g]
        ws = w[g * per_group : (g + 1) * per_group]
        for i in range(kh):
            for j in range(kw):
                y0, x0 = i * dilation[0], j * dilation[1]
                patch = xs[:, :, y0 : y0 + stride[0] * oh : stride[0], x0 : x0 + stride[1] * ow : stride[1]]
                out[:, g * per_group : (g + 1) * per_group] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out.astype(np.float32)


def max_pool(x: np.ndarray, k: int, s: int) -> np.ndarray:
    """Caffe MAX pooling without padding (ceil mode: windows past the edge are clipped)."""
    n, c, h, w = x.shape
    oh = int(np.ceil((h - k) / s)) + 1
    ow = int(np.ceil((w - k) / s)) + 1
    out = np.full((n, c, oh, ow), -np.inf, dtype=np.float32)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * s : min(i * s + k, h), j * s : min(j * s + k, w)].max(axis=(2, 3))
    return out
