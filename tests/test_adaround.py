"""``--adaround``: learned weight rounding (Nagel et al. 2020).

On a synthetic layer with correlated inputs the learned rounding has a smaller output error than nearest rounding on
inputs it never saw; the integers never leave the layer's bound (``winograd_levels`` for Winograd layers). On a real
model the ncnn INT8 ``.bin`` holds exactly the learned integers, the Q/DQ ONNX's weights divided by their scales
round to the same integers, and the ncnn runtime's INT8 outputs move closer to FP32.
"""

from __future__ import annotations

import numpy as np
import pytest

from int8conv.calibration import adaround
from int8conv.calibration.int8_simulation import per_output_scales, round_clip


def _layer(rng: np.random.Generator, k: int, out: int, bound: float):
    """Correlated non-negative inputs (a ReLU of mixed Gaussians), weights scaled to +-bound per output."""
    mix = rng.normal(size=(k, k)) / np.sqrt(k) + 0.3 * np.eye(k)

    def inputs(n: int) -> np.ndarray:
        return np.maximum(rng.normal(size=(n, k)) @ mix, 0) + 0.1 * rng.normal(size=(n, k))

    weight = rng.normal(size=(out, k))
    scaled = weight * (bound / np.abs(weight).max(axis=1))[:, None]
    return inputs, scaled


def _output_error(q: np.ndarray, scaled: np.ndarray, x: np.ndarray) -> float:
    return float(np.square(x @ (q - scaled).T).sum())


@pytest.mark.parametrize("bound", [31.0, 127.0])
def test_learned_rounding_beats_nearest_on_held_out_inputs(bound):
    rng = np.random.default_rng(0)
    inputs, scaled = _layer(rng, 64, 16, bound)
    train, held_out = inputs(4000), inputs(4000)
    gram = (train.T @ train)[None]
    learned = adaround.learn_rounding(
        scaled, gram, scaled @ gram[0], bound, 300, np.full(scaled.shape[0], np.trace(gram[0]) / 64)
    )
    nearest = round_clip(scaled)
    floor = np.floor(scaled)
    assert np.all((learned == floor) | (learned == floor + 1))  # up or down, nothing else
    assert np.abs(learned).max() <= bound
    assert not np.array_equal(learned, nearest)
    # measured: 0.57 (6-bit) and 0.54 (8-bit) of nearest rounding's error on the held-out inputs
    assert _output_error(learned, scaled, held_out) < 0.75 * _output_error(nearest, scaled, held_out)
    # the quadratic form the layers' rounding is judged with (``LayerGram.error``) is that error
    held_gram = (held_out.T @ held_out)[None]
    np.testing.assert_allclose(
        adaround.quadratic_error(learned - scaled, held_gram).sum(), _output_error(learned, scaled, held_out), rtol=1e-6
    )


def test_rounding_never_leaves_the_bound():
    """Weights at the 6-bit edge whose fractional part invites rounding up stay at +-31 (Winograd's bound)."""
    rng = np.random.default_rng(2)
    inputs, scaled = _layer(rng, 32, 8, 31.0)
    scaled[:, :4] = np.sign(scaled[:, :4]) * 30.9  # nearest rounding gives 31: up would give 32
    scaled[:, 4] = 31.0
    x = inputs(2000)
    gram = (x.T @ x)[None]
    learned = adaround.learn_rounding(scaled, gram, scaled @ gram[0], 31.0, 200, None)
    assert np.abs(learned).max() <= 31
    assert np.all(np.abs(learned[:, :5]) >= 30)


def test_rectified_sigmoid_starts_at_the_fractional_part():
    fraction = np.linspace(0.0, 0.999, 50)
    h, slope = adaround.rectified_sigmoid(adaround.initial_v(fraction))
    np.testing.assert_allclose(h, fraction, atol=1e-5)
    assert np.all(slope > 0)


def _int8_weights(layer) -> np.ndarray:
    return layer.weights[0].data.astype(np.int8).reshape(int(layer.params[0]), -1)


@pytest.mark.slow
def test_learned_integers_reach_ncnn_and_the_qdq_onnx(shared, tmp_path):
    """The INT8 .bin holds the learned integers (6-bit where ncnn uses Winograd), the Q/DQ ONNX's weights over
    their scales round to the same integers, and ncnn's INT8 outputs get closer to FP32 on images not learned on."""
    from onnx import numpy_helper

    from int8conv import pipeline
    from int8conv.calibration.preprocess import list_images, read_image
    from int8conv.calibration.weight_scales import quantizable_layers, weight_levels
    from int8conv.ncnn.model import read_model, write_model
    from int8conv.ncnn.quantize import is_int8, quantize_model
    from int8conv.ncnn.runtime import NcnnRunner
    from int8conv.tensorrt.onnx_export import export_onnx
    from int8conv.tensorrt.qdq import insert_qdq
    from int8conv.tensorrt.ranges import layer_input_ranges
    from int8conv.zoo import MODELS

    zoo = MODELS["ultraface"]  # depthwise, 6-bit Winograd and requantize-fused layers
    model = pipeline.ModelFiles(*zoo.paths(shared))
    prep = pipeline.PreprocessOptions.like(zoo.prep)
    options = pipeline.CalibrationOptions(
        images=shared / "images" / "faces", max_images=16, backend="opencv", method="kl", adaround=True
    )
    build = pipeline.build_ncnn(model, prep, options)
    result = build.result
    assert result.method == "kl+adaround" and result.weights
    paths = pipeline.write_ncnn_build(build, tmp_path, model.stem)
    written = read_model(paths["int8_param"], paths["int8_bin"])
    bounds = {layer.name: weight_levels(layer) for layer in quantizable_layers(result.deploy)}
    changed = 0
    for name, weight in result.weights.items():
        layer = written.layer(name)
        assert is_int8(layer), name
        scales = per_output_scales(weight, result.table.weight_scales[name])
        learned = np.round(weight * scales[:, None].astype(np.float32))
        np.testing.assert_array_equal(_int8_weights(layer), learned, err_msg=name)
        assert np.abs(learned).max() <= bounds[name], name
        nearest = round_clip(build.fp32.layer(name).weights[0].data.reshape(weight.shape) * scales[:, None])
        changed += int((learned != nearest).sum())
    assert changed > 0, "adaround changed no integer"

    export = export_onnx(model.load(), batch=1)
    qdq = insert_qdq(export, {}, (), layer_input_ranges(result.table), pipeline.qdq_weights(result))
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    produced = {node.output[0]: node for node in qdq.graph.node}
    checked = 0
    for node in qdq.graph.node:
        if node.op_type != "Conv" or node.name not in result.weights:
            continue
        dequantize = produced[node.input[1]]
        quantize = produced[dequantize.input[0]]
        weight, scale = initializers[quantize.input[0]], initializers[quantize.input[1]]
        onnx_integers = np.round(weight.reshape(scale.size, -1) / scale[:, None])
        np.testing.assert_array_equal(onnx_integers, _int8_weights(written.layer(node.name)), err_msg=node.name)
        checked += 1
    assert checked == len(result.weights)

    nearest_model = quantize_model(build.fp32, build.table, biases=result.biases)
    write_model(nearest_model, tmp_path / "nearest.param", tmp_path / "nearest.bin")
    runners = {
        "fp32": NcnnRunner(paths["fp32_param"], paths["fp32_bin"], int8=False),
        "adaround": NcnnRunner(paths["int8_param"], paths["int8_bin"], int8=True),
        "nearest": NcnnRunner(tmp_path / "nearest.param", tmp_path / "nearest.bin", int8=True),
    }
    judged = list_images(shared / "images" / "voc_coco_detection") + list_images(shared / "images" / "skimage")
    errors = {"adaround": [], "nearest": []}
    for path in judged:
        x = zoo.prep.apply(read_image(path))
        ref = runners["fp32"].run({runners["fp32"].input_names[0]: x})
        for label in errors:
            got = runners[label].run({runners[label].input_names[0]: x})
            errors[label].append(sum(float(np.square(got[k] - ref[k]).sum()) for k in ref))
    assert np.mean(errors["adaround"]) < np.mean(errors["nearest"])


@pytest.mark.slow
def test_adaround_through_the_command_lines(shared, tmp_path):
    """``--adaround`` is refused where only a table is written (or read); the one-shot conversion writes the learned
    integers into the INT8 .bin (with ``--bias-correction``: biases corrected for them), and ``export-trt`` writes
    the same integers into the Q/DQ ONNX."""
    import onnx
    from onnx import numpy_helper

    from int8conv.caffe.fold import fold_batchnorm_scale
    from int8conv.caffe.graph import load_graph
    from int8conv.calibration.weight_scales import quantizable_layers, uses_int8_winograd, weight_levels
    from int8conv.cli import main as int8conv_main
    from int8conv.legacy_cli import main as convert_tool
    from int8conv.ncnn.model import read_model
    from int8conv.ncnn.quantize import int8_layers
    from int8conv.zoo import MODELS as SHARED_MODELS
    from tests.test_calibrate_cli import model_args

    args = model_args(shared, "det3") + ["--max-images", "8", "--backend", "opencv", "--method", "kl", "-q"]
    assert int8conv_main(["calibrate", *args, "--adaround", "--output", str(tmp_path / "t.table")]) == 2
    assert convert_tool([*args, "--adaround"]) == 2
    assert convert_tool([*args, "--ncnn-dir", str(tmp_path / "plain")]) == 0
    assert convert_tool([*args, "--adaround", "--ncnn-dir", str(tmp_path / "ar")]) == 0
    plain = read_model(tmp_path / "plain" / "det3-int8.param", tmp_path / "plain" / "det3-int8.bin")
    learned = read_model(tmp_path / "ar" / "det3-int8.param", tmp_path / "ar" / "det3-int8.bin")
    names = int8_layers(learned)
    assert names == int8_layers(plain)
    differ = [n for n in names if not np.array_equal(_int8_weights(plain.layer(n)), _int8_weights(learned.layer(n)))]
    assert differ, "--adaround changed no int8 weight"
    # ncnn's INT8 Winograd layers keep their bound (det3's conv1-conv3, 3x3 stride 1: 127, 101 and 50 levels)
    deploy = fold_batchnorm_scale(load_graph(*SHARED_MODELS["det3"].paths(shared)))
    winograd = {layer.name: weight_levels(layer) for layer in quantizable_layers(deploy) if uses_int8_winograd(layer)}
    assert set(winograd) & set(differ) and sorted(winograd.values()) == [50, 101, 127]
    for name, bound in winograd.items():
        assert np.abs(_int8_weights(learned.layer(name))).max() <= bound, name
    # bias correction after the rounding: the same integers, biases corrected for them
    assert convert_tool([*args, "--bias-correction", "--ncnn-dir", str(tmp_path / "bc")]) == 2  # kl alone: refused
    assert convert_tool([*args, "--adaround", "--bias-correction", "--ncnn-dir", str(tmp_path / "bc")]) == 0
    corrected = read_model(tmp_path / "bc" / "det3-int8.param", tmp_path / "bc" / "det3-int8.bin")
    for name in names:
        np.testing.assert_array_equal(_int8_weights(corrected.layer(name)), _int8_weights(learned.layer(name)))
    assert any(not np.array_equal(corrected.layer(n).weights[1].data, learned.layer(n).weights[1].data) for n in differ)
    table = tmp_path / "plain" / "det3.table"
    assert int8conv_main(["export-trt", *args, "--adaround", "--table", str(table), "--out-dir", str(tmp_path)]) == 2
    assert int8conv_main(["export-trt", *args, "--adaround", "--out-dir", str(tmp_path / "trt")]) == 0
    qdq = onnx.load(tmp_path / "trt" / "det3.qdq.onnx")
    initializers = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    for name in differ:
        weight, scale = initializers[f"{name}/weight"], initializers[f"{name}/weight/qdq_scale"]
        integers = np.round(weight.reshape(scale.size, -1) / scale[:, None])
        np.testing.assert_array_equal(integers, _int8_weights(learned.layer(name)), err_msg=name)
