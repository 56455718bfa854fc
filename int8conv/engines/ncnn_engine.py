"""The ncnn FP32 engine: calibration forwards through the project's own FP32 ncnn model of the graph.

The model is converted in memory (``ncnn.convert``: the file ``int8conv convert`` writes, shape hints included)
and loaded from a temporary folder. Its blob names are the IR's values (caffe2ncnn's names), so a calibrated value
is extracted under its own name. What the converter removes is handled here:

- Dropout and Caffe Split are identities: a value they hide is read under the name of its identical neighbour;
- a BatchNorm/Scale folded into a convolution, or an activation fused into one, hides that convolution's
  pre-activation output. No INT8 layer reads such a value (the fusion requires it to have one reader, the
  folded or fused layer), so calibration never asks for one; a caller who does (TensorRT's ranges of every
  value) gets an error that names them, and ``--backend auto`` uses OpenCV for it instead.

ncnn runs one image at a time. The PyPI binding holds the GIL while ncnn computes, so parallel workers are
processes (``calibration.workers``), each handed a picklable ``reader()`` that opens the same files.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from int8conv.caffe.graph import Graph
from int8conv.caffe.shapes import infer_shapes
from int8conv.errors import ModelError
from int8conv.ncnn.runtime import ValueReader

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

    def __init__(self, graph: Graph, threads: int = 1) -> None:
        graph.image_input(self.name)
        self.graph, self.threads = graph, threads
        self._networks: dict[tuple[int, ...], _Network] = {}
        self._readers: dict[tuple, ValueReader] = {}

    def _network(self, chw: tuple[int, ...]) -> _Network:
        """The network for inputs of shape ``chw``; another input size is converted again (shapes change)."""
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

    def reader(self, values: Sequence[str], chw: tuple[int, ...] | None = None) -> ValueReader:
        """What a forward of ``values`` on inputs of shape ``chw`` needs, picklable for a worker process."""
        chw = chw or tuple(next(iter(self.graph.inputs.values()))[1:])
        key = (chw, tuple(values))
        reader = self._readers.get(key)
        if reader is None:
            names = self.blob_names(values, chw)
            network = self._network(chw)
            reader = self._readers[key] = ValueReader(
                network.param,
                network.bin,
                network.input,
                names,
                sorted(set(names.values()) - {network.input}, key=network.order.__getitem__),
                {value: network.shapes[value] for value in names if value in network.shapes},
                self.threads,
                owner=network.folder,
            )
        return reader

    def forward(self, batch: np.ndarray, values: Sequence[str]) -> dict[str, np.ndarray]:
        """Run each image of the batch; values come back with the batch axis first, in Caffe's shapes."""
        return self.reader(values, tuple(int(d) for d in batch.shape[1:])).forward(batch)
