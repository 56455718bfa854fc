"""The one registry of Caffe layer kinds: every stage asks it what a layer type is and who can handle it.

One module per family declares its types (see ``base.LayerKind``); importing this package registers them all.
Adding a type means adding its declaration to a family module (or a new module imported here) and its test in
``tests/test_layers.py``; docs/layers.md is generated from this registry by ``scripts/make_layer_docs.py``.
"""

from __future__ import annotations

from int8conv.caffe.layers import (  # noqa: F401  (each module registers its kinds)
    activation,
    convolution,
    detection,
    eltwise,
    inner_product,
    normalization,
    pooling,
    recurrent,
    resize,
    roi,
    tensor,
)
from int8conv.caffe.layers.base import REGISTRY, Decline, LayerKind, declined

__all__ = ["REGISTRY", "Decline", "LayerKind", "declined", "kind_of", "types_where"]


def kind_of(layer_type: str) -> LayerKind | None:
    """The declaration of a Caffe type, or None for a type nobody declared."""
    return REGISTRY.get(layer_type)


def types_where(flag: str) -> frozenset[str]:
    """The Caffe types whose declaration has ``flag`` true (quantizable, folds_into, head_passthrough, ...)."""
    return frozenset(name for name, kind in REGISTRY.items() if getattr(kind, flag) is True)
