"""``int8conv report``: the KL curve is the one the KL method minimizes, the page renders for res10 SSD and
open_nsfw, and its numbers are exactly ``int8conv eval``'s on the same files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.calibration.histograms import BlobHistogram
from int8conv.calibration.thresholds import activation_threshold
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.cli import main as int8conv_main
from int8conv.evaluation.report import kl_divergence_curve
from int8conv.tables.ncnn_table import read_ncnn_table
from tests.conftest import QUICK_EVAL

pytestmark = [pytest.mark.slow]

RNG = np.random.default_rng(11)

RES10 = (
    "res10_300x300_ssd",
    "deploy.prototxt",
    "res10_300x300_ssd_iter_140000.caffemodel",
    ["--mean", "104", "177", "123"],
)
NSFW = (
    "open_nsfw_resnet50_1by2",
    "deploy.prototxt",
    "resnet_50_1by2_nsfw.caffemodel",
    ["--mean", "104", "117", "123", "--resize-then-crop", "256", "256"],
)


def _histogram(values: np.ndarray) -> BlobHistogram:
    hist = BlobHistogram("x")
    hist.update(values.astype(np.float32))
    return hist


@pytest.mark.parametrize(
    "values",
    [
        RNG.laplace(scale=0.5, size=200_000),  # long tail: KL clips
        np.maximum(RNG.normal(size=200_000), 0) * 3.0,  # ReLU output, exact zeros
        np.round(RNG.normal(size=200_000) * 20) / 8 + RNG.normal(size=200_000) * 1e-3,  # spiky, like pixel data
    ],
    ids=["laplace", "relu", "spiky"],
)
def test_kl_curve_minimum_is_the_kl_threshold(values):
    hist = _histogram(values)
    curve = kl_divergence_curve(hist)
    assert curve is not None and curve.thresholds.shape == curve.divergences.shape
    # activation_threshold clamps KL's pick (a bin edge) to max |x|
    assert min(curve.chosen, hist.absmax) == pytest.approx(activation_threshold(hist, "kl"), rel=1e-12)
    assert np.all(np.diff(curve.thresholds) > 0) and curve.thresholds[-1] == pytest.approx(hist.range_max)
    best = np.min(curve.divergences)
    at_chosen = curve.divergences[np.argmin(np.abs(curve.thresholds - curve.chosen))]
    assert at_chosen <= best + 1e-9 * abs(best) + 1e-12


def test_kl_curve_absent_when_kl_does_not_clip():
    """Fewer non-empty bins than quantized levels: KL keeps the whole range, there is no curve to draw."""
    hist = _histogram(np.repeat(np.arange(1, 40, dtype=np.float64), 50))
    assert kl_divergence_curve(hist) is None
    assert kl_divergence_curve(BlobHistogram("empty")) is None


def _model(shared: Path, spec) -> list[str]:
    folder, proto, model, flags = spec
    base = shared / "models" / folder
    return ["--proto", str(base / proto), "--model", str(base / model), *flags]


def _listing(tmp: Path, name: str, files: list[Path]) -> Path:
    path = tmp / f"{name}.txt"
    path.write_text("\n".join(str(f) for f in files))
    return path


def _page_checks(out: Path, stem: str, graph_args: tuple[Path, Path], table_path: Path) -> str:
    """Every quantizable layer has a figure that decodes as an image, and the page's thresholds are the table's."""
    page = (out / f"{stem}.html").read_text()
    deploy = fold_batchnorm_scale(load_graph(*graph_args))
    layers = quantizable_layers(deploy)
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(layers) + 1  # one per layer and the cosine bars
    for src in images:
        picture = cv2.imread(str(out / src))
        assert picture is not None and picture.shape[0] > 100 and picture.shape[1] > 300, src
    table = read_ncnn_table(table_path)
    for layer in layers:
        row = re.search(
            rf"<tr><td>{re.escape(layer.name)}</td><td>[^<]*</td><td>[^<]*</td><td>[^<]*</td>"
            rf"<td>([^<]*)</td>",
            page,
        )
        assert row is not None, layer.name
        assert float(row.group(1)) == pytest.approx(127.0 / table.activation_scales[layer.name], rel=1e-3)
    return page


def test_report_res10_numbers_equal_eval(shared, tmp_path):
    """The page and its JSON carry eval's report; `int8conv eval` on the report's files gives the same numbers."""
    folder, proto, model = RES10[:3]
    calib = _listing(tmp_path, "calib", sorted((shared / "images" / "voc_coco_detection").glob("*.jpg"))[:2])
    faces = _listing(
        tmp_path,
        "eval",
        [
            shared / "images" / "faces" / "bobmtcnn_multiple-faces.jpg",
            shared / "images" / "faces" / "dlib_2008_001322.jpg",
        ],
    )
    out = tmp_path / "report"
    common = _model(shared, RES10) + ["--backend", "opencv", "--threads", "1", "--timing-runs", "1", "-q"]
    assert (
        int8conv_main(["report", *common, "--images", str(calib), "--eval-images", str(faces), "--out-dir", str(out)])
        == 0
    )
    stem = Path(model).stem
    page = _page_checks(
        out, stem, (shared / "models" / folder / proto, shared / "models" / folder / model), out / f"{stem}.table"
    )
    ours = json.loads((out / f"{stem}.json").read_text())
    assert ours["task"] == "ssd" and ours["images"] == 2
    assert ours["int8_vs_fp32"]["task"]["reference_detections"] >= 20  # 18 + 3 faces at score >= 0.5

    eval_json = tmp_path / "eval.json"
    assert (
        int8conv_main(["eval", *common, "--ncnn-dir", str(out), "--images", str(faces), "--json", str(eval_json)]) == 0
    )
    theirs = json.loads(eval_json.read_text())
    timing = {"speed_ms", "speed_ratio_int8_over_fp32"}
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k not in timing} == {k: v for k, v in theirs.items() if k not in timing}
    # the page shows those numbers, as eval's text report does
    assert f"{ours['int8_vs_fp32']['output_cosine']:.4f}" in page
    for name, value in ours["int8_vs_fp32"]["layer_cosine"].items():
        assert re.search(rf"<td>{re.escape(name)}</td>.*<td>{value:.5f}</td></tr>", page), name


def test_report_renders_open_nsfw_with_a_given_table(shared, tmp_path):
    """Saved statistics and a given table: the page shows that table's thresholds; ResNet-50's 54 layers render."""
    folder, proto, model = NSFW[:3]
    images = sorted((shared / "images" / "imagenet_samples_200").glob("*.JPEG"))
    calib = _listing(tmp_path, "calib", images[:2])
    evaluation = _listing(tmp_path, "eval", [shared / "images" / "skimage" / "coffee.png"])
    table = tmp_path / "given.table"
    base = _model(shared, NSFW) + ["--backend", "opencv", "-q"]
    stats = tmp_path / "stats.npz"
    assert (
        int8conv_main(
            [
                "calibrate",
                *base,
                "--images",
                str(calib),
                "--method",
                "percentile",
                "--output",
                str(table),
                "--save-stats",
                str(stats),
            ]
        )
        == 0
    )
    out = tmp_path / "report"
    assert (
        int8conv_main(
            [
                "report",
                *base,
                "--load-stats",
                str(stats),
                "--table",
                str(table),
                "--eval-images",
                str(evaluation),
                "--out-dir",
                str(out),
                *QUICK_EVAL,
            ]
        )
        == 0
    )
    stem = Path(model).stem
    _page_checks(out, stem, (shared / "models" / folder / proto, shared / "models" / folder / model), table)
    report = json.loads((out / f"{stem}.json").read_text())
    assert report["fp32_vs_caffe"] is None and report["int8_layers"] == 54
    assert report["int8_vs_fp32"]["task"]["top1_agreement"] == 1.0


def test_a_layer_whose_input_was_all_zeros_is_rendered(tmp_path):
    """A given table's threshold for an input that was all zeros on these images: the row leaves threshold / max
    empty (it divided by max |x| = 0) and the figure is drawn."""
    from int8conv.evaluation.report import LayerReport, _row, plot_layer

    hist = BlobHistogram("dead")
    hist.update(np.zeros(64, np.float32))
    layer = LayerReport("conv", "Convolution", "dead", hist, 2.0, None, np.array([1.0, 2.0]), 127, None)
    cells = re.findall(r"<td>(.*?)</td>", _row(layer))
    assert cells[4:7] == ["2", "", "0.000%"]
    plot_layer(layer, tmp_path / "conv.png")
    assert cv2.imread(str(tmp_path / "conv.png")) is not None
