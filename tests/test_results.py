"""The eval report records serialize to the ``eval --json`` schema: its keys in its order, NaN/Inf as null."""

from __future__ import annotations

import json
import math
import re

from int8conv.evaluation.evaluate import TaskMetric, format_report
from int8conv.evaluation.results import (
    ArmDifference,
    ArmReport,
    ArmTarget,
    ArmTiming,
    ClassifierAgreement,
    DetectionAgreement,
    Difference,
    EvalReport,
    Int8Comparison,
    LayerTimes,
    MapAgreement,
    OutputComparison,
    finite_json,
)
from int8conv.evaluation.speed import LayerTiming

HEAD = ["model", "int8_model", "task", "images", "score_threshold", "iou_threshold", "int8_layers"]
COMPARISON = ["output_blobs", "output_cosine", "output_cosine_min", "task", "layer_cosine"]
DETECTION = ["precision", "recall", "mean_iou", "reference_detections", "candidate_detections", "matched"]


def _ssd_report(**changes) -> EvalReport:
    detections = DetectionAgreement(0.9, 0.75, math.nan, 4, 5, 3)
    fields = {
        "model": "m.param",
        "int8_model": "m-int8.param",
        "task": "ssd",
        "images": 2,
        "score_threshold": 0.5,
        "iou_threshold": 0.5,
        "int8_layers": 3,
        "fp32_layers": ["conv_head"],
        "fp32_vs_caffe": {"detection_out": Difference(0.0, 0.0, "detection count differs (3 vs 4)"), "x": Difference()},
        "fp32_vs_caffe_task": detections,
        "int8_vs_fp32": Int8Comparison(["loc", "conf"], 0.99, 0.98, detections, {"conv1": 0.999}, 1, 0.99999),
        "speed_ms": {"fp32": {1: 4.0, 2: 2.5}, "int8": {1: 2.0, 2: 2.0}},
    }
    return EvalReport(**{**fields, **changes})


def test_eval_report_json_has_the_eval_schema():
    report = _ssd_report()
    found = json.loads(report.to_json())
    assert list(found) == [
        *HEAD,
        "fp32_layers",
        "fp32_vs_caffe",
        "fp32_vs_caffe_task",
        "int8_vs_fp32",
        "speed_ms",
        "speed_ratio_int8_over_fp32",
    ]
    assert found["fp32_vs_caffe"] == {
        "detection_out": {"max_abs": 0.0, "max_rel": 0.0, "note": "detection count differs (3 vs 4)"},
        "x": {"max_abs": 0.0, "max_rel": 0.0},  # no note key without a note
    }
    assert list(found["fp32_vs_caffe_task"]) == DETECTION and found["fp32_vs_caffe_task"]["mean_iou"] is None
    assert list(found["int8_vs_fp32"]) == [*COMPARISON, "winograd_layers", "winograd_vs_direct_cosine_min"]
    assert found["int8_vs_fp32"]["output_blobs"] == ["loc", "conf"]
    assert found["speed_ms"] == {"fp32": {"1": 4.0, "2": 2.5}, "int8": {"1": 2.0, "2": 2.0}}
    assert found["speed_ratio_int8_over_fp32"] == {"1": 0.5, "2": 0.8}
    # the layout eval --json has always written: two-space indent, no trailing newline (the writer adds it)
    assert report.to_json() == json.dumps(found, indent=2)
    assert (
        "NaN" not in report.to_json()
        and "Infinity" not in _ssd_report(fp32_vs_caffe={"y": Difference(1.0, math.inf)}).to_json()
    )


def test_eval_report_without_caffe_and_with_layer_times():
    timing = LayerTiming({1: 0.2}, {1: 0.3})
    report = _ssd_report(
        fp32_vs_caffe=None, fp32_vs_caffe_task=None, layer_ms=LayerTimes("timed here", {"conv1": timing})
    )
    found = json.loads(report.to_json())
    assert found["fp32_vs_caffe"] is None and found["fp32_vs_caffe_task"] is None
    assert list(found)[-1] == "layer_ms"
    assert found["layer_ms"] == {"source": "timed here", "layers": {"conv1": {"fp32": {"1": 0.2}, "int8": {"1": 0.3}}}}
    text = format_report(report)
    assert "ncnn FP32 vs Caffe" not in text and "INT8 slower" in text and "conv_head" in text
    assert "INT8 is slower than FP32 here" not in text  # faster at 1 and 2 threads


def test_eval_report_names_the_remedy_when_int8_is_slower():
    text = format_report(_ssd_report(speed_ms={"fp32": {1: 4.0, 2: 2.5}, "int8": {1: 2.0, 2: 3.0}}))
    assert "INT8 is slower than FP32 here at 2 thread(s): int8conv quantize --optimize speed" in text


def test_task_metrics_serialize_by_task():
    classifier, segmentation = TaskMetric("classifier"), TaskMetric("segmentation")
    assert list(classifier.summary().as_dict()) == ["top1_agreement", "mean_abs_prob_diff"]
    assert isinstance(classifier.summary(), ClassifierAgreement) and math.isnan(classifier.summary().top1_agreement)
    assert list(segmentation.summary().as_dict()) == ["map_iou", "map_iou_min", "map_threshold"]
    assert isinstance(segmentation.summary(), MapAgreement) and segmentation.summary().map_threshold == 0.5
    assert list(TaskMetric("ssd").summary().as_dict()) == DETECTION


def test_arm_report_json_has_the_arm_schema():
    task = ClassifierAgreement(1.0, 0.001)
    comparison = OutputComparison(["prob"], 0.999, 0.998, task, {"conv1": 0.9999})
    differs = ArmDifference(["prob"], 1.0, 1.0, task, {}, {"prob": Difference(1e-6, 1e-5)})
    report = ArmReport(
        *["m.param", "m-int8.param", "classifier", 4, 0.5, 0.5, 3],
        arm=ArmTarget("cortex-a76", False, 1, {"machine": "aarch64", "emulated": True}),
        x86_ncnn="1.0.0",
        int8_vs_fp32={"arm": comparison, "x86": comparison},
        arm_vs_x86={"fp32": differs, "int8": differs},
        arm_ms_per_image=ArmTiming(10.0, 5.0, "emulated"),
    )
    found = json.loads(report.to_json())
    assert list(found) == [*HEAD, "arm", "x86_ncnn", "int8_vs_fp32", "arm_vs_x86", "arm_ms_per_image"]
    assert found["arm"] == {"cpu": "cortex-a76", "fp16": False, "threads": 1, "machine": "aarch64", "emulated": True}
    assert list(found["int8_vs_fp32"]["arm"]) == COMPARISON
    assert list(found["arm_vs_x86"]["fp32"]) == [*COMPARISON, "difference"]
    assert found["arm_vs_x86"]["int8"]["difference"] == {"prob": {"max_abs": 1e-6, "max_rel": 1e-5}}
    assert found["arm_ms_per_image"] == {"fp32": 10.0, "int8": 5.0, "note": "emulated"}


def test_difference_keeps_a_nan_output_whichever_image_has_it():
    """max over images of |Caffe - ncnn|: an output holding NaN makes it NaN (null in the JSON), not the other images'
    largest difference (Python's max dropped a NaN that came after a number)."""
    reference = [1.0, 2.0, 4.0]
    for outputs in (([1.0, 2.0, 4.5], [1.0, math.nan, 4.0]), ([1.0, math.nan, 4.0], [1.0, 2.0, 4.5])):
        diff = Difference()
        for output in outputs:
            diff.add(reference, output)
        assert math.isnan(diff.max_abs) and math.isnan(diff.max_rel)
        assert json.loads(json.dumps(finite_json(diff.as_dict()))) == {"max_abs": None, "max_rel": None}


def test_a_nan_layer_cosine_is_listed_and_drawn_as_the_worst(tmp_path):
    """A layer whose output holds NaN (cosine NaN) heads the lowest-cosine list and the cosine plot is still drawn
    (the sort left the NaN anywhere; the plot's axis limit became NaN and matplotlib refused it)."""
    from types import SimpleNamespace

    import cv2

    from int8conv.evaluation.report import plot_cosines

    cosines = {"conv1": 0.999, "conv2": 0.98, "conv3": math.nan, "conv4": 0.9999}
    base = _ssd_report().int8_vs_fp32
    report = _ssd_report(int8_vs_fp32=Int8Comparison(base.output_blobs, 0.99, 0.98, base.task, cosines, 0, None))
    listed = re.findall(r"^    (conv\d) ", format_report(report, worst_layers=2), re.M)
    assert listed == ["conv3", "conv2"]
    png = tmp_path / "cosines.png"
    plot_cosines([SimpleNamespace(name=name, cosine=value) for name, value in cosines.items()], png)
    assert cv2.imread(str(png)) is not None
