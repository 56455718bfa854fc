"""The shipped tables in tables/: one per shared model, each matching its model, reproducible from its command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import load_graph
from int8conv.caffe.shapes import conv_geometry
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.tables.ncnn_table import read_ncnn_table
from tests.conftest import calibrate_args, run_python

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "tables"


def _make_tables():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts" / "make_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


MAKE = _make_tables()


def test_one_table_per_shared_model(shared):
    """tables/<folder>.table for each model folder; MTCNN one per net that images can feed (det1-det3)."""
    expected = {folder.name for folder in (shared / "models").iterdir() if folder.is_dir() and folder.name != "mtcnn"}
    expected |= {"mtcnn_det1", "mtcnn_det2", "mtcnn_det3"}
    assert {p.stem for p in TABLES.glob("*.table")} == expected == {e.name for e in MAKE.ENTRIES}
    readme = (TABLES / "README.md").read_text()
    for entry in MAKE.ENTRIES:
        for command in entry.commands():
            assert MAKE.shell_line(command) in readme, entry.name
    assert "det4" in readme


@pytest.mark.parametrize("entry", MAKE.ENTRIES, ids=lambda e: e.name)
def test_table_matches_its_model(shared, entry):
    """Every quantizable layer has a weight line with ncnn's scale count and an activation line; all finite."""
    table = read_ncnn_table(TABLES / f"{entry.name}.table")
    layers = quantizable_layers(fold_batchnorm_scale(load_graph(*entry.model.paths(shared))))
    names = {layer.name for layer in layers}
    assert set(table.weight_scales) == names
    assert set(table.activation_scales) == names
    for layer in layers:
        group = conv_geometry(layer)["group"] if layer.type == "Convolution" else 1
        scales = table.weight_scales[layer.name]
        assert scales.size == (group if group > 1 else layer.blobs[0].shape[0]), layer.name
        assert np.all(np.isfinite(scales)) and np.all(scales >= 0)
        assert np.isfinite(table.activation_scales[layer.name]) and table.activation_scales[layer.name] > 0


def test_regenerated_table_is_byte_identical(shared, tmp_path):
    """Run the README's command for mtcnn_det1 again: the table it writes is the shipped one, byte for byte."""
    entry = MAKE.BY_NAME["mtcnn_det1"]
    command = MAKE.resolve(entry.calibrate_command(), shared, tmp_path)
    out = tmp_path / "mtcnn_det1.table"
    command[command.index("--output") + 1] = str(out)
    proc = subprocess.run(command + ["-q"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (TABLES / "mtcnn_det1.table").read_bytes()


def test_calibrate_refuses_det4_as_the_readme_says(shared, tmp_path):
    base = shared / "models" / "mtcnn"
    model = (base / "det4.prototxt", base / "det4.caffemodel")
    argv = calibrate_args(*model, shared / "images" / "faces", tmp_path / "det4.table", *MAKE.MTCNN_FLAGS)
    proc = run_python("-m", "int8conv.cli", *argv)
    assert proc.returncode == 2 and "15 channels" in proc.stderr
    assert not (tmp_path / "det4.table").exists()
