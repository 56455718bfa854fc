"""Shape hints: the ``-23330=`` parameter ``ncnnoptimize`` writes on every layer with the shapes of its tops.

ncnn reads them in ``Net::load_param`` (param id 30: per top ``dims,w,h,c``) into the layers' ``bottom_shapes``
and ``top_shapes`` before ``create_pipeline``, where kernels are chosen and weights pre-transformed for the real
input size instead of a guess (yufacedetectnet FP32: ~5-14% faster at one thread). Without them the runtime
still computes the same network, so hints never change what a model means; they may change which kernel runs
and therefore the last float bits.

The shapes come from the ncnn runtime itself, as ``ncnnoptimize``'s ``shape_inference`` gets them: one forward
of a zero input with every blob extracted. Shapes do not depend on the weights, so the net is loaded with zero
weights (ncnn's ``DataReaderFromEmpty``, as ``benchncnn`` does): no ``.bin`` is serialized, written or read, and
every core runs the one forward. Layers whose output size depends on the data (DetectionOutput) and 4-D Mats (the
hint format holds at most 3 dimensions) get no hint, as in ``ncnnoptimize``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
from pathlib import Path

import numpy as np

from int8conv.errors import Int8ConvError
from int8conv.ncnn.model import SHAPE_HINTS, NcnnModel, param_text

log = logging.getLogger(__name__)

#: Layers whose top shape depends on the input values.
DATA_DEPENDENT = {"DetectionOutput", "YoloDetectionOutput", "Yolov3DetectionOutput"}


def has_shape_hints(model: NcnnModel) -> bool:
    return any(SHAPE_HINTS in layer.params for layer in model.layers)


def without_shape_hints(model: NcnnModel) -> NcnnModel:
    """A copy of ``model`` with every hint removed (what the converter wrote before hints); the weight arrays are
    shared, not copied."""
    result = copy.copy(model)
    result.layers = [
        dataclasses.replace(
            layer,
            bottoms=list(layer.bottoms),
            tops=list(layer.tops),
            params={k: v for k, v in layer.params.items() if k != SHAPE_HINTS},
            weights=list(layer.weights),
        )
        for layer in model.layers
    ]
    return result


def _input_array(params: dict) -> np.ndarray:
    """A zero input of the shape an ``Input`` layer declares (0=w 1=h 2=c, 11=d)."""
    dims = [int(params.get(k, 0)) for k in (2, 11, 1, 0)]
    return np.zeros([d for d in dims if d > 0], np.float32)


def add_shape_hints(model: NcnnModel) -> NcnnModel:
    """Give every layer of the FP32 ``model`` (in place) the hint ncnnoptimize would write; returns ``model``.

    A model the runtime cannot run with a zero input (an Input layer without a shape, a layer ncnn rejects)
    keeps no hints, with a warning: hints only speed ncnn up, the files are right without them.
    """
    from int8conv.ncnn.runtime import NcnnRunner, available_cores

    inputs = {layer.tops[0]: _input_array(layer.params) for layer in model.layers if layer.type == "Input"}
    if not inputs or any(array.ndim == 0 for array in inputs.values()):
        log.warning("no shape hints: an Input layer declares no shape")
        return model
    plain = without_shape_hints(model)
    with tempfile.TemporaryDirectory(prefix="int8conv-shapes-") as tmp:
        param = Path(tmp) / "model.param"
        param.write_text(param_text(plain), encoding="utf-8")
        try:
            runner = NcnnRunner(param, None, int8=False, threads=available_cores())  # one forward: every core
            shapes = runner.shapes(inputs, plain.blob_names)
        except Int8ConvError as exc:
            log.warning("no shape hints: the ncnn runtime cannot run this model on a zero input (%s)", exc)
            return model
    for layer in model.layers:
        layer.params.pop(SHAPE_HINTS, None)
        tops = [shapes.get(top) for top in layer.tops]
        if layer.type in DATA_DEPENDENT or any(s is None or not 1 <= s[0] <= 3 for s in tops):
            continue
        layer.params[SHAPE_HINTS] = [int(v) for s in tops for v in s]
    log.debug(
        "shape hints on %d of %d layers", sum(SHAPE_HINTS in layer.params for layer in model.layers), len(model.layers)
    )
    return model
