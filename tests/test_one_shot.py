"""`convert_tool.py --ncnn-dir OUT`: table, FP32 and INT8 ncnn models in one shot, all loaded by ncnn."""

from __future__ import annotations

import numpy as np

from int8conv.caffe.graph import load_graph
from int8conv.calibration.preprocess import Preprocess, list_images, read_image
from int8conv.engines import make_engine
from int8conv.legacy_cli import main as convert_tool
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.tables.ncnn_table import read_ncnn_table


def test_one_shot_writes_models_ncnn_runs(shared, tmp_path):
    base = shared / "models" / "mtcnn"
    faces = list_images(shared / "images" / "faces")
    out = tmp_path / "ncnn"
    assert (
        convert_tool(
            [
                "--proto",
                str(base / "det3.prototxt"),
                "--model",
                str(base / "det3.caffemodel"),
                "--mean",
                "127.5",
                "--norm",
                "0.0078125",
                "--color",
                "rgb",
                "--swap-hw",
                "-q",
                "--images",
                str(shared / "images" / "faces"),
                "--max-images",
                "10",
                "--ncnn-dir",
                str(out),
            ]
        )
        == 0
    )
    assert {p.name for p in out.iterdir()} == {
        "det3.param",
        "det3.bin",
        "det3-int8.param",
        "det3-int8.bin",
        "det3.table",
    }
    table = read_ncnn_table(out / "det3.table")
    assert "conv1" in table.activation_scales
    fp32 = NcnnRunner(out / "det3.param", out / "det3.bin", int8=False)
    int8 = NcnnRunner(out / "det3-int8.param", out / "det3-int8.bin", int8=True)
    graph = load_graph(base / "det3.prototxt", base / "det3.caffemodel")
    caffe = make_engine("opencv", graph, base / "det3.prototxt", base / "det3.caffemodel")
    prep = Preprocess(size=(48, 48), mean=(127.5,), norm=0.0078125, color="rgb", swap_hw=True)
    for path in faces[12:15]:  # not used for calibration
        x = prep.apply(read_image(path))
        reference = caffe.forward(x[None], ["prob1"])["prob1"][0]
        got32 = fp32.run({"data": x})["prob1"].reshape(-1)
        got8 = int8.run({"data": x})["prob1"].reshape(-1)
        np.testing.assert_allclose(got32, reference, atol=1e-4)
        assert np.abs(got8 - reference).max() < 0.05, (path.name, got8, reference)
