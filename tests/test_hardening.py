"""Issue 12's reproductions that are not a plain "bad input -> exit 2" row of docs/errors.md: output sets under
interrupts and full disks, flags that repeat saved statistics, pycaffe's unknown layers, and the small messages."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import shutil
import stat
import warnings

import numpy as np
import pytest

from int8conv import pipeline
from int8conv.calibration.histograms import CalibrationStatistics
from int8conv.cli import main
from int8conv.errors import Int8ConvError, ModelError
from int8conv.tables.ncnn_table import read_ncnn_table
from tests.conftest import LENET_GRAY, QUICK_EVAL, lenet_calibrate


@pytest.fixture
def lenet(shared):
    folder = shared / "models" / "lenet_mnist"
    return ["--proto", str(folder / "lenet.prototxt"), "--model", str(folder / "lenet_iter_10000.caffemodel")]


@pytest.fixture
def images(shared):
    return shared / "images" / "skimage"


def _files(folder):
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in sorted(folder.iterdir())}


def _old_one_shot(out):
    out.mkdir()
    for name in (
        "lenet_iter_10000.param",
        "lenet_iter_10000.bin",
        "lenet_iter_10000-int8.param",
        "lenet_iter_10000-int8.bin",
        "lenet_iter_10000.table",
    ):
        (out / name).write_text(f"old {name}\n")
    os.chmod(out / "lenet_iter_10000.bin", 0o600)
    return _files(out)


@pytest.mark.real_models
def test_interrupted_one_shot_leaves_the_old_set_and_says_so_truthfully(lenet, images, tmp_path, monkeypatch, capsys):
    """Interrupted once the FP32 and INT8 pairs are written (staged): nothing of the new set lands."""
    from int8conv import legacy_cli

    out = tmp_path / "nc"
    before = _old_one_shot(out)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_text_atomic", interrupted)  # the table, after both pairs are staged
    code = legacy_cli.main(
        [*lenet, *LENET_GRAY, "--images", str(images), "--backend", "opencv", "--ncnn-dir", str(out)]
    )
    assert code == 130
    assert "interrupted; no output was written (existing files are unchanged)" in capsys.readouterr().err
    assert _files(out) == before


@pytest.mark.real_models
def test_interrupt_after_saved_statistics_names_what_landed(lenet, images, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_text_atomic", interrupted)  # the table, after the statistics landed
    stats = tmp_path / "s.npz"
    assert (
        main(
            [
                "calibrate",
                *lenet,
                *LENET_GRAY,
                "--images",
                str(images),
                "--backend",
                "opencv",
                "--save-stats",
                str(stats),
                "--output",
                str(tmp_path / "t.table"),
            ]
        )
        == 130
    )
    assert f"only these complete outputs were written: {stats}; nothing else was changed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


@pytest.mark.real_models
def test_full_disk_between_bin_and_param_keeps_the_old_pair(lenet, tmp_path, monkeypatch, capsys):
    from int8conv.ncnn import model as ncnn_model

    out = tmp_path / "fp32"
    out.mkdir()
    (out / "lenet_iter_10000.param").write_text("old param\n")
    (out / "lenet_iter_10000.bin").write_bytes(b"old bin")
    before = _files(out)

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ncnn_model, "write_text_atomic", full)  # the .bin is staged, the .param write fails
    assert main(["convert", *lenet, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'lenet_iter_10000.param'}: No space left on device; no output was written" in err
    assert _files(out) == before


@pytest.mark.real_models
def test_output_through_a_symlink_and_dev_full(lenet, images, tmp_path, capsys):
    real = tmp_path / "real.table"
    real.write_text("old\n")
    os.chmod(real, 0o600)
    (tmp_path / "link.table").symlink_to(real)
    args = ["calibrate", *lenet, *LENET_GRAY, "--images", str(images), "--backend", "opencv", "-q"]
    assert main([*args, "--output", str(tmp_path / "link.table")]) == 0
    assert (tmp_path / "link.table").is_symlink() and real.read_text().startswith("conv1_param_0 ")
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert main([*args, "--output", "/dev/full"]) == 2
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    assert "/dev/full: No space left on device" in capsys.readouterr().err


@pytest.mark.real_models
def test_load_stats_with_the_same_preprocessing_is_accepted_and_images_warned_only_when_unused(
    lenet, images, tmp_path, capsys
):
    stats = tmp_path / "s.npz"
    args = ["calibrate", *lenet, *LENET_GRAY, "--backend", "opencv", "-q"]
    assert main([*args, "--images", str(images), "--save-stats", str(stats), "--output", str(tmp_path / "a")]) == 0
    assert main([*args, "--images", str(images), "--load-stats", str(stats), "--output", str(tmp_path / "b")]) == 0
    # --method auto (the default) validates its candidates on the images: they are used, no warning says otherwise
    assert "is not used" not in capsys.readouterr().err
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text()
    kl = ["--method", "kl", "--images", str(images), "--load-stats", str(stats)]
    assert main([*args, *kl, "--output", str(tmp_path / "c")]) == 0
    assert f"--images {images} is not used: the histograms come from --load-stats" in capsys.readouterr().err


@pytest.mark.real_models
def test_load_stats_without_preprocessing_flags_uses_the_saved_preprocessing(lenet, images, tmp_path):
    """--load-stats alone decides the preprocessing: LeNet's gray statistics give the table of the full command line
    (calibrate and report), not a refusal of the default --color bgr (3 channels for a 1-channel input)."""
    stats = tmp_path / "s.npz"
    args = ["calibrate", *lenet, "--backend", "opencv", "-q", "--method", "kl"]
    assert (
        main([*args, *LENET_GRAY, "--images", str(images), "--save-stats", str(stats), "--output", str(tmp_path / "a")])
        == 0
    )
    assert main([*args, "--load-stats", str(stats), "--output", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text()
    report = ["report", *lenet, "-q", "--method", "kl", "--load-stats", str(stats), "--eval-images", str(images)]
    assert main([*report, *QUICK_EVAL, "--max-images", "2", "--out-dir", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "lenet_iter_10000.table").read_text() == (tmp_path / "a").read_text()


def test_load_stats_refuses_a_letterbox_the_statistics_were_not_collected_with(lenet, images, tmp_path, capsys):
    """Saved statistics leave ``letterbox`` out when it was off; --letterbox then contradicts them, and its absence
    contradicts statistics collected with it."""
    assert set(pipeline.PREPROCESS_FLAGS) == {f.name for f in dataclasses.fields(pipeline.PreprocessOptions)}
    args = ["calibrate", *lenet, *LENET_GRAY, "--backend", "opencv", "-q"]
    for saved, loaded in (([], ["--letterbox"]), (["--letterbox"], [])):
        stats = tmp_path / f"s{len(saved)}.npz"
        written = [*args, *saved, "--images", str(images), "--save-stats", str(stats), "--output", str(tmp_path / "a")]
        assert main(written) == 0
        assert main([*args, *loaded, "--load-stats", str(stats), "--output", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert f"{', '.join(['--norm', '--color', *loaded])} disagree with the preprocessing" in err
        expected = f"letterbox {bool(saved)} (statistics) vs {bool(loaded)} (flags)"
        assert expected in err and not (tmp_path / "b").exists()


def test_adaround_with_a_given_table_is_refused_before_any_work(tmp_path):
    """export-trt and report with --table and --adaround: the table cannot hold learned weights."""
    model = pipeline.ModelFiles(tmp_path / "none.prototxt", tmp_path / "none.caffemodel")  # never read
    options, table = pipeline.CalibrationOptions(adaround=True), tmp_path / "given.table"
    expected = f"--adaround learns weights, which the table {table} cannot hold: drop --table"
    with pytest.raises(Int8ConvError, match=re.escape(expected)):
        pipeline.export_trt(model, pipeline.PreprocessOptions(), options, pipeline.TrtOptions(table=table))
    evaluation = pipeline.EvalOptions(tmp_path / "images")
    with pytest.raises(Int8ConvError, match=re.escape(expected)):
        pipeline.report(model, pipeline.PreprocessOptions(), options, evaluation, tmp_path / "out", table=table)
    assert not (tmp_path / "out").exists()


def test_statistics_with_a_huge_exponent_are_refused_without_numpy_warnings(tmp_path):
    stats = CalibrationStatistics({"caffemodel_sha256": "x"}, {}, bins=64)
    stats.update({"v": np.array([[0.5, -3.0, 0.0]], np.float32)})
    stats.save(tmp_path / "ok.npz")
    stats.histograms["v"].exponent = 10**6
    stats.save(tmp_path / "huge.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert CalibrationStatistics.load(tmp_path / "ok.npz").histograms["v"].range_max == 4.0
        with pytest.raises(Int8ConvError, match=r"huge.npz is damaged: value 'v': histogram range 2\*\*1000000"):
            CalibrationStatistics.load(tmp_path / "huge.npz")


@pytest.mark.real_models
def test_two_layers_writing_one_top_are_named(shared, tmp_path):
    from int8conv.caffe.graph import load_graph

    folder = shared / "models" / "mtcnn"
    text = (folder / "det1.prototxt").read_text()
    proto = tmp_path / "det1.prototxt"
    proto.write_text(text.replace('top: "conv4-2"', 'top: "conv4-1"'))
    with pytest.raises(ModelError, match="layers 'conv4-1' and 'conv4-2' both write blob 'conv4-1'"):
        load_graph(proto, folder / "det1.caffemodel")
    load_graph(folder / "det1.prototxt", folder / "det1.caffemodel")  # in-place PReLU on its own top is fine


# ------------------------------------------------------------------------------------------------ item 13


def test_gray_mean_message_counts_right():
    from int8conv.calibration.preprocess import Preprocess

    with pytest.raises(Int8ConvError, match=r"--mean needs 1 value for gray input, got 3"):
        Preprocess(size=(4, 4), mean=(1, 2, 3), color="gray")
    with pytest.raises(Int8ConvError, match=r"--std needs 1 or 3 values for bgr input, got 2"):
        Preprocess(size=(4, 4), std=(1, 2))


@pytest.mark.real_models
def test_a_missing_bias_is_named(shared):
    from int8conv.caffe.graph import build_graph
    from int8conv.caffe.reader import read_caffemodel, read_prototxt, weights_by_layer

    folder = shared / "models" / "lenet_mnist"
    weights = weights_by_layer(read_caffemodel(folder / "lenet_iter_10000.caffemodel"))
    weights["conv1"] = weights["conv1"][:1]
    with pytest.raises(
        ModelError,
        match=r"'conv1' \(Convolution\): expected a bias of 20 values, the caffemodel "
        r"has no bias",
    ):
        build_graph(read_prototxt(folder / "lenet.prototxt"), weights)


def test_single_image_and_missing_list_entries(tmp_path, caplog):
    import cv2

    from int8conv.calibration.preprocess import ImageTally, Preprocess, iter_batches, list_images

    image = tmp_path / "x.jpg"
    cv2.imwrite(str(image), np.full((8, 8, 3), 100, np.uint8))
    assert list_images(image) == [image]
    listing = tmp_path / "list.txt"
    listing.write_text("x.jpg\nmissing.jpg\n")
    tally = ImageTally()
    with caplog.at_level(logging.WARNING):
        batches = list(iter_batches(list_images(listing), Preprocess(size=(4, 4)), 2, tally))
    assert len(batches) == 1 and tally.used == 1
    assert f"skipping {tmp_path / 'missing.jpg'}: no such file" in caplog.text
    assert tally.skipped == [(tmp_path / "missing.jpg", "no such file")]


@pytest.mark.real_models
def test_eval_quiet_still_prints_the_report(lenet, images, tmp_path, capsys):
    fp32 = ["--param", str(tmp_path / "l.param"), "--bin", str(tmp_path / "l.bin")]
    assert main(["-q", "convert", *lenet, *fp32]) == 0
    assert main(lenet_calibrate(lenet, images, tmp_path / "l.table")) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "-q",
                "eval",
                *lenet,
                *LENET_GRAY,
                *fp32,
                "--table",
                str(tmp_path / "l.table"),
                "--images",
                str(images),
                "--max-images",
                "2",
                *QUICK_EVAL,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "ncnn INT8 vs ncnn FP32" in captured.out and captured.err == ""


@pytest.mark.real_models
def test_a_layer_without_its_bottoms_is_named(shared, tmp_path):
    """Found by the prototxt fuzzer: a Softmax without a bottom was an IndexError in shape inference."""
    from int8conv.caffe.graph import load_graph

    folder = shared / "models" / "lenet_mnist"
    proto = tmp_path / "lenet.prototxt"
    proto.write_text((folder / "lenet.prototxt").read_text().replace('bottom: "ip2"\n  top: "prob"', 'top: "prob"'))
    with pytest.raises(ModelError, match=r"layer 'prob' \(Softmax\) needs 1 bottom\(s\), it has 0"):
        load_graph(proto, folder / "lenet_iter_10000.caffemodel")


@pytest.mark.real_models
def test_auto_fp32_refuses_images_of_the_wrong_channel_count(lenet, images, tmp_path, capsys):
    """quantize --auto-fp32 on a 1-channel ncnn model without --color gray: a clear refusal naming the input, not an
    output cosine measured on 3-channel images (it was ~0, and the chosen FP32 layers were noise)."""
    table = tmp_path / "lenet.table"
    assert main(["-q", "convert", *lenet, "--out-dir", str(tmp_path)]) == 0
    assert main(lenet_calibrate(lenet, images, table)) == 0
    param, weights = tmp_path / "lenet_iter_10000.param", tmp_path / "lenet_iter_10000.bin"
    quantize = [
        "quantize",
        "--param",
        str(param),
        "--bin",
        str(weights),
        "--table",
        str(table),
        "--images",
        str(images),
    ]
    out = ["--out-param", str(tmp_path / "q.param"), "--out-bin", str(tmp_path / "q.bin"), "--auto-fp32", "0.99"]
    capsys.readouterr()
    assert main(["-q", *quantize, *out]) == 2
    assert (
        f"input 'data' of {param} has 1 channels, but --color bgr gives 3: pass --color gray" in capsys.readouterr().err
    )
    assert not (tmp_path / "q.param").exists()
    assert main(["-q", *quantize, *out, *LENET_GRAY]) == 0
    timed = [*quantize[: quantize.index("--images")], *out[:4], "--optimize", "speed"]  # random pixels, any --color
    assert main(["-q", *timed]) == 0


@pytest.mark.real_models
@pytest.mark.parametrize("flag", ["--layer-timings", "--save-layer-timings"])
def test_layer_timings_without_optimize_speed_are_refused(lenet, tmp_path, capsys, flag):
    """--layer-timings / --save-layer-timings belong to --optimize speed: without it they were silently ignored
    (no timings file written, the device's timings unused)."""
    assert main(["-q", "convert", *lenet, "--out-dir", str(tmp_path)]) == 0
    table, timings = tmp_path / "empty.table", tmp_path / "timings.json"
    table.write_text("")
    timings.write_text("{}")
    model = ["--param", str(tmp_path / "lenet_iter_10000.param"), "--bin", str(tmp_path / "lenet_iter_10000.bin")]
    out = ["--out-param", str(tmp_path / "q.param"), "--out-bin", str(tmp_path / "q.bin"), "--table", str(table)]
    assert main(["quantize", *model, *out, flag, str(timings if flag == "--layer-timings" else tmp_path / "t")]) == 2
    assert f"{flag} is for --optimize speed" in capsys.readouterr().err
    assert not (tmp_path / "q.param").exists() and not (tmp_path / "t").exists()


@pytest.mark.real_models
def test_quantize_names_a_legacy_table(lenet, images, tmp_path, capsys):
    """A --legacy-table (per-tensor weight scales) given to quantize: the format is named, not 'the table was made
    for another model' after a warning per layer about missing activation lines."""
    table = tmp_path / "legacy.table"
    assert main([*lenet_calibrate(lenet, images, table), "--legacy-table"]) == 0
    assert main(["-q", "convert", *lenet, "--out-dir", str(tmp_path)]) == 0
    model = ["--param", str(tmp_path / "lenet_iter_10000.param"), "--bin", str(tmp_path / "lenet_iter_10000.bin")]
    out = ["--out-param", str(tmp_path / "q.param"), "--out-bin", str(tmp_path / "q.bin")]
    capsys.readouterr()
    assert main(["quantize", *model, "--table", str(table), *out]) == 2
    err = capsys.readouterr().err
    assert "it is the legacy per-tensor format (--legacy-table)" in err and "another model" not in err
    assert "WARNING" not in err and not (tmp_path / "q.param").exists()


@pytest.mark.parametrize("before, after", [("-v", "-q"), ("-q", "-v")])
def test_verbose_and_quiet_on_both_sides_of_the_command_are_refused(tmp_path, capsys, before, after):
    """-v before the command and -q after it (or the reverse) was debug logging with the progress bars off: one
    flag silently lost. Each parser already refuses the pair; across the two it is the same argparse error."""
    for name in ("a.prototxt", "a.caffemodel"):
        (tmp_path / name).write_text("")  # never read: the flags are refused first
    argv = [before, "convert", "--proto", str(tmp_path / "a.prototxt"), "--model", str(tmp_path / "a.caffemodel")]
    assert main([*argv, "--out-dir", str(tmp_path / "out"), after]) == 2
    err = capsys.readouterr().err
    assert "int8conv convert: error: argument -q/--quiet: not allowed with argument -v/--verbose" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.real_models
def test_report_with_a_given_table_writes_that_table_to_its_folder(lenet, images, tmp_path):
    """report --table into a folder of an earlier report: the folder's table is the one its INT8 model was quantized
    with (it was the earlier run's, contradicting the models beside it)."""
    out, given = tmp_path / "rep", tmp_path / "given.table"
    report = ["report", *lenet, *LENET_GRAY, "-q", "--images", str(images), "--eval-images", str(images)]
    report += [*QUICK_EVAL, "--max-eval-images", "2", "--out-dir", str(out)]
    assert main([*report, "--method", "kl"]) == 0
    assert main([*lenet_calibrate(lenet, images, given), "--method", "minmax"]) == 0
    assert read_ncnn_table(given).activation_scales != read_ncnn_table(out / "lenet_iter_10000.table").activation_scales
    assert main([*report, "--table", str(given)]) == 0
    folder_table = read_ncnn_table(out / "lenet_iter_10000.table")
    assert folder_table.activation_scales == read_ncnn_table(given).activation_scales
    model = ["--param", str(out / "lenet_iter_10000.param"), "--bin", str(out / "lenet_iter_10000.bin")]
    again = ["--out-param", str(tmp_path / "q.param"), "--out-bin", str(tmp_path / "q.bin")]
    assert main(["-q", "quantize", *model, "--table", str(out / "lenet_iter_10000.table"), *again]) == 0
    assert (tmp_path / "q.bin").read_bytes() == (out / "lenet_iter_10000-int8.bin").read_bytes()


@pytest.mark.real_models
def test_export_trt_names_a_misspelt_fp32_layer_before_calibrating(lenet, tmp_path, capsys):
    """--fp32-layers with a name the model lacks is refused before the images are read (it was refused after the
    whole calibration); an empty image folder shows the order."""
    (tmp_path / "empty").mkdir()
    args = ["export-trt", *lenet, *LENET_GRAY, "--images", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "o")]
    assert main(["-q", *args, "--fp32-layers", "conv1", "ip9"]) == 2
    err = capsys.readouterr().err
    assert "--fp32-layers names ip9, which are not Convolution or InnerProduct layers" in err
    assert "no images found" not in err and not (tmp_path / "o").exists()


@pytest.mark.real_models
def test_eval_refuses_model_flags_it_would_ignore(lenet, images, tmp_path, capsys):
    """eval --ncnn-dir with --param/--bin, or the INT8 pair with --table: one of them was silently ignored (and with
    --table the report said 'quantized from' it while the given INT8 model ran)."""
    out = tmp_path / "nc"
    assert main(["-q", "convert", *lenet, "--out-dir", str(out)]) == 0
    fp32 = ["--param", str(out / "lenet_iter_10000.param"), "--bin", str(out / "lenet_iter_10000.bin")]
    for kind in ("param", "bin"):  # stand-ins for the INT8 pair: never read, the flags are refused first
        shutil.copy(out / f"lenet_iter_10000.{kind}", out / f"lenet_iter_10000-int8.{kind}")
    int8 = [
        "--int8-param",
        str(out / "lenet_iter_10000-int8.param"),
        "--int8-bin",
        str(out / "lenet_iter_10000-int8.bin"),
    ]
    base = ["-q", "eval", *lenet, *LENET_GRAY, "--images", str(images), *QUICK_EVAL, "--max-images", "1"]
    table = tmp_path / "lenet.table"
    table.write_text("")  # never read: refused first
    assert main([*base, *fp32, *int8, "--table", str(table)]) == 2
    assert "--int8-param, --int8-bin are for a given INT8 model, without --table" in capsys.readouterr().err
    assert main([*base, "--ncnn-dir", str(out), *fp32]) == 2
    assert "--param, --bin are for models given file by file, without --ncnn-dir (--ncnn-dir names the models: " in (
        capsys.readouterr().err
    )


@pytest.mark.real_models
@pytest.mark.parametrize("flag", ["--save-stats", "--load-stats"])
def test_export_trt_with_a_table_refuses_statistics_flags(lenet, images, tmp_path, capsys, flag):
    """export-trt --table takes every range from the table: --save-stats wrote nothing and --load-stats (even of
    another model) was never read, both silently."""
    table, stats = tmp_path / "lenet.table", tmp_path / "s.npz"
    assert main([*lenet_calibrate(lenet, images, table), "--save-stats", str(stats)]) == 0
    args = ["export-trt", *lenet, *LENET_GRAY, "--table", str(table), "--out-dir", str(tmp_path / "trt")]
    given = str(stats) if flag == "--load-stats" else str(tmp_path / "new.npz")
    assert main(["-q", *args, flag, given]) == 2
    assert f"{flag} is for ranges from statistics, without --table" in capsys.readouterr().err
    assert not (tmp_path / "trt").exists() and not (tmp_path / "new.npz").exists()
