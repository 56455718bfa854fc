"""The embedded FP32 engine: OpenCV's DNN Caffe importer with layer fusion off, so every value is observable."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.errors import ModelError


class OpenCVEngine:
    """Forward with ``cv2.dnn``; a value is the output of the layer that produced it (in-place versions too).

    OpenCV keeps the PriorBox geometry of the first input size a net saw, so the net is rebuilt whenever
    the spatial size of the input changes.
    """

    name = "opencv"

    def __init__(self, graph: Graph, prototxt: Path, caffemodel: Path) -> None:
        import cv2

        self._cv2 = cv2
        self.graph = graph
        self.prototxt, self.caffemodel = str(prototxt), str(caffemodel)
        self._net = None
        self._spatial: tuple[int, ...] | None = None
        self._pins: dict[str, tuple[str, int]] = {}
        for layer in graph.layers:
            for index, top in enumerate(layer.tops):
                self._pins[top] = (layer.name, index)

    def _net_for(self, shape: tuple[int, ...]):
        if self._net is None or self._spatial != shape[2:]:
            try:
                net = self._cv2.dnn.readNetFromCaffe(self.prototxt, self.caffemodel)
            except self._cv2.error as exc:
                raise ModelError(f"{self.prototxt}: OpenCV cannot load this model: {exc}") from exc
            net.enableFusion(False)
            net.setPreferableBackend(self._cv2.dnn.DNN_BACKEND_OPENCV)
            net.setPreferableTarget(self._cv2.dnn.DNN_TARGET_CPU)
            self._net, self._spatial = net, shape[2:]
        return self._net

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """Values produced by layers come from ``forwardAndRetrieve``; network inputs are returned as given."""
        net = self._net_for(batch.shape)
        inputs = list(self.graph.inputs)
        if len(inputs) != 1:
            raise ModelError(f"network '{self.graph.name}' has {len(inputs)} inputs; calibration supports one")
        result: dict[str, np.ndarray] = {}
        wanted_layers: list[str] = []
        for value in values:
            if value in self.graph.inputs:
                result[value] = batch
            elif value in self._pins:
                if self._pins[value][0] not in wanted_layers:
                    wanted_layers.append(self._pins[value][0])
            else:
                raise ModelError(f"blob '{value}' is not produced by any layer of '{self.graph.name}'")
        if not wanted_layers:
            return result
        # OpenCV pins only the first output of each requested layer; later layers may reuse the memory of
        # the others. A layer whose second or later output is wanted therefore gets a forward of its own,
        # which stops right after it.
        multi = {self._pins[v][0] for v in values if v in self._pins and self._pins[v][1] > 0}
        single = [name for name in wanted_layers if name not in multi]
        by_layer: dict[str, list] = {}
        for group in ([single] if single else []) + [[name] for name in sorted(multi)]:
            net.setInput(np.ascontiguousarray(batch, dtype=np.float32), inputs[0])
            by_layer.update(zip(group, net.forwardAndRetrieve(group)))
        for value in values:
            if value in self._pins:
                layer, index = self._pins[value]
                result[value] = np.asarray(by_layer[layer][index])
        return result
