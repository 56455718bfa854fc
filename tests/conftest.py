"""Shared fixtures: where the real models and images live, and how their absence is handled.

Tests on real models use ``shared`` (``../shared`` or ``INT8CONV_SHARED``). Without it they skip,
unless ``INT8CONV_REQUIRE_SHARED=1`` (set by CI), which turns the skip into a failure.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The shared models/images folder, if present."""
    candidate = Path(os.environ.get("INT8CONV_SHARED", ROOT.parent / "shared"))
    return candidate if (candidate / "models").is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        if os.environ.get("INT8CONV_REQUIRE_SHARED") == "1":
            pytest.fail("INT8CONV_REQUIRE_SHARED=1 but ../shared (or INT8CONV_SHARED) has no models/")
        pytest.skip("real models not available: ../shared (or INT8CONV_SHARED) is missing")
    return path


@pytest.fixture(scope="session")
def caffe():
    """pycaffe, or a skip that says how to get it (a failure under INT8CONV_REQUIRE_CAFFE=1, as CI sets)."""
    from int8conv.engines.caffe_engine import import_caffe
    from int8conv.errors import BackendUnavailable

    try:
        return import_caffe()
    except BackendUnavailable as exc:
        if os.environ.get("INT8CONV_REQUIRE_CAFFE") == "1":
            pytest.fail(f"INT8CONV_REQUIRE_CAFFE=1 but {exc}")
        pytest.skip(str(exc))
