"""A vectorized numpy model of ncnn's INT8 Convolution / ConvolutionDepthWise / InnerProduct arithmetic.

What ``Convolution::forward_int8`` (and the depthwise / innerproduct kernels) compute, in order:

1. ``q = float2int8(x * bottom_scale)``: round half away from zero, clamp to [-127, 127];
2. integer accumulation of ``q`` with the int8 weights (``float2int8(w * weight_scale)``);
3. dequantize: ``acc / (bottom_scale * weight_scale)``, 0 for a weight scale of 0 (dead channel), plus bias;
4. the fused activation (``activation_type`` 9=: ReLU, leaky ReLU, clip, sigmoid);
5. with requantize fusion (``int8_scale_term`` > 100): ``float2int8(y * top_scale)``, read back as ``/ top_scale``.

The calibration search (``scale_search``) evaluates thousands of candidate scales with it, on sampled output
positions (``patches``) instead of whole feature maps; ``simulate_layer`` runs a whole quantized ncnn layer
and is what the tests compare with the ncnn runtime. Integer sums are held in float64 there (exact below 2**53).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from int8conv.ncnn.model import NcnnLayer
from int8conv.ncnn.quantize import QUANTIZABLE, REQUANTIZE, scale_units


@dataclass
class LayerGeometry:
    """An ncnn quantizable layer as numpy arrays: weights (out, in/group * kh * kw), bias, geometry, activation."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    group: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    activation: int
    activation_params: tuple[float, ...]
    units: int  # how many weight scales ncnn reads (group for depthwise)
    inner_product: bool

    @classmethod
    def of(cls, layer: NcnnLayer) -> LayerGeometry:
        if layer.type not in QUANTIZABLE:
            raise ValueError(f"layer '{layer.name}' ({layer.type}) is not an INT8 layer type")
        p = layer.params
        out = int(p[0])
        weight = np.asarray(layer.weights[0].data, dtype=np.float64).reshape(out, -1)
        ip = layer.type == "InnerProduct"
        has_bias = int(p.get(1 if ip else 5, 0))
        bias = np.asarray(layer.weights[1].data, dtype=np.float64).reshape(-1) if has_bias else np.zeros(out)
        act_params = p.get(10, ())
        act_params = tuple(float(v) for v in (act_params if isinstance(act_params, (list, tuple)) else [act_params]))
        if ip:  # one output position reading the whole flattened input
            kernel, stride, dilation, pad, group = (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 1
        else:
            kw, sw, dw, pw = int(p[1]), int(p.get(3, 1)), int(p.get(2, 1)), int(p.get(4, 0))
            ph = int(p.get(14, pw))
            kernel, stride, dilation = (int(p.get(11, kw)), kw), (int(p.get(13, sw)), sw), (int(p.get(12, dw)), dw)
            pad = (ph, pw, int(p.get(16, ph)), int(p.get(15, pw)))
            group = int(p.get(7, 1)) if layer.type == "ConvolutionDepthWise" else 1
        return cls(
            layer.name,
            weight,
            bias,
            group,
            kernel,
            stride,
            dilation,
            pad,
            int(p.get(9, 0)),
            act_params,
            scale_units(layer),
            ip,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.pad
        return (
            (height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (width + left + right - dw * (kw - 1) - 1) // sw + 1,
        )

    def patches(self, x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The receptive fields of output positions (rows, cols) of one CHW input: (P, in_channels * kh * kw).

        InnerProduct: the whole flattened input, one row. Padding reads zeros, as ncnn pads with 0.
        """
        if self.inner_product:
            return np.asarray(x, dtype=np.float32).reshape(1, -1)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.pad
        padded = np.pad(np.asarray(x, dtype=np.float32), ((0, 0), (top, bottom), (left, right)))
        ys = rows[:, None, None] * sh + np.arange(kh)[None, :, None] * dh
        xs = cols[:, None, None] * sw + np.arange(kw)[None, None, :] * dw
        taken = padded[:, ys, xs]  # (C, P, kh, kw)
        return np.ascontiguousarray(taken.transpose(1, 0, 2, 3).reshape(rows.size, -1))

    def activate(self, y: np.ndarray) -> np.ndarray:
        """ncnn's fused activation (``activation_type``): 0 none, 1 ReLU, 2 leaky, 3 clip, 4 sigmoid."""
        if self.activation == 1:
            return np.maximum(y, 0)
        if self.activation == 2:
            return np.where(y > 0, y, y * self.activation_params[0])
        if self.activation == 3:
            return np.clip(y, self.activation_params[0], self.activation_params[1])
        if self.activation == 4:
            return 1.0 / (1.0 + np.exp(-y))
        return y

    def per_output(self, weight_scales: np.ndarray) -> np.ndarray:
        """``per_output_scales`` of this layer's weights."""
        return per_output_scales(self.weight, weight_scales)

    def accumulate(self, q: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """``q`` (P, K) times ``weight`` (out, K / group) group by group: (P, out)."""
        if self.group == 1:
            return q @ weight.T
        p = q.shape[0]
        out = weight.shape[0]
        qg = q.reshape(p, self.group, -1).transpose(1, 0, 2)  # (G, P, K/G)
        wg = weight.reshape(self.group, out // self.group, -1).transpose(0, 2, 1)  # (G, K/G, out/G)
        return np.matmul(qg, wg).transpose(1, 0, 2).reshape(p, out)

    def quantized_weight(self, weight_scales: np.ndarray, dtype=np.float64) -> np.ndarray:
        """The int8 weights ncnn stores for these per-unit scales (as floats)."""
        return round_clip((self.weight * self.per_output(weight_scales)[:, None]).astype(dtype))

    def int8(
        self, patches: np.ndarray, bottom_scale: float, weight_scales: np.ndarray, pre_activation: bool = False
    ) -> np.ndarray:
        """The INT8 layer output at the sampled positions, computed as ncnn does (steps 1-4 above)."""
        q = quantize_input(patches, bottom_scale)
        acc = self.accumulate(q, self.quantized_weight(weight_scales, patches.dtype))
        return self.dequantize(acc, bottom_scale, weight_scales, pre_activation)

    def dequantize(
        self, acc: np.ndarray, bottom_scale: float, weight_scales: np.ndarray, pre_activation: bool = False
    ) -> np.ndarray:
        """Steps 3-4 on the integer sums ``acc``: dequantized plus the bias, then the activation (not with
        ``pre_activation``)."""
        scales = self.per_output(weight_scales)
        dequant = np.where(scales > 0, 1.0 / (bottom_scale * np.where(scales > 0, scales, 1.0)), 0.0)
        y = acc * dequant.astype(acc.dtype) + self.bias.astype(acc.dtype)
        return y if pre_activation else self.activate(y)


def per_output_scales(weight: np.ndarray, weight_scales: np.ndarray) -> np.ndarray:
    """The table's per-unit weight scales (per group for depthwise) repeated to one per output channel of
    ``weight`` (out, ...), as float64."""
    scales = np.asarray(weight_scales, dtype=np.float64).reshape(-1)
    return np.repeat(scales, weight.shape[0] // scales.size)


def round_clip(values: np.ndarray) -> np.ndarray:
    """``float2int8`` kept in the input's float type (same values as ``float_to_int8``, fewer passes), in one
    buffer: the search rounds thousands of candidate inputs."""
    rounded = np.copysign(np.asarray(0.5, values.dtype), values)
    rounded += values
    np.trunc(rounded, out=rounded)
    return np.clip(rounded, -127, 127, out=rounded)


def quantize_input(patches: np.ndarray, bottom_scale: float) -> np.ndarray:
    """Step 1: the int8 input values (as floats of the patches' type)."""
    return round_clip(patches * patches.dtype.type(bottom_scale))


def all_positions(geometry: LayerGeometry, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Every output position of one CHW input, row-major."""
    if geometry.inner_product:
        return np.zeros(1, int), np.zeros(1, int), (1, 1)
    oh, ow = geometry.output_size(x.shape[-2], x.shape[-1])
    rows, cols = np.divmod(np.arange(oh * ow), ow)
    return rows, cols, (oh, ow)


def simulate_layer(layer: NcnnLayer, x: np.ndarray) -> np.ndarray:
    """The output of one quantized ncnn layer (as ``quantize_model`` writes it) for one CHW input, in float.

    A requantizing layer's output is int8 in ncnn; it is returned dequantized with the top scale, as
    ``NcnnRunner.extract`` returns it.
    """
    term = int(layer.params.get(8, 0))
    if not term:
        raise ValueError(f"layer '{layer.name}' is not quantized")
    fused = term > REQUANTIZE
    arrays = layer.weights
    weight_scales = np.asarray(arrays[-3 if fused else -2].data, dtype=np.float64)
    bottom_scale = float(np.asarray(arrays[-2 if fused else -1].data)[0])
    geometry = LayerGeometry.of(layer)  # its weights are the int8 values already: no weight scale applies
    rows, cols, (oh, ow) = all_positions(geometry, x)
    q = quantize_input(geometry.patches(x, rows, cols).astype(np.float64), bottom_scale)
    acc = geometry.accumulate(q, geometry.weight)
    y = geometry.dequantize(acc, bottom_scale, weight_scales)
    if fused:
        top_scale = float(np.asarray(arrays[-1].data)[0])
        y = round_clip(y * top_scale) / top_scale
    out = y.T.reshape(-1) if geometry.inner_product else y.T.reshape(-1, oh, ow)
    return out.astype(np.float32)
