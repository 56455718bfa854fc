"""The ncnn FP32 engine: calibration forwards through the project's own FP32 ncnn model of the graph.

The model is converted in memory (``ncnn.convert``: the file ``int8conv convert`` writes, shape hints included)
and loaded from a temporary folder. Its blob names are the IR's values (caffe2ncnn's names), so a calibrated value
is extracted under its own name. What the converter removes is handled here:

- Dropout and Caffe Split are identities: a value they hide is read under the name of its identical neighbour;
- a BatchNorm/Scale folded into a convolution, or an activation fused into one, hides that convolution's
  pre-activation output. No INT8 layer reads such a value (the fusion requires it to have one reader, the
  folded or fused layer), so calibration never asks for one; a caller who does (TensorRT's ranges of every
  value) gets an error that names them, and ``--backend auto`` uses OpenCV for it instead.

ncnn runs one image at a time and releases the GIL while it computes, so ``replica()`` engines on the same
files run in parallel threads (``--jobs``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.caffe.shapes import infer_shapes
from int8conv.errors import ModelError

log = logging.getLogger(__name__)


def _identity(layer) -> bool:
    """A Caffe layer the converter removes because it passes its bottom through unchanged."""
    if layer.type == "Split":
        return True
    p = layer.param.dropout_param
    return layer.type == "Dropout" and not (p.HasField("scale_train") and not p.scale_train)


def _equal_values(graph: Graph) -> dict[str, list[str]]:
    """Every value -> the values that hold the same numbers through identity layers (itself first)."""
    groups: dict[str, list[str]] = {}
    for layer in graph.layers:
        if _identity(layer) and len(layer.bottoms) == 1:
            group = groups.setdefault(layer.bottoms[0], [layer.bottoms[0]])
            for top in layer.tops:
                group.append(top)
                groups[top] = group
    return groups


class _Network:
    """One converted and written FP32 ncnn model for one input size, and its blob -> value map."""

    def __init__(self, graph: Graph) -> None:
        from int8conv.ncnn.convert import convert_graph
        from int8conv.ncnn.model import bin_bytes, param_text

        model = convert_graph(graph)
        self.folder = tempfile.TemporaryDirectory(prefix="int8conv-ncnn-engine-")
        self.param, self.bin = Path(self.folder.name) / "fp32.param", Path(self.folder.name) / "fp32.bin"
        self.param.write_text(param_text(model), encoding="utf-8")
        self.bin.write_bytes(bin_bytes(model))
        self.order = {blob: i for i, blob in enumerate(model.blob_names)}  # first appearance = execution order
        self.blobs = set(self.order)
        self.input = model.input_names[0]
        self.equal = _equal_values(graph)
        self.shapes = graph.shapes


class NcnnEngine:
    """Forward with the ncnn runtime on the project's FP32 ncnn model; see the module doc for hidden values."""

    name = "ncnn"
    #: ncnn computes one image at a time: fed so, its values never grow with the batch size
    images_per_forward = 1

    def __init__(self, graph: Graph, threads: int = 1) -> None:
        graph.image_input(self.name)
        self.graph, self.threads = graph, threads
        self._networks: dict[tuple[int, ...], _Network] = {}
        self._converting = threading.Lock()  # replicas share the networks: convert each size once
        self._runners: dict[tuple[int, ...], object] = {}

    def replica(self) -> NcnnEngine:
        """Another engine on the same converted files (no second conversion), for a parallel worker."""
        engine = NcnnEngine(self.graph, self.threads)
        engine._networks, engine._converting = self._networks, self._converting
        return engine

    def _network(self, chw: tuple[int, ...]) -> _Network:
        """The network for inputs of shape ``chw``; another input size is converted again (shapes change)."""
        with self._converting:
            if chw not in self._networks:
                name, shape = next(iter(self.graph.inputs.items()))
                graph = self.graph
                if tuple(shape[1:]) != chw:
                    graph = dataclasses.replace(self.graph, inputs={name: (1, *chw)})
                    graph.shapes = infer_shapes(graph)
                self._networks[chw] = _Network(graph)
            return self._networks[chw]

    def blob_names(self, values: Sequence[str], chw: tuple[int, ...] | None = None) -> dict[str, str]:
        """Value -> the ncnn blob that holds it; values ncnn fuses away are an error naming them."""
        chw = chw or tuple(next(iter(self.graph.inputs.values()))[1:])
        network = self._network(chw)
        found, hidden = {}, []
        for value in values:
            blob = next((v for v in network.equal.get(value, [value]) if v in network.blobs), None)
            if blob is None:
                hidden.append(value)
            else:
                found[value] = blob
        if hidden:
            raise ModelError(
                f"the ncnn engine cannot observe {len(hidden)} value(s) of '{self.graph.name}' that "
                f"the ncnn model fuses into a convolution ({', '.join(hidden[:5])}"
                f"{' ...' if len(hidden) > 5 else ''}); use --backend opencv or caffe"
            )
        return found

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """Run each image of the batch; values come back with the batch axis first, in Caffe's shapes."""
        from int8conv.ncnn.runtime import NcnnRunner

        chw = tuple(int(d) for d in batch.shape[1:])
        names = self.blob_names(values, chw)
        network = self._network(chw)
        runner = self._runners.get(chw)
        if runner is None:
            runner = self._runners[chw] = NcnnRunner(network.param, network.bin, int8=False, threads=self.threads)
        # in execution order, so ncnn's light mode frees every other blob as soon as it is consumed
        wanted = sorted(set(names.values()) - {network.input}, key=network.order.__getitem__)
        per_image = [runner.extract({network.input: image}, wanted, light=True) for image in batch]
        result: dict[str, np.ndarray] = {}
        for value, blob in names.items():
            if blob == network.input:
                result[value] = batch
                continue
            # one image (how the calibration loop feeds ncnn): a view with the batch axis, not a copy
            stacked = per_image[0][blob][None] if len(per_image) == 1 else np.stack([o[blob] for o in per_image])
            shape = network.shapes.get(value)
            # ncnn drops the unit axes of a global pooling output (a 1-D Mat); Caffe keeps (N, C, 1, 1)
            if shape is not None and int(np.prod(shape[1:])) == stacked[0].size:
                stacked = stacked.reshape((len(batch), *shape[1:]))
            result[value] = stacked
        return result
