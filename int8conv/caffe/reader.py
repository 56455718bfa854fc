"""Read a Caffe deploy ``.prototxt`` and ``.caffemodel`` with protobuf alone (no pycaffe)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from google.protobuf.message import DecodeError

from int8conv.caffe.proto import caffe_pb2
from int8conv.errors import ModelError

log = logging.getLogger(__name__)

#: a ``layers {`` block at the start of a line: the V1 format (before 2015), with enum layer types
V1_LAYERS = re.compile(r"^\s*layers\s*\{", re.MULTILINE)
V1_MESSAGE = (
    "this is a V1 Caffe model: the V1 prototxt format (`layers { type: CONVOLUTION ... }` with enum types); "
    "upgrade it "
    'to the current `layer { type: "Convolution" }` format with Caffe\'s tool: '
    "`upgrade_net_proto_text OLD.prototxt NEW.prototxt`, then run again with NEW.prototxt"
)


def read_prototxt(path: str | Path) -> caffe_pb2.NetParameter:
    """Parse a deploy prototxt; a syntax error or unknown field names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ModelError(f"{path}: cannot read prototxt: {exc.strerror}") from exc
    if text.startswith("\ufeff"):  # the parser's message would point at an invisible character
        raise ModelError(
            f"{path}: starts with a byte order mark (saved by a Windows editor as 'UTF-8 with BOM'), which Caffe's and "
            "OpenCV's prototxt parsers refuse too: save it as plain UTF-8"
        )
    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(text, net)
    except text_format.ParseError as exc:
        if V1_LAYERS.search(text):  # the V1 schema's enum types are what fails to parse
            raise ModelError(f"{path}: {V1_MESSAGE}") from exc
        if "\x00" in text:  # binary (a text prototxt has no NUL byte): the parser would quote raw bytes
            raise ModelError(
                f"{path}: a binary file, not a text prototxt (a .caffemodel?): --proto takes the deploy .prototxt, "
                "--model the .caffemodel"
            ) from exc
        raise ModelError(f"{path}:{exc}") from exc
    if len(net.layers):
        raise ModelError(f"{path}: {V1_MESSAGE}")
    return net


def read_caffemodel(path: str | Path) -> caffe_pb2.NetParameter:
    """Parse a binary caffemodel (V2 ``layer`` or V1 ``layers``; both carry weights by layer name)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read caffemodel: {exc.strerror}") from exc
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(data)
    except DecodeError as exc:
        raise ModelError(f"{path}: not a valid caffemodel (protobuf decode failed: {exc})") from exc
    if not len(net.layer) and not len(net.layers):
        raise ModelError(f"{path}: the caffemodel holds no layers (is it a prototxt or another file?)")
    return net


def blob_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """A BlobProto as float32 with its declared shape (legacy num/channels/height/width included)."""
    if len(blob.double_data):
        data = np.asarray(blob.double_data, dtype=np.float64).astype(np.float32)
    else:
        data = np.asarray(blob.data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    if int(np.prod(shape)) != data.size:
        raise ModelError(f"blob declares shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def weights_by_layer(model: caffe_pb2.NetParameter, path: str | Path = "") -> dict[str, list[np.ndarray]]:
    """Layer name -> its weight arrays, from a caffemodel of either format."""
    weights: dict[str, list[np.ndarray]] = {}
    for layer in list(model.layer) + list(model.layers):
        if not isinstance(layer.name, str):  # protobuf hands over invalid UTF-8 as bytes
            raise ModelError(f"{path}: a layer name is not UTF-8 text ({layer.name[:40]!r}): the caffemodel is damaged")
        if not len(layer.blobs):
            continue
        try:
            weights[layer.name] = [blob_to_array(b) for b in layer.blobs]
        except ModelError as exc:
            raise ModelError(f"{path}: layer '{layer.name}': {exc}") from exc
    return weights


def weights_only(model: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """The caffemodel's blobs by layer name, without layer parameters.

    Caffe forks store their own parameters under field numbers that other forks use for something else (yoloface's
    caffemodel has ``upsample_param`` at 149, which brocolli-caffe reads as a PSROIPooling parameter with required
    fields and then aborts); the weights alone load in any of them.
    """
    slim = caffe_pb2.NetParameter()
    for layer in list(model.layer) + list(model.layers):
        if len(layer.blobs):
            copy = slim.layer.add()
            copy.name = layer.name
            copy.blobs.extend(layer.blobs)
    return slim
