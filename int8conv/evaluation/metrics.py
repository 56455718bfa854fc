"""The comparison rules every INT8-vs-FP32 judgement uses: ncnn evaluation, ``--auto-fp32`` and the Q/DQ search.

One rule for "the output cosine" of a model with several output blobs: the LOWEST cosine among them (box
regressions outweigh class scores in norm, so one cosine over their concatenation would hide lost objects),
and over a set of images the lowest again: a mean would let a few good images hide a bad one. A NaN cosine (an
output holding NaN/Inf) is the lowest of all: Python's ``min`` would skip or keep it depending on its position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from int8conv.errors import ModelError


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays of the same size (1.0 when both are all zero)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size != b.size:
        raise ModelError(f"cannot compare blobs of {a.size} and {b.size} values")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def lowest(values: Iterable[float]) -> float:
    """The minimum, NaN when any value is NaN (a broken output must not hide behind a good one)."""
    return float(np.min(np.fromiter(values, dtype=np.float64)))


def worst_first(cosine: float) -> float:
    """A cosine as a sort key: NaN below every number, so it ranks as the worst (NaN compares false to all)."""
    return -math.inf if math.isnan(cosine) else cosine


def blob_cosine(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The output cosine of one image: the lowest cosine among its output blobs."""
    if len(reference) != len(candidate):
        raise ModelError(f"cannot compare {len(reference)} output blobs with {len(candidate)}")
    return lowest(cosine(a, b) for a, b in zip(reference, candidate, strict=True))


def output_cosine(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> float:
    """The score the FP32-fallback searches raise to their target: the worst image's ``blob_cosine``."""
    return lowest(blob_cosine(r, c) for r, c in zip(reference, candidate, strict=True))
