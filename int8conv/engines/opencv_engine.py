"""The embedded FP32 engine: OpenCV's DNN Caffe importer with layer fusion off, so every value is observable.

OpenCV lacks some layers of Caffe forks. The engine hands OpenCV a rewritten net where needed: the fork type
names of depthwise convolution become ``Convolution`` with one group per output channel, and ``Upsample``
(nearest neighbour, ``upsample_param { scale }``) runs as a Python layer registered with ``cv2.dnn_registerLayer``.
A type OpenCV still cannot create is a ``ModelError`` naming the layer and this engine.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from int8conv.caffe.graph import Graph
from int8conv.caffe.layers.convolution import DEPTHWISE_FORK_TYPES
from int8conv.caffe.layers.detection import state_prior_box_clip
from int8conv.caffe.reader import read_prototxt
from int8conv.errors import ModelError

log = logging.getLogger(__name__)

#: Fork type names of depthwise convolution, run as ``Convolution`` with ``group = num_output`` (layer registry).
DEPTHWISE_ALIASES = DEPTHWISE_FORK_TYPES
_CANNOT_CREATE = re.compile(r"Can't create layer \"([^\"]+)\" of type \"([^\"]+)\"")


class UpsampleLayer:
    """The Caffe forks' ``Upsample``: nearest-neighbour upsampling by an integer ``scale`` (``out[h, w] =
    in[h // scale, w // scale]``), as brocolli-caffe and darknet ports compute it."""

    def __init__(self, params: dict, blobs: list) -> None:
        self.scale = int(float(params.get("scale", 1)))
        if self.scale < 1:
            raise ValueError(f"Upsample scale must be >= 1, not {params.get('scale')}")

    def getMemoryShapes(self, inputs: list) -> list:  # OpenCV's Python layer protocol
        n, c, h, w = inputs[0]
        return [[n, c, h * self.scale, w * self.scale]]

    def forward(self, inputs: list) -> list:
        x = inputs[0]
        return [np.ascontiguousarray(x.repeat(self.scale, axis=2).repeat(self.scale, axis=3))]


def _finite(blob) -> bool:
    """Every value finite: one float64 sum instead of a boolean array per blob on the calibration path (a float64
    sum of float32 values cannot overflow, so it is finite exactly when every value is)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.isfinite(np.sum(blob, dtype=np.float64)))


#: Fork layers OpenCV lacks, run as Python layers.
PYTHON_LAYERS = {"Upsample": UpsampleLayer}


def register_python_layers(types: set[str]) -> None:
    """Register the Python layers these types need. OpenCV aborts the process on a second registration of a
    name, so each is unregistered first (a no-op when it was not registered)."""
    import cv2

    for kind in sorted(types & set(PYTHON_LAYERS)):
        cv2.dnn_unregisterLayer(kind)
        cv2.dnn_registerLayer(kind, PYTHON_LAYERS[kind])


def opencv_prototxt(prototxt: Path, graph: Graph) -> str | None:
    """The prototxt text OpenCV should read, or None when the file can be read as it is.

    Depthwise fork types become ``Convolution`` with ``group = num_output`` (their prototxts may leave
    ``group`` out); ``Upsample`` layers must have one bottom (the two-bottom unpooling variant is another layer);
    a PriorBox without ``clip`` gets SSD Caffe's default stated (OpenCV's own default clips).
    """
    for layer in graph.layers:
        if layer.type == "Upsample" and len(layer.bottoms) != 1:
            raise ModelError(
                f"{prototxt}: layer '{layer.name}' (Upsample) has {len(layer.bottoms)} bottoms; the "
                "OpenCV engine runs the nearest-neighbour Upsample of one bottom only (not unpooling)"
            )
    net = read_prototxt(prototxt)
    renamed = []
    for layer in net.layer:
        if layer.type in DEPTHWISE_ALIASES:
            renamed.append(f"{layer.name} ({layer.type})")
            layer.type = "Convolution"
            if layer.convolution_param.group <= 1:
                layer.convolution_param.group = layer.convolution_param.num_output
    stated = state_prior_box_clip(net)
    if not renamed and not stated:
        return None
    if renamed:
        log.debug("OpenCV engine: depthwise fork layers run as Convolution: %s", ", ".join(renamed))
    return text_format.MessageToString(net)


def opencv_miscomputes(graph: Graph) -> str | None:
    """A layer OpenCV's DNN loads but computes wrongly, named, or None. Measured with OpenCV 4.14 against the
    definitions: it ignores Log's base, scale and shift (log10 came out as ln) and LRN's k (k 2 gave k 1's values)."""
    for layer in graph.layers:
        if layer.type == "Log":
            p = layer.param.log_param
            if (p.base, p.scale, p.shift) != (-1.0, 1.0, 0.0):
                return f"layer '{layer.name}' (Log): OpenCV's DNN ignores its base, scale and shift"
        if layer.type == "LRN" and layer.param.lrn_param.k != 1.0:
            return f"layer '{layer.name}' (LRN): OpenCV's DNN ignores its k ({layer.param.lrn_param.k:g})"
    return None


def opencv_error(prototxt: Path | str, exc: Exception) -> ModelError:
    """A cv2.error as a ModelError; an uncreatable layer type names the layer and this engine."""
    import cv2

    found = _CANNOT_CREATE.search(str(exc))
    if found:
        return ModelError(
            f"{prototxt}: layer '{found.group(1)}' has type '{found.group(2)}', which the opencv "
            f"engine (OpenCV {cv2.__version__} DNN) does not have; try --backend caffe if pycaffe has "
            "it"
        )
    return ModelError(f"{prototxt}: OpenCV cannot run this model: {str(exc).strip()}")


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
        wrong = opencv_miscomputes(graph)
        if wrong:
            raise ModelError(f"{prototxt}: {wrong}, so the opencv engine would compute it wrongly; use --backend caffe")
        self._rewritten = opencv_prototxt(Path(prototxt), graph)
        register_python_layers({layer.type for layer in graph.layers})
        self._net = None
        self._names: dict[str, str] = {}  # Caffe layer name -> OpenCV's, for the loaded net
        self._spatial: tuple[int, ...] | None = None
        self._pins: dict[str, tuple[str, int]] = {}
        for layer in graph.layers:
            for index, top in enumerate(layer.tops):
                self._pins[top] = (layer.name, index)

    def _read_net(self):
        if self._rewritten is None:
            return self._cv2.dnn.readNetFromCaffe(self.prototxt, self.caffemodel)
        return self._cv2.dnn.readNetFromCaffe(
            np.frombuffer(self._rewritten.encode("utf-8"), np.uint8), np.fromfile(self.caffemodel, np.uint8)
        )

    def _net_for(self, shape: tuple[int, ...]):
        if self._net is None or self._spatial != shape[2:]:
            try:
                net = self._read_net()
            except self._cv2.error as exc:
                raise ModelError(f"{self.prototxt}: OpenCV cannot load this model: {exc}") from exc
            net.enableFusion(False)
            net.setPreferableBackend(self._cv2.dnn.DNN_BACKEND_OPENCV)
            net.setPreferableTarget(self._cv2.dnn.DNN_TARGET_CPU)
            self._net, self._spatial = net, shape[2:]
            self._names = self._opencv_names(net)
        return self._net

    def _opencv_names(self, net) -> dict[str, str]:
        """Caffe layer name -> OpenCV's: OpenCV 4.14's importer names a Convolution after its top (layer 'conv1'
        with top 'conv1_out' is 'conv1_out' there), so a layer not found under its own name is asked for under
        its first top."""
        known = set(net.getLayerNames())
        return {
            layer.name: layer.tops[0]
            if layer.name not in known and layer.tops and layer.tops[0] in known
            else layer.name
            for layer in self.graph.layers
        }

    def _retrieve(self, net, batch: np.ndarray, image: str, layers: list[str]) -> list:
        """``forwardAndRetrieve`` of ``layers``, run again once on a freshly loaded net when it returns a
        non-finite value.

        Measured: in about 3 fresh processes in 10, OpenCV 4.x returns a few NaN from a forward that requests every
        layer of the ShuffleNet (2 of 240 values of ``resx16_conv2``), and keeps returning them from that loaded
        net; the same model loaded again is finite. A value that stays non-finite is the model's and is reported.
        """
        outputs = self._forward_and_retrieve(net, batch, image, layers)
        bad = [name for name, blobs in zip(layers, outputs, strict=True) if not all(map(_finite, blobs))]
        if not bad:
            return outputs
        log.warning(
            "OpenCV's forward returned non-finite values for layer '%s'%s; running it again on a freshly loaded net",
            bad[0],
            f" and {len(bad) - 1} more" if len(bad) > 1 else "",
        )
        self._net = None
        return self._forward_and_retrieve(self._net_for(batch.shape), batch, image, layers)

    def _forward_and_retrieve(self, net, batch: np.ndarray, image: str, layers: list[str]) -> list:
        net.setInput(np.ascontiguousarray(batch, dtype=np.float32), image)
        try:
            return net.forwardAndRetrieve([self._names.get(name, name) for name in layers])
        except self._cv2.error as exc:
            raise opencv_error(self.prototxt, exc) from exc

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """Values produced by layers come from ``forwardAndRetrieve``; network inputs are returned as given."""
        image = self.graph.image_input(self.name)
        net = self._net_for(batch.shape)
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
            by_layer.update(zip(group, self._retrieve(net, batch, image, group), strict=True))
        for value in values:
            if value in self._pins:
                layer, index = self._pins[value]
                result[value] = np.asarray(by_layer[layer][index])
        return result
