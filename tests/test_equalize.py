"""``int8conv equalize``: the equalized caffemodel computes the same FP32 outputs (checked with OpenCV, an engine
the equalization does not use to check itself), gives every depthwise input channel the same range, and quantizes
better on the ncnn runtime."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from int8conv import pipeline
from int8conv.caffe.graph import load_graph
from int8conv.calibration.calibrate import build_table
from int8conv.calibration.equalize import channel_ranges, equalization_pairs
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.cli import main as cli
from int8conv.engines import make_engine
from int8conv.evaluation.metrics import cosine
from int8conv.legacy_cli import main as convert_tool
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import write_model
from int8conv.ncnn.quantize import quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.zoo import MODELS, cli_flags, model_input
from tests.synthetic import write_caffe_model

NET = """
name: "dw"
input: "data"
input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "act" type: "ReLU" bottom: "conv" top: "conv" relu_param { negative_slope: 0.1 } }
layer { name: "dw" type: "Convolution" bottom: "conv" top: "dw"
  convolution_param { num_output: 8 group: 8 kernel_size: 3 pad: 1 } }
layer { name: "act2" type: "ReLU" bottom: "dw" top: "dw" }
layer { name: "pw" type: "Convolution" bottom: "dw" top: "pw" convolution_param { num_output: 4 kernel_size: 1 } }
"""


@pytest.fixture
def spread_net(tmp_path):
    """A conv -> BatchNorm -> Scale -> ReLU -> depthwise net whose 8 channels span about 100x in range, and 6
    random images to measure them on."""
    rng = np.random.default_rng(3)
    f = np.float32
    gamma = np.geomspace(1e-2, 1.0, 8).astype(f)  # channel ranges from the Scale layer
    weights = {
        "conv": [rng.normal(size=(8, 3, 3, 3)).astype(f), rng.normal(size=8).astype(f) * 0.1],
        "bn": [rng.normal(size=8).astype(f) * 0.1, rng.uniform(0.5, 2, size=8).astype(f), np.array([1.0], f)],
        "scale": [gamma, (gamma * 0.2).astype(f)],
        "dw": [rng.normal(size=(8, 1, 3, 3)).astype(f), rng.normal(size=8).astype(f) * 0.01],
        "pw": [(rng.normal(size=(4, 8, 1, 1)) / gamma.reshape(1, 8, 1, 1)).astype(f), np.zeros(4, f)],
    }
    proto, model = write_caffe_model(tmp_path / "net", NET, weights)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
    return proto, model, images


def _equalized(proto, model, images, tmp_path):
    options = pipeline.CalibrationOptions(images=images, backend="ncnn")
    result = pipeline.equalize(pipeline.ModelFiles(proto, model), pipeline.PreprocessOptions(mean=(127.0,)), options)
    path = tmp_path / "equalized.caffemodel"
    pipeline.write_equalized(result, path)
    return result, path


def _inputs(seed: int, n: int) -> np.ndarray:
    return (np.random.default_rng(seed).integers(0, 256, size=(n, 3, 16, 16)) - 127.0).astype(np.float32)


def test_equalized_model_is_the_same_network_with_equal_depthwise_input_ranges(spread_net, tmp_path):
    proto, model, images = spread_net
    result, path = _equalized(proto, model, images, tmp_path)
    assert [(p.producer, p.depthwise, p.value) for p in result.pairs] == [("scale", "dw", "conv_act")]
    assert result.pairs[0].spread > 30 and result.fp32_max_rel < 1e-5
    x = _inputs(0, 4)
    before = make_engine("opencv", load_graph(proto, model), proto, model).forward(x, ["pw", "conv_act"])
    after = make_engine("opencv", load_graph(proto, path), proto, path).forward(x, ["pw", "conv_act"])
    np.testing.assert_allclose(after["pw"], before["pw"], rtol=1e-4, atol=1e-4 * np.abs(before["pw"]).max())
    peak = np.abs(after["conv_act"]).max(axis=(0, 2, 3))
    ranges = channel_ranges([before], ["conv_act"])["conv_act"]
    assert ranges.max() / ranges.min() > 30  # before: about 100x apart
    assert peak.max() / peak.min() < 1.6  # after: one range (measured on other images than these)


def test_equalization_raises_the_int8_output_cosine(spread_net, tmp_path):
    """Same images, same minmax table rule: the INT8 ncnn model of the equalized net is closer to FP32."""
    proto, model, images = spread_net
    _, path = _equalized(proto, model, images, tmp_path)
    x = _inputs(1, 8)
    found = {}
    for label, caffemodel in (("original", model), ("equalized", path)):
        graph = load_graph(proto, caffemodel)
        fp32 = convert_graph(graph)
        stats = pipeline.collect(
            pipeline.ModelFiles(proto, caffemodel),
            graph,
            pipeline.PreprocessOptions(mean=(127.0,)),
            pipeline.CalibrationOptions(images=images, backend="ncnn"),
        )
        int8 = quantize_model(fp32, build_table(graph, stats, "minmax").table, fp16_storage=False)
        runners = []
        for stem, m in (("fp32", fp32), ("int8", int8)):
            write_model(m, tmp_path / f"{label}-{stem}.param", tmp_path / f"{label}-{stem}.bin")
            runners.append(
                NcnnRunner(tmp_path / f"{label}-{stem}.param", tmp_path / f"{label}-{stem}.bin", stem == "int8")
            )
        found[label] = min(cosine(runners[0].run({"data": a})["pw"], runners[1].run({"data": a})["pw"]) for a in x)
    assert found["equalized"] > found["original"] + 0.01, found


def test_a_model_without_depthwise_layers_is_a_clear_error(tmp_path, capsys):
    rng = np.random.default_rng(0)
    net = 'name: "plain"\ninput: "data"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
    net += 'layer { name: "c" type: "Convolution" bottom: "data" top: "c"\n'
    net += "  convolution_param { num_output: 4 kernel_size: 3 } }\n"
    proto, model = write_caffe_model(tmp_path, net, {"c": [rng.normal(size=(4, 3, 3, 3)), np.zeros(4)]})
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "out.caffemodel"
    code = cli(
        ["equalize", "--proto", str(proto), "--model", str(model), "--images", str(images), "--output", str(out)]
    )
    assert code == 2 and "nothing to equalize" in capsys.readouterr().err and not out.exists()


def test_ultraface_pairs_are_its_depthwise_layers(shared):
    graph = load_graph(*MODELS["ultraface"].paths(shared))
    pairs = equalization_pairs(graph)
    depthwise = [layer.name for layer in graph.layers if layer.type == "Convolution" and layer.blobs[0].shape[1] == 1]
    assert len(pairs) == 11 and {d.name for _, d in pairs} <= set(depthwise) and pairs[0][1].name == "188"


def _face_split(shared, tmp_path):
    """The shared faces and a list file of every other one (calibration); the rest judge (``faces[1::2]``)."""
    faces = list_images(shared / "images" / "faces")
    listing = tmp_path / "calibration.txt"
    listing.write_text("\n".join(map(str, faces[0::2])))
    return faces, listing


@pytest.mark.slow  # a whole calibration + conversion of ultraface, twice
def test_one_shot_equalize_writes_the_model_its_files_fit(shared, tmp_path, capsys):
    """``convert_tool.py --ncnn-dir OUT --equalize`` on ultraface: the six files land together; the FP32 model is
    the original network; its INT8 model is closer to the original FP32 outputs than the plain one-shot's."""
    zoo = MODELS["ultraface"]
    proto, model = zoo.paths(shared)
    faces, listing = _face_split(shared, tmp_path)
    common = ["--proto", str(proto), "--model", str(model), *cli_flags(zoo.prep), "--images", str(listing), "-q"]
    assert convert_tool([*common, "--equalize", "--output", str(tmp_path / "t.table")]) == 2
    assert "use it with --ncnn-dir" in capsys.readouterr().err
    found = {}
    for label, extra in (("plain", []), ("equalized", ["--equalize"])):
        out = tmp_path / label
        assert convert_tool([*common, "--ncnn-dir", str(out), *extra]) == 0
        stem = model.stem
        assert (out / f"{stem}-equalized.caffemodel").exists() == bool(extra)
        fp32 = NcnnRunner(out / f"{stem}.param", out / f"{stem}.bin", int8=False)
        int8 = NcnnRunner(out / f"{stem}-int8.param", out / f"{stem}-int8.bin", int8=True)
        found[label] = []
        for path in faces[1::2][:6]:
            feed = {"input": model_input(zoo.prep, read_image(path), 3)}
            found[label].append((fp32.run(feed), int8.run(feed)))
    for (plain_fp32, _), (equal_fp32, _) in zip(found["plain"], found["equalized"], strict=True):
        for name, value in plain_fp32.items():
            np.testing.assert_allclose(equal_fp32[name], value, atol=1e-4 * np.abs(value).max())
    mean = {label: np.mean([min(cosine(f[n], q[n]) for n in f) for f, q in pairs]) for label, pairs in found.items()}
    assert mean["equalized"] > mean["plain"] + 0.002, mean


@pytest.mark.slow  # a whole calibration + conversion of ultraface, twice
def test_export_trt_equalize_is_the_same_network_and_a_closer_qdq_model(shared, tmp_path, capsys):
    """``export-trt --equalize`` on ultraface: its FP32 ONNX computes the original's outputs, and its Q/DQ ONNX
    is closer to them on held-out faces (onnxruntime) than the Q/DQ ONNX of the original model."""
    import onnxruntime as ort

    zoo = MODELS["ultraface"]
    proto, model = zoo.paths(shared)
    faces, listing = _face_split(shared, tmp_path)
    common = ["export-trt", "--proto", str(proto), "--model", str(model), *cli_flags(zoo.prep), "-q"]
    common += ["--images", str(listing)]
    (tmp_path / "t.table").write_text("conv 1.0\n")
    assert cli([*common, "--equalize", "--table", str(tmp_path / "t.table"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "--equalize changes the model, which the table" in capsys.readouterr().err
    runs = {}
    for label, extra in (("plain", []), ("equalized", ["--equalize"])):
        assert cli([*common, *extra, "--out-dir", str(tmp_path / label)]) == 0
        runs[label] = [
            ort.InferenceSession(str(tmp_path / label / f"{model.stem}{suffix}"), providers=["CPUExecutionProvider"])
            for suffix in (".onnx", ".qdq.onnx")
        ]
    worst = {}
    for label, (fp32, qdq) in runs.items():
        name = fp32.get_inputs()[0].name
        low = 1.0
        for path in faces[1::2][:6]:
            x = model_input(zoo.prep, read_image(path), 3)[None]
            reference, quantized = fp32.run(None, {name: x}), qdq.run(None, {name: x})
            if label == "equalized":  # the same network as the original, up to float rounding
                for mine, theirs in zip(reference, runs["plain"][0].run(None, {name: x}), strict=True):
                    np.testing.assert_allclose(mine, theirs, atol=1e-4 * np.abs(theirs).max())
            low = min(low, *(cosine(a, b) for a, b in zip(reference, quantized, strict=True)))
        worst[label] = low
    assert worst["equalized"] > worst["plain"] + 0.005, worst


def test_one_shot_equalize_reports_an_unreadable_image_once(spread_net, tmp_path, capsys):
    """The one-shot's equalization reads some of the calibration images, then calibration reads them all: an
    unreadable one is reported by the calibration alone (it was reported by both)."""
    proto, model, images = spread_net
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    flags = ["--proto", str(proto), "--model", str(model), "--mean", "127", "--images", str(images), "-q"]
    assert convert_tool([*flags, "--method", "kl", "--ncnn-dir", str(tmp_path / "out"), "--equalize"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"skipping {images / 'broken.jpg'}: not a readable image") == 1, err
    assert f"skipped 1 unreadable image(s): {images / 'broken.jpg'}" in err
