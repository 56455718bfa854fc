"""The ncnn model as plain data, and its ``.param``/``.bin`` file format.

The converter builds an ``NcnnModel``, the quantizer rewrites one, and both write it with ``write_model``.
``read_model`` reads any model the writer produces (and ncnn's own FP32/INT8 models of the layers listed in
``WEIGHT_LAYOUTS``), so tests and tools can inspect what ncnn will load.

Formats (from ncnn's ``net.cpp``, ``paramdict.cpp`` and ``modelbin.cpp``):

- ``.param``: the magic ``7767517`` (the only value today's ``Net::load_param`` accepts), ``layer_count blob_count``,
  then one line per layer: ``Type Name n_bottoms n_tops bottoms... tops... id=value ...``; arrays are
  ``-(23300+id)=n,v1,...``. ncnn parses a value as float when its text holds ``.`` or ``e``, and reads at most
  15 characters of it, with at most 9 digits after the point.
- ``.bin``: the arrays of every layer in order. A weight array (``ModelBin::load(w, 0)``) starts with a 4-byte
  storage tag and is padded to 4 bytes; the others (``load(w, 1)``: biases, scales, BatchNorm data) are raw fp32.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.atomic import in_scratch, output_set, write_bytes_atomic, write_text_atomic
from int8conv.errors import ModelError
from int8conv.layer_list import LayerList

log = logging.getLogger(__name__)

#: What today's ncnn runtime requires on the first line of a .param file.
PARAM_MAGIC = 7767517
#: Storage tags of a weight array in the .bin.
TAG_FP32 = 0
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_LEGACY = 0x0002C056
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: ncnn stores array parameter ``id`` under the key ``-(ARRAY_KEY_BASE + id)``.
ARRAY_KEY_BASE = 23300
#: Param id of the shape hints (``-23330=``, see ``shape_hints``); written first, as ncnnoptimize does.
SHAPE_HINTS = 30

ParamValue = int | float | list[int] | list[float]
PathLike = str | os.PathLike


@dataclass
class NcnnBlob:
    """One array in the .bin, in order.

    ``tagged`` arrays are weights read with ncnn's storage tag (fp32, fp16 or int8, chosen by ``data.dtype``);
    untagged ones are raw fp32 (biases, INT8 scales, BatchNorm/Scale/PReLU/Normalize data).
    """

    data: np.ndarray
    tagged: bool = True


@dataclass
class NcnnLayer:
    """One line of the .param with the arrays it owns in the .bin."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, ParamValue]
    weights: list[NcnnBlob] = field(default_factory=list)


@dataclass
class NcnnModel(LayerList[NcnnLayer]):
    """Layers in execution order; blobs are named by the layers' bottoms and tops."""

    layers: list[NcnnLayer]

    def missing_layer(self, name: str) -> str:
        return f"no ncnn layer named '{name}'"

    @property
    def blob_names(self) -> list[str]:
        """Every blob, in the order ncnn numbers them (first appearance)."""
        seen: dict[str, None] = {}
        for layer in self.layers:
            for blob in layer.bottoms + layer.tops:
                seen.setdefault(blob, None)
        return list(seen)

    @property
    def input_names(self) -> list[str]:
        """Blobs fed by ``Input`` layers: the names to pass to ``Extractor.input``."""
        return [top for layer in self.layers if layer.type == "Input" for top in layer.tops]

    @property
    def output_names(self) -> list[str]:
        """Blobs no layer reads: the names to pass to ``Extractor.extract``."""
        read = {b for layer in self.layers for b in layer.bottoms}
        return [top for layer in self.layers for top in layer.tops if top not in read]


# --------------------------------------------------------------------------------------------------- .param text


def format_float(value: float) -> str:
    """The shortest text that ncnn parses back to the same float32, always with a '.' or 'e'."""
    v = np.float32(value)
    if not np.isfinite(v):
        raise ModelError(f"parameter value {value} is not finite; ncnn cannot parse it")
    text = np.format_float_positional(v, unique=True, trim="0")
    if len(text) > 15 or len(text.partition(".")[2]) > 9:
        text = np.format_float_scientific(v, unique=True, trim="0", exp_digits=2)
    return text


def _format_scalar(value: int | float | np.number) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return format_float(float(value))


def format_param(key: int, value: ParamValue) -> str:
    """``id=value`` or, for a list, ``-(23300+id)=n,v1,...`` (all elements share the first element's kind)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        as_float = any(isinstance(v, (float, np.floating)) for v in items)
        text = [format_float(float(v)) if as_float else str(int(v)) for v in items]
        return f"{-(ARRAY_KEY_BASE + key)}=" + ",".join([str(len(items))] + text)
    return f"{key}={_format_scalar(value)}"


def _check_name(kind: str, name: str, layer: str) -> None:
    if not name or any(c.isspace() for c in name) or len(name) > 255:
        raise ModelError(f"ncnn layer '{layer}': {kind} name {name!r} must be 1-255 characters without spaces")


def param_text(model: NcnnModel) -> str:
    """The .param file of ``model``."""
    lines = [str(PARAM_MAGIC), f"{len(model.layers)} {len(model.blob_names)}"]
    for layer in model.layers:
        _check_name("layer", layer.name, layer.name)
        _check_name("type", layer.type, layer.name)
        for blob in layer.bottoms + layer.tops:
            _check_name("blob", blob, layer.name)
        head = f"{layer.type:<24} {layer.name:<32} {len(layer.bottoms)} {len(layer.tops)}"
        params = sorted(layer.params.items(), key=lambda item: (item[0] != SHAPE_HINTS, item[0]))
        fields = layer.bottoms + layer.tops + [format_param(k, v) for k, v in params]
        lines.append(" ".join([head] + fields))
    return "\n".join(lines) + "\n"


def _parse_number(text: str, where: str) -> int | float:
    try:
        if "." in text or "e" in text.lower():
            value = float(np.float32(float(text))) if abs(float(text)) <= FLOAT32_MAX else math.inf
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        return int(text)
    except ValueError:
        raise ModelError(f"{where}: cannot parse parameter value {text!r} (not a finite float32 or an int)") from None


def parse_param(text: str, path: PathLike = "<param>") -> list[NcnnLayer]:
    """Layers of a .param text (without weights); errors name the file and line."""
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if len(lines) < 2 or lines[0][1].strip() != str(PARAM_MAGIC):
        raise ModelError(f"{path}:1: not an ncnn .param file (first line must be {PARAM_MAGIC})")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1][1].split())
    except ValueError:
        raise ModelError(f"{path}:{lines[1][0]}: expected 'layer_count blob_count'") from None
    layers = []
    for lineno, line in lines[2:]:
        where = f"{path}:{lineno}"
        tokens = line.split()
        try:
            kind, name, n_bottom, n_top = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
        except (IndexError, ValueError):
            raise ModelError(f"{where}: expected 'Type Name bottom_count top_count ...'") from None
        blobs = tokens[4 : 4 + n_bottom + n_top]
        if len(blobs) != n_bottom + n_top:
            raise ModelError(f"{where}: layer '{name}' lists fewer blobs than its counts")
        params: dict[int, ParamValue] = {}
        for token in tokens[4 + n_bottom + n_top :]:
            key_text, sep, value = token.partition("=")
            try:
                key = int(key_text)
            except ValueError:
                key = None
            if not sep or key is None:
                raise ModelError(f"{where}: layer '{name}': malformed parameter {token!r}")
            if key <= -ARRAY_KEY_BASE:
                count, *items = value.split(",")
                values = [_parse_number(v, where) for v in items]
                if _parse_number(count, where) != len(values):
                    raise ModelError(f"{where}: layer '{name}': array {token!r} announces {count} values")
                params[-key - ARRAY_KEY_BASE] = values
            else:
                params[key] = _parse_number(value, where)
        layers.append(NcnnLayer(kind, name, blobs[:n_bottom], blobs[n_bottom:], params))
    if len(layers) != layer_count:
        raise ModelError(f"{path}: header announces {layer_count} layers, the file has {len(layers)}")
    return layers


# --------------------------------------------------------------------------------------------------- .bin layout

#: One array a layer loads: (element count, tagged).
ArraySpec = tuple[int, bool]


def _conv_arrays(layer: NcnnLayer) -> list[ArraySpec]:
    p = layer.params
    num_output, bias_term, weight_size = int(p.get(0, 0)), int(p.get(5, 0)), int(p.get(6, 0))
    arrays = [(weight_size, True)] + ([(num_output, False)] if bias_term else [])
    term = int(p.get(8, 0))
    if layer.type == "Convolution" and term:
        arrays += [(num_output, False), (1, False)]
    elif layer.type == "ConvolutionDepthWise" and term:
        arrays += [(int(p.get(7, 1)) if term in (1, 101) else 1, False), (1, False)]
    if term > 100 and layer.type in ("Convolution", "ConvolutionDepthWise"):
        arrays.append((1, False))
    return arrays


def _inner_product_arrays(layer: NcnnLayer) -> list[ArraySpec]:
    p = layer.params
    num_output = int(p.get(0, 0))
    arrays = [(int(p.get(2, 0)), True)] + ([(num_output, False)] if int(p.get(1, 0)) else [])
    if int(p.get(8, 0)):
        arrays += [(num_output, False), (1, False)]
    return arrays


def _scale_arrays(layer: NcnnLayer) -> list[ArraySpec]:
    size = int(layer.params.get(0, 0))
    if size == -233:
        return []
    return [(size, False)] * (2 if int(layer.params.get(1, 0)) else 1)


#: The arrays each layer type loads from the .bin, in order, as its ``load_model`` reads them.
WEIGHT_LAYOUTS: dict[str, Callable[[NcnnLayer], list[ArraySpec]]] = {
    "Convolution": _conv_arrays,
    "ConvolutionDepthWise": _conv_arrays,
    "Deconvolution": _conv_arrays,
    "DeconvolutionDepthWise": _conv_arrays,
    "InnerProduct": _inner_product_arrays,
    "BatchNorm": lambda layer: [(int(layer.params.get(0, 0)), False)] * 4,
    "Scale": _scale_arrays,
    "PReLU": lambda layer: [(int(layer.params.get(0, 0)), False)],
    "Normalize": lambda layer: [(int(layer.params.get(3, 0)), False)],
    "Bias": lambda layer: [(int(layer.params.get(0, 0)), False)],
}


#: fp32 arrays are written with the values below this magnitude as 0, as ncnnoptimize writes them: their products
#: are denormal floats, which x86 computes many times slower (shufflenet_driver has 27261 such weights, and its FP32
#: model ran 9% slower with them), and they change no result beyond 1e-30
TINY = np.float32(1e-30)


def _fp32_bytes(data: np.ndarray) -> bytes:
    data = np.ascontiguousarray(data, dtype="<f4")
    tiny = (np.abs(data) < TINY) & (data != 0)
    return (np.where(tiny, np.float32(0), data).astype("<f4") if tiny.any() else data).tobytes()


def _pad4(raw: bytes) -> bytes:
    return raw + b"\0" * (-len(raw) % 4)


def blob_bytes(blob: NcnnBlob, where: str = "") -> bytes:
    """``blob`` as the .bin holds it: tag + data (padded to 4 bytes) or raw little-endian fp32 (``TINY`` values 0)."""
    data = np.asarray(blob.data)
    if not blob.tagged:
        if data.dtype != np.float32:
            raise ModelError(f"{where}: untagged arrays are raw fp32, got {data.dtype}")
        return _fp32_bytes(data)
    if data.dtype == np.float32:
        tag, raw = TAG_FP32, _fp32_bytes(data)
    elif data.dtype == np.float16:
        tag, raw = TAG_FP16, np.ascontiguousarray(data, dtype="<f2").tobytes()
    elif data.dtype == np.int8:
        tag, raw = TAG_INT8, np.ascontiguousarray(data).tobytes()
    else:
        raise ModelError(f"{where}: weight arrays must be float32, float16 or int8, got {data.dtype}")
    return np.uint32(tag).astype("<u4").tobytes() + _pad4(raw)


def bin_bytes(model: NcnnModel) -> bytes:
    """The .bin file of ``model``; every layer's arrays must match what its type loads."""
    chunks = []
    for layer in model.layers:
        layout = WEIGHT_LAYOUTS.get(layer.type)
        expected = layout(layer) if layout else []
        found = [(int(np.asarray(b.data).size), b.tagged) for b in layer.weights]
        if found != expected:
            raise ModelError(
                f"ncnn layer '{layer.name}' ({layer.type}): weight arrays (size, tagged) {found} "
                f"do not match what ncnn loads for its params: {expected}"
            )
        chunks += [blob_bytes(b, f"ncnn layer '{layer.name}'") for b in layer.weights]
    return b"".join(chunks)


class _BinReader:
    """Sequential reads of a .bin buffer; running past the end names the layer."""

    def __init__(self, data: bytes, path: PathLike) -> None:
        self.data, self.pos, self.path = data, 0, path

    def take(self, nbytes: int, layer: NcnnLayer) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise ModelError(f"{self.path}: file ends inside the weights of layer '{layer.name}' ({layer.type})")
        chunk = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return chunk

    def array(self, count: int, tagged: bool, layer: NcnnLayer) -> NcnnBlob:
        if not tagged:
            return NcnnBlob(np.frombuffer(self.take(4 * count, layer), "<f4").astype(np.float32), False)
        head = self.take(4, layer)
        tag = int(np.frombuffer(head, "<u4")[0])
        if tag == TAG_FP16:
            raw = self.take(count * 2 + (-count * 2 % 4), layer)
            return NcnnBlob(np.frombuffer(raw[: count * 2], "<f2").astype(np.float16), True)
        if tag == TAG_INT8:
            raw = self.take(count + (-count % 4), layer)
            return NcnnBlob(np.frombuffer(raw[:count], np.int8).copy(), True)
        if tag in (TAG_FP32, TAG_FP32_LEGACY):
            return NcnnBlob(np.frombuffer(self.take(4 * count, layer), "<f4").astype(np.float32), True)
        # Any other non-zero flag: a 256-entry codebook followed by one byte index per weight.
        table = np.frombuffer(self.take(256 * 4, layer), "<f4")
        index = np.frombuffer(self.take(count + (-count % 4), layer)[:count], np.uint8)
        return NcnnBlob(table[index].astype(np.float32), True)


def parse_bin(layers: list[NcnnLayer], data: bytes, path: PathLike = "<bin>") -> None:
    """Attach each layer's arrays from the .bin ``data``; the sizes must add up exactly."""
    reader = _BinReader(data, path)
    for layer in layers:
        layout = WEIGHT_LAYOUTS.get(layer.type)
        layer.weights = [reader.array(n, tagged, layer) for n, tagged in (layout(layer) if layout else [])]
    if reader.pos != len(data):
        raise ModelError(
            f"{path}: {len(data) - reader.pos} bytes left after the last layer's weights; "
            "the .bin does not belong to this .param (or holds a layer type this reader does not know)"
        )


# --------------------------------------------------------------------------------------------------- files


def write_model(model: NcnnModel, param_path: PathLike, bin_path: PathLike) -> None:
    """Write ``model`` atomically as ``param_path`` + ``bin_path``."""
    text, data = param_text(model), bin_bytes(model)
    with output_set():  # the pair lands together (with the caller's set, if any)
        write_bytes_atomic(bin_path, data)
        write_text_atomic(param_path, text)
    level = logging.DEBUG if in_scratch() else logging.INFO  # a search's temporary models are no news
    log.log(level, "wrote %s (%d layers) and %s (%d bytes)", param_path, len(model.layers), bin_path, len(data))


def _read(path: PathLike, text: bool) -> str | bytes:
    try:
        return Path(path).read_text(encoding="utf-8") if text else Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"{exc.filename}: cannot read ncnn model: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ModelError(
            f"{path}: not an ncnn .param file (not text: byte {exc.start} is not UTF-8; is it the .bin?)"
        ) from exc


def read_param(param_path: PathLike) -> NcnnModel:
    """A .param alone: the layers, blobs and parameters, no weights (for names and types, without the .bin)."""
    return NcnnModel(parse_param(_read(param_path, text=True), param_path))


def read_model(param_path: PathLike, bin_path: PathLike) -> NcnnModel:
    """Read a .param/.bin pair into an ``NcnnModel`` (weights as 1-D arrays in file order)."""
    model = read_param(param_path)
    parse_bin(model.layers, _read(bin_path, text=False), bin_path)
    return model
