"""FP32 engines that return the value of any graph value for a batch of images.

``opencv`` (default, embedded: OpenCV's DNN Caffe importer) and ``caffe`` (pycaffe, when importable).
Every engine takes a preprocessed float32 NCHW batch and the graph's SSA value names, and returns
``{value: ndarray}`` with the batch dimension first.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.errors import BackendUnavailable, Int8ConvError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "opencv", "caffe")


class Engine(Protocol):
    """What the calibrator needs from an FP32 forward pass."""

    name: str

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """Run the batch and return the requested values."""


def caffe_importable() -> bool:
    """True when ``import caffe`` (pycaffe) works in this environment."""
    from int8conv.engines.caffe_engine import import_caffe  # sets GLOG_minloglevel before _caffe.so loads

    try:
        import_caffe()
    except BackendUnavailable:
        return False
    return True


def make_engine(backend: str, graph: Graph, prototxt: str | Path, caffemodel: str | Path,
                gpu: int | None = None) -> Engine:
    """Pick the FP32 engine: ``auto`` prefers pycaffe when importable, else OpenCV."""
    if backend not in BACKENDS:
        raise Int8ConvError(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if backend == "auto":
        backend = "caffe" if caffe_importable() else "opencv"
        log.info("backend auto: using %s", "pycaffe" if backend == "caffe" else "OpenCV DNN (pycaffe not importable)")
    if backend == "caffe":
        from int8conv.engines.caffe_engine import CaffeEngine
        return CaffeEngine(graph, Path(prototxt), Path(caffemodel), gpu=gpu)
    if gpu is not None:
        raise BackendUnavailable("--gpu needs the pycaffe backend (--backend caffe); the OpenCV engine runs on the CPU")
    from int8conv.engines.opencv_engine import OpenCVEngine
    return OpenCVEngine(graph, Path(prototxt), Path(caffemodel))
