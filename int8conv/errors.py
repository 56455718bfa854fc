"""User-facing errors: every failure a user can cause names the file, line, layer or image."""

from __future__ import annotations

from collections.abc import Sequence


def some_names(names: Sequence[str], most: int = 10) -> str:
    """The first ``most`` of ``names`` for a message, "..." marking the rest: a long list stays one readable line."""
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


class Int8ConvError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback and exits 2."""


class ModelError(Int8ConvError):
    """The prototxt or caffemodel is unreadable, inconsistent or uses something unsupported."""


class ImageError(Int8ConvError):
    """No usable calibration image, or an image list that cannot be read."""


class BackendUnavailable(Int8ConvError):
    """An optional backend (pycaffe, a GPU, TensorRT) is not present on this machine."""


class OutputError(Int8ConvError):
    """An output path that cannot be written as asked (a directory, a special file, two outputs on one path)."""
