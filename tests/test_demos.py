"""The demos, run as users run them (``python demos/<demo>.py`` from the repository root), on 1-2 images each.

FP32 results are checked against the known Caffe results in each model's SOURCE.txt; INT8 against FP32.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demos"))

from int8conv.errors import Int8ConvError  # noqa: E402
from int8conv.zoo import MODELS, cli_flags, write_digit_cells  # noqa: E402
from tests.conftest import run_python  # noqa: E402

pytestmark = [pytest.mark.slow]


def run_demo(script: str, *args: str, shared: Path) -> str:
    env = {**os.environ, "INT8CONV_SHARED": str(shared), "INT8CONV_QUIET": "1"}
    proc = run_python(ROOT / "demos" / script, *args, "--runs", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_classify_open_nsfw_default(shared, tmp_path):
    """No model flags: open_nsfw. caffe_cat.jpg -> SFW 1.0 and coffee.png -> SFW 0.982 (SOURCE.txt)."""
    images = tmp_path / "images"
    images.mkdir()
    for source in (
        shared / "images" / "voc_coco_detection" / "caffe_cat.jpg",
        shared / "images" / "skimage" / "coffee.png",
    ):
        (images / source.name).write_bytes(source.read_bytes())
    out = tmp_path / "out"
    stdout = run_demo(
        "classify.py",
        "--images",
        str(images),
        "--out-dir",
        str(out),
        "--calib-images",
        str(shared / "images" / "imagenet_samples_200"),
        "--max-calib-images",
        "4",
        shared=shared,
    )
    fp32 = dict(re.findall(r"^(\S+)\n  FP32 +[\d.]+ ms  (.+)$", stdout, re.M))
    int8 = dict(re.findall(r"^(\S+)\n  FP32 .+\n  INT8 +[\d.]+ ms  (.+)$", stdout, re.M))
    assert fp32["caffe_cat.jpg"].startswith("SFW 1.0000")
    assert fp32["coffee.png"].startswith("SFW 0.98")
    assert float(fp32["coffee.png"].split(", ")[1].split()[1]) == pytest.approx(0.018, abs=0.002)
    assert int8["caffe_cat.jpg"].startswith("SFW") and int8["coffee.png"].startswith("SFW")
    assert "top-1 agreement INT8 vs FP32: 2/2" in stdout
    assert re.search(r"INT8/FP32 time ratio \d+\.\d{3}", stdout)
    assert sorted(p.name for p in out.glob("*.png")) == ["caffe_cat.png", "coffee.png"]
    picture = cv2.imread(str(out / "coffee.png"))
    assert picture is not None and picture.shape[1] > 2 * picture.shape[0]  # image + two bar charts
    assert (out / "models" / "resnet_50_1by2_nsfw-int8.param").is_file()


def test_classify_lenet_digits(shared, tmp_path):
    """LeNet preset: calibrated on digit cells it cuts itself; FP32 reads the digits, INT8 agrees."""
    digits = write_digit_cells(shared / "images" / "opencv_samples" / "digits.png", tmp_path / "digits", 10, offset=7)
    stdout = run_demo(
        "classify.py",
        "--model-name",
        "lenet",
        "--images",
        str(digits),
        "--out-dir",
        str(tmp_path / "out"),
        "--top-k",
        "3",
        shared=shared,
    )
    rows = re.findall(r"^digit(\d)_\d+\.png\n  FP32 .+ ms  (\d) [\d.]+.*\n  INT8 .+ ms  (\d) ", stdout, re.M)
    assert len(rows) == 10
    assert sum(truth == fp32 for truth, fp32, _ in rows) >= 8  # SOURCE.txt: 88.4% top-1 on these digits
    assert all(fp32 == int8 for _, fp32, int8 in rows)
    assert len(list((tmp_path / "out").glob("*.png"))) == 10


@pytest.mark.parametrize(
    "preset, image, faces",
    [
        ("res10", "bobmtcnn_multiple-faces.jpg", 18),
        ("yufacedetectnet", "libfacedetection_keliamoniz1.jpg", 1),
        ("ultraface", "dlib_2008_001322.jpg", 3),  # host-decoded
        ("retinaface", "bobmtcnn_multiple-faces.jpg", 18),  # host-decoded anchors + landmarks, letterboxed
        ("yoloface", "bobmtcnn_multiple-faces.jpg", 19),  # darknet heads (OpenCV FP32 finds 19 here)
    ],
)
def test_ssd_detect_presets(shared, tmp_path, preset, image, faces):
    """FP32 finds the faces SOURCE.txt lists; the picture has the FP32 and INT8 panels side by side."""
    images = tmp_path / "images"
    images.mkdir()
    (images / image).write_bytes((shared / "images" / "faces" / image).read_bytes())
    out = tmp_path / "out"
    args = ["--images", str(images), "--out-dir", str(out), "--max-calib-images", "4"]
    stdout = run_demo("ssd_detect.py", *(["--model-name", preset] if preset != "res10" else []), *args, shared=shared)
    found = re.search(
        rf"^{re.escape(image)}: FP32 (\d+) box\(es\) .+ \| INT8 (\d+) box\(es\) .+ \| (\d+) INT8 box", stdout, re.M
    )
    assert found, stdout
    fp32, int8, matched = map(int, found.groups())
    assert fp32 == faces
    assert matched >= faces - 1 and int8 <= faces + 1  # ultraface: its preset keeps sensitive layers FP32
    picture = cv2.imread(str(out / f"{Path(image).stem}.png"))
    source = cv2.imread(str(images / image))
    assert picture is not None and picture.shape[1] == 2 * source.shape[1] + 8
    assert re.search(r"INT8/FP32 time ratio \d+\.\d{3}", stdout)


def test_own_model_needs_calibration_images(shared, tmp_path):
    folder = shared / "models" / "res10_300x300_ssd"
    model = ["--proto", folder / "deploy.prototxt", "--model", folder / "res10_300x300_ssd_iter_140000.caffemodel"]
    proc = run_python(ROOT / "demos" / "ssd_detect.py", *model, "--images", tmp_path, "--out-dir", tmp_path / "out")
    assert proc.returncode == 2 and "--calib-images" in proc.stderr


def test_auto_fp32_keeps_layers_fp32(shared, tmp_path):
    """--auto-fp32: the demo says which layers stayed FP32, and the INT8 model really has them in FP32."""
    from int8conv.ncnn.model import read_model
    from int8conv.ncnn.quantize import int8_layers

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes((shared / "images" / "faces" / "dlib_2008_001322.jpg").read_bytes())
    out = tmp_path / "out"
    stdout = run_demo(
        "ssd_detect.py",
        "--model-name",
        "ultraface",
        "--images",
        str(images),
        "--out-dir",
        str(out),
        "--max-calib-images",
        "2",
        "--auto-fp32",
        "0.9999",
        shared=shared,
    )
    kept = re.search(r"\(FP32 layers: ([^)]+)\)", stdout)
    assert kept, stdout
    names = kept.group(1).split(", ")
    quantized = int8_layers(read_model(out / "models" / "slim-320-int8.param", out / "models" / "slim-320-int8.bin"))
    assert names and not set(names) & set(quantized) and len(quantized) > 0


@pytest.mark.parametrize(
    "demo, flags, message",
    [
        ("classify", ["--top-k", "0"], "--top-k: must be 1 or more"),  # was an IndexError after the first image
        ("classify", ["--runs", "-1"], "--runs: must be 1 or more"),
        ("ssd_detect", ["--score-threshold", "1.5"], "--score-threshold: must be in [0, 1]"),  # was: no box, silently
        ("ssd_detect", ["--threads", "0"], "--threads: must be 1 or more"),
        ("ssd_detect", ["--proto", "missing.prototxt", "--model", "missing.caffemodel"], "no such file"),
        ("classify", ["--method", "entropy"], "--method: invalid choice: 'entropy'"),  # was: after the histograms
        ("ssd_detect", ["--backend", "gpu"], "--backend: invalid choice: 'gpu'"),  # was: after listing the images
    ],
)
def test_demo_flags_are_checked_as_the_cli_checks_them(tmp_path, capsys, demo, flags, message):
    """Bad flag values stop the demo with exit code 2 and a message naming the flag, before any model is built."""
    module = __import__(demo)
    with pytest.raises(SystemExit) as stopped:
        module.parse_args(["--images", str(tmp_path), "--out-dir", str(tmp_path / "out"), *flags])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_a_python_without_the_dependencies_is_told_to_use_the_venv():
    """`python demos/classify.py` with a Python that lacks a dependency (onnx hidden here): one line naming the
    module and the venv's Python, not a traceback from inside int8conv."""
    code = (
        "import runpy, sys; sys.modules['onnx'] = None; sys.path.insert(0, 'demos'); "
        "sys.argv = ['demos/classify.py', '--help']; runpy.run_path('demos/classify.py', run_name='__main__')"
    )
    proc = run_python("-c", code)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "onnx is not installed for" in proc.stderr and "`.venv/bin/python demos/...`" in proc.stderr


def test_a_wrong_images_path_stops_the_demo_before_the_models_are_built(shared, tmp_path):
    """--images that does not exist is the first error, not the one after a calibration (a minute on open_nsfw)."""
    import classify

    proto, model = MODELS["lenet"].paths(shared)
    own = ["--proto", str(proto), "--model", str(model), "--color", "gray", "--norm", "0.00390625"]
    calib = ["--calib-images", str(shared / "images" / "skimage")]
    with pytest.raises(Int8ConvError, match="missing: no such image directory"):
        classify.main([*own, *calib, "--images", str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "models").exists()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"letterbox": True},
        {"swap_hw": True},  # was drawn transposed
        {"resize": (60, 90)},  # was drawn without the crop undone
        {"swap_hw": True, "resize": (60, 90)},
    ],
)
def test_drawn_boxes_land_on_the_object_in_the_image(options):
    """A bright rectangle found in the network input, as a detection, maps back onto the rectangle in the image."""
    from ssd_detect import in_image

    from int8conv.calibration.preprocess import Preprocess
    from int8conv.evaluation.detection import Detections

    image = np.zeros((80, 120, 3), np.uint8)
    image[20:50, 30:90] = 255  # x 30..90 of 120, y 20..50 of 80
    prep = Preprocess(size=(48, 64), **options)
    data = prep.apply(image)[0]
    rows, cols = np.nonzero(data > 127)
    found = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]) / np.tile(data.shape[::-1], 2)
    drawn = in_image(Detections(found, np.ones(1), np.ones(1, np.int64), found.reshape(1, 2, 2)), prep, image)
    truth = np.array([30 / 120, 20 / 80, 90 / 120, 50 / 80])
    np.testing.assert_allclose(drawn.boxes[0], truth, atol=2.5 / 48)
    np.testing.assert_allclose(drawn.landmarks[0].reshape(-1), truth, atol=2.5 / 48)


def test_classify_ranks_the_softmax_output_of_a_multi_output_model(shared, tmp_path):
    """MTCNN det2 outputs its box regressions (conv5-2) before its Softmax (prob1): the demo ranks prob1, as eval
    reads its top-1 (it ranked the 4 regressions as 'class 0..3' scores)."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "face.jpg").write_bytes((shared / "images" / "faces" / "dlib_2008_001322.jpg").read_bytes())
    proto, model = MODELS["det2"].paths(shared)
    stdout = run_demo(
        "classify.py",
        *("--proto", str(proto), "--model", str(model), "--calib-images", str(images), "--images", str(images)),
        *("--out-dir", str(tmp_path / "out"), "--labels", "nonface,face", *cli_flags(MODELS["det2"].prep)),
        shared=shared,
    )
    rows = re.findall(r"^  (FP32|INT8) .+ ms  (\w+) ([\d.]+), (\w+) ([\d.]+)$", stdout, re.M)
    assert len(rows) == 2
    for _, first, p_first, second, p_second in rows:
        assert {first, second} == {"nonface", "face"} and float(p_first) + float(p_second) == pytest.approx(1, abs=2e-4)


def test_cached_models_are_rebuilt_for_another_calibration_backend(shared, tmp_path):
    """The cache key holds --backend: a run with another FP32 engine calibrates again instead of reusing the
    models calibrated with the first one."""
    digits = write_digit_cells(shared / "images" / "opencv_samples" / "digits.png", tmp_path / "digits", 2)
    env = {**os.environ, "INT8CONV_SHARED": str(shared), "INT8CONV_QUIET": "1"}
    flags = ["--model-name", "lenet", "--images", str(digits), "--out-dir", str(tmp_path / "out"), "--runs", "1"]
    logs = []
    for backend in ("ncnn", "opencv", "opencv"):
        proc = run_python(ROOT / "demos" / "classify.py", *flags, "--backend", backend, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs.append("using the cached ncnn models" in proc.stderr)
    assert logs == [False, False, True]


@pytest.mark.parametrize(
    ("fp32", "int8", "ratio"), [(2.0, 1.0, "2.00x faster"), (1.0, 2.0, "2.00x slower"), (1.0, 1.0, "1.00x slower")]
)
def test_speed_summary_says_how_many_times_faster_or_slower(fp32, int8, ratio):
    """INT8 twice as slow is "2.00x slower", not "0.50x slower"."""
    from _common import speed_summary

    line = speed_summary([fp32], [int8], 1)
    assert f"INT8/FP32 time ratio {int8 / fp32:.3f} ({ratio})" in line
