"""docs/errors.md stays true: every row's command, run as written, gives its exit code and message fragment,
without a traceback, and leaves every file of the work folder byte-identical with its mode.

The rows run in one child process (``python -m tests.test_errors_doc``), so a native crash (pycaffe's glog
abort, a segfault in a runtime) fails the row that caused it instead of the whole test session.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import LENET_GRAY, ROOT, lenet_calibrate

DOC = ROOT / "docs" / "errors.md"
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*?)\|\s*`(.+?)`\s*\|(.*?)\|\s*(\d+)\s*\|(.*?)\|\s*$")


def documented_rows() -> list[dict]:
    """The table rows of docs/errors.md: command (with placeholders), message fragments, exit code, needs."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            number, what, command, seen, code, needs = (g.strip() for g in match.groups())
            rows.append(
                {
                    "id": f"{number}-{what}",
                    "command": command,
                    "fragments": re.findall(r"`([^`]+)`", seen),
                    "code": int(code),
                    "needs": needs,
                }
            )
    return rows


ROWS = documented_rows()


def skip_without_caffe() -> None:
    """pycaffe rows skip where it is not importable, unless INT8CONV_REQUIRE_CAFFE=1 (CI builds it)."""
    from int8conv.engines import caffe_importable

    if not caffe_importable():
        if os.environ.get("INT8CONV_REQUIRE_CAFFE") == "1":
            pytest.fail("INT8CONV_REQUIRE_CAFFE=1 but pycaffe is not importable")
        pytest.skip("pycaffe is not importable here (int8conv install-caffe); CI has it")


def test_the_table_has_every_defect_group():
    assert len(ROWS) >= 40 and {int(r["id"].split("-")[0]) for r in ROWS} >= {1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}
    assert all(r["fragments"] for r in ROWS)


# ------------------------------------------------------------------------------------------------ work folder


def _v1_prototxt() -> str:
    return (
        'name: "LeNet"\ninput: "data"\ninput_dim: 1\ninput_dim: 1\ninput_dim: 28\ninput_dim: 28\n'
        'layers {\n  name: "conv1"\n  type: CONVOLUTION\n  bottom: "data"\n  top: "conv1"\n'
        "  convolution_param { num_output: 20 kernel_size: 5 }\n}\n"
    )


def _with_layer(prototxt: str, layer_type: str) -> str:
    """LeNet with an in-place layer of ``layer_type`` after conv1."""
    anchor = 'layer {\n  name: "pool1"'
    assert anchor in prototxt
    extra = f'layer {{\n  name: "odd"\n  type: "{layer_type}"\n  bottom: "conv1"\n  top: "conv1"\n}}\n'
    return prototxt.replace(anchor, extra + anchor, 1)


def _with_roi_input(prototxt: str) -> str:
    """LeNet with a second input, the ROIs of a ROIPooling on conv1."""
    anchor = 'layer {\n  name: "pool1"'
    extra = (
        'layer {\n  name: "rois"\n  type: "Input"\n  top: "rois"\n  input_param { shape: { dim: 1 dim: 5 } }\n}\n'
        'layer {\n  name: "odd"\n  type: "ROIPooling"\n  bottom: "conv1"\n  bottom: "rois"\n  top: "odd"\n'
        "  roi_pooling_param { pooled_h: 2 pooled_w: 2 }\n}\n"
    )
    return prototxt.replace(anchor, extra + anchor, 1)


def make_work(shared: Path, work: Path) -> dict[str, str]:
    """The files the rows use, and the placeholder values."""
    from int8conv.calibration.histograms import CalibrationStatistics
    from int8conv.cli import main

    lenet = shared / "models" / "lenet_mnist"
    proto, model = lenet / "lenet.prototxt", lenet / "lenet_iter_10000.caffemodel"
    det1 = shared / "models" / "mtcnn"
    images = shared / "images" / "skimage"
    base = ["--proto", str(proto), "--model", str(model)]
    assert main(["-q", "convert", *base, "--param", str(work / "lenet.param"), "--bin", str(work / "lenet.bin")]) == 0
    assert main([*lenet_calibrate(base, images, work / "lenet.table"), "--save-stats", str(work / "lenet.npz")]) == 0
    text = proto.read_text()
    for kind in ("Foo", "Python", "Interp"):
        (work / f"lenet_{kind}.prototxt").write_text(_with_layer(text, kind))
    (work / "lenet_rois.prototxt").write_text(_with_roi_input(text))
    det1_text = (det1 / "det1.prototxt").read_text()
    dup = re.sub(r'(name: "conv4-2".*?top: )"conv4-2"', r'\1"conv4-1"', det1_text, count=1, flags=re.DOTALL)
    assert dup != det1_text
    (work / "det1_dup.prototxt").write_text(dup)
    (work / "v1.prototxt").write_text(_v1_prototxt())
    (work / "garbage.param").write_bytes((work / "lenet.bin").read_bytes()[:4096])
    (work / "empty.table").write_text("")
    lines = (work / "lenet.table").read_text().splitlines()
    assert len(lines) == 8 and lines[0].startswith("conv1_param_0 ")
    (work / "dup.table").write_text("\n".join(lines + lines[:1]) + "\n")
    stats = CalibrationStatistics.load(work / "lenet.npz")
    stats.histograms["data"].exponent = 1_000_000
    stats.save(work / "huge.npz")
    (work / "out.table").write_text("the user's old table\n")
    os.chmod(work / "out.table", 0o600)
    (work / "adir").mkdir()
    (work / "empty").mkdir()
    (work / "afile").write_text("a file\n")
    os.mkfifo(work / "fifo")
    return {
        "lenet": shlex.join(base),
        "gray": shlex.join(LENET_GRAY),
        "images": str(images),
        "w": str(work),
        "lenet_model": str(model),
        "det1_proto": str(det1 / "det1.prototxt"),
        "det1_model": str(det1 / "det1.caffemodel"),
        "det1_table": str(ROOT / "tables" / "mtcnn_det1.table"),
    }


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind, mode and (files) content hash."""
    state = {}
    for path in sorted(folder.rglob("*")):
        info = os.lstat(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
        state[str(path.relative_to(folder))] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), digest)
    return state


def run_case(command: str, work: Path) -> dict:
    """Run one documented command in this process; its exit code, stderr and what changed in ``work``."""
    from int8conv.cli import main as int8conv_main
    from int8conv.legacy_cli import main as legacy_main

    argv = shlex.split(command)
    entry = {"int8conv": int8conv_main, "convert_tool.py": legacy_main}[argv[0]]
    before = snapshot(work)
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = entry(argv[1:])
        except SystemExit as exc:
            code = exc.code
    after = snapshot(work)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return {"code": code, "stderr": err.getvalue(), "changed": changed}


def _main() -> None:
    """Child process: ``python -m tests.test_errors_doc CASES.json RESULTS.json WORK``."""
    cases, results, work = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
    done = {}
    for key, command in cases.items():
        done[key] = {"started": True}
        results.write_text(json.dumps(done))  # a crash leaves this row marked started, not finished
        done[key] = run_case(command, work)
    results.write_text(json.dumps(done))


# ------------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def outcomes(shared, tmp_path_factory) -> dict[str, dict]:
    from int8conv.engines import caffe_importable

    work = tmp_path_factory.mktemp("errors_doc")
    values = make_work(shared, work)
    have_caffe = caffe_importable()
    cases = {r["id"]: r["command"].format(**values) for r in ROWS if r["needs"] != "pycaffe" or have_caffe}
    cases_file, results = work.parent / "cases.json", work.parent / "results.json"
    cases_file.write_text(json.dumps(cases))
    child = subprocess.run(
        [sys.executable, "-m", "tests.test_errors_doc", str(cases_file), str(results), str(work)],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, INT8CONV_QUIET="1"),
    )
    done = json.loads(results.read_text()) if results.exists() else {}
    for value in done.values():
        value.setdefault("child", f"child exit {child.returncode}: {child.stderr[-2000:]}")
    shutil.rmtree(work / "nc", ignore_errors=True)
    return {"rows": done, "values": values, "have_caffe": have_caffe}


@pytest.mark.real_models
@pytest.mark.parametrize("row", ROWS, ids=[r["id"] for r in ROWS])
def test_documented_error(row, outcomes):
    if row["needs"] == "pycaffe":
        skip_without_caffe()
    result = outcomes["rows"].get(row["id"])
    assert result is not None and "code" in result, f"the command crashed the process: {result}"
    err = result["stderr"]
    assert "Traceback" not in err, err
    for fragment in row["fragments"]:
        assert fragment.format(**outcomes["values"]) in err, err
    assert result["code"] == row["code"], err
    errors = [line for line in err.splitlines() if line.startswith("ERROR") or ": error: " in line]
    assert len(errors) == 1, err
    assert result["changed"] == [], f"files changed: {result['changed']}"


def test_an_internal_error_is_exit_1_with_the_traceback_only_under_v(capsys, tmp_path):
    from int8conv import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["convert"].set_defaults(func=lambda args: np.zeros(2)[5])  # a bug: IndexError
    argv = ["convert", "--proto", __file__, "--model", str(DOC), "--out-dir", str(tmp_path)]
    assert cli.run(parser, argv) == 1
    err = capsys.readouterr().err
    assert "internal error, this is a bug in int8conv" in err and "IndexError" in err and "run with -v" in err
    assert "Traceback" not in err
    assert cli.run(parser, ["-v", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err


if __name__ == "__main__":
    _main()
