"""Shape hints (``-23330=``) in the FP32 and INT8 .param files: right shapes, loaded by ncnn, same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from int8conv.caffe.graph import load_graph
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.ncnn.convert import convert_graph
from int8conv.ncnn.model import SHAPE_HINTS, read_model, write_model
from int8conv.ncnn.quantize import quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.ncnn.shape_hints import DATA_DEPENDENT, has_shape_hints, without_shape_hints
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.zoo import MODELS, model_input

TABLES = Path(__file__).resolve().parents[1] / "tables"
#: shared model -> its shipped table (det4 has none: images cannot feed it)
TABLE_OF = {
    "lenet": "lenet_mnist",
    "det1": "mtcnn_det1",
    "det2": "mtcnn_det2",
    "det3": "mtcnn_det3",
    "open_nsfw": "open_nsfw_resnet50_1by2",
    "res10": "res10_300x300_ssd",
    "ultraface": "ultraface_slim320",
    "yufacedetectnet": "yufacedetectnet_v1",
    "retinaface": "retinaface_mnet025",
    "yoloface": "yoloface_500k_v2",
    "shufflenet_driver": "shufflenet_v1_driver_action",
    "lane": "mobilenet_yolov3_lite_lane",
    "det4": None,
}


def _hints(model) -> dict[str, tuple[int, ...]]:
    return {
        top: tuple(layer.params[SHAPE_HINTS][4 * i : 4 * i + 4])
        for layer in model.layers
        if SHAPE_HINTS in layer.params
        for i, top in enumerate(layer.tops)
    }


def _outputs_agree(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Hints change which kernel ncnn picks (another Winograd tile, another GEMM blocking), so the sums run in
    another order: equal to float rounding, not always bit for bit."""
    for name, expected in a.items():
        assert expected.shape == b[name].shape, name
        scale = max(1.0, float(np.abs(expected).max()))
        np.testing.assert_allclose(b[name], expected, rtol=0, atol=1e-5 * scale, err_msg=name)


@pytest.mark.real_models
@pytest.mark.parametrize("key", sorted(MODELS))
def test_hints_are_the_runtime_shapes_and_change_no_output(shared, key, tmp_path):
    spec = MODELS[key]
    graph = load_graph(*spec.paths(shared))
    fp32 = convert_graph(graph)
    hints = _hints(fp32)
    # every layer but the data-dependent ones carries a hint, as ncnnoptimize writes them
    assert [layer.name for layer in fp32.layers if SHAPE_HINTS not in layer.params] == [
        layer.name for layer in fp32.layers if layer.type in DATA_DEPENDENT
    ]
    write_model(fp32, tmp_path / "hints.param", tmp_path / "hints.bin")
    write_model(without_shape_hints(fp32), tmp_path / "plain.param", tmp_path / "plain.bin")
    text = (tmp_path / "hints.param").read_text()
    assert text.count(" -23330=") == len([layer for layer in fp32.layers if SHAPE_HINTS in layer.params])
    assert _hints(read_model(tmp_path / "hints.param", tmp_path / "hints.bin")) == hints

    image = read_image(list_images(shared / "images" / "faces")[0])
    inputs = {fp32.input_names[0]: model_input(spec.prep, image, next(iter(graph.inputs.values()))[1])}
    hinted = NcnnRunner(tmp_path / "hints.param", tmp_path / "hints.bin", int8=False)
    plain = NcnnRunner(tmp_path / "plain.param", tmp_path / "plain.bin", int8=False)
    # the hints are the shapes ncnn computes on a real image (not only on the zero input they came from)
    actual = plain.shapes(inputs, hints)
    assert {blob: actual[blob] for blob in hints} == hints
    _outputs_agree(plain.run(inputs), hinted.run(inputs))

    table_name = TABLE_OF[key]
    if table_name is None:
        return
    int8 = quantize_model(fp32, read_ncnn_table(TABLES / f"{table_name}.table"))
    assert _hints(int8) == hints
    write_model(int8, tmp_path / "int8.param", tmp_path / "int8.bin")
    write_model(without_shape_hints(int8), tmp_path / "int8-plain.param", tmp_path / "int8-plain.bin")
    _outputs_agree(
        NcnnRunner(tmp_path / "int8-plain.param", tmp_path / "int8-plain.bin", int8=True).run(inputs),
        NcnnRunner(tmp_path / "int8.param", tmp_path / "int8.bin", int8=True).run(inputs),
    )


@pytest.mark.real_models
def test_quantizing_a_model_without_hints_adds_them(shared):
    """A caffe2ncnn-style FP32 model (no hints) still gives an INT8 model with hints."""
    graph = load_graph(*MODELS["det1"].paths(shared))
    fp32 = convert_graph(graph)
    plain = without_shape_hints(fp32)
    assert not has_shape_hints(plain)
    int8 = quantize_model(plain, read_ncnn_table(TABLES / "mtcnn_det1.table"))
    assert _hints(int8) == _hints(fp32)
    assert not has_shape_hints(plain)
