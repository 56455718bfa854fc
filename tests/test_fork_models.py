"""The shared models with Caffe-fork layers on the FP32 side: the OpenCV engine runs them, agrees
with pycaffe, reproduces the results each SOURCE.txt verified, calibrates them, and the host decoders and task
metrics measure what they claim.

RetinaFace (Deconvolution, Crop), yoloface-500k (Upsample, two-bottom Scale), the ShuffleNet driver-action
classifier (ShuffleChannel, ConvolutionDepthwise) and the MobileNet-YOLOv3-lite lane net (DepthwiseConvolution,
Deconvolution, Sigmoid).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from int8conv.caffe.fold import fold_batchnorm_scale
from int8conv.caffe.graph import Graph, load_graph
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.calibration.weight_scales import quantizable_layers
from int8conv.cli import main as int8conv_main
from int8conv.engines import make_engine
from int8conv.engines.caffe_engine import CaffeEngine
from int8conv.errors import ModelError
from int8conv.evaluation.detection import Detections, iou_matrix
from int8conv.evaluation.evaluate import TaskMetric, map_iou, output_view, update_metric
from int8conv.evaluation.host_decoders import decode_retinaface, decode_yolo, retinaface_outputs, yoloface_heads
from int8conv.evaluation.metrics import cosine
from int8conv.tables.ncnn_table import read_ncnn_table
from int8conv.zoo import FORK_MODELS, MODELS, cli_flags
from tests.conftest import calibrate_args, eval_args
from tests.pycaffe_twin import write_twin
from tests.synthetic import write_caffe_model

MULTIPLE_FACES = "bobmtcnn_multiple-faces.jpg"
ROAD = "voc_000456.jpg"


def fork_graph(shared: Path, key: str) -> tuple[Graph, Path, Path]:
    """The model's graph and files."""
    proto, model = MODELS[key].paths(shared)
    return load_graph(proto, model), proto, model


class Forward:
    """One model on the OpenCV engine: network outputs of one image, without the batch axis."""

    def __init__(self, shared: Path, key: str) -> None:
        self.graph, self.proto, self.caffemodel = fork_graph(shared, key)
        self.prep = MODELS[key].prep
        self.engine = make_engine("opencv", self.graph, self.proto, self.caffemodel)

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.engine.forward(self.prep.apply(image)[None], self.graph.outputs)
        return {name: value[0] for name, value in outputs.items()}


@pytest.fixture(scope="module")
def forwards(shared):
    cache: dict[str, Forward] = {}

    def get(key: str) -> Forward:
        if key not in cache:
            cache[key] = Forward(shared, key)
        return cache[key]

    return get


def _image(shared: Path, folder: str, name: str) -> np.ndarray:
    return read_image(shared / "images" / folder / name)


def _retinaface(forwards, image: np.ndarray) -> Detections:
    height, width = MODELS["retinaface"].prep.size
    return decode_retinaface(forwards("retinaface")(image), width, height)


def _in_image(found: Detections, prep, image: np.ndarray) -> np.ndarray:
    """Input-normalized boxes -> image-normalized (undoing the letterbox)."""
    fx, fy = prep.content_fraction(image.shape)
    return found.boxes / np.asarray([fx, fy, fx, fy])


# ---------------------------------------------------------------- the OpenCV engine against pycaffe


@pytest.mark.pycaffe
@pytest.mark.parametrize("key", FORK_MODELS)
def test_opencv_engine_matches_pycaffe(shared, caffe, key, tmp_path):
    """Every value (in-place versions included), on two real images, against pycaffe running a twin of the net
    spelled with BVLC layers (tests/pycaffe_twin.py). Measured: max relative difference 1e-6 to 8e-6."""
    graph, proto, model = fork_graph(shared, key)
    prep = MODELS[key].prep
    batch = np.stack([prep.apply(_image(shared, "faces", name)) for name in (MULTIPLE_FACES, "dlib_bald_guys.jpg")])
    opencv = make_engine("opencv", graph, proto, model)
    values = [top for layer in graph.layers for top in layer.tops]
    bottoms = [layer.bottoms[0] for layer in graph.layers if layer.type == "ShuffleChannel"]
    shapes = {graph.blob_of(v): a.shape for v, a in opencv.forward(batch[:1], bottoms).items()} if bottoms else {}
    twin = CaffeEngine(graph, *write_twin(caffe, proto, model, tmp_path, shapes))
    got, want = opencv.forward(batch, values), twin.forward(batch, values)
    for value in values:
        peak = float(np.abs(want[value]).max())
        assert got[value].shape == want[value].shape, value
        assert float(np.abs(got[value] - want[value]).max()) <= 1e-4 * max(peak, 1.0), value


@pytest.mark.pycaffe
@pytest.mark.parametrize("key", ["retinaface", "yoloface"])
def test_runs_on_pycaffe_itself(shared, caffe, key):
    """pycaffe has Deconvolution and Crop, and brocolli-caffe's Upsample: --backend caffe runs RetinaFace's and
    yoloface's own files (yoloface's caffemodel through its weights only), and agrees."""
    graph, proto, model = fork_graph(shared, key)
    x = MODELS[key].prep.apply(_image(shared, "faces", MULTIPLE_FACES))[None]
    got = make_engine("opencv", graph, proto, model).forward(x, graph.outputs)
    want = make_engine("caffe", graph, proto, model).forward(x, graph.outputs)
    for name in graph.outputs:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.pycaffe
@pytest.mark.parametrize(
    "key, reason",
    [
        ("lane", "layer 'conv1/dw' has type 'DepthwiseConvolution'"),
        ("shufflenet_driver", 'no field named "shuffle_channel_param"'),
    ],
)
def test_pycaffe_is_refused_before_it_aborts(shared, caffe, key, reason):
    """pycaffe aborts the process on these files; the caffe engine names the layer instead, and auto picks OpenCV."""
    graph, proto, model = fork_graph(shared, key)
    with pytest.raises(ModelError, match=re.escape(reason)):
        make_engine("caffe", graph, proto, model)
    assert make_engine("auto", graph, proto, model).name == "opencv"


UNKNOWN_NET = """
name: "unknown"
input: "data"
input_shape { dim: 1 dim: 3 dim: 4 dim: 4 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 2 kernel_size: 1 } }
layer { name: "odd" type: "NoSuchLayer" bottom: "conv" top: "odd" }
layer { name: "head" type: "Convolution" bottom: "odd" top: "head" convolution_param { num_output: 2 kernel_size: 1 } }
"""


@pytest.mark.parametrize(
    "backend, engine",
    [("opencv", "which the opencv engine"), ("caffe", "which pycaffe's layer registry does not have")],
)
def test_unknown_layer_type_is_a_clear_calibrate_error(tmp_path, capsys, backend, engine):
    """Exit 2 with the layer, its type and the engine that lacks it: no raw cv2.error, no pycaffe abort."""
    import cv2

    if backend == "caffe":
        from int8conv.engines import caffe_importable

        if not caffe_importable():
            pytest.skip("pycaffe is not importable")
    rng = np.random.default_rng(3)
    weights = {
        "conv": [rng.normal(size=(2, 3, 1, 1)).astype(np.float32), np.zeros(2, np.float32)],
        "head": [rng.normal(size=(2, 2, 1, 1)).astype(np.float32), np.zeros(2, np.float32)],
    }
    proto, model = write_caffe_model(tmp_path, UNKNOWN_NET, weights)
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8))
    code = int8conv_main(calibrate_args(proto, model, tmp_path / "images", tmp_path / "t.table", "--backend", backend))
    assert code == 2
    assert f"layer 'odd' has type 'NoSuchLayer', {engine}" in capsys.readouterr().err
    assert not (tmp_path / "t.table").exists()


# ---------------------------------------------------------------- what each SOURCE.txt verified, decoded here


def test_retinaface_finds_the_18_faces_with_ordered_landmarks(shared, forwards):
    found = _retinaface(forwards, _image(shared, "faces", MULTIPLE_FACES))
    assert len(found) == 18
    assert found.scores.min() >= 0.8
    for box, points in zip(found.boxes, found.landmarks, strict=True):
        assert np.all((points >= box[:2] - 0.01) & (points <= box[2:] + 0.01))  # inside the box
        left_eye, right_eye, nose, mouth_left, mouth_right = points
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]  # left before right
        assert max(left_eye[1], right_eye[1]) < nose[1] < max(mouth_left[1], mouth_right[1])  # eyes, nose, mouth


@pytest.mark.parametrize(
    "folder, name",
    [
        ("voc_coco_detection", "darknet_dog.jpg"),
        ("faces", "dlib_dogs.jpg"),
        ("voc_coco_detection", "caffe_cat.jpg"),
        ("skimage", "chelsea.png"),
        ("skimage", "brick.png"),
        ("skimage", "coins.png"),
    ],
)
def test_retinaface_finds_nothing_on_animals_bricks_and_coins(shared, forwards, folder, name):
    assert len(_retinaface(forwards, _image(shared, folder, name))) == 0


def test_yoloface_finds_the_faces_retinaface_finds(shared, forwards):
    """SOURCE.txt: every RetinaFace face is found (IoU > 0.3), a few extra in crowds, one false positive on a dog.
    Measured here: 95 of RetinaFace's 97 faces on images/faces; the two missed are on a 2.6:1 panorama
    (libfacedetection_chloecalmon.png) that the 352x288 input squashes."""
    yolo = forwards("yoloface")
    height, width = MODELS["yoloface"].prep.size
    retina_faces = matched = extra = 0
    for path in list_images(shared / "images" / "faces"):
        image = read_image(path)
        outputs = yolo(image)
        faces = decode_yolo(outputs, yoloface_heads({n: a.shape for n, a in outputs.items()}, height), width, height)
        reference = _in_image(_retinaface(forwards, image), MODELS["retinaface"].prep, image)
        if len(reference):
            hit = iou_matrix(reference, faces.boxes).max(axis=1, initial=0.0) > 0.3
            retina_faces, matched = retina_faces + hit.size, matched + int(hit.sum())
        extra += max(0, len(faces) - len(reference))
    assert retina_faces == 97
    assert matched >= 95
    assert extra <= 12
    dogs = yolo(_image(shared, "voc_coco_detection", "darknet_dog.jpg"))
    assert len(decode_yolo(dogs, yoloface_heads({n: a.shape for n, a in dogs.items()}, height), width, height)) <= 1


def test_shufflenet_calls_most_face_crops_normal(shared, forwards):
    """SOURCE.txt: 65 of 97 tight face crops are 'normal' (class 0); here the crops are RetinaFace's boxes."""
    net = forwards("shufflenet_driver")
    classes = []
    for path in list_images(shared / "images" / "faces"):
        image = read_image(path)
        height, width = image.shape[:2]
        for x1, y1, x2, y2 in _in_image(_retinaface(forwards, image), MODELS["retinaface"].prep, image):
            crop = image[
                max(0, int(y1 * height)) : int(np.ceil(y2 * height)), max(0, int(x1 * width)) : int(np.ceil(x2 * width))
            ]
            probabilities = next(iter(net(crop).values())).reshape(-1)
            assert probabilities.size == 4 and abs(float(probabilities.sum()) - 1) < 1e-4
            classes.append(int(np.argmax(probabilities)))
    assert len(classes) == 97
    assert 55 <= classes.count(0) <= 75


def test_lane_map_traces_the_dashed_lane_on_the_road(shared, forwards):
    """The sigmoid map's pixels above 0.5 on voc_000456.jpg lie on one straight line (the dashed marking beside
    the kerb, lower right), and the road photo has at least twice the lane pixels of every other VOC/COCO photo."""
    net = forwards("lane")
    lane_map = next(iter(net(_image(shared, "voc_coco_detection", ROAD)).values()))
    assert lane_map.shape == (1, 128, 128)
    rows, cols = np.nonzero(lane_map[0] > 0.5)
    lower_right = (rows >= 64) & (cols >= 64)
    assert lower_right.sum() >= 40
    points = np.stack([cols[lower_right], rows[lower_right]], axis=1).astype(np.float64)
    _, spread, directions = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
    assert spread[1] / spread[0] < 0.1  # a line, not a blob
    assert directions[0][0] * directions[0][1] < 0  # rising to the right, as the kerb line
    others = [
        float((next(iter(net(read_image(p)).values())) > 0.5).mean())
        for p in list_images(shared / "images" / "voc_coco_detection")
        if p.name != ROAD
    ]
    assert float((lane_map > 0.5).mean()) >= 2 * max(others)


# ---------------------------------------------------------------- task metrics on OpenCV FP32 and a perturbed copy


def test_retinaface_metric_counts_a_removed_face(shared, forwards):
    """FP32 against itself: precision = recall = 1; with one face's score lowered below 0.8: recall 17/18."""
    outputs = forwards("retinaface")(_image(shared, "faces", MULTIPLE_FACES))
    height, width = MODELS["retinaface"].prep.size
    reference = decode_retinaface(outputs, width, height)
    perturbed = {k: v.copy() for k, v in outputs.items()}
    face = reference.boxes[0]
    for stride in (32, 16, 8):  # every anchor that decodes to a box overlapping the best face loses its score
        scores = perturbed[retinaface_outputs(stride)[0]]
        for anchor in range(2):
            single = {k: v.copy() for k, v in outputs.items()}
            for s in (32, 16, 8):
                single[retinaface_outputs(s)[0]][2:] = 0.0
            cell = scores[2 + anchor]
            for row, col in zip(*np.nonzero(cell >= 0.8), strict=True):
                single[retinaface_outputs(stride)[0]][2 + anchor, row, col] = cell[row, col]
                box = decode_retinaface(single, width, height, threshold=0.8, iou_threshold=1.0).boxes
                if len(box) and iou_matrix(box[:1], face[None])[0, 0] > 0.3:
                    scores[2 + anchor, row, col] = 0.0
                single[retinaface_outputs(stride)[0]][2 + anchor, row, col] = 0.0
    same, removed = TaskMetric("retinaface"), TaskMetric("retinaface")
    update_metric(same, reference, decode_retinaface(outputs, width, height), 0.5)
    update_metric(removed, reference, decode_retinaface(perturbed, width, height), 0.5)
    assert (same.matches.precision, same.matches.recall, same.matches.mean_iou) == (1.0, 1.0, 1.0)
    assert removed.matches.recall == pytest.approx(17 / 18) and removed.matches.precision == 1.0


def test_yoloface_metric_sees_doubled_boxes(shared, forwards):
    """Adding log 2 to every w/h logit doubles each box about its centre (IoU 1/4 with the original): next to
    nothing matches at IoU 0.5 (a grown box may cover a larger neighbour), while the unchanged outputs match all."""
    outputs = forwards("yoloface")(_image(shared, "faces", MULTIPLE_FACES))
    height, width = MODELS["yoloface"].prep.size
    heads = yoloface_heads({n: a.shape for n, a in outputs.items()}, height)
    doubled = {n: a.copy() for n, a in outputs.items()}
    for array in doubled.values():
        array.reshape(3, 6, *array.shape[-2:])[:, 2:4] += np.log(2.0)
    reference = decode_yolo(outputs, heads, width, height)
    same, grown = TaskMetric("yoloface"), TaskMetric("yoloface")
    update_metric(same, reference, decode_yolo(outputs, heads, width, height), 0.5)
    update_metric(grown, reference, decode_yolo(doubled, heads, width, height), 0.5)
    assert same.matches.recall == 1.0 and same.matches.precision == 1.0 and len(reference) >= 18
    assert grown.matches.candidate >= len(reference) / 2 and grown.matches.recall <= 0.1


def test_lane_map_iou_and_cosine_of_a_perturbed_map(shared, forwards):
    lane_map = next(iter(forwards("lane")(_image(shared, "voc_coco_detection", ROAD)).values()))
    on = np.flatnonzero(lane_map.reshape(-1) > 0.5)
    half = lane_map.copy().reshape(-1)
    half[on[: on.size // 2]] = 0.0  # half of the lane pixels switched off
    metric = TaskMetric("segmentation")
    update_metric(metric, lane_map.reshape(-1), lane_map.reshape(-1), 0.5)
    update_metric(metric, lane_map.reshape(-1), half, 0.5)
    assert metric.summary().map_iou_min == pytest.approx((on.size - on.size // 2) / on.size)
    assert metric.summary().map_iou == pytest.approx((1 + (on.size - on.size // 2) / on.size) / 2)
    assert map_iou(np.zeros(4), np.zeros(4)) == 1.0
    assert cosine(lane_map, half) < 1.0


def test_shufflenet_metric_top1_and_probability_difference(shared, forwards):
    probabilities = next(iter(forwards("shufflenet_driver")(_image(shared, "faces", "dlib_bald_guys.jpg")).values()))
    reference = probabilities.reshape(-1)
    swapped = reference[::-1].copy()
    metric = TaskMetric("classifier")
    update_metric(metric, reference, reference, 0.5)
    update_metric(metric, reference, swapped, 0.5)
    assert np.argmax(reference) != np.argmax(swapped)  # the second pair disagrees on the class
    assert metric.summary().top1_agreement == 0.5
    assert metric.summary().mean_abs_prob_diff == pytest.approx(np.abs(reference - swapped).mean() / 2)


def test_retinaface_output_view_drops_the_background_channels(shared, forwards):
    """The score maps' first two channels (background) are ~1 almost everywhere and would hide a lost face."""
    outputs = forwards("retinaface")(_image(shared, "faces", MULTIPLE_FACES))
    view = output_view(SimpleNamespace(output_names=list(outputs), layers=()), "retinaface")
    no_faces = {k: v.copy() for k, v in outputs.items()}
    for stride in (32, 16, 8):
        no_faces[retinaface_outputs(stride)[0]][2:] = 0.0
    assert view.cosine(outputs, outputs) == pytest.approx(1.0)
    assert view.cosine(outputs, no_faces) == 0.0


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k == "lane" else k for k in FORK_MODELS])
def test_calibrate_writes_a_sane_table(shared, key, tmp_path):
    """``int8conv calibrate`` on 8 images: a weight line for every quantizable layer of the folded graph, an
    activation scale for each whose input was not all zero, all finite and positive."""
    graph, proto, model = fork_graph(shared, key)
    folder = "voc_coco_detection" if key == "lane" else "faces"
    table = tmp_path / f"{key}.table"
    flags = ["--max-images", "8", "--backend", "opencv", *cli_flags(MODELS[key].prep)]
    code = int8conv_main(["-q", *calibrate_args(proto, model, shared / "images" / folder, table, *flags)])
    assert code == 0
    parsed = read_ncnn_table(table)
    layers = {layer.name for layer in quantizable_layers(fold_batchnorm_scale(graph))}
    assert set(parsed.weight_scales) == layers and len(layers) >= 10
    assert set(parsed.activation_scales) <= layers and len(parsed.activation_scales) >= len(layers) - 2
    for name, scales in parsed.weight_scales.items():
        assert np.all(np.isfinite(scales)) and np.all(scales >= 0) and scales.max() > 0, name
    assert all(np.isfinite(s) and s > 0 for s in parsed.activation_scales.values())


# ---------------------------------------------------------------- end to end through the CLI (needs the ncnn writers)

#: key -> (task eval must detect, image folder, the bounds INT8 must meet against ncnn FP32). Measured before the
#: ncnn writers had Crop (RetinaFace with its identity Crops removed: precision 0.983, recall 0.967 on 10 images)
#: and DepthwiseConvolution (the lane net renamed to Convolution: map IoU 0.52 mean on 8 VOC/COCO photos).
END_TO_END = {
    "retinaface": ("retinaface", "faces", {"precision": 0.9, "recall": 0.9}),
    "yoloface": ("yoloface", "faces", {"precision": 0.8, "recall": 0.8}),
    "shufflenet_driver": ("classifier", "faces", {"top1_agreement": 0.8}),
    "lane": ("segmentation", "voc_coco_detection", {"map_iou": 0.3}),
}
#: The same task metrics, ncnn FP32 against the OpenCV FP32 engine: the converter's correctness.
FP32_BOUNDS = {"precision": 0.95, "recall": 0.95, "top1_agreement": 0.95, "map_iou": 0.95}


@pytest.mark.slow
@pytest.mark.parametrize("key", FORK_MODELS)
def test_convert_calibrate_quantize_eval(shared, key, tmp_path, capsys):
    """convert -> calibrate (half the images) -> quantize -> eval (the other half): the task eval detects from the
    outputs, and INT8 agrees with FP32 on it."""
    _, proto, model = fork_graph(shared, key)
    task, folder, bounds = END_TO_END[key]
    code = int8conv_main(["-q", "convert", "--proto", str(proto), "--model", str(model), "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 0, error
    images = list_images(shared / "images" / folder)
    for name, part in (("calib.txt", images[::2]), ("eval.txt", images[1::2])):
        (tmp_path / name).write_text("\n".join(map(str, part)) + "\n", encoding="utf-8")
    flags = cli_flags(MODELS[key].prep)
    fp32 = (tmp_path / f"{model.stem}.param", tmp_path / f"{model.stem}.bin")
    int8 = (tmp_path / "int8.param", tmp_path / "int8.bin")
    table = tmp_path / "t.table"
    quantize = ["--param", str(fp32[0]), "--bin", str(fp32[1]), "--table", str(table)]
    evaluation = [
        "--backend",
        "opencv",
        "--threads",
        "1",
        "--timing-runs",
        "1",
        "--json",
        str(tmp_path / "report.json"),
    ]
    steps = [
        calibrate_args(proto, model, tmp_path / "calib.txt", table, "--backend", "opencv", *flags),
        ["quantize", *quantize, "--out-param", str(int8[0]), "--out-bin", str(int8[1])],
        eval_args(proto, model, fp32, int8, tmp_path / "eval.txt", *evaluation, *flags),
    ]
    for step in steps:
        assert int8conv_main(["-q", *step]) == 0, (step[0], capsys.readouterr().err)
    import json

    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["task"] == task
    for metric, bound in bounds.items():
        assert report["int8_vs_fp32"]["task"][metric] >= bound, (metric, report["int8_vs_fp32"]["task"])
        assert report["fp32_vs_caffe_task"][metric] >= FP32_BOUNDS[metric], report["fp32_vs_caffe_task"]
    assert all(d["max_rel"] <= 1e-3 for d in report["fp32_vs_caffe"].values()), report["fp32_vs_caffe"]
    assert 0.0 <= report["int8_vs_fp32"]["output_cosine_min"] <= report["int8_vs_fp32"]["output_cosine"] <= 1.0
