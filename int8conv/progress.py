"""tqdm progress bars that ``-q`` silences."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled under ``-q`` (INT8CONV_QUIET=1)."""
    return tqdm(iterable, disable=os.environ.get("INT8CONV_QUIET") == "1", leave=False, **kwargs)
