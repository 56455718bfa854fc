"""Flags that have no effect in the combination given are refused (``validate.UNUSED``): exit 2, a message naming
the flag and what it needs, before any work or write. They used to be silently ignored. Each refusal is right only
where the flag changes nothing: with the check bypassed, refused combinations write the same bytes as without the
flag, and their neighbours, where the flag acts, pass the check. Plus the two cases that are not refusals:
``--percentile`` with ``--method auto`` (it sets auto's percentile candidate) and tensor names with ':' in the
TensorRT ``.ranges.txt`` (a warning)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from int8conv import legacy_cli, pipeline
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.cli import build_parser, main
from int8conv.commands import validate
from int8conv.commands.validate import check_args
from int8conv.tables.tensorrt_files import read_dynamic_ranges, read_ranges_json
from tests.conftest import LENET_GRAY, lenet_calibrate
from tests.synthetic import write_caffe_model


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Empty stand-ins for every input file: a refused command line never reads them."""
    for name in ("a.prototxt", "a.caffemodel", "a.param", "a.bin", "i.param", "i.bin", "a.table", "t.json"):
        (tmp_path / name).write_text("")
    (tmp_path / "images").mkdir()
    return tmp_path


def _commands(w: Path) -> dict[str, list[str]]:
    """A valid command line of each command over ``w``'s stand-ins (each then gets the flags under test)."""
    model = ["--proto", str(w / "a.prototxt"), "--model", str(w / "a.caffemodel")]
    ncnn = ["--param", str(w / "a.param"), "--bin", str(w / "a.bin")]
    images = ["--images", str(w / "images")]
    return {
        "calibrate": ["calibrate", *model, *images, "--output", str(w / "out.table")],
        "convert_tool.py": [*model, *images, "--output", str(w / "out.table")],
        "export-trt": ["export-trt", *model, *images, "--out-dir", str(w / "trt")],
        "report": ["report", *model, *images, "--eval-images", str(w / "images"), "--out-dir", str(w / "rep")],
        "quantize": ["quantize", *ncnn, "--table", str(w / "a.table"), "--out-param", str(w / "q.param")]
        + ["--out-bin", str(w / "q.bin")],
        "eval": ["eval", *model, *ncnn, "--table", str(w / "a.table"), *images],
    }


def _run(command: str, argv: list[str]) -> int:
    return legacy_cli.main(argv) if command == "convert_tool.py" else main(argv)


#: (command, flags added, the message's start): every row used to run with the flag ignored
REFUSED = [
    *[
        (command, ["--method", method, "--percentile", "99.9"], "--percentile is for --method percentile or auto")
        for command, method in (
            ("calibrate", "kl"),
            ("calibrate", "eq"),
            ("convert_tool.py", "minmax"),
            ("export-trt", "mse"),
            ("report", "aciq"),
        )
    ],
    (
        "calibrate",
        ["--method", "kl", "--legacy-table", "--weights-8bit"],
        "--weights-8bit is for the ncnn table format",
    ),
    ("export-trt", ["--table", "{w}/a.table", "--method", "kl"], "--method is for ranges from statistics, without"),
    (
        "export-trt",
        ["--table", "{w}/a.table", "--backend", "opencv", "--jobs", "2"],
        "--backend, --jobs are for ranges from statistics",
    ),
    ("report", ["--table", "{w}/a.table", "--weights-8bit"], "--weights-8bit is for a table computed here"),
    ("report", ["--table", "{w}/a.table", "--head-method", "same"], "--head-method is for a table computed here"),
    ("quantize", ["--images", "{w}/images"], "--images is for --auto-fp32/--min-cosine or --optimize speed"),
    ("quantize", [*LENET_GRAY, "--size", "28", "28"], "--norm, --size, --color are for --auto-fp32/--min-cosine or"),
    ("quantize", ["--max-images", "2", "--letterbox"], "--max-images, --letterbox are for --auto-fp32/--min-cosine"),
    ("quantize", ["--optimize", "speed", "--mean", "1", "--size", "9", "9"], "--mean is for --images (the images"),
    ("quantize", ["--optimize", "speed", "--max-images", "2"], "--max-images is for --images"),
    ("quantize", ["--optimize", "speed", "--task", "classifier"], "--task is for --auto-fp32/--min-cosine"),
    ("quantize", ["--layer-timings", "{w}/t.json"], "--layer-timings is for --optimize speed"),
    ("eval", ["--arm-cpu", "max"], "--arm-cpu is for --arch arm64 (the ARM run they configure)"),
    ("eval", ["--arm-fp16", "off", "--arm-threads", "2"], "--arm-fp16, --arm-threads are for --arch arm64"),
    ("eval", ["--arch", "arm64", "--threads", "1"], "--threads is for the x86 evaluation, without --arch arm64"),
    ("eval", ["--arch", "arm64", "--layer-times"], "--layer-times is for the x86 evaluation"),
    ("eval", ["--no-caffe", "--backend", "opencv"], "--backend is for the Caffe FP32 reference, without --no-caffe"),
    ("eval", ["--task", "classifier", "--iou-threshold", "0.7"], "--iou-threshold is for a detection --task"),
    ("report", ["--task", "segmentation", "--score-threshold", "0.3"], "--score-threshold is for a detection --task"),
    ("eval", ["--auto-fp32-images", "{w}/images"], "--auto-fp32-images is for --auto-fp32"),
    ("export-trt", ["--auto-fp32-images", "8"], "--auto-fp32-images is for --auto-fp32"),
]


@pytest.mark.parametrize("command, flags, message", REFUSED, ids=[f"{r[0]} {' '.join(r[1])}" for r in REFUSED])
def test_a_flag_without_effect_is_refused_naming_what_it_needs(work, capsys, command, flags, message):
    argv = _commands(work)[command] + [flag.replace("{w}", str(work)) for flag in flags]
    before = sorted(p.name for p in work.iterdir())
    assert _run(command, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "drop" in err, err
    assert sorted(p.name for p in work.iterdir()) == before  # refused before any work or write


def test_no_fp16_in_eval_needs_a_table(work, capsys):
    """eval --no-fp16 sets the weights of the INT8 model it quantizes from --table; a given INT8 pair has its own."""
    argv = _commands(work)["eval"]
    argv = argv[: argv.index("--table")] + ["--int8-param", str(work / "i.param"), "--int8-bin", str(work / "i.bin")]
    assert main([*argv, "--images", str(work / "images"), "--no-fp16"]) == 2
    assert "--no-fp16 is for --table (the INT8 model quantized here" in capsys.readouterr().err


def test_a_default_given_explicitly_is_not_refused(work, capsys):
    """The default value changes nothing, so it counts as not given: past the check, the empty prototxt fails."""
    argv = _commands(work)["calibrate"] + ["--method", "kl", "--percentile", "99.99"]
    assert main(argv) == 2
    assert "--percentile" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ on LeNet


@pytest.fixture
def lenet(shared):
    folder = shared / "models" / "lenet_mnist"
    return ["--proto", str(folder / "lenet.prototxt"), "--model", str(folder / "lenet_iter_10000.caffemodel")]


def test_percentile_sets_the_candidate_of_method_auto(shared, lenet, tmp_path):
    """--percentile is not refused with --method auto: auto's percentile candidate is built with it, so its score
    (and auto's table where that candidate wins) follows the flag; the other candidates do not move."""
    images = shared / "images" / "skimage"
    model = pipeline.ModelFiles(lenet[1], lenet[3])
    prep = pipeline.PreprocessOptions(color="gray", norm=0.00390625)
    scores = {
        p: pipeline.calibrate(model, prep, pipeline.CalibrationOptions(images, backend="opencv", percentile=p)).scores
        for p in (99.99, 99.0)
    }
    assert scores[99.99]["percentile"] != scores[99.0]["percentile"]
    assert all(scores[99.99][m] == scores[99.0][m] for m in ("mse", "kl", "aciq"))
    assert main([*lenet_calibrate(lenet, images, tmp_path / "t.table"), "--percentile", "99"]) == 0


def test_load_stats_reads_each_file_once(shared, lenet, tmp_path, monkeypatch):
    """--load-stats A B: the preprocessing they fix and the histograms come from one read of each file (the first
    was read twice), and the table is the one of the same statistics read the old way."""
    images = shared / "images" / "skimage"
    paths = sorted(images.iterdir())
    halves = [tmp_path / "a.txt", tmp_path / "b.txt"]
    halves[0].write_text("".join(f"{p}\n" for p in paths[: len(paths) // 2]))
    halves[1].write_text("".join(f"{p}\n" for p in paths[len(paths) // 2 :]))
    stats = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for listing, saved in zip(halves, stats, strict=True):
        argv = lenet_calibrate(lenet, listing, tmp_path / "x.table")
        assert main([*argv, "--method", "kl", "--save-stats", str(saved)]) == 0
    reads: list[Path] = []
    load = CalibrationStatistics.load.__func__

    def counted(cls, path):
        reads.append(Path(path))
        return load(cls, path)

    monkeypatch.setattr(CalibrationStatistics, "load", classmethod(counted))
    table = tmp_path / "merged.table"
    merge = ["-q", "calibrate", *lenet, "--method", "kl", "--load-stats", *map(str, stats), "--output", str(table)]
    assert main(merge) == 0  # no preprocessing flag: LeNet's gray preprocessing came from the statistics
    assert reads == stats


#: a convolution whose output blob is named like a TensorFlow tensor ('conv1:0'), then a ReLU in place and a head
COLON_NET = """
input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1:0"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1:0" top: "conv1:0" }
layer { name: "conv2" type: "Convolution" bottom: "conv1:0" top: "out"
        convolution_param { num_output: 2 kernel_size: 3 } }
"""


def test_ranges_txt_warns_about_names_sampleint8api_misreads(tmp_path, capsys, shared):
    """A blob named 'conv1:0': sampleINT8API splits '<name>:<amax>' at the first ':', so that line would give a
    range to 'conv1'. The file is still written (int8conv's reader splits at the last ':'), with a warning naming the
    tensors; the JSON ranges and the Q/DQ ONNX carry the name unchanged."""
    rng = np.random.default_rng(0)
    weights = {
        "conv1": [rng.normal(size=(4, 3, 3, 3)), np.zeros(4)],
        "conv2": [rng.normal(size=(2, 4, 3, 3)), np.zeros(2)],
    }
    proto, model = write_caffe_model(tmp_path, COLON_NET, weights)
    out = tmp_path / "trt"
    argv = ["export-trt", "--proto", str(proto), "--model", str(model), "--method", "kl", "--backend", "opencv"]
    images = shared / "images" / "skimage"
    assert main(["-q", *argv, "--images", str(images), "--max-images", "2", "--out-dir", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "sampleINT8API" in line]
    assert len(warned) == 1 and "2 tensor name(s) contain ':' (conv1:0, conv1:0_relu1)" in warned[0]
    assert "the .ranges.json and the Q/DQ ONNX hold them unchanged" in warned[0]
    text = (out / "net.ranges.txt").read_text()
    ranges = read_dynamic_ranges(out / "net.ranges.txt")
    assert set(ranges) == {"data", "conv1:0", "conv1:0_relu1", "out"} == set(read_ranges_json(out / "net.ranges.json"))
    # sampleINT8API's reading (getline to ':' for the name, then to the next ':' for the value): the wrong names
    sample = {line.split(":")[0] for line in text.splitlines()}
    assert sample == {"data", "conv1", "out"}
    assert json.loads((out / "net.ranges.json").read_text())["ranges"]["conv1:0"] == ranges["conv1:0"]


# ------------------------------------------------------------------------------------------------ accepted neighbours


#: (command, flags added): the neighbours of the refused rows, where the flag acts; check_args must let them through
ACCEPTED = [
    ("calibrate", ["--percentile", "99"]),  # the default method is auto: its percentile candidate
    ("calibrate", ["--method", "percentile", "--percentile", "99", "--head-method", "same"]),
    ("export-trt", ["--method", "auto", "--percentile", "99"]),  # auto's table gives the layer-input ranges
    ("report", ["--method", "percentile", "--percentile", "99"]),
    ("calibrate", ["--legacy-table", "--weights-8bit"]),  # auto validates INT8 models made with the weight scales
    ("calibrate", ["--legacy-table", "--weights-8bit", "--method", "eq"]),  # eq searches with them
    ("calibrate", ["--method", "kl", "--weights-8bit"]),  # the ncnn table holds them
    ("convert_tool.py", ["--method", "kl", "--legacy-table", "--weights-8bit", "--ncnn-dir", "{w}/nc"]),  # INT8 .bin
    ("report", ["--no-caffe", "--backend", "opencv"]),  # report's --backend is also its calibration engine
    ("export-trt", ["--table", "{w}/a.table", "--max-images", "4"]),  # the Q/DQ check runs on the images
    ("export-trt", ["--auto-fp32", "0.99", "--auto-fp32-images", "8"]),
    ("quantize", ["--auto-fp32", "0.99", "--images", "{w}/images", "--max-images", "2", *LENET_GRAY, "--task", "ssd"]),
    (
        "quantize",
        ["--optimize", "speed", "--min-cosine", "0.99", "--images", "{w}/images", "--mean", "1", "--task", "ssd"],
    ),
    ("quantize", ["--optimize", "speed", "--size", "28", "28"]),  # random pixels of that size are timed
    ("quantize", ["--optimize", "speed", "--layer-timings", "{w}/t.json", "--save-layer-timings", "{w}/s.json"]),
    ("eval", ["--score-threshold", "0.3", "--iou-threshold", "0.7"]),  # --task auto may find a detector
    ("report", ["--task", "ssd", "--score-threshold", "0.3"]),
    ("eval", ["--no-fp16", "--backend", "opencv", "--threads", "1", "--timing-runs", "2", "--layer-times"]),
    ("eval", ["--arch", "arm64", "--arm-cpu", "max", "--arm-fp16", "off", "--arm-threads", "2", "--no-fp16"]),
    ("eval", ["--arch", "arm64", "--auto-fp32", "0.99", "--auto-fp32-images", "{w}/images"]),  # searched on x86 ncnn
    ("eval", ["--no-caffe", "--layer-times"]),
]


@pytest.mark.parametrize("command, flags", ACCEPTED, ids=[f"{r[0]} {' '.join(r[1])}" for r in ACCEPTED])
def test_a_flag_that_acts_is_accepted(work, command, flags):
    argv = _commands(work)[command] + [flag.replace("{w}", str(work)) for flag in flags]
    if "--ncnn-dir" in argv:  # the one-shot writes its own table
        del argv[argv.index("--output") : argv.index("--output") + 2]
    parser = legacy_cli.build_parser() if command == "convert_tool.py" else build_parser()
    args = parser.parse_args(argv)
    check_args(args, getattr(args, "_parser", parser), getattr(args, "_command", parser.prog))  # raises if refused


# ------------------------------------------------------------------------------------------------ refused: no effect

#: two 3x3 stride-1 convolutions; conv2 reads 64 channels, so its default weight scales have fewer levels (ncnn's
#: INT8 Winograd bound) than --weights-8bit's
WIDE_NET = """
input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 64 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "out"
        convolution_param { num_output: 2 kernel_size: 1 } }
"""


@pytest.fixture
def wide(tmp_path: Path, shared: Path) -> list[str]:
    rng = np.random.default_rng(1)
    weights = {
        "conv1": [rng.normal(size=(64, 3, 3, 3)), np.zeros(64)],
        "conv2": [rng.normal(size=(8, 64, 3, 3)), np.zeros(8)],
        "conv3": [rng.normal(size=(2, 8, 1, 1)), np.zeros(2)],
    }
    proto, model = write_caffe_model(tmp_path / "wide", WIDE_NET, weights)
    images = shared / "images" / "skimage"
    return ["--proto", str(proto), "--model", str(model), "--images", str(images), "--backend", "opencv"]


def _calibrated(tmp_path: Path, wide: list[str], name: str, *flags: str) -> bytes:
    table = tmp_path / f"{name}.table"
    assert main(["-q", "calibrate", *wide, "--output", str(table), *flags]) == 0
    return table.read_bytes()


def test_refused_table_flags_change_no_byte_where_refused(tmp_path, wide, monkeypatch):
    """With the check bypassed, each refused combination writes the table it writes without the flag, while the
    neighbour that accepts the flag writes another: --percentile acts with --method percentile, not kl;
    --weights-8bit acts on the ncnn table, not on --legacy-table with a histogram method."""
    monkeypatch.setattr(validate, "check_unused", lambda *args: None)
    table = functools.partial(_calibrated, tmp_path, wide)
    kl = table("kl", "--method", "kl")
    assert table("kl-p", "--method", "kl", "--percentile", "90") == kl
    assert table("p", "--method", "percentile") != table("p-90", "--method", "percentile", "--percentile", "90")
    legacy = table("legacy", "--method", "kl", "--legacy-table")
    assert table("legacy-8bit", "--method", "kl", "--legacy-table", "--weights-8bit") == legacy
    assert table("8bit", "--method", "kl", "--weights-8bit") != kl


def test_refused_export_and_quantize_flags_change_no_byte(tmp_path, wide, monkeypatch):
    """export-trt --table with --method/--percentile writes the five files it writes without them; quantize without
    a search writes the INT8 pair it writes without --images and the preprocessing flags."""
    monkeypatch.setattr(validate, "check_unused", lambda *args: None)
    table = tmp_path / "t.table"
    assert main(["-q", "calibrate", *wide, "--method", "kl", "--output", str(table)]) == 0
    written = []
    for name, flags in (("plain", []), ("method", ["--method", "percentile", "--percentile", "90"])):
        out = tmp_path / name
        assert main(["-q", "export-trt", *wide, "--table", str(table), "--out-dir", str(out), *flags]) == 0
        written.append({path.name: path.read_bytes() for path in sorted(out.iterdir())})
    assert len(written[0]) == 5 and written[0] == written[1]
    assert main(["-q", "convert", *wide[:4], "--out-dir", str(tmp_path / "nc")]) == 0
    fp32 = ["--param", str(tmp_path / "nc" / "net.param"), "--bin", str(tmp_path / "nc" / "net.bin")]
    pairs = []
    for name, flags in (("q", []), ("q-prep", [*wide[4:6], "--max-images", "2", "--mean", "9", "--color", "rgb"])):
        out = ["--out-param", str(tmp_path / f"{name}.param"), "--out-bin", str(tmp_path / f"{name}.bin")]
        assert main(["-q", "quantize", *fp32, "--table", str(table), *out, *flags]) == 0
        pairs.append((tmp_path / f"{name}.param").read_bytes() + (tmp_path / f"{name}.bin").read_bytes())
    assert pairs[0] == pairs[1]
