"""The default calibration gives the same INT8 task metrics whichever FP32 engine produced the statistics.

OpenCV, pycaffe and ncnn compute the same blobs to ~1e-5; a method whose choice flips on near-ties (KL) can still
give different tables. The default's task metrics (detectors: precision/recall against FP32; classifiers:
top-1 agreement) on held-out images must agree within 0.005 between the three engines.
"""

from __future__ import annotations

import pytest

from int8conv import pipeline
from int8conv.calibration.preprocess import list_images
from int8conv.evaluation.evaluate import EvalConfig, evaluate
from int8conv.zoo import MODELS

pytestmark = [pytest.mark.pycaffe, pytest.mark.slow]


def _listing(tmp_path, name: str, paths) -> str:
    listing = tmp_path / name
    listing.write_text("\n".join(str(p) for p in paths))
    return listing


@pytest.mark.parametrize("key", ["yufacedetectnet", "ultraface", "det3"])
def test_default_task_metrics_do_not_depend_on_the_fp32_engine(shared, tmp_path, caffe, key):
    zoo = MODELS[key]
    faces = list_images(shared / "images" / "faces") + list_images(shared / "images" / "voc_coco_detection")
    calibration, judged = _listing(tmp_path, "calib.txt", faces[0::2]), faces[1::2]
    model = pipeline.ModelFiles(*zoo.paths(shared))
    prep = pipeline.PreprocessOptions.like(zoo.prep)
    metrics = {}
    for backend in ("opencv", "caffe", "ncnn"):
        options = pipeline.CalibrationOptions(images=calibration, backend=backend)
        build = pipeline.build_ncnn(model, prep, options, fp16_storage=False)
        paths = pipeline.ncnn_paths(tmp_path / backend, model.stem)
        (tmp_path / backend).mkdir()
        pipeline.write_ncnn_models(build.fp32, build.int8, paths)
        report = evaluate(
            EvalConfig(
                paths["fp32_param"],
                paths["fp32_bin"],
                paths["int8_param"],
                paths["int8_bin"],
                zoo.prep,
                judged,
                threads=(),
            )
        )
        task = report.int8_vs_fp32.task.as_dict()
        metrics[backend] = {k: task[k] for k in ("precision", "recall", "top1_agreement") if k in task}
    assert metrics["opencv"], key  # a task metric to compare (detection or classifier), not an empty loop
    for backend in ("caffe", "ncnn"):
        for name, value in metrics["opencv"].items():
            assert abs(value - metrics[backend][name]) <= 0.005, (backend, name, metrics)
