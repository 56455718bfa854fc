"""The ncnn calibration engine: the same values and statistics as the OpenCV engine, the same table whatever
--jobs (worker processes), hidden values declined by name, and worker failures that surface instead of hanging."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from int8conv.caffe.graph import load_graph
from int8conv.calibration import workers
from int8conv.calibration.calibrate import all_values, build_table, calibration_values, collect_statistics
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.preprocess import ImageTally, Preprocess, iter_batches, list_images
from int8conv.calibration.workers import CHUNK_IMAGES
from int8conv.engines import make_engine
from int8conv.engines.ncnn_engine import NcnnEngine
from int8conv.errors import ImageError, Int8ConvError, ModelError
from int8conv.zoo import FORK_MODELS, MODELS
from tests.synthetic import write_caffe_model

RNG = np.random.default_rng(3)
#: the models images can feed (det4 reads five crops at once) and the ncnn converter supports (no fork layers)
CALIBRATED = sorted(key for key in MODELS if key != "det4" and key not in FORK_MODELS)


def _moved_fraction(a, b) -> float:
    """Share of the samples that sit in a different histogram bin (or are zero in one and not the other)."""
    moved = np.abs(a.counts - b.counts).sum() / 2 + abs(a.zeros - b.zeros)
    return float(moved) / max(a.count, 1)


@pytest.mark.real_models
@pytest.mark.parametrize("key", CALIBRATED)
def test_statistics_equal_opencv(shared, key):
    """On 4 real images: every calibrated value to 1e-4 of OpenCV's, histograms within 0.1% of their samples,
    min/max-based and percentile scales to 4 digits, KL scales equal but for rare near-ties (as pycaffe's test)."""
    spec = MODELS[key]
    proto, model = spec.paths(shared)
    graph = load_graph(proto, model)
    images = list_images(shared / "images" / "faces")[:4]
    values = calibration_values(graph)
    batch, _ = next(iter_batches(images[:2], spec.prep, 2, ImageTally()))
    got = make_engine("ncnn", graph, proto, model).forward(batch, values)
    reference = make_engine("opencv", graph, proto, model).forward(batch, values)
    for value in values:
        assert got[value].shape == reference[value].shape, value
        scale = float(np.abs(reference[value]).max()) or 1.0
        assert float(np.abs(got[value] - reference[value]).max()) / scale < 1e-4, value

    stats = {
        backend: collect_statistics(
            graph, make_engine(backend, graph, proto, model), images, spec.prep, {"caffemodel_sha256": key}
        )
        for backend in ("ncnn", "opencv")
    }
    for value, hist in stats["opencv"].histograms.items():
        other = stats["ncnn"].histograms[value]
        assert other.count == hist.count and other.absmax == pytest.approx(hist.absmax, rel=1e-4), value
        assert _moved_fraction(other, hist) <= 1e-3, value
    for method in ("minmax", "percentile"):
        a, b = (build_table(graph, stats[e], method).table.activation_scales for e in ("ncnn", "opencv"))
        assert set(a) == set(b)
        for layer, scale in b.items():
            assert a[layer] == pytest.approx(scale, rel=5e-4), (method, layer)
    a, b = (build_table(graph, stats[e], "kl").table.activation_scales for e in ("ncnn", "opencv"))
    flips = [layer for layer, scale in b.items() if a[layer] != pytest.approx(scale, rel=5e-4)]
    assert len(flips) <= max(1, len(b) // 20), flips


@pytest.mark.real_models
@pytest.mark.parametrize("key", ["retinaface", "lane"])
def test_fork_layer_models_calibrate_on_ncnn(shared, key):
    """Deconvolution, Crop and the fork depthwise name convert (layer registry): auto calibrates them on ncnn."""
    proto, model = MODELS[key].paths(shared)
    graph = load_graph(proto, model)
    assert make_engine("auto", graph, proto, model, calibration=True).name == "ncnn"


def test_a_declined_layer_is_named_and_auto_uses_opencv(tmp_path):
    text = """
    input: "data" input_shape { dim: 2 dim: 3 }
    layer { name: "emb" type: "Embed" bottom: "data" top: "emb" embed_param { num_output: 4 input_dim: 5 } }
    """
    proto, model = write_caffe_model(tmp_path, text, {"emb": [np.zeros((5, 4), np.float32), np.zeros(4, np.float32)]})
    graph = load_graph(proto, model)
    with pytest.raises(ModelError, match=r"layer 'emb' has type 'Embed', which the ncnn converter does not"):
        NcnnEngine(graph).blob_names(calibration_values(graph))
    assert make_engine("auto", graph, proto, model, calibration=True).name == "opencv"


NET = """
name: "fused"
input: "data"
input_shape { dim: 1 dim: 3 dim: 9 dim: 9 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "drop" type: "Dropout" bottom: "conv1" top: "conv1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "pool" type: "Pooling" bottom: "conv1" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 2 } }
"""


@pytest.fixture(scope="module")
def fused_net(tmp_path_factory):
    f = np.float32
    weights = {
        "conv1": [RNG.normal(size=(4, 3, 3, 3)).astype(f), RNG.normal(size=4).astype(f)],
        "ip": [RNG.normal(size=(2, 4)).astype(f), RNG.normal(size=2).astype(f)],
    }
    proto, model = write_caffe_model(tmp_path_factory.mktemp("fused"), NET, weights)
    return load_graph(proto, model), proto, model


def test_identity_values_and_vectors_match_opencv(fused_net):
    """The ReLU output the Dropout hides is read under the Dropout's name; the global pooling output, a 1-D Mat
    in ncnn, comes back in Caffe's (N, C, 1, 1)."""
    graph, proto, model = fused_net
    x = RNG.normal(size=(2, 3, 9, 9)).astype(np.float32)
    values = ["conv1_relu1", "conv1_drop", "pool", "ip"]
    got = NcnnEngine(graph).forward(x, values)
    expected = make_engine("opencv", graph, proto, model).forward(x, values)
    for value in values:
        assert got[value].shape == expected[value].shape, value
        np.testing.assert_allclose(got[value], expected[value], rtol=1e-5, atol=1e-5, err_msg=value)


def test_fused_values_are_declined_by_name_and_auto_uses_opencv(fused_net):
    graph, proto, model = fused_net
    with pytest.raises(ModelError, match=r"fuses into a convolution \(conv1\).*--backend opencv"):
        NcnnEngine(graph).blob_names(["conv1", "pool"])
    assert make_engine("auto", graph, proto, model, calibration=True, values=all_values(graph)).name == "opencv"
    assert make_engine("auto", graph, proto, model, calibration=True).name == "ncnn"
    # an FP32 reference for eval is never the ncnn model under evaluation
    assert make_engine("auto", graph, proto, model).name in ("opencv", "caffe")


@pytest.fixture
def workers_start_at_once(monkeypatch):
    """Worker processes even for work too small to pay for their start (the first chunk's timing decides); the
    list it returns records the pool sizes used."""
    monkeypatch.setattr(workers, "WORKER_START_SECONDS", 0.0)
    pools, pool = [], workers._Pool

    def recorded(reader, chunks, prep, new_statistics, count):
        pools.append(count)
        return pool(reader, chunks, prep, new_statistics, count)

    monkeypatch.setattr(workers, "_Pool", recorded)
    return pools


def test_no_images_is_a_clear_error(fused_net):
    graph, _, _ = fused_net
    with pytest.raises(ImageError, match="none of the 0 calibration images"):
        collect_statistics(graph, NcnnEngine(graph), [], Preprocess(size=(9, 9)), {}, jobs=2)


@pytest.mark.real_models
def test_jobs_do_not_change_the_statistics(shared, workers_start_at_once, caplog):
    """--jobs 3 (two worker processes and this one; three chunks, one image unreadable) against one process: the
    same statistics, and the unreadable image reported once either way."""
    spec = MODELS["ultraface"]
    proto, model = spec.paths(shared)
    graph = load_graph(proto, model)
    missing = shared / "missing.jpg"
    images = list_images(shared / "images" / "faces")[: 2 * CHUNK_IMAGES + 3] + [missing]
    runs = []
    for jobs in (1, 3):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            runs.append(
                collect_statistics(
                    graph,
                    make_engine("ncnn", graph, proto, model),
                    images,
                    spec.prep,
                    {"caffemodel_sha256": "x"},
                    batch_size=2,
                    jobs=jobs,
                )
            )
        assert [r.getMessage() for r in caplog.records].count(f"skipping {missing}: no such file") == 1, jobs
    one, two = runs
    assert workers_start_at_once == [2]
    assert one.images_used == two.images_used == 2 * CHUNK_IMAGES + 3
    assert one.images_skipped == two.images_skipped == 1
    assert set(one.histograms) == set(two.histograms)
    for value, hist in one.histograms.items():
        other = two.histograms[value]
        np.testing.assert_array_equal(other.counts, hist.counts, err_msg=value)
        assert (other.count, other.zeros, other.min, other.max, other.exponent) == (
            hist.count,
            hist.zeros,
            hist.min,
            hist.max,
            hist.exponent,
        ), value
        assert other.abs_sum == hist.abs_sum, value  # chunks merge in the same order whatever --jobs


@pytest.mark.real_models
def test_packed_values_give_the_same_statistics(shared):
    """Calibration reads ncnn's blobs in their packed layout (no unpacking copy): the same histograms, extremes and
    zero counts as the unpacked values, on a model whose blobs ncnn really packs."""
    spec = MODELS["ultraface"]
    proto, model = spec.paths(shared)
    graph = load_graph(proto, model)
    reader = make_engine("ncnn", graph, proto, model).reader(calibration_values(graph))
    batch, _ = next(iter_batches(list_images(shared / "images" / "faces")[:1], spec.prep, 1, ImageTally()))
    runner = reader.load()
    ex = runner._extractor({reader.input: batch[0]}, light=False)
    assert sum(runner._extract(ex, blob, packed=True).elempack > 1 for blob in reader.order) > len(reader.order) // 2
    packed, unpacked = CalibrationStatistics({}, {}), CalibrationStatistics({}, {})
    packed.update(reader.forward(batch, packed=True))
    unpacked.update(reader.forward(batch))
    assert set(packed.histograms) == set(unpacked.histograms)
    for value, hist in unpacked.histograms.items():
        other = packed.histograms[value]
        np.testing.assert_array_equal(other.counts, hist.counts, err_msg=value)
        assert (other.count, other.zeros, other.min, other.max) == (hist.count, hist.zeros, hist.min, hist.max), value
        assert other.abs_sum == pytest.approx(hist.abs_sum, rel=1e-12), value


class _FailingEngine:
    name = "failing"

    def __init__(self, after: int) -> None:
        self.calls, self.after = 0, after

    def forward(self, batch, values):
        self.calls += 1
        if self.calls > self.after:
            raise ModelError("forward failed on purpose")
        return {"data": batch}


def _png_images(folder, count: int) -> list:
    import cv2

    for i in range(count):
        cv2.imwrite(str(folder / f"{i:02d}.png"), np.full((8, 8, 3), i, np.uint8))
    return list_images(folder)


def test_a_failing_worker_surfaces_its_error(tmp_path):
    """Many batches queued and the forward failing on the second: the error reaches the caller, nothing hangs."""
    graph = type("G", (), {"inputs": {"data": (1, 3, 8, 8)}})()
    images = _png_images(tmp_path, 12)
    with pytest.raises(ModelError, match="on purpose"):
        collect_statistics(
            graph, _FailingEngine(after=1), images, Preprocess(size=(8, 8)), {}, values=["data"], batch_size=1
        )
    # --jobs 2 with an engine that has no worker processes runs in one process
    stats = collect_statistics(
        graph, _FailingEngine(after=100), images, Preprocess(size=(8, 8)), {}, values=["data"], batch_size=5, jobs=2
    )
    assert isinstance(stats, CalibrationStatistics) and stats.images_used == 12
    assert stats.histograms["data"].count == 12 * 3 * 8 * 8


OVERFLOW = """
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 2 kernel_size: 3 } }
"""


def test_a_failing_worker_process_surfaces_its_error(tmp_path, workers_start_at_once):
    """conv1 overflows to Inf on the images of value 10 and more, beyond the first chunk: the histogram's error,
    raised in a worker process, reaches the caller with the value's name."""
    f = np.float32
    weights = {  # 27 * 1.3e36 * 9 < 3.4e38 (float32's largest) < 27 * 1.3e36 * 10
        "conv1": [np.full((2, 3, 3, 3), 1.3e36, f), np.zeros(2, f)],
        "conv2": [np.ones((2, 2, 3, 3), f), np.zeros(2, f)],
    }
    proto, model = write_caffe_model(tmp_path / "model", OVERFLOW, weights)
    graph = load_graph(proto, model)
    images = _png_images(tmp_path, 3 * CHUNK_IMAGES)
    with pytest.raises(Int8ConvError, match=r"value 'conv1': the FP32 forward produced NaN or Inf"):
        collect_statistics(graph, NcnnEngine(graph), images, Preprocess(size=(8, 8)), {}, jobs=2)
    assert workers_start_at_once == [1]
