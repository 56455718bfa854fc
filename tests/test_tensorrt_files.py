"""TensorRT calibration cache and dynamic-range files, and ``int8conv export-trt`` end to end."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from int8conv import pipeline
from int8conv.caffe.graph import load_graph
from int8conv.cli import main as int8conv_main
from int8conv.errors import Int8ConvError
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.tables.tensorrt_files import (
    DEFAULT_TRT_VERSION,
    FLOAT32_RANGE,
    MIN_AMAX,
    algorithm_for,
    cache_version,
    format_calibration_cache,
    hex_to_scale,
    read_calibration_cache,
    read_dynamic_ranges,
    read_ranges_json,
    scale_to_hex,
    write_calibration_cache,
    write_dynamic_ranges,
    write_ranges_json,
)

pytestmark = [pytest.mark.usefixtures("ort_cache")]

YUNET = ("yufacedetectnet_v1", "yufacedetectnet-open-v1.prototxt", "yufacedetectnet-open-v1.caffemodel")


def test_hex_is_tensorrts_big_endian_float32():
    """sampleINT8API's README: cache line ``fc_replaced_output: 4494305c`` is scale 1185.51, range 150559.926..."""
    assert hex_to_scale("4494305c") * 127 == 150559.92626953125
    assert scale_to_hex(150559.92626953125 / 127) == "4494305c"
    assert scale_to_hex(1.0) == "3f800000" and scale_to_hex(2.0**-7) == "3c000000"


def test_hex_float_hex_round_trip_is_exact():
    rng = np.random.default_rng(0)
    bits = rng.integers(0x00800000, 0x7F7FFFFF, size=20000, dtype=np.uint32)  # every positive normal float32
    for value in bits.view(np.float32):
        text = scale_to_hex(float(value))
        assert len(text) == 8 and int(text, 16) == value.view(np.uint32)
        assert scale_to_hex(hex_to_scale(text)) == text
        assert struct.pack(">f", hex_to_scale(text)) == struct.pack(">f", value)


def test_cache_file_round_trip(tmp_path):
    ranges = {"data": 177.0, "conv1_relu": 4.38671875, "a:b/c": 1e-3, "dead": MIN_AMAX, "big": 3.0e6}
    path = tmp_path / "m.cache"
    write_calibration_cache(path, ranges)
    lines = path.read_text().splitlines()
    assert (
        lines[0] == f"TRT-{cache_version(DEFAULT_TRT_VERSION)}-EntropyCalibration2" == "TRT-101303-EntropyCalibration2"
    )
    cache = read_calibration_cache(path)
    assert (cache.version, cache.algorithm) == ("101303", "EntropyCalibration2")
    assert list(cache.scales) == list(ranges)
    for name, amax in ranges.items():
        assert struct.pack(">f", cache.scales[name]) == struct.pack(">f", amax / 127)
        assert np.isfinite(cache.scales[name]) and cache.scales[name] > 0
    rewritten = tmp_path / "again.cache"
    write_calibration_cache(rewritten, cache.ranges())
    assert rewritten.read_text() == path.read_text()


def test_versions_and_calibrators():
    assert cache_version("8.6.1") == "8601" and cache_version("7.0.0") == "7000"
    assert cache_version("10.13.3") == "101303" and cache_version("10.1") == "100100"
    assert cache_version("101303") == "101303"
    assert algorithm_for("minmax") == "MinMaxCalibration"
    assert {algorithm_for(m) for m in ("kl", "percentile", "aciq", "mse")} == {"EntropyCalibration2"}
    text = format_calibration_cache({"x": 1.0}, version="8.6.1", algorithm="MinMaxCalibration")
    assert text.splitlines()[0] == "TRT-8601-MinMaxCalibration"
    with pytest.raises(Int8ConvError, match="10.x.y|like"):
        cache_version("ten")
    with pytest.raises(Int8ConvError, match="calibrator"):
        format_calibration_cache({"x": 1.0}, algorithm="Percentile")


def test_a_bare_major_version_is_a_version_not_a_header_number():
    """``--trt-version 10`` means TensorRT 10.0.0: its header number is 100000 (NV_TENSORRT_VERSION = major*10000 +
    minor*100 + patch), and TensorRT 8's is 8000 (major*1000 + ...), never the 'TRT-10-' no TensorRT writes."""
    assert cache_version("10") == cache_version("10.0.0") == "100000"
    assert cache_version("8") == cache_version("8.0") == "8000"
    assert format_calibration_cache({"x": 1.0}, version="10").splitlines()[0] == "TRT-100000-EntropyCalibration2"
    with pytest.raises(Int8ConvError, match="not like"):
        cache_version("861")  # 3 digits: neither a major version nor a number TensorRT writes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, 1e300, 1e-300])
def test_no_bad_value_reaches_a_file(tmp_path, bad):
    for write in (
        lambda p: write_calibration_cache(p, {"ok": 1.0, "conv3": bad}),
        lambda p: write_dynamic_ranges(p, {"ok": 1.0, "conv3": bad}),
        lambda p: write_ranges_json(p, {"ok": 1.0, "conv3": bad}, "kl", "test"),
    ):
        path = tmp_path / "out"
        with pytest.raises(Int8ConvError, match="conv3"):
            write(path)
        assert not path.exists()


def test_the_range_limits_reach_the_cache_as_positive_finite_scales(tmp_path):
    """The smallest and largest amax check_amax lets through give a float32 scale TensorRT reads back as positive
    and finite (the smallest a denormal, not 0): no further check is needed between the range and the file."""
    path = tmp_path / "limits.cache"
    write_calibration_cache(path, {"low": FLOAT32_RANGE[0], "high": FLOAT32_RANGE[1]})
    scales = read_calibration_cache(path).scales
    assert 0 < scales["low"] < float(np.finfo(np.float32).tiny) and np.isfinite(scales["high"])


def test_readers_name_file_and_line(tmp_path):
    cache = tmp_path / "bad.cache"
    cache.write_text("TRT-8601-EntropyCalibration2\ndata: 3c010a14\nconv1: zz\n")
    with pytest.raises(Int8ConvError, match=r"bad.cache:3"):
        read_calibration_cache(cache)
    cache.write_text("TRT-8601-EntropyCalibration2\ndata: 7fc00000\n")  # NaN
    with pytest.raises(Int8ConvError, match=r"bad.cache:2.*data"):
        read_calibration_cache(cache)
    cache.write_text("conv1: 3c010a14\n")
    with pytest.raises(Int8ConvError, match=r"bad.cache:1.*header"):
        read_calibration_cache(cache)
    ranges = tmp_path / "bad.txt"
    ranges.write_text("data:1.5\nconv1:-2\n")
    with pytest.raises(Int8ConvError, match=r"bad.txt:2"):
        read_dynamic_ranges(ranges)


def test_dynamic_ranges_text_and_json_round_trip(tmp_path):
    ranges = {"data": 177.0, "conv4_3_norm/unit": 1.0, "x:y": 0.1 + 0.2, "fc7": 1234.5678}
    write_dynamic_ranges(tmp_path / "r.txt", ranges)
    assert (tmp_path / "r.txt").read_text().splitlines()[0] == "data:177.0"  # sampleINT8API's tensor:amax
    assert read_dynamic_ranges(tmp_path / "r.txt") == ranges
    write_ranges_json(tmp_path / "r.json", ranges, "kl", "4 images")
    assert read_ranges_json(tmp_path / "r.json") == ranges
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["method"] == "kl" and body["ranges"] == ranges


# export-trt --------------------------------------------------------------------------------------------------
def yunet_files(shared: Path) -> tuple[Path, Path]:
    """YuNet's prototxt and caffemodel."""
    folder, proto, model = YUNET
    return shared / "models" / folder / proto, shared / "models" / folder / model


def yunet_model_args(shared: Path) -> list[str]:
    proto, model = yunet_files(shared)
    return ["--proto", str(proto), "--model", str(model)]


def yunet_args(shared: Path) -> list[str]:
    # a histogram method: these tests are about the files (auto without images to validate on falls back to mse)
    return [*yunet_model_args(shared), "--method", "mse"]


def outputs(out: Path) -> dict[str, Path]:
    return pipeline.trt_paths(out, Path(YUNET[2]).stem)


@pytest.fixture(scope="module")
def yunet_export(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt")
    args = yunet_args(shared) + ["--images", str(shared / "images" / "faces"), "--max-images", "4", "-q"]
    assert int8conv_main(["export-trt", *args, "--out-dir", str(out), "--save-stats", str(out / "s.npz")]) == 0
    return out


def test_export_trt_writes_every_tensor(shared, yunet_export):
    files = outputs(yunet_export)
    assert all(p.is_file() for p in files.values())
    model = onnx.load(files["onnx"])
    onnx.checker.check_model(model, full_check=True)
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Concat" and set(n.input) <= constants}
    tensors = [i.name for i in model.graph.input] + [
        o for n in model.graph.node for o in n.output if o not in constants
    ]
    cache = read_calibration_cache(files["cache"])
    ranges = read_dynamic_ranges(files["txt"])
    assert list(cache.scales) == list(ranges) == list(read_ranges_json(files["json"])) == tensors
    assert cache.algorithm == "EntropyCalibration2"
    for name, amax in ranges.items():
        assert np.isfinite(amax) and amax > 0
        assert struct.pack(">f", cache.scales[name]) == struct.pack(">f", amax / 127)
    assert ranges["conv3_3_norm/unit"] == 1.0  # inner tensor of Normalize: a unit vector
    assert ranges["conv3_3_norm_mbox_loc_perm"] == ranges["conv3_3_norm_mbox_loc_new"]  # Permute keeps the range
    graph = load_graph(*yunet_files(shared))
    assert "data" in ranges and all(v in ranges for v in graph.outputs if v not in ("detection_out",))
    qdq = onnx.load(files["qdq"])
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) > 0


def test_export_trt_from_saved_statistics_is_identical(shared, yunet_export, tmp_path):
    args = yunet_args(shared) + ["--load-stats", str(yunet_export / "s.npz"), "-q"]
    assert int8conv_main(["export-trt", *args, "--out-dir", str(tmp_path)]) == 0
    for kind, path in outputs(tmp_path).items():
        assert path.read_bytes() == outputs(yunet_export)[kind].read_bytes(), kind


def test_calibrate_statistics_are_not_enough_for_tensorrt(shared, tmp_path, capsys):
    """Statistics saved by 'calibrate' hold only convolution inputs: a clear error, no partial output."""
    base = yunet_args(shared) + ["--images", str(shared / "images" / "faces"), "--max-images", "2", "-q"]
    assert (
        int8conv_main(
            ["calibrate", *base, "--output", str(tmp_path / "t.table"), "--save-stats", str(tmp_path / "conv.npz")]
        )
        == 0
    )
    out = tmp_path / "out"
    capsys.readouterr()
    code = int8conv_main(
        ["export-trt", *yunet_args(shared), "--load-stats", str(tmp_path / "conv.npz"), "--out-dir", str(out)]
    )
    assert code == 2 and "--save-stats FILE" in capsys.readouterr().err and not out.exists()

    # an ncnn table gives the convolution inputs only: amax = 127 / scale
    assert (
        int8conv_main(
            # no --method: every range is the table's (the flag is refused there)
            ["export-trt", *yunet_model_args(shared), "--table", str(tmp_path / "t.table"), "--out-dir", str(out), "-q"]
        )
        == 0
    )
    table = read_ncnn_table(tmp_path / "t.table")
    graph = load_graph(*yunet_files(shared))
    expected = {graph.layer(name).bottoms[0]: 127 / scale for name, scale in table.activation_scales.items()}
    expected.update({f"{layer.name}/unit": 1.0 for layer in graph.layers if layer.type == "Normalize"})
    assert read_dynamic_ranges(outputs(out)["txt"]) == pytest.approx(expected, rel=1e-12)


def test_export_trt_options(shared, yunet_export, tmp_path):
    args = yunet_args(shared) + ["--load-stats", str(yunet_export / "s.npz"), "--out-dir", str(tmp_path), "-q"]
    assert (
        int8conv_main(
            [
                "export-trt",
                *args,
                "--trt-version",
                "8.6.1",
                "--method",
                "minmax",
                "--batch",
                "-1",
                "--fp32-layers",
                "conv1_1",
                "conv1_2",
            ]
        )
        == 0
    )
    files = outputs(tmp_path)
    assert files["cache"].read_text().startswith("TRT-8601-MinMaxCalibration\n")
    qdq = onnx.load(files["qdq"])
    assert qdq.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    quantized_inputs = {n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert "data" not in quantized_inputs and "conv1_1_relu1_1" not in quantized_inputs  # conv1_1, conv1_2 FP32
    assert "pool1" in quantized_inputs
    bad = int8conv_main(["export-trt", *args, "--fp32-layers", "pool1"])
    assert bad == 2


def test_auto_fp32_keeps_the_most_harmful_layers_fp32(shared, yunet_export, tmp_path):
    args = yunet_args(shared) + [
        "--load-stats",
        str(yunet_export / "s.npz"),
        "--out-dir",
        str(tmp_path),
        "-q",
        "--images",
        str(shared / "images" / "faces"),
        "--auto-fp32",
        "0.999",
        "--auto-fp32-images",
        "2",
    ]
    assert int8conv_main(["export-trt", *args]) == 0
    qdq = onnx.load(outputs(tmp_path)["qdq"])
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    convs = [n for n in qdq.graph.node if n.op_type == "Conv"]
    fp32 = [n.name for n in convs if producers.get(n.input[0]) != "DequantizeLinear"]
    assert 0 < len(fp32) < len(convs) // 2
    assert read_dynamic_ranges(outputs(tmp_path)["txt"]) == read_dynamic_ranges(outputs(yunet_export)["txt"])


def test_missing_calibration_input_fails_cleanly(shared, tmp_path):
    args = yunet_args(shared) + ["--out-dir", str(tmp_path / "out")]
    assert int8conv_main(["export-trt", *args]) == 2  # neither images nor statistics
    assert int8conv_main(["export-trt", *args, "--images", str(tmp_path / "none")]) == 2
    assert int8conv_main(["export-trt", *args, "--table", str(tmp_path / "none.table")]) == 2
    assert not (tmp_path / "out").exists()
