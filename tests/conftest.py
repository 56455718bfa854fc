"""Shared fixtures: where the real models and images live, and how their absence is handled.

Tests on real models use ``shared`` (``../shared`` or ``INT8CONV_SHARED``). Without it they skip,
unless ``INT8CONV_REQUIRE_SHARED=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from int8conv.zoo import find_shared
from tests import onnx_models

ROOT = Path(__file__).resolve().parents[1]
#: lenet_mnist's preprocessing: gray pixels scaled to [0, 1]
LENET_GRAY = ["--color", "gray", "--norm", "0.00390625"]
#: the quickest evaluation for eval and report: no Caffe reference, one thread, one timed pass
QUICK_EVAL = ["--no-caffe", "--threads", "1", "--timing-runs", "1"]


def lenet_calibrate(model: list[str], images: Path, table: Path) -> list[str]:
    """``int8conv -q calibrate`` argv of lenet_mnist (``model``: its --proto/--model) on ``images`` with OpenCV."""
    inputs = [*model, *LENET_GRAY, "--images", str(images)]
    return ["-q", "calibrate", *inputs, "--backend", "opencv", "--output", str(table)]


def calibrate_args(proto: Path, model: Path, images: Path, table: Path, *extra: str) -> list[str]:
    """``int8conv calibrate`` argv: ``proto``/``model`` calibrated on ``images`` into ``table``, then ``extra``."""
    files = ["--proto", str(proto), "--model", str(model), "--images", str(images), "--output", str(table)]
    return ["calibrate", *files, *extra]


def eval_args(
    proto: Path, model: Path, fp32: tuple[Path, Path], int8: tuple[Path, Path], images: Path, *extra: str
) -> list[str]:
    """``int8conv eval`` argv: ``proto``/``model`` against the ncnn ``fp32`` and ``int8`` (.param, .bin) pairs on
    ``images``, then ``extra``."""
    files = ["--param", str(fp32[0]), "--bin", str(fp32[1]), "--int8-param", str(int8[0]), "--int8-bin", str(int8[1])]
    return ["eval", "--proto", str(proto), "--model", str(model), *files, "--images", str(images), *extra]


def run_python(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python *argv`` in a fresh interpreter from the repository root, as a user runs a script; text output."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, env=env)


def convert_tool_res10(proto: Path, model: Path, images: Path) -> list[str]:
    """The original tool's command line, convert_tool.py in a fresh interpreter, for res10 (its mean) on ``images``."""
    flags = ["--proto", str(proto), "--model", str(model), "--mean", "104", "177", "123", "--norm", "1"]
    return [sys.executable, str(ROOT / "convert_tool.py"), *flags, "--images", str(images)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that takes the real models (``shared`` or a fixture built on it) is marked ``real_models``."""
    for item in items:
        if {"shared", "exported"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_models)


@pytest.fixture(scope="session")
def shared() -> Path:
    path = find_shared()
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


@pytest.fixture(scope="module")
def ort_cache(tmp_path_factory):
    """onnxruntime writes under ~/.cache unless XDG_CACHE_HOME points elsewhere."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


_EXPORTS: dict[str, onnx_models.Exported] = {}


@pytest.fixture(scope="module")
def exported(shared):
    def get(key: str) -> onnx_models.Exported:
        if key not in _EXPORTS:
            _EXPORTS[key] = onnx_models.Exported(shared, key)
        return _EXPORTS[key]

    return get
