"""Recurrent layers."""

from __future__ import annotations

from int8conv.caffe.layers.base import Decline, LayerKind, register

FAMILY = "recurrent"

_NOT_WRITTEN = Decline(
    "not written yet in int8conv: Caffe's LSTM runs over time steps given by a second "
    "(sequence-continuation) bottom, which no test model has"
)
register(
    LayerKind(
        "LSTM", FAMILY, None, _NOT_WRITTEN, _NOT_WRITTEN, opencv=Decline("not checked: int8conv has no emitter for it")
    )
)
