"""FP32 engines that return the value of any graph value for a batch of images.

``opencv`` (embedded: OpenCV's DNN Caffe importer), ``caffe`` (pycaffe, when importable) and, for calibration,
``ncnn`` (the project's own FP32 ncnn model on the ncnn runtime; see ``ncnn_engine``).
Every engine takes a preprocessed float32 NCHW batch and the graph's SSA value names, and returns
``{value: ndarray}`` with the batch dimension first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.caffe.layers import Decline, kind_of
from int8conv.engines.caffe_engine import import_caffe  # sets GLOG_minloglevel before _caffe.so loads
from int8conv.errors import BackendUnavailable, Int8ConvError, ModelError

log = logging.getLogger(__name__)

#: FP32 references (eval compares ncnn against them, so ncnn is not one of them).
BACKENDS = ("auto", "opencv", "caffe")
#: Engines that can feed calibration.
CALIBRATION_BACKENDS = ("auto", "ncnn", "opencv", "caffe")


class Engine(Protocol):
    """What the calibrator needs from an FP32 forward pass."""

    name: str

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the batch and return the requested values."""


def caffe_importable() -> bool:
    """True when ``import caffe`` (pycaffe) works in this environment."""
    try:
        import_caffe()
    except BackendUnavailable:
        return False
    return True


def caffe_obstacle(prototxt: str | Path, gpu: bool = False) -> str | None:
    """Why pycaffe cannot run this model (naming the layer), or None when it can.

    pycaffe aborts the whole process (a glog CHECK) on a layer type its registry lacks and on a prototxt its
    schema cannot read, so the prototxt is checked first with pycaffe's own schema, fork type names as spelled.
    The caffemodel needs no check: the caffe engine hands pycaffe its weights only (``reader.weights_only``).
    A registered type the registry declines for pycaffe (PSROIPooling: no CPU forward) is an obstacle unless ``gpu``.
    """
    from google.protobuf import text_format

    caffe = import_caffe()
    from caffe.proto import caffe_pb2

    net = caffe_pb2.NetParameter()
    try:
        text_format.Parse(Path(prototxt).read_text(encoding="utf-8", errors="replace"), net)
    except text_format.ParseError as exc:
        return f"{prototxt}:{exc} (pycaffe's schema)"
    known = set(caffe.layer_type_list())
    missing = [layer for layer in net.layer if layer.type not in known]
    if missing:
        more = f" (nor {len(missing) - 1} more layers)" if len(missing) > 1 else ""
        return (
            f"{prototxt}: layer '{missing[0].name}' has type '{missing[0].type}', which pycaffe's layer "
            f"registry does not have{more}"
        )
    for layer in [] if gpu else net.layer:  # registered, yet it aborts the process on the CPU (PSROIPooling)
        kind = kind_of(layer.type)
        if kind is not None and isinstance(kind.caffe, Decline):
            return f"{prototxt}: layer '{layer.name}' has type '{layer.type}': {kind.caffe.reason}"
    return None


def _auto_calibration_engine(graph: Graph, values: Sequence[str] | None) -> Engine | None:
    """ncnn, the engine with the least CPU time per image (benchmarks/bench_calibrate.py), unless it cannot
    convert the model or observe a requested value; None then."""
    from int8conv.calibration.calibrate import calibration_values
    from int8conv.engines.ncnn_engine import NcnnEngine

    try:
        engine = NcnnEngine(graph)
        engine.blob_names(values if values is not None else calibration_values(graph))
    except ModelError as exc:
        log.info("backend auto: not ncnn, since %s", exc)
        return None
    return engine


def make_engine(
    backend: str,
    graph: Graph,
    prototxt: str | Path,
    caffemodel: str | Path,
    gpu: int | None = None,
    calibration: bool = False,
    values: Sequence[str] | None = None,
) -> Engine:
    """Pick the FP32 engine. ``auto`` for an FP32 reference prefers pycaffe when importable and it has every layer
    type, else OpenCV; for ``calibration`` (``values``: what it will ask for) it is pycaffe with ``gpu``, else
    ncnn, else OpenCV."""
    if backend == "auto" and calibration and gpu is None:
        engine = _auto_calibration_engine(graph, values)
        if engine is not None:
            log.info("backend auto: calibrating with ncnn")
            return engine
        backend = "opencv"
    if backend == "ncnn":
        if gpu is not None:
            raise BackendUnavailable("--gpu needs the pycaffe backend (--backend caffe); ncnn runs on the CPU")
        from int8conv.engines.ncnn_engine import NcnnEngine

        return NcnnEngine(graph)
    if backend not in BACKENDS:
        raise Int8ConvError(f"--backend must be one of {', '.join(CALIBRATION_BACKENDS)}, not '{backend}'")
    obstacle = caffe_obstacle(prototxt, gpu is not None) if backend != "opencv" and caffe_importable() else None
    if backend == "auto":
        if not caffe_importable():
            backend, why = "opencv", "OpenCV DNN (pycaffe not importable)"
        elif obstacle and gpu is None:
            backend, why = "opencv", f"OpenCV DNN, since pycaffe cannot run it: {obstacle}"
        else:
            backend, why = "caffe", "pycaffe"
        log.info("backend auto: using %s", why)
    if backend == "caffe":
        if obstacle:
            raise ModelError(f"the caffe engine cannot run this model: {obstacle}; use --backend opencv")
        from int8conv.engines.caffe_engine import CaffeEngine

        return CaffeEngine(graph, Path(prototxt), Path(caffemodel), gpu=gpu)
    if gpu is not None:
        raise BackendUnavailable("--gpu needs the pycaffe backend (--backend caffe); the OpenCV engine runs on the CPU")
    from int8conv.engines.opencv_engine import OpenCVEngine

    return OpenCVEngine(graph, Path(prototxt), Path(caffemodel))
