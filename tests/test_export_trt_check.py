"""export-trt's ``check``: the written Q/DQ ONNX against the written FP32 ONNX under onnxruntime, on the spread-out
calibration images ``--method auto`` validates on, and a warning below ``auto_select.WARN_BELOW``.

Ultraface on 8 face photos (mse: no ncnn candidates to run) is below the bar (its small box regressions: see
test_qdq_quality.py), res10 above it.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnxruntime as ort
import pytest

from int8conv import pipeline
from int8conv.calibration.auto_select import WARN_BELOW
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.cli import main as int8conv_main
from int8conv.tensorrt import qdq as qdq_module
from int8conv.tensorrt.qdq import QdqCheck
from int8conv.zoo import MODELS, cli_flags

pytestmark = [pytest.mark.usefixtures("ort_cache"), pytest.mark.real_models, pytest.mark.slow]  # ~15 s of exports

#: the calibration images used here: the first 8 face photos; auto's validation of 8 is 4 of them, spread evenly
IMAGES = 8
CHECKED = (0, 2, 5, 7)  # round(linspace(0, 7, 4))


def listing(shared, tmp_path, count: int = IMAGES):
    paths = list_images(shared / "images" / "faces")[:count]
    path = tmp_path / "calibration.txt"
    path.write_text("\n".join(map(str, paths)))
    return path, paths


def export(shared, tmp_path, key: str, trt: pipeline.TrtOptions | None = None, count: int = IMAGES, method="mse", **kw):
    """``export_trt`` of ``key`` calibrated (mse) on the first ``count`` face photos, written to ``tmp_path/out``."""
    trt = trt or pipeline.TrtOptions()
    zoo = MODELS[key]
    images, paths = listing(shared, tmp_path, count)
    options = pipeline.CalibrationOptions(images=images, backend="opencv", method=method, **kw)
    model = pipeline.ModelFiles(*zoo.paths(shared))
    result = pipeline.export_trt(model, pipeline.PreprocessOptions.like(zoo.prep), options, trt)
    return result, pipeline.write_trt_export(result, tmp_path / "out", model.stem, trt.trt_version), paths


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def independent_cosines(files, prep, images) -> list[float]:
    """Per image, the lowest output cosine of the written Q/DQ file against the written FP32 file (onnxruntime)."""
    fp32, qdq = (ort.InferenceSession(str(files[kind]), providers=["CPUExecutionProvider"]) for kind in ("onnx", "qdq"))
    name = fp32.get_inputs()[0].name
    found = []
    for path in images:
        feed = {name: prep.apply(read_image(path))[None]}
        found.append(min(cosine(a, b) for a, b in zip(fp32.run(None, feed), qdq.run(None, feed), strict=True)))
    return found


def ultraface_args(shared, stats_dir, out_dir, *extra: str) -> list[str]:
    """``export-trt`` of ultraface from the fixture's saved statistics (mse) into ``out_dir``, then ``extra``."""
    zoo = MODELS["ultraface"]
    proto, model = zoo.paths(shared)
    args = ["export-trt", "--proto", str(proto), "--model", str(model), *cli_flags(zoo.prep), "--method", "mse"]
    return args + ["--load-stats", str(stats_dir / "s.npz"), "--out-dir", str(out_dir), *extra]


@pytest.fixture(scope="module")
def ultraface(shared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ultraface")
    return (*export(shared, tmp, "ultraface", save_stats=tmp / "s.npz"), tmp)


def test_the_check_is_the_written_qdq_models_cosine(ultraface):
    result, files, paths, _ = ultraface
    expected = independent_cosines(files, MODELS["ultraface"].prep, [paths[i] for i in CHECKED])
    assert len(result.check.cosines) == len(CHECKED)
    assert result.check.worst == pytest.approx(min(expected), abs=1e-6)
    assert result.check.mean == pytest.approx(np.mean(expected), abs=1e-6)
    assert result.check.worst < 0.99  # the case the warning is for


def test_the_summary_prints_it_and_warns_below_the_bar(shared, ultraface, tmp_path, capsys):
    result, _, paths, tmp = ultraface
    args = ultraface_args(shared, tmp, tmp_path, "--images", str(tmp / "calibration.txt"))
    assert int8conv_main(args) == 0
    out, err = capsys.readouterr()
    line = next(line for line in out.splitlines() if line.startswith("check "))
    assert "onnxruntime" in line and f"worst of {len(CHECKED)} calibration image(s)" in line
    worst, mean = map(float, re.findall(r"\d\.\d{5}", line))
    assert worst == pytest.approx(result.check.worst, abs=5e-6) and mean == pytest.approx(result.check.mean, abs=5e-6)
    warning = next(line for line in err.splitlines() if line.startswith("WARNING") and "Q/DQ model's" in line)
    assert f"{result.check.worst:.4f}" in warning and "not as accurate as FP32" in warning
    assert "--auto-fp32 0.99" in warning and "--equalize" in warning  # ultraface has conv->depthwise pairs

    assert int8conv_main(["-q", *args]) == 0  # -q: the warning stays, the summary and INFO lines go
    out, err = capsys.readouterr()
    assert not out and "not as accurate as FP32" in err and "INFO" not in err


def test_the_warning_is_for_below_the_bar_only(shared, ultraface, monkeypatch, caplog):
    """The bar moved to either side of the measured worst image; the remedies named are the ones the run lacks."""
    result, _, _, _ = ultraface
    graph = pipeline.ModelFiles(*MODELS["ultraface"].paths(shared)).load()

    def warnings(trt: pipeline.TrtOptions, check: QdqCheck = result.check) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, "int8conv.pipeline"):
            pipeline.warn_inaccurate_qdq(check, graph, trt)
        return [r.getMessage() for r in caplog.records]

    monkeypatch.setattr(pipeline, "WARN_BELOW", result.check.worst - 1e-4)
    assert warnings(pipeline.TrtOptions()) == []
    monkeypatch.setattr(pipeline, "WARN_BELOW", result.check.worst + 1e-4)
    (message,) = warnings(pipeline.TrtOptions())
    assert "--auto-fp32" in message and "--equalize" in message
    (message,) = warnings(pipeline.TrtOptions(auto_fp32=1.0, equalized=True))  # both already used
    assert "--auto-fp32" not in message and "--equalize" not in message
    assert warnings(pipeline.TrtOptions(), QdqCheck((1.0, float("nan"))))  # a broken output is never above it


def test_res10_above_the_bar_does_not_warn(shared, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "int8conv.pipeline"):
        result, files, paths = export(shared, tmp_path, "res10", count=4)
    assert result.check.worst >= 0.99
    assert result.check.worst == pytest.approx(min(independent_cosines(files, MODELS["res10"].prep, paths)), abs=1e-6)
    assert not [r for r in caplog.records if "export-trt" in r.getMessage()]


def test_auto_fp32_reuses_the_search_measurement(shared, ultraface, tmp_path, monkeypatch):
    """--auto-fp32 scores the written choice already: its number is the check, measured once."""
    _, _, _, tmp = ultraface
    checks = []
    original = qdq_module.OutputCosine.check
    monkeypatch.setattr(qdq_module.OutputCosine, "check", lambda self, m: checks.append(1) or original(self, m))
    trt = pipeline.TrtOptions(auto_fp32=0.5, auto_fp32_images=3)  # reached all INT8: one measurement
    result, _, _ = export(shared, tmp_path, "ultraface", trt, load_stats=(tmp / "s.npz",))
    assert len(checks) == 1 and len(result.check.cosines) == 3
    assert result.check.worst == result.choice.cosine


def test_without_images_there_is_nothing_to_check(shared, ultraface, tmp_path, capsys):
    _, _, _, tmp = ultraface
    args = ultraface_args(shared, tmp, tmp_path)
    assert int8conv_main(args) == 0
    out, err = capsys.readouterr()
    assert not any(line.startswith("check ") for line in out.splitlines())
    (info,) = [line for line in err.splitlines() if "not checked" in line]
    assert info.startswith("INFO") and "no calibration images" in info
    assert int8conv_main(["-q", *args]) == 0
    assert "not checked" not in capsys.readouterr().err


def test_export_trt_warns_about_its_qdq_model_only(shared, tmp_path, caplog):
    """``--method auto`` scores its candidates on the ncnn runtime, but export-trt's product is the Q/DQ ONNX: the
    warning is about that model, never the ncnn INT8 model's (``pipeline.warn_inaccurate_int8``)."""
    with caplog.at_level(logging.WARNING):
        result, _, _ = export(shared, tmp_path, "ultraface", count=4, method="auto")
    text = caplog.text
    assert "INT8 model's output cosine" not in text
    assert ("Q/DQ model's output cosine" in text) == (result.check.worst < WARN_BELOW)
