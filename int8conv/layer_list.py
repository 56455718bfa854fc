"""Lookups over layers in execution order, which the Caffe IR (``caffe.graph.Graph``) and the ncnn model
(``ncnn.model.NcnnModel``) both answer the same way."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

from int8conv.errors import ModelError


class _Wired(Protocol):
    name: str
    bottoms: list[str]
    tops: list[str]


L = TypeVar("L", bound=_Wired)


class LayerList(Generic[L]):
    """A mixin for a class with ``layers``: find a layer by name, the producer of a value, its consumers."""

    layers: list[L]

    def missing_layer(self, name: str) -> str:
        """The error message for a layer name that is not there."""
        return f"no layer named '{name}'"

    def layer(self, name: str) -> L:
        """The layer called ``name``; a missing one is an error that names it."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ModelError(self.missing_layer(name))

    def producer(self, value: str) -> L | None:
        """The layer whose top is ``value`` (None for a network input)."""
        for layer in self.layers:
            if value in layer.tops:
                return layer
        return None

    def consumers(self, value: str) -> list[L]:
        """The layers that read ``value``, in execution order."""
        return [layer for layer in self.layers if value in layer.bottoms]
