"""``--method auto``: the selection keeps the candidate table that scores best on the validation images, and its
thresholds are what the ncnn files get (the TensorRT side: ``test_threshold_source``'s auto cases)."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import pytest

from int8conv import pipeline
from int8conv.calibration.auto_select import (
    AUTO_CANDIDATES,
    AUTO_FALLBACK,
    TIE,
    WARN_BELOW,
    calibrate_auto,
    validation_images,
)
from int8conv.calibration.calibrate import build_table
from int8conv.calibration.preprocess import list_images, network_inputs
from int8conv.commands.calibrate import summary
from int8conv.evaluation.mixed_precision import OutputScorer
from int8conv.ncnn.convert import convert_graph
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.zoo import MODELS


def test_validation_images_are_spread_and_bounded():
    assert validation_images([]) == []
    assert validation_images([1, 2, 3]) == [1, 2, 3]
    assert validation_images(list(range(10))) == [0, 3, 6, 9]
    many = validation_images(list(range(100)))
    assert len(many) == 12 and many[0] == 0 and many[-1] == 99


@pytest.fixture(scope="module")
def yunet(shared, tmp_path_factory):
    """yufacedetectnet calibrated with --method auto on 8 face images (its candidates disagree), and the
    validation inputs."""
    zoo = MODELS["yufacedetectnet"]
    listing = tmp_path_factory.mktemp("auto") / "images.txt"
    paths = list_images(shared / "images" / "faces")[:8]
    listing.write_text("\n".join(map(str, paths)))
    model = pipeline.ModelFiles(*zoo.paths(shared))
    prep = pipeline.PreprocessOptions.like(zoo.prep)
    options = pipeline.CalibrationOptions(images=listing, backend="opencv", method="auto")
    result = pipeline.calibrate(model, prep, options)
    graph = model.load()
    name = next(iter(graph.inputs))
    inputs = [f[name] for f in network_inputs(validation_images(paths), prep.for_graph(graph, model.proto), name)]
    return model, prep, options, graph, result, inputs


def test_auto_is_at_least_as_good_as_every_candidate(yunet, tmp_path):
    _, _, _, graph, result, inputs = yunet
    fp32 = convert_graph(graph)
    score = OutputScorer(fp32, [{fp32.input_names[0]: x} for x in inputs], tmp_path, "auto", False, 1)
    chosen = score(result.table)
    assert chosen == pytest.approx(result.scores["auto"], abs=1e-9)  # rescored independently
    for method in AUTO_CANDIDATES:
        assert chosen >= score(build_table(graph, result.statistics, method).table) - TIE - 1e-12, method
    assert result.method == "auto"
    assert result.thresholds == pytest.approx(
        {k: 127.0 / v for k, v in result.table.activation_scales.items()}, rel=1e-12
    )


def test_auto_is_the_best_candidate_run_once_each(yunet, monkeypatch):
    _, _, _, graph, result, inputs = yunet
    calls = []
    original = OutputScorer.__call__
    monkeypatch.setattr(OutputScorer, "__call__", lambda self, table: calls.append(1) or original(self, table))
    again = calibrate_auto(graph, result.statistics, inputs)
    assert len(calls) == len(AUTO_CANDIDATES)
    assert again.table.activation_scales == result.table.activation_scales  # deterministic
    top = max(again.scores[m] for m in AUTO_CANDIDATES)
    best = next(m for m in AUTO_CANDIDATES if again.scores[m] >= top - TIE)
    assert again.scores["auto"] == again.scores[best]
    assert again.table.activation_scales == build_table(graph, result.statistics, best).table.activation_scales


def test_the_chosen_table_is_what_the_ncnn_files_get(yunet, tmp_path):
    model, prep, options, _, result, _ = yunet
    build = pipeline.build_ncnn(model, prep, options, result=result)
    paths = pipeline.write_ncnn_build(build, tmp_path, model.stem)
    written = read_ncnn_table(paths["table"])
    assert set(written.activation_scales) == set(result.table.activation_scales)
    for layer, scale in result.table.activation_scales.items():
        assert written.activation_scales[layer] == pytest.approx(scale, rel=1e-6), layer


def test_without_images_auto_falls_back(yunet, caplog):
    graph, result = yunet[3], yunet[4]
    stats_only = pipeline.CalibrationOptions(method="auto")
    with caplog.at_level(logging.WARNING):
        fallback = pipeline.table_from_statistics(graph, result.statistics, stats_only)
    assert fallback.method == AUTO_FALLBACK
    assert f"none were given (statistics only): using {AUTO_FALLBACK}" in caplog.text


def test_auto_says_shared_notes_once_and_warns_below_the_bar(yunet, caplog):
    """What every candidate shares (the head layers) is logged once, not per candidate; a best worst-image cosine
    below WARN_BELOW is a warning that gives it and the remedies, and the calibrate summary prints it."""
    _, _, _, graph, result, inputs = yunet
    with caplog.at_level(logging.INFO):
        again = calibrate_auto(graph, result.statistics, inputs)
    assert caplog.text.count("head layers with minmax thresholds") == 1
    assert again.scores["auto"] < WARN_BELOW  # yufacedetectnet's worst validation image: about 0.8
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # the commands warn, not the selection
    with caplog.at_level(logging.WARNING):
        pipeline.warn_inaccurate_int8(again)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"is {again.scores['auto']:.4f} on the worst of {len(inputs)}" in warning and "--auto-fp32" in warning
    assert "equalize" not in warning  # yufacedetectnet has no conv->depthwise pair
    text = summary(argparse.Namespace(output="t.table", legacy_table=False), again)
    assert f"check      INT8 output cosine {again.scores['auto']:.4f} against FP32" in text
    assert f"worst of {len(inputs)} calibration image(s)" in text


def test_unreadable_images_are_reported_once_and_left_out_of_the_validation(shared, tmp_path, caplog):
    """An image the statistics pass could not read is not picked again for auto's validation images: each is
    reported once, and the validation gets as many readable images as asked."""
    zoo = MODELS["yufacedetectnet"]
    empty, text = tmp_path / "empty.jpg", tmp_path / "text.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image")
    paths = [*list_images(shared / "images" / "faces")[:8], empty, text]  # the spread picks the last one
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(map(str, paths)))
    options = pipeline.CalibrationOptions(images=listing, backend="opencv", method="auto")
    with caplog.at_level(logging.WARNING):
        result = pipeline.calibrate(
            pipeline.ModelFiles(*zoo.paths(shared)), pipeline.PreprocessOptions.like(zoo.prep), options
        )
    messages = [r.getMessage() for r in caplog.records]
    for bad in (empty, text):
        assert messages.count(f"skipping {bad}: not a readable image") == 1, bad
    assert result.statistics.images_skipped == 2
    assert result.validation_images == len(validation_images(paths[:8])) == 4


@pytest.mark.slow
def test_the_int8_warning_names_equalize_where_the_model_has_pairs(shared, tmp_path, caplog):
    """ultraface has conv->depthwise pairs: below the bar, the remedies include equalizing them, unless the model
    already is equalized (convert_tool.py --equalize)."""
    zoo = MODELS["ultraface"]
    images = tmp_path / "calibration.txt"
    images.write_text("\n".join(map(str, list_images(shared / "images" / "faces")[:4])))
    options = pipeline.CalibrationOptions(images=images, backend="opencv", method="mse")
    result = pipeline.calibrate(
        pipeline.ModelFiles(*zoo.paths(shared)), pipeline.PreprocessOptions.like(zoo.prep), options
    )
    assert not result.validation_images  # mse validates nothing: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipeline.warn_inaccurate_int8(result)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    low = dataclasses.replace(result, scores={"auto": 0.9}, validation_images=4)
    for equalized in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            pipeline.warn_inaccurate_int8(low, equalized)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert "INT8 model's output cosine against FP32 is 0.9000 on the worst of 4" in warning
        assert ("11 conv->depthwise pair(s)" in warning) != equalized
