"""Which errors mean that a Caffe-fork layer is not supported *yet* by the reader or the ncnn writer.

Tests of the fork models skip on these errors only, with the layer they name, so they start running once the
registry and the ncnn writers support the layer.
"""
from __future__ import annotations

import re

#: The two errors that mean a fork layer is not supported yet (the layer registry adds them): the project's
#: Caffe schema lacks the layer's parameter field, or the ncnn converter names a layer it cannot write.
_NOT_YET = (re.compile(r'has no field named "(\w+)"'),
            re.compile(r"layer '([^']+)'[^\n]*(?:ncnn converter|not supported|unsupported|declin)"))


def not_convertible(message: str) -> str | None:
    """The layer (or layer parameter) an error names as not readable/convertible yet, else None."""
    for pattern in _NOT_YET:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None
