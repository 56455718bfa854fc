"""Property-based fuzzing of every reader of user files: the prototxt reader (mutated real prototxts), the
caffemodel reader (truncated and bit-flipped real caffemodels), the ncnn table reader, the ncnn ``.param``/``.bin``
reader and the statistics loader.

The only allowed outcomes are success or an ``Int8ConvError`` with a message: no other exception, no numpy
warning, no hang, no crash. Each target runs in a child process (``python -m tests.test_fuzz_readers TARGET``)
with a time limit, so a native crash (protobuf's C parser, numpy) or a hang fails its test instead of the
session; hypothesis is derandomized (fixed seed), with a bounded example count and a deadline per example.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from int8conv.errors import Int8ConvError
from int8conv.zoo import find_shared

ROOT = Path(__file__).resolve().parents[1]


def examples(default: int) -> int:
    """The example count: bounded in CI; ``INT8CONV_FUZZ_EXAMPLES=N`` explores further locally."""
    return int(os.environ.get("INT8CONV_FUZZ_EXAMPLES", default))


FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: tokens that make a mutation reach deeper than random characters would
PROTOTXT_TOKENS = [
    "layer {",
    "layers {",
    "}",
    "{",
    '"',
    'type: "Convolution"',
    'type: "Foo"',
    "type: CONVOLUTION",
    'top: "conv1"',
    'bottom: "data"',
    'bottom: "nowhere"',
    "num_output: 0",
    "kernel_size: 99",
    "group: 7",
    "stride: 0",
    "dim: 0",
    "dim: -3",
    'input: "x"',
    "input_dim: 1",
    "\n",
    " ",
    "#",
    'name: "conv1"',
    "pad: 100000",
    "axis: 9",
    "pool: AVE",
    "in_place: true",
    "slice_point: 5",
    "include { phase: TRAIN }",
    "1e308",
    "-0",
    "nan",
    "\x00",
    "\u00e9",
]
PARAM_TOKENS = [
    "7767517",
    "\n",
    " ",
    "0=",
    "1=3",
    "-23300=2,1.0,2.0",
    "-23300=5,1",
    "Convolution",
    "Input",
    "InnerProduct",
    "conv1",
    "data",
    "=",
    ",",
    "999999999",
    "-1",
    "1e40",
    "nan",
    "6=0",
    "8=2",
    "5=1",
]
TABLE_TOKENS = ["conv1_param_0", "conv1", " ", "\n", "0", "-1", "nan", "inf", "1e400", "3.5", "_param_", "\t"]


def mutations(tokens: list[str]) -> st.SearchStrategy:
    """Edits of a text: (kind, where as a fraction, length, inserted text)."""
    inserted = st.one_of(st.sampled_from(tokens), st.text(max_size=12))
    return st.lists(
        st.tuples(
            st.sampled_from(["delete", "insert", "replace", "duplicate"]), st.floats(0, 1), st.integers(0, 60), inserted
        ),
        min_size=1,
        max_size=6,
    )


def mutate_text(text: str, edits) -> str:
    for kind, where, length, token in edits:
        at = int(where * len(text))
        if kind == "delete":
            text = text[:at] + text[at + length :]
        elif kind == "insert":
            text = text[:at] + token + text[at:]
        elif kind == "replace":
            text = text[:at] + token + text[at + len(token) :]
        else:
            text = text[:at] + text[at : at + length] + text[at:]
    return text


byte_edits = st.tuples(
    st.one_of(st.just(1.0), st.floats(0, 1)),
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), max_size=8),
    st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16)), max_size=2),
)


def mutate_bytes(data: bytes, edits) -> bytes:
    """Truncate at a fraction (1.0 keeps all), flip bits, overwrite chunks."""
    keep, flips, chunks = edits
    buffer = bytearray(data[: max(1, round(keep * len(data)))] if keep < 1 else data)
    for where, bit in flips:
        buffer[min(int(where * len(buffer)), len(buffer) - 1)] ^= 1 << bit
    for where, chunk in chunks:
        at = min(int(where * len(buffer)), len(buffer) - 1)
        buffer[at : at + len(chunk)] = chunk
    return bytes(buffer)


#: outcomes of this child's examples, printed at the end: proof that the inputs reached both outcomes
TALLY = {"accepted": 0, "Int8ConvError": 0}


def allowed(function, *args):
    """Run ``function``: success, or the project's own error with a message. numpy warnings are failures."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            result = function(*args)
        except Int8ConvError as exc:
            assert str(exc).strip(), "an Int8ConvError without a message"
            TALLY["Int8ConvError"] += 1
            return None
    TALLY["accepted"] += 1
    return result


def _shared() -> Path:
    folder = find_shared()
    assert folder is not None, "../shared (or INT8CONV_SHARED) is missing"
    return folder


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="int8conv-fuzz-"))


# ------------------------------------------------------------------------------------------------ targets


def fuzz_prototxt() -> None:
    """Mutated prototxts of LeNet, MTCNN det1 and the res10 SSD (PriorBox, Permute, Flatten, Concat,
    DetectionOutput), read and built into the graph (shapes inferred) with the real weights."""
    from int8conv.caffe.graph import build_graph
    from int8conv.caffe.reader import read_caffemodel, read_prototxt, weights_by_layer

    models = _shared() / "models"
    sources = [
        (models / "mtcnn" / "det1.prototxt", models / "mtcnn" / "det1.caffemodel"),
        (models / "lenet_mnist" / "lenet.prototxt", models / "lenet_mnist" / "lenet_iter_10000.caffemodel"),
        (
            models / "res10_300x300_ssd" / "deploy.prototxt",
            models / "res10_300x300_ssd" / "res10_300x300_ssd_iter_140000.caffemodel",
        ),
    ]
    texts = [proto.read_text() for proto, _ in sources]
    weights = [weights_by_layer(read_caffemodel(model), model) for _, model in sources]  # read once: 10 MB
    work = _scratch()

    def load(proto: Path, which: int):
        return build_graph(read_prototxt(proto), weights[which], proto)

    @settings(FUZZ, max_examples=examples(1500))
    @given(st.integers(0, len(sources) - 1), mutations(PROTOTXT_TOKENS))
    def run(which, edits):
        proto = work / "net.prototxt"
        proto.write_text(mutate_text(texts[which], edits), encoding="utf-8", errors="surrogatepass")
        allowed(load, proto, which)

    run()


def fuzz_caffemodel() -> None:
    from int8conv.caffe.graph import load_graph

    folder = _shared() / "models" / "mtcnn"
    data = (folder / "det1.caffemodel").read_bytes()
    work = _scratch()

    @settings(FUZZ, max_examples=examples(1000))
    @given(byte_edits)
    def run(edits):
        model = work / "net.caffemodel"
        model.write_bytes(mutate_bytes(data, edits))
        allowed(load_graph, folder / "det1.prototxt", model)

    run()


def fuzz_table() -> None:
    from int8conv.tables.ncnn_table import read_ncnn_table

    text = (ROOT / "tables" / "mtcnn_det1.table").read_text()
    work = _scratch()

    @settings(FUZZ, max_examples=examples(1500))
    @given(mutations(TABLE_TOKENS), st.booleans(), st.binary(max_size=64))
    def run(edits, as_bytes, raw):
        path = work / "x.table"
        if as_bytes:
            path.write_bytes(raw + mutate_text(text, edits).encode("utf-8", "surrogatepass"))
        else:
            path.write_text(mutate_text(text, edits), encoding="utf-8", errors="surrogatepass")
        table = allowed(read_ncnn_table, path)
        if table is not None:
            table.validate()  # what the reader accepted is a table the writers and the quantizer take

    run()


def _lenet_ncnn() -> tuple[str, bytes]:
    from int8conv.caffe.graph import load_graph
    from int8conv.ncnn.convert import convert_graph
    from int8conv.ncnn.model import bin_bytes, param_text

    folder = _shared() / "models" / "lenet_mnist"
    model = convert_graph(load_graph(folder / "lenet.prototxt", folder / "lenet_iter_10000.caffemodel"))
    return param_text(model), bin_bytes(model)


def fuzz_param() -> None:
    from int8conv.ncnn.model import read_model

    text, data = _lenet_ncnn()
    work = _scratch()

    @settings(FUZZ, max_examples=examples(1500))
    @given(mutations(PARAM_TOKENS), byte_edits, st.sampled_from(["param", "bin", "both"]))
    def run(edits, bin_edits, which):
        param, binary = work / "m.param", work / "m.bin"
        param.write_text(mutate_text(text, edits) if which != "bin" else text, encoding="utf-8", errors="surrogatepass")
        binary.write_bytes(mutate_bytes(data, bin_edits) if which != "param" else data)
        allowed(read_model, param, binary)

    run()


def _statistics_arrays() -> dict[str, np.ndarray]:
    from int8conv.calibration.histograms import CalibrationStatistics

    stats = CalibrationStatistics({"caffemodel_sha256": "0" * 64, "caffemodel": "m"}, {"norm": 1.0}, bins=64)
    rng = np.random.default_rng(0)
    stats.update(
        {
            "data": rng.normal(size=(2, 3, 8, 8)).astype(np.float32),
            "relu": np.maximum(rng.normal(size=(2, 4, 4, 4)), 0).astype(np.float32),
            "zero": np.zeros((2, 2), np.float32),
        }
    )
    stats.images_used = 2
    path = _scratch() / "s.npz"
    stats.save(path)
    with np.load(path, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def fuzz_statistics() -> None:
    from int8conv.calibration.histograms import CalibrationStatistics

    arrays = _statistics_arrays()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    saved = buffer.getvalue()
    meta = json.loads(str(arrays["meta"]))
    work = _scratch()
    numbers = st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0, -1, 10**6, -(10**6), 1024, -1075, 2**62]),
    )
    field_edit = st.tuples(
        st.sampled_from(["counts", "exponent", "count", "zeros", "min", "max", "abs_sum", "has_range"]),
        st.integers(0, 200),
        numbers,
    )
    meta_edit = st.tuples(
        st.sampled_from(
            ["bins", "images_used", "values", "version", "format", "model", "preprocess", "images_skipped"]
        ),
        st.one_of(
            st.none(),
            st.integers(-5, 2**40),
            st.text(max_size=5),
            st.lists(st.text(max_size=3), max_size=4),
            st.floats(),
        ),
    )

    @settings(FUZZ, max_examples=examples(1500))
    @given(
        st.booleans(),
        byte_edits,
        st.lists(field_edit, max_size=4),
        st.lists(meta_edit, max_size=2),
        st.sets(st.sampled_from(sorted(arrays)), max_size=2),
    )
    def run(raw, edits, fields, metas, dropped):
        path = work / "s.npz"
        if raw:  # the file's bytes: truncated, bit-flipped
            path.write_bytes(mutate_bytes(saved, edits))
        else:  # a well-formed .npz with damaged content
            changed = {key: value.copy() for key, value in arrays.items() if key not in dropped}
            for key, index, value in fields:
                if key in changed and changed[key].size:
                    flat = changed[key].reshape(-1)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # the fuzzer's own casts, not the loader's
                        flat[index % flat.size] = np.asarray(value).astype(flat.dtype)
            if "meta" in changed:
                damaged = dict(meta)
                for key, value in metas:
                    damaged[key] = value
                changed["meta"] = np.array(json.dumps(damaged))
            np.savez(path, **changed)
        allowed(CalibrationStatistics.load, path)

    run()


TARGETS = {
    "prototxt": fuzz_prototxt,
    "caffemodel": fuzz_caffemodel,
    "table": fuzz_table,
    "param": fuzz_param,
    "statistics": fuzz_statistics,
}


@pytest.mark.real_models
@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_reader_fuzz(target, shared):
    """Only success or Int8ConvError; a crash (signal) or a hang (timeout) of the child fails too."""
    try:
        child = subprocess.run(
            [sys.executable, "-m", "tests.test_fuzz_readers", target],
            cwd=ROOT,
            timeout=240,
            capture_output=True,
            text=True,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the {target} reader hung: no result in {exc.timeout} s")
    assert child.returncode == 0, f"exit {child.returncode}\n{child.stdout[-4000:]}\n{child.stderr[-8000:]}"
    tally = json.loads(child.stdout.strip().splitlines()[-1])
    assert tally["accepted"] > 0 and tally["Int8ConvError"] > 0, tally  # both outcomes reached


def test_mutations_change_the_input():
    """The mutators do mutate (a fuzz run of unchanged inputs would prove nothing)."""
    assert mutate_text("abcdef", [("delete", 0.0, 2, "")]) == "cdef"
    assert mutate_text("abcdef", [("insert", 0.5, 0, "XY")]) == "abcXYdef"
    assert mutate_bytes(b"\x00\x00\x00\x00", (1.0, [(0.0, 3)], [])) == b"\x08\x00\x00\x00"
    assert mutate_bytes(b"abcd", (0.5, [], [])) == b"ab"
    assert zipfile.is_zipfile(io.BytesIO(_npz_bytes())) and not zipfile.is_zipfile(io.BytesIO(b"x" * 40))


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros(2))
    return buffer.getvalue()


if __name__ == "__main__":
    TARGETS[sys.argv[1]]()
    print(json.dumps({"target": sys.argv[1], **TALLY}))
