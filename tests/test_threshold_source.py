"""One source of thresholds: the Q/DQ ONNX, the TensorRT cache and ranges hold the ncnn table's thresholds.

For every shared model the ncnn table (``calibrate``) and the TensorRT export (``export-trt``) are computed
from the same images with the same options; each Conv/Gemm's input Q/DQ scale must be the table's
``127 / scale`` divided by 127 (the head rule included), and the per-tensor ranges of the cache the largest
threshold of the layers that read the tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from int8conv import pipeline
from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.calibration.preprocess import list_images
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.ncnn.quantize import int8_layers, runtime_fp32_layers
from int8conv.tables.tensorrt_files import LEVELS
from int8conv.zoo import MODELS

#: the shared models calibrate takes from plain images (det4 reads five crops at once) and the converter
#: handles (retinaface, yoloface, shufflenet_driver and lane need the fork layers of issue 10)
CONVERTIBLE = ("lenet", "det1", "det2", "det3", "open_nsfw", "res10", "ultraface", "yufacedetectnet")
KEYS = [
    pytest.param(k, "kl", marks=pytest.mark.slow) if k in ("open_nsfw", "res10") else (k, "kl") for k in CONVERTIBLE
] + [("det2", "auto"), ("yufacedetectnet", "auto")]  # auto: its chosen thresholds


def _input_scales(qdq) -> dict[str, float]:
    """Conv/Gemm node -> the scale of the DequantizeLinear feeding its input."""
    inits = {init.name: numpy_helper.to_array(init) for init in qdq.graph.initializer}
    producers = {out: node for node in qdq.graph.node for out in node.output}
    scales = {}
    for node in qdq.graph.node:
        if node.op_type in ("Conv", "Gemm") and node.input[0] in producers:
            dq = producers[node.input[0]]
            if dq.op_type == "DequantizeLinear":
                scales[node.name] = float(inits[dq.input[1]])
    return scales


@pytest.mark.parametrize(("key", "method"), KEYS)
def test_qdq_scales_are_the_ncnn_table_scales(shared, tmp_path, key, method):
    zoo = MODELS[key]
    listing = tmp_path / "images.txt"
    pool = "imagenet_samples_200" if key == "open_nsfw" else "faces"
    listing.write_text("\n".join(str(p) for p in list_images(shared / "images" / pool)[:4]))
    model = pipeline.ModelFiles(*zoo.paths(shared))
    prep = pipeline.PreprocessOptions.like(zoo.prep)
    options = pipeline.CalibrationOptions(images=listing, backend="opencv", method=method)
    table = pipeline.calibrate(model, prep, options).table
    export = pipeline.export_trt(model, prep, options, pipeline.TrtOptions())

    scales = _input_scales(export.qdq)
    assert set(scales) == set(table.activation_scales)
    for layer, scale in table.activation_scales.items():
        expected = np.float32(127.0 / scale / LEVELS)
        assert scales[layer] == pytest.approx(float(expected), rel=1e-6), layer

    deploy = fold_batchnorm_scale(model.load())
    readers: dict[str, list[str]] = {}
    for layer in quantizable_layers(deploy):
        if layer.name in table.activation_scales:
            readers.setdefault(layer.bottoms[0], []).append(layer.name)
    for value, layers in readers.items():
        assert export.ranges[value] == pytest.approx(
            max(127.0 / table.activation_scales[n] for n in layers), rel=1e-6
        ), value


@pytest.mark.real_models
def test_qdq_quantizes_the_layers_the_ncnn_int8_model_quantizes(shared, tmp_path):
    """The ShuffleNet's grouped convolutions stay FP32 in its ncnn INT8 model (ncnn's x86 INT8 group path computes
    them wrongly), so nothing validates their thresholds: the Q/DQ ONNX leaves the same layers FP32 and quantizes
    every layer the ncnn model quantizes, with the table's scales."""
    zoo = MODELS["shufflenet_driver"]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(p) for p in list_images(shared / "images" / "imagenet_samples_200")[:4]))
    model = pipeline.ModelFiles(*zoo.paths(shared))
    prep = pipeline.PreprocessOptions.like(zoo.prep)
    options = pipeline.CalibrationOptions(images=listing, backend="opencv", method="kl")
    build = pipeline.build_ncnn(model, prep, options, fp16_storage=False)
    export = pipeline.export_trt(model, prep, options, pipeline.TrtOptions())
    grouped = runtime_fp32_layers(build.fp32)
    assert len(grouped) > 10 and sorted(export.fp32_layers) == sorted(grouped)
    scales = _input_scales(export.qdq)
    assert set(scales) == set(int8_layers(build.int8))
    for layer, scale in scales.items():
        assert scale == pytest.approx(
            float(np.float32(127.0 / build.table.activation_scales[layer] / LEVELS)), rel=1e-6
        )
