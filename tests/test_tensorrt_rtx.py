"""Acceptance of the TensorRT exports by NVIDIA's own parser and builder: TensorRT-RTX (``tensorrt-rtx-cu12``).

TensorRT-RTX's OnnxParser and ``build_serialized_network`` run on the CPU, so every shared model's Q/DQ
ONNX is parsed and built here, and every name of the cache and range files is checked to be a tensor of
the parsed network. This is TensorRT-RTX, not TensorRT: tests that need full TensorRT or a GPU skip with
that reason; nothing here runs on a GPU.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from int8conv.errors import BackendUnavailable
from int8conv.tables.tensorrt_files import (
    read_calibration_cache,
    read_dynamic_ranges,
    read_ranges_json,
    write_calibration_cache,
    write_dynamic_ranges,
    write_ranges_json,
)
from int8conv.tensorrt.engine import EngineRunner, ParsedNetwork, build_plan, import_tensorrt, require_gpu
from int8conv.tensorrt.onnx_export import export_onnx
from int8conv.tensorrt.qdq import insert_qdq
from tests.onnx_models import HELD_OUT, MODELS, inputs

pytestmark = [pytest.mark.usefixtures("ort_cache"), pytest.mark.tensorrt]

BUILD_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="module")
def rtx():
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("TensorRT-RTX is not installed (pip install tensorrt-rtx-cu12)")
    return import_tensorrt("tensorrt-rtx")


@pytest.mark.parametrize("key", sorted(MODELS))
def test_tensorrt_rtx_builds_the_qdq_onnx_and_knows_every_range_name(shared, exported, rtx, key, tmp_path):
    model = exported(key)
    ranges = model.ranges(shared, "kl")
    write_calibration_cache(tmp_path / "m.cache", ranges)
    write_dynamic_ranges(tmp_path / "m.ranges.txt", ranges)
    write_ranges_json(tmp_path / "m.ranges.json", ranges, "kl", "test")
    qdq = insert_qdq(model.export, ranges).SerializeToString()

    fp32_network = ParsedNetwork(rtx, model.export.model.SerializeToString(), strongly_typed=False).tensors()
    qdq_parsed = ParsedNetwork(rtx, qdq, strongly_typed=False)
    for names in (
        read_calibration_cache(tmp_path / "m.cache").scales,
        read_dynamic_ranges(tmp_path / "m.ranges.txt"),
        read_ranges_json(tmp_path / "m.ranges.json"),
    ):
        assert set(names) <= set(fp32_network), sorted(set(names) - set(fp32_network))[:5]
        assert set(names) <= set(qdq_parsed.tensors())
    quantize_nodes = sum(n.op_type == "QuantizeLinear" for n in insert_qdq(model.export, ranges).graph.node)
    assert qdq_parsed.layer_types().count("QUANTIZE") == quantize_nodes > 0
    assert qdq_parsed.layer_types().count("DEQUANTIZE") == quantize_nodes

    started = time.perf_counter()
    plan = build_plan(qdq, "qdq", flavour="tensorrt-rtx")
    BUILD_SECONDS[key] = time.perf_counter() - started
    assert len(plan) > 1000
    print(f"TensorRT-RTX build of {key} Q/DQ ONNX: {BUILD_SECONDS[key]:.1f} s, plan {len(plan)} bytes")


def test_tensorrt_rtx_builds_a_dynamic_batch_with_a_profile(shared, exported, rtx):
    model = exported("det3")
    export = export_onnx(model.graph, batch=-1)
    plan = build_plan(
        insert_qdq(export, model.ranges(shared, "kl")).SerializeToString(), "qdq", flavour="tensorrt-rtx", max_batch=4
    )
    assert len(plan) > 1000


def test_implicit_int8_is_refused_by_tensorrt_rtx(shared, exported, rtx, tmp_path):
    """TensorRT-RTX, like TensorRT 11, has no implicit INT8: the cache/ranges modes say so."""
    model = exported("det1")
    ranges = model.ranges(shared, "kl")
    write_calibration_cache(tmp_path / "m.cache", ranges)
    fp32 = model.export.model.SerializeToString()
    with pytest.raises(BackendUnavailable, match="Q/DQ"):
        build_plan(fp32, "cache", flavour="tensorrt-rtx", cache=tmp_path / "m.cache")
    with pytest.raises(BackendUnavailable, match="Q/DQ"):
        build_plan(fp32, "ranges", flavour="tensorrt-rtx", ranges=ranges)


def test_running_needs_a_gpu(shared, exported, rtx):
    try:
        require_gpu()
    except BackendUnavailable:
        pass
    else:
        pytest.skip("a GPU is present: test_full_tensorrt_on_gpu covers running")
    plan = build_plan(
        insert_qdq(exported("det1").export, exported("det1").ranges(shared, "kl")).SerializeToString(),
        "qdq",
        flavour="tensorrt-rtx",
    )
    with pytest.raises(BackendUnavailable, match="GPU|cuda"):
        EngineRunner(plan, flavour="tensorrt-rtx")


def test_missing_tensorrt_is_said_plainly():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("full TensorRT is installed here")
    with pytest.raises(BackendUnavailable, match="'tensorrt' is not importable"):
        build_plan(b"", "qdq", flavour="tensorrt")


@pytest.mark.parametrize("mode", ["qdq", "cache", "ranges"])
def test_full_tensorrt_on_gpu(shared, exported, mode, tmp_path):
    """Full TensorRT on a GPU: the INT8 engine's outputs agree with onnxruntime's FP32 (cosine >= 0.99)."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("full TensorRT (the 'tensorrt' package) is not installed; it does not install from PyPI here")
    try:
        require_gpu()
    except BackendUnavailable as exc:
        pytest.skip(f"no GPU: {exc}")
    trt = import_tensorrt("tensorrt")
    if mode != "qdq" and not hasattr(trt.BuilderFlag, "INT8"):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 (removed in 11)")
    model = exported("res10")
    ranges = model.ranges(shared, "kl")
    write_calibration_cache(tmp_path / "m.cache", ranges)
    source = insert_qdq(model.export, ranges) if mode == "qdq" else model.export.model
    plan = build_plan(source.SerializeToString(), mode, cache=tmp_path / "m.cache", ranges=ranges)
    runner = EngineRunner(plan)
    for x in inputs(shared, "res10", HELD_OUT)[:2]:
        got = runner.run({model.input: x})
        want = model.run(x)
        for name in model.outputs:
            a, b = want[name].ravel().astype(np.float64), got[name].ravel().astype(np.float64)
            assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.99, name
