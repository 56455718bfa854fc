"""`convert_tool.py` / `int8conv calibrate` end to end on the real models, and its errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.caffe.shapes import conv_geometry
from int8conv.calibration.weight_scales import DEAD_CHANNEL_RATIO, quantizable_layers
from int8conv.cli import main as int8conv_main
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.zoo import MODELS as SHARED_MODELS
from int8conv.zoo import cli_flags
from tests.conftest import convert_tool_res10, run_python

ROOT = Path(__file__).resolve().parents[1]

#: the shared models calibrate takes from images (det4's 15-channel input cannot be fed), with their images
MODELS = {
    "res10": "faces",
    "open_nsfw": "imagenet_samples_200",
    "yufacedetectnet": "faces",
    "ultraface": "faces",
    "det1": "faces",
    "det2": "faces",
    "det3": "faces",
    "lenet": "opencv_samples",
}


def model_args(shared: Path, key: str) -> list[str]:
    proto, model = SHARED_MODELS[key].paths(shared)
    return [
        "--proto",
        str(proto),
        "--model",
        str(model),
        "--images",
        str(shared / "images" / MODELS[key]),
        *cli_flags(SHARED_MODELS[key].prep),
    ]


@pytest.mark.parametrize(
    "key", [pytest.param(k, marks=pytest.mark.slow) if k == "open_nsfw" else k for k in sorted(MODELS)]
)
def test_table_covers_every_layer_and_is_deterministic(shared, tmp_path, key):
    args = model_args(shared, key) + ["--max-images", "6", "--backend", "opencv", "-q"]
    first, second = tmp_path / "a.table", tmp_path / "b.table"
    assert int8conv_main(["calibrate", *args, "--output", str(first)]) == 0
    assert int8conv_main(["calibrate", *args, "--output", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()

    table = read_ncnn_table(first)
    graph = fold_batchnorm_scale(load_graph(*SHARED_MODELS[key].paths(shared)))
    layers = quantizable_layers(graph)
    assert set(table.weight_scales) == {layer.name for layer in layers}
    assert set(table.activation_scales) == {layer.name for layer in layers}
    for layer in layers:
        scales = table.weight_scales[layer.name]
        group = conv_geometry(layer)["group"] if layer.type == "Convolution" else 1
        assert scales.size == (group if group > 1 else layer.blobs[0].shape[0]), layer.name
        assert np.all(np.isfinite(scales)) and np.all(scales >= 0)
        absmax = np.abs(layer.blobs[0].reshape(scales.size, -1)).max(axis=1)
        dead = absmax <= absmax.max() * DEAD_CHANNEL_RATIO  # zero, or under 1/1024 of the layer's largest channel
        assert np.all((scales == 0) == dead), layer.name
        assert np.all(scales[~dead] <= 127 / absmax[~dead] * 1.0001)
        assert np.isfinite(table.activation_scales[layer.name]) and table.activation_scales[layer.name] > 0


def test_original_command_line(shared, tmp_path):
    """The original tool's flags, through convert_tool.py in a subprocess, with its summary."""
    proto, model = SHARED_MODELS["res10"].paths(shared)
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((shared / "images" / "faces").glob("*.jpg"))[:3]:
        shutil.copy(source, images)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "res10.table"
    proc = subprocess.run(
        [*convert_tool_res10(proto, model, images), "--output", str(out)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 used, 1 skipped" in proc.stdout and "corrupt.jpg" in proc.stderr
    table = read_ncnn_table(out)
    assert "conv1_h" in table.weight_scales and "conv1_h" in table.activation_scales


def test_saved_statistics_merge_like_one_run(shared, tmp_path):
    """Statistics of two image sets, merged, give the table of one run over both sets."""
    faces = sorted((shared / "images" / "faces").glob("*.jpg"))[:4]
    sets = []
    for name, files in (("a", faces[:2]), ("b", faces[2:]), ("all", faces)):
        listing = tmp_path / f"{name}.txt"
        listing.write_text("\n".join(str(f) for f in files))
        sets.append(listing)
    base = model_args(shared, "res10")
    # a histogram method: the property is the histograms' (auto without images to validate on falls back to mse)
    base = (
        base[: base.index("--images")]
        + base[base.index("--images") + 2 :]
        + ["-q", "--backend", "opencv", "--method", "mse"]
    )
    for listing in sets[:2]:
        assert (
            int8conv_main(
                [
                    "calibrate",
                    *base,
                    "--images",
                    str(listing),
                    "--output",
                    str(tmp_path / "x.table"),
                    "--save-stats",
                    str(tmp_path / f"{listing.stem}.npz"),
                ]
            )
            == 0
        )
    assert int8conv_main(["calibrate", *base, "--images", str(sets[2]), "--output", str(tmp_path / "one.table")]) == 0
    assert (
        int8conv_main(
            [
                "calibrate",
                *base,
                "--load-stats",
                str(tmp_path / "a.npz"),
                str(tmp_path / "b.npz"),
                "--output",
                str(tmp_path / "merged.table"),
            ]
        )
        == 0
    )
    assert (tmp_path / "merged.table").read_text() == (tmp_path / "one.table").read_text()


def test_errors_exit_2_and_name_the_problem(shared, tmp_path, capsys):
    args = model_args(shared, "res10")
    empty = tmp_path / "bad_images"
    empty.mkdir()
    (empty / "x.jpg").write_bytes(b"not a jpeg")
    images_at = args.index("--images") + 1
    bad = list(args)
    bad[images_at] = str(empty)
    assert int8conv_main(["calibrate", *bad, "--output", str(tmp_path / "t.table")]) == 2
    assert "none of the 1 calibration images" in capsys.readouterr().err
    assert not (tmp_path / "t.table").exists()
    other = model_args(shared, "lenet")
    wrong_stats = tmp_path / "lenet.npz"
    assert (
        int8conv_main(
            [
                "calibrate",
                *other,
                "--max-images",
                "2",
                "-q",
                "--output",
                str(tmp_path / "l.table"),
                "--save-stats",
                str(wrong_stats),
            ]
        )
        == 0
    )
    assert (
        int8conv_main(["calibrate", *args, "--load-stats", str(wrong_stats), "--output", str(tmp_path / "t.table")])
        == 2
    )
    assert "collected for lenet_iter_10000.caffemodel" in capsys.readouterr().err


def test_legacy_table_is_blob_keyed_per_tensor(shared, tmp_path):
    """--legacy-table: one 127/max|W| per layer, activation scales keyed by the Caffe blob each layer reads."""
    out = tmp_path / "legacy.table"
    assert (
        int8conv_main(
            [
                "calibrate",
                *model_args(shared, "det2"),
                "--max-images",
                "4",
                "--backend",
                "opencv",
                "-q",
                "--legacy-table",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    graph = load_graph(*SHARED_MODELS["det2"].paths(shared))
    layers = quantizable_layers(fold_batchnorm_scale(graph))
    lines = dict(line.split() for line in out.read_text().splitlines())
    for layer in layers:
        assert float(lines[f"{layer.name}_param_0"]) == pytest.approx(127 / np.abs(layer.blobs[0]).max(), rel=1e-6)
    blobs = {graph.blob_of(layer.bottoms[0]) for layer in layers}
    assert set(lines) == {f"{layer.name}_param_0" for layer in layers} | blobs
    assert "data" in blobs and all(float(lines[b]) > 0 for b in blobs)


def test_python_dash_m_int8conv_is_the_command(tmp_path):
    """``python -m int8conv`` (a venv whose bin/ is not on PATH) runs the CLI with its exit codes: 0, and 2 with
    the flag named for a bad input."""
    from int8conv import __version__

    shown = run_python("-m", "int8conv", "--version")
    assert shown.returncode == 0 and shown.stdout.strip() == f"int8conv {__version__}"
    missing = run_python("-m", "int8conv", "convert", "--proto", str(tmp_path / "no.prototxt"), "--model", "x")
    assert missing.returncode == 2 and "argument --proto" in missing.stderr and "no such file" in missing.stderr
