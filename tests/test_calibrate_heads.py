"""Head layers (feeding the outputs only through reshapes/softmax) keep their input's full range."""

from __future__ import annotations

import cv2
import numpy as np

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.calibration.calibrate import TableRules, build_table, collect_statistics, head_layers
from int8conv.calibration.preprocess import Preprocess
from int8conv.engines import make_engine
from tests.synthetic import write_caffe_model

NET = """
name: "heads"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "body" type: "Convolution" bottom: "data" top: "body" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "body" top: "body" }
layer { name: "mid" type: "Convolution" bottom: "body" top: "mid" convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "conf" type: "Convolution" bottom: "body" top: "conf" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "perm" type: "Permute" bottom: "conf" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "flat" type: "Flatten" bottom: "perm" top: "flat" }
layer { name: "prob" type: "Softmax" bottom: "flat" top: "prob" }
layer { name: "mid_relu" type: "ReLU" bottom: "mid" top: "mid" }
"""


def test_heads_use_absmax(tmp_path):
    rng = np.random.default_rng(3)
    weights = {
        "body": [rng.normal(size=(8, 3, 3, 3)).astype(np.float32), np.zeros(8, np.float32)],
        "mid": [rng.normal(size=(8, 8, 1, 1)).astype(np.float32), np.zeros(8, np.float32)],
        "conf": [rng.normal(size=(4, 8, 1, 1)).astype(np.float32), np.zeros(4, np.float32)],
    }
    proto, model = write_caffe_model(tmp_path, NET, weights)
    graph = load_graph(proto, model)
    assert head_layers(fold_batchnorm_scale(graph)) == {"conf"}

    engine = make_engine("opencv", graph, proto, model)
    images = []
    for i in range(6):  # a few images with rare large values
        path = tmp_path / f"{i}.png"
        image = rng.integers(0, 60, size=(16, 16, 3)).astype(np.uint8)
        image[i, i] = 255
        cv2.imwrite(str(path), image)
        images.append(path)
    stats = collect_statistics(graph, engine, images, Preprocess(size=(16, 16)), {"caffemodel_sha256": "x"})
    result = build_table(graph, stats, "percentile", TableRules(percentile=99.0))
    absmax = stats.histograms["body_relu"].absmax
    assert result.thresholds["conf"] == absmax
    assert result.thresholds["mid"] < absmax  # the same blob, read by a body layer, is clipped
    same = build_table(graph, stats, "percentile", TableRules(percentile=99.0, head_method=None))
    assert same.thresholds["conf"] == same.thresholds["mid"]
