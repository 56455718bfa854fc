#!/usr/bin/env python3
"""Write docs/layers.md, the coverage table of every Caffe layer type, from the layer registry.

    python scripts/make_layer_docs.py            # rewrite docs/layers.md
    python scripts/make_layer_docs.py --check    # exit 1 when docs/layers.md is not what the registry says

``tests/test_layers.py`` checks that the committed file is the one this script writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from int8conv.caffe.layers import REGISTRY, Decline, LayerKind  # noqa: E402

DOC = ROOT / "docs" / "layers.md"
COLUMNS = ("shape", "ncnn FP32", "ncnn INT8", "ONNX", "Q/DQ", "calibrate on opencv", "calibrate on caffe")


def cells(kind: LayerKind) -> tuple[list[str], list[str]]:
    """The row's yes/no cells and the reasons for every "no" (or FP32), in column order."""
    reasons: list[str] = []

    def mark(value: object, column: str, no: str = "no") -> str:
        if value is True or callable(value):
            return "yes"
        if isinstance(value, Decline):
            reasons.append(f"{column}: {value.reason}")
        return no

    graph_input = kind.input_shapes is not None
    shape = "yes" if kind.shape is not None or graph_input else "no"
    ncnn = "graph input" if graph_input else mark(kind.ncnn, "ncnn")
    onnx = "graph input" if graph_input else mark(kind.onnx, "ONNX")
    precision = "yes" if kind.is_quantizable else "FP32"  # how it runs in the INT8 model of a writer that has it
    int8 = precision if ncnn == "yes" else "no"
    qdq = precision if onnx == "yes" else "no"
    if "yes" in (ncnn, onnx) and isinstance(kind.quantizable, Decline) and kind.weights is not None:
        reasons.append(f"INT8: {kind.quantizable.reason}")
    opencv = mark(kind.opencv, "OpenCV")
    caffe = mark(kind.caffe, "pycaffe")
    if kind.alias_of:
        reasons.append(f"read as {kind.alias_of}")
    if kind.notes:
        reasons.append(kind.notes)
    return [shape, ncnn, int8, onnx, qdq, opencv, caffe], reasons


def render() -> str:
    """docs/layers.md as the registry declares it today."""
    head = "| type | family | " + " | ".join(COLUMNS) + " | why not / notes |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name in sorted(REGISTRY, key=str.lower):
        kind = REGISTRY[name]
        values, reasons = cells(kind)
        rows.append(
            f"| `{name}` | {kind.family} | "
            + " | ".join(values)
            + " | "
            + "; ".join(r.replace("|", "/") for r in reasons)
            + " |"
        )
    return f"""# Layer coverage

Generated from the layer registry (`int8conv/caffe/layers/`) by `python scripts/make_layer_docs.py`; do not edit.
Every Caffe type that Tencent/ncnn's `caffe2ncnn` converts, the parameter-free types it passes through, and the
common Caffe-fork layers are declared there once. Each path either handles a type or declines it with the reason
given in the last column.

- **shape**: int8conv infers its output shape (and checks its weights against the prototxt).
- **ncnn FP32**: `int8conv convert` writes it. **ncnn INT8**: `int8conv quantize` makes it INT8 (yes), or it runs
  in FP32 inside the INT8 model (FP32). A grouped, not depthwise, Convolution stays FP32 too: ncnn's x86 INT8 group
  path computes it wrongly. It stays FP32 in the Q/DQ ONNX as well, since no calibration step validates its threshold.
- **ONNX**: `int8conv export-trt` exports it (opset 17). **Q/DQ**: its input and weights get QuantizeLinear/
  DequantizeLinear in the explicit-quantization ONNX (yes), or it stays FP32 there (FP32).
- **calibrate on opencv / caffe**: the FP32 engine runs it, so `calibrate --backend opencv` / `--backend caffe` can
  take the model (`tests/test_layers.py` checks the pycaffe column against pycaffe's own layer list).

`tests/test_layers.py` runs every type that a writer handles on a small synthetic net: ncnn FP32 and ONNX
(onnxruntime) within a max relative difference of 1e-4 of pycaffe (or OpenCV, or a numpy reference where neither
has the layer), and ncnn INT8 with a cosine >= 0.99 for the quantizable types.

{chr(10).join(rows)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare docs/layers.md with the registry")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        same = DOC.exists() and DOC.read_text() == text
        print("docs/layers.md is up to date" if same else "docs/layers.md differs: run scripts/make_layer_docs.py")
        return 0 if same else 1
    from int8conv.atomic import write_text_atomic

    write_text_atomic(DOC, text)
    print(f"wrote {DOC.relative_to(ROOT)} ({len(REGISTRY)} types)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
