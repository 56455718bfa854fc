"""Shared models exported to ONNX once per session, with their inputs: what the ONNX and TensorRT tests share."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from int8conv.caffe.graph import load_graph
from int8conv.calibration.calibrate import all_values
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.calibration.preprocess import list_images, read_image
from int8conv.engines.opencv_engine import OpenCVEngine
from int8conv.tensorrt.onnx_export import export_onnx
from int8conv.tensorrt.ranges import tensor_ranges, value_ranges
from int8conv.zoo import MODELS as SHARED_MODELS

#: key: the shared model and the image pool its inputs come from (lenet: digit cells, see ``digits``)
MODELS = {
    "lenet": ("lenet", "digits"),
    "det1": ("det1", "faces"),
    "det2": ("det2", "faces"),
    "det3": ("det3", "faces"),
    "det4": ("det4", "faces"),
    "nsfw": ("open_nsfw", "imagenet_samples_200"),
    "res10": ("res10", "faces"),
    "ultraface": ("ultraface", "faces"),
    "yunet": ("yufacedetectnet", "faces"),
}
CALIBRATION = slice(0, 8)  # images that calibrate
HELD_OUT = slice(8, 14)  # images that judge


def session(model: onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def model_paths(shared: Path, key: str) -> tuple[Path, Path]:
    return SHARED_MODELS[MODELS[key][0]].paths(shared)


def digits(shared: Path, which: slice) -> list[np.ndarray]:
    """MNIST-style inputs: 20x20 cells of OpenCV's digits.png padded to 28x28, /256 (lenet's SOURCE.txt)."""
    sheet = cv2.imread(str(shared / "images" / "opencv_samples" / "digits.png"), cv2.IMREAD_GRAYSCALE)
    cells = [sheet[r * 20 : (r + 1) * 20, c * 20 : (c + 1) * 20] for r in range(0, 50, 5) for c in range(0, 100, 37)]
    return [np.pad(cell, 4).astype(np.float32)[None, None] / 256 for cell in cells[which]]


def inputs(shared: Path, key: str, which: slice) -> list[np.ndarray]:
    """Preprocessed 1xCxHxW inputs from the model's image pool."""
    name, pool = MODELS[key]
    prep = SHARED_MODELS[name].prep
    if pool == "digits":
        return digits(shared, which)
    paths = list_images(shared / "images" / pool)[which]
    images = [prep.apply(read_image(p))[None] for p in paths]
    if key == "det4":  # 15 channels: five 24x24 RGB patches
        return [np.concatenate([images[(i + k) % len(images)] for k in range(5)], axis=1) for i in range(len(images))]
    return images


class Exported:
    """One model exported once: graph, ONNX, onnxruntime session, OpenCV net."""

    def __init__(self, shared: Path, key: str) -> None:
        self.key = key
        self.proto, self.caffemodel = model_paths(shared, key)
        self.graph = load_graph(self.proto, self.caffemodel)
        self.export = export_onnx(self.graph, batch=1)
        self.session = session(self.export.model)
        self.input = next(iter(self.graph.inputs))
        self.outputs = [o for o in self.export.outputs if o not in self.export.constants]
        self._ranges: dict[str, dict[str, float]] = {}

    def opencv(self, x: np.ndarray, values: list[str]) -> list[np.ndarray]:
        net = cv2.dnn.readNetFromCaffe(str(self.proto), str(self.caffemodel))
        net.enableFusion(False)
        net.setInput(x)
        return net.forward([self.graph.producer(v).name for v in values])

    def run(self, x: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        names = names or self.export.outputs
        return dict(zip(names, self.session.run(names, {self.input: x}), strict=True))

    def ranges(self, shared: Path, method: str) -> dict[str, float]:
        """Tensor ranges from statistics of the calibration images (OpenCV engine, every value)."""
        if method not in self._ranges:
            stats = CalibrationStatistics({"model": self.key}, {})
            engine = OpenCVEngine(self.graph, self.proto, self.caffemodel)
            for x in inputs(shared, self.key, CALIBRATION):
                stats.update(engine.forward(x, all_values(self.graph)))
            self._ranges[method] = tensor_ranges(self.export, value_ranges(stats, method))
        return self._ranges[method]
