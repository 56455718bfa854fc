"""The pycaffe FP32 engine: the reference Caffe implementation, CPU or (with a CUDA build) GPU.

pycaffe keeps one buffer per Caffe blob, so after ``forward()`` an in-place chain ``conv -> bn -> relu`` only
shows its last version. To return any version (the IR value ``x_L``), the net is run in segments
(``ForwardFromTo``) and each requested blob is copied right after the layer that wrote that version.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.caffe.layers.detection import state_prior_box_clip
from int8conv.caffe.reader import read_caffemodel, weights_only
from int8conv.errors import BackendUnavailable, ModelError

log = logging.getLogger(__name__)

INSTALL_HINT = "run `int8conv install-caffe` to build it (or use --backend opencv)"
#: the hint for --gpu, which install-caffe's pycaffe cannot serve
GPU_HINT = (
    "--gpu needs a pycaffe built with CUDA, which `int8conv install-caffe` does not build (CPU-only): "
    "install one yourself, or drop --gpu to calibrate on the CPU"
)


def import_caffe(hint: str = INSTALL_HINT) -> ModuleType:
    """``import caffe`` with glog quiet; any failure becomes ``BackendUnavailable`` with the cause and ``hint``."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe
    except Exception as exc:  # noqa: BLE001 - an ImportError, or whatever a broken _caffe.so raises
        raise BackendUnavailable(f"pycaffe is not importable: {type(exc).__name__}: {exc}; {hint}") from exc
    return caffe


def caffe_has_cuda(caffe: ModuleType) -> bool:
    """Whether this pycaffe was built with CUDA (a CPU-only one aborts the process on ``set_device``).

    Builds from ``int8conv install-caffe`` record it in a JSON file beside the package; for any other
    pycaffe, the CUDA runtime among the shared libraries ``_caffe.so`` loads decides.
    """
    from int8conv.engines.caffe_build import read_build_info

    package = Path(caffe.__file__).resolve().parent
    info = read_build_info(package)
    if info is not None:
        return bool(info.get("cuda"))
    library = next(package.glob("_caffe*.so"), None)
    if library is None:
        return False
    try:
        linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return "libcudart" in linked


def _with_ssd_defaults(prototxt: Path, directory: Path) -> Path:
    """The prototxt, or a copy in ``directory`` read with pycaffe's own schema that states SSD Caffe's PriorBox
    ``clip`` default (this fork's pycaffe defaults to true, SSD's and caffe2ncnn's is false)."""
    from caffe.proto import caffe_pb2 as pycaffe_pb2
    from google.protobuf import text_format

    net = pycaffe_pb2.NetParameter()
    try:
        text_format.Parse(prototxt.read_text(encoding="utf-8"), net)
    except (text_format.ParseError, UnicodeDecodeError):
        return prototxt  # pycaffe reports it itself (caffe_obstacle checked the schema first)
    if not state_prior_box_clip(net):
        return prototxt
    stated = directory / prototxt.name
    stated.write_text(text_format.MessageToString(net), encoding="utf-8")
    return stated


class CaffeEngine:
    """Forward with pycaffe; returns any graph value, in-place intermediate versions included.

    pycaffe gets the caffemodel's weights without its layer parameters (``weights_only``): a fork's parameters in
    the caffemodel can make pycaffe abort the process while parsing it.
    """

    name = "caffe"

    def __init__(self, graph: Graph, prototxt: Path, caffemodel: Path, gpu: int | None = None) -> None:
        caffe = import_caffe(INSTALL_HINT if gpu is None else GPU_HINT)
        if gpu is not None:
            if gpu < 0:
                raise BackendUnavailable(f"--gpu must be a device number >= 0, not {gpu}")
            if not caffe_has_cuda(caffe):
                raise BackendUnavailable(
                    f"--gpu (GPU device {gpu}): this pycaffe ({caffe.__file__}) is built CPU-only "
                    "(int8conv install-caffe builds CPU-only); drop --gpu to run on the CPU"
                )
            caffe.set_mode_gpu()
            caffe.set_device(gpu)
            log.info("pycaffe on GPU %d", gpu)
        else:
            caffe.set_mode_cpu()
        self.graph = graph
        for path in (prototxt, caffemodel):
            if not Path(path).is_file():
                raise ModelError(f"{path}: no such file")
        with tempfile.TemporaryDirectory(prefix="int8conv-weights-") as tmp:
            weights = Path(tmp) / "weights.caffemodel"
            weights.write_bytes(weights_only(read_caffemodel(caffemodel)).SerializeToString())
            net_file = _with_ssd_defaults(Path(prototxt), Path(tmp))
            try:
                self._net = caffe.Net(str(net_file), caffe.TEST, weights=str(weights))
            except Exception as exc:  # noqa: BLE001 - pycaffe raises bare RuntimeError/ValueError
                raise ModelError(f"{prototxt}: pycaffe cannot load this model with {caffemodel}: {exc}") from exc
        self._layer_index = {name: i for i, name in enumerate(self._net._layer_names)}
        missing = [layer.name for layer in graph.layers if layer.name not in self._layer_index]
        if missing:
            raise ModelError(
                f"{prototxt}: pycaffe's net has no layer(s) {', '.join(missing)}; the graph and the net disagree"
            )
        self._input = graph.image_input(self.name)
        # value -> index (in pycaffe's net) of the layer that wrote it: its blob holds it right after that layer
        self._producer = {top: self._layer_index[layer.name] for layer in graph.layers for top in layer.tops}

    def _set_input(self, batch: np.ndarray) -> None:
        blob = self._net.blobs[self._input]
        if tuple(blob.data.shape) != batch.shape:
            blob.reshape(*batch.shape)
            self._net.reshape()
        blob.data[...] = batch

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """One pass over the net, paused after each layer that wrote a requested value, and stopped after the
        last one (a calibration pass never runs DetectionOutput and the like)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != len(self.graph.inputs[self._input]):
            raise ModelError(
                f"input batch has shape {batch.shape}; '{self._input}' of '{self.graph.name}' "
                f"is {self.graph.inputs[self._input]}"
            )
        result: dict[str, np.ndarray] = {}
        stops: dict[int, list[str]] = {}
        for value in values:
            if value in self.graph.inputs:
                result[value] = batch.copy()
            elif value in self._producer:
                stops.setdefault(self._producer[value], []).append(value)
            else:
                raise ModelError(f"blob '{value}' is not produced by any layer of '{self.graph.name}'")
        self._set_input(batch)
        start = 0
        for stop in sorted(stops):
            self._net._forward(start, stop)
            for value in stops[stop]:
                result[value] = self._net.blobs[self.graph.blob_of(value)].data.copy()
            start = stop + 1
        return {value: result[value] for value in values}
