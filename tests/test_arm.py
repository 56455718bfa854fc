"""ncnn's ARM kernels under qemu: the runner, ``eval --arch arm64`` on real models, the 6-bit rule on
ARM, and ``install-arm``'s refusals.

Tests that run ARM code need the environment ``int8conv install-arm`` builds (or an aarch64 host). Without it they
skip with the reason, except with ``INT8CONV_REQUIRE_ARM=1`` (set in CI), where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from int8conv.arm import install
from int8conv.arm import runtime as arm_runtime
from int8conv.arm.runtime import ArmModel, ArmOptions, run_arm
from int8conv.calibration.weight_scales import winograd_levels
from int8conv.cli import main as cli
from int8conv.errors import BackendUnavailable
from int8conv.evaluation.metrics import cosine
from int8conv.ncnn.model import NcnnModel
from int8conv.ncnn.quantize import quantize_model
from int8conv.ncnn.runtime import NcnnRunner
from int8conv.zoo import MODELS, cli_flags
from tests.test_ncnn_quantize import _absmax_table, _conv, _input, _save, winograd_worst_case


@pytest.fixture(scope="session")
def arm() -> None:
    reason = arm_runtime.unavailable()
    if reason is not None:
        if os.environ.get("INT8CONV_REQUIRE_ARM") == "1":
            pytest.fail(f"INT8CONV_REQUIRE_ARM=1 but ARM code cannot run: {reason}")
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------------ runner


def _chain(tmp_path: Path) -> tuple[tuple[Path, Path], tuple[Path, Path], np.ndarray]:
    """A 3x3 conv (ReLU) + 1x1 conv net, FP32 and INT8 (absmax scales), and an input."""
    rng = np.random.default_rng(3)
    model = NcnnModel(
        [
            _input(8, 10, 10),
            _conv("c1", "data", "a", rng.normal(size=(16, 8, 3, 3)), rng.normal(size=16) * 0.1, relu=True),
            _conv("c2", "a", "out", rng.normal(size=(4, 16, 1, 1)), rng.normal(size=4) * 0.1, pad=0),
        ]
    )
    x = rng.normal(size=(8, 10, 10)).astype(np.float32)
    peak = float(np.abs(NcnnRunner(*_save(model, tmp_path, "fp32"), int8=False).extract({"data": x}, ["a"])["a"]).max())
    table = _absmax_table(model, {"c1": float(np.abs(x).max()), "c2": peak})
    return _save(model, tmp_path, "fp32"), _save(quantize_model(model, table, fp16_storage=False), tmp_path, "int8"), x


@pytest.mark.arm
def test_runner_round_trip_matches_x86(arm, tmp_path):
    """Inputs go in and blobs come back as .npz: with fp16 off, ARM FP32 equals x86 FP32 to float rounding and the
    requantized int8 blob comes back int8 and dequantized; QEMU_CPU picks the features ncnn sees; fp16 on moves
    FP32 by fp16 rounding only."""
    fp32, int8, x = _chain(tmp_path)
    inputs = [{"data": x}, {"data": -x}]
    models = [ArmModel(*fp32, False, ["a", "out"]), ArmModel(*int8, True, ["a", "out"])]
    a53 = run_arm(models, inputs, ArmOptions("cortex-a53", fp16=False))
    a76 = run_arm(models, inputs, ArmOptions("cortex-a76", fp16=False))
    assert a53.info["machine"] == "aarch64" and a53.info["ncnn"] == install.host_ncnn_version()
    if a53.info["emulated"]:
        assert "asimddp" not in a53.info["cpu_features"] and "asimddp" in a76.info["cpu_features"]
    for m, (param, binary), int8_flag in ((0, fp32, False), (1, int8, True)):
        x86 = NcnnRunner(param, binary, int8=int8_flag)
        for i, inp in enumerate(inputs):
            expected = x86.extract(inp, ["a", "out"])
            for blob in ("a", "out"):
                got = a53.outputs[m][i][blob]
                assert got.dtype == np.float32 and got.shape == expected[blob].shape
                tolerance = 1e-4 if m == 0 else 1.0 / 127 * np.abs(expected[blob]).max() + 1e-6
                np.testing.assert_allclose(got, expected[blob], atol=tolerance)
                np.testing.assert_array_equal(got, a76.outputs[m][i][blob])  # fp16 off: CPU-independent
    fp16 = run_arm(models[:1], inputs[:1], ArmOptions("cortex-a76", fp16=True)).outputs[0][0]["out"]
    exact = a76.outputs[0][0]["out"]
    assert not np.array_equal(fp16, exact) and cosine(fp16, exact) > 0.999


# ------------------------------------------------------------------------------------------------ 6-bit rule


@pytest.mark.arm
def test_int8_winograd_on_arm_needs_6bit_weights_without_dot_product(arm, tmp_path):
    """The 6-bit rule, measured on ARM with the x86 overflow case of test_ncnn_quantize (128 channels, inputs
    aligned with the weights' signs), INT8 against FP32:

    - ARMv8.0 (cortex-a53, no dot product): ncnn's ARM INT8 Winograd overflows with 8-bit weights exactly as
      x86 does (the same cosine, -0.952), the direct kernel and 6-bit weights stay exact: the rule holds on ARM;
    - ARMv8.2 with dot product (cortex-a76): Winograd on or off give bit-identical, exact outputs with 8-bit
      weights. So ``--weights-8bit`` is safe only on dot-product CPUs, and cannot be the ARM default.
    """
    rng = np.random.default_rng(0)
    channels = 128
    signs = np.sign(rng.normal(size=(channels, 3, 3)))
    weight = (np.abs(rng.normal(size=(16, channels, 3, 3))) * signs).astype(np.float32)
    x = (np.tile(signs, (1, 8, 8)) * 5.0).astype(np.float32)
    model = NcnnModel([_input(channels, 24, 24), _conv("c", "data", "out", weight, np.zeros(16))])
    reference = NcnnRunner(*_save(model, tmp_path, "fp32"), int8=False).run({"data": x})["out"]
    models = []
    for levels in (127, 31):
        files = _save(
            quantize_model(model, _absmax_table(model, {"c": 5.0}, levels), fp16_storage=False),
            tmp_path,
            f"int8-{levels}",
        )
        models += [ArmModel(*files, True, ["out"], winograd=True), ArmModel(*files, True, ["out"], winograd=False)]
    x86_8bit = cosine(NcnnRunner(models[0].param, models[0].bin, int8=True).run({"data": x})["out"], reference)
    found = {}
    for cpu in ("cortex-a53", "cortex-a76"):
        outputs = run_arm(models, [{"data": x}], ArmOptions(cpu, fp16=False)).outputs
        found[cpu] = [cosine(out[0]["out"], reference) for out in outputs]
        assert found[cpu][1] > 0.9999 and found[cpu][2] > 0.999 and found[cpu][3] > 0.999, (cpu, found[cpu])
        if cpu == "cortex-a76":
            np.testing.assert_array_equal(outputs[0][0]["out"], outputs[1][0]["out"])
    print(
        "ARM INT8 vs FP32 cosine [8-bit Winograd, 8-bit direct, 6-bit Winograd, 6-bit direct]:",
        found,
        "x86 8-bit Winograd:",
        x86_8bit,
    )
    assert found["cortex-a53"][0] < 0.5 and found["cortex-a53"][0] == pytest.approx(x86_8bit, abs=1e-6)
    assert found["cortex-a76"][0] > 0.9999


@pytest.mark.arm
def test_winograd_weight_levels_hold_on_arm(arm, tmp_path):
    """``weight_scales.winograd_levels`` on ARMv8.0 (cortex-a53, ncnn's ARM INT8 Winograd): the worst-case input of
    test_ncnn_quantize stays exact at the bound and overflows one level above it, as on x86."""
    found = {}
    for channels in (26, 64):
        levels = winograd_levels(channels)
        built = [winograd_worst_case(channels, n, tmp_path) for n in (levels, levels + 1)]
        models = [ArmModel(param, binary, True, ["out"], winograd=True) for param, binary, _, _ in built]
        _, _, x, reference = built[0]
        outputs = run_arm(models, [{"data": x}], ArmOptions("cortex-a53", fp16=False)).outputs
        found[channels] = [cosine(out[0]["out"], reference) for out in outputs]
    print("ARM worst-case cosine per channels [at the bound, one level above]:", found)
    assert all(at > 0.9999 and above < 0.5 for at, above in found.values())


# ------------------------------------------------------------------------------------------------ eval --arch arm64

FACES, VOC = "faces", "voc_coco_detection"


@pytest.mark.arm
@pytest.mark.parametrize("key", ["res10", "ultraface"])
def test_eval_arch_arm64_on_shared_models(key, arm, shared, tmp_path, capsys):
    """``eval --arch arm64 --arm-fp16 off`` end to end: calibrate, convert, then ARM FP32 equals x86 FP32 (cosine
    ~1) and ARM INT8 vs ARM FP32 reports the task metrics next to x86's."""
    spec = MODELS[key]
    proto, caffemodel = spec.paths(shared)
    model_args = ["--proto", str(proto), "--model", str(caffemodel)]
    table = tmp_path / f"{key}.table"
    assert (
        cli(
            [
                "-q",
                "calibrate",
                *model_args,
                *cli_flags(spec.prep),
                "--images",
                str(shared / "images" / VOC),
                "--max-images",
                "4",
                "--backend",
                "opencv",
                "--output",
                str(table),
            ]
        )
        == 0
    )
    assert cli(["-q", "convert", *model_args, "--out-dir", str(tmp_path)]) == 0
    param, binary = tmp_path / f"{caffemodel.stem}.param", tmp_path / f"{caffemodel.stem}.bin"
    assert (
        cli(
            [
                "-q",
                "eval",
                *model_args,
                *cli_flags(spec.prep),
                "--param",
                str(param),
                "--bin",
                str(binary),
                "--table",
                str(table),
                "--images",
                str(shared / "images" / FACES),
                "--max-images",
                "4",
                "--arch",
                "arm64",
                "--arm-cpu",
                "cortex-a76",
                "--arm-fp16",
                "off",
                "--json",
                str(tmp_path / "arm.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "arm.json").read_text())
    print(json.dumps({k: report[k] for k in ("int8_vs_fp32", "arm_vs_x86", "arm_ms_per_image")}, indent=1))
    assert report["images"] == 4 and report["arm"]["machine"] == "aarch64" and report["arm"]["fp16"] is False
    fp32 = report["arm_vs_x86"]["fp32"]
    assert fp32["output_cosine_min"] > 0.99999
    assert max(d["max_rel"] for d in fp32["difference"].values()) < 1e-4
    assert fp32["task"]["recall"] == 1.0 and fp32["task"]["precision"] == 1.0
    arm_q, x86_q = report["int8_vs_fp32"]["arm"], report["int8_vs_fp32"]["x86"]
    assert arm_q["task"]["reference_detections"] == x86_q["task"]["reference_detections"] > 0
    assert set(arm_q["layer_cosine"]) == set(x86_q["layer_cosine"]) and len(arm_q["layer_cosine"]) > 10
    assert abs(arm_q["output_cosine"] - x86_q["output_cosine"]) < 0.01
    assert report["arm_vs_x86"]["int8"]["output_cosine_min"] > 0.99
    assert "not device timings" in report["arm_ms_per_image"]["note"]
    text = capsys.readouterr().out  # format_arm_report's
    assert "ARM vs x86" in text and "qemu cortex-a76 (emulated), fp16 off" in text and "not device timings" in text


# ------------------------------------------------------------------------------------------------ refusals


def test_install_arm_refuses_on_an_arm_host(monkeypatch):
    monkeypatch.setattr(install.platform, "machine", lambda: "aarch64")
    with pytest.raises(BackendUnavailable, match="already ARM"):
        install.install_arm()


def test_install_arm_refuses_without_root(monkeypatch):
    monkeypatch.setattr(install.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(install.os, "geteuid", lambda: 1000)
    assert cli(["install-arm"]) == 2
    with pytest.raises(BackendUnavailable, match="needs root"):
        install.check_host()


def test_install_arm_refuses_when_binfmt_misc_cannot_be_mounted(monkeypatch, tmp_path):
    """A container that may not mount binfmt_misc: the mount fails and the refusal says why."""
    monkeypatch.setattr(install, "BINFMT_DIR", tmp_path / "binfmt_misc")

    def mount(command, **kwargs):
        assert command[:3] == ["mount", "-t", "binfmt_misc"]
        return subprocess.CompletedProcess(command, 32, "", "mount: permission denied")

    monkeypatch.setattr(install.subprocess, "run", mount)
    with pytest.raises(BackendUnavailable, match="binfmt_misc cannot be mounted.*permission denied"):
        install.register_binfmt(tmp_path / "log")


def test_eval_arm64_without_the_environment_says_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(arm_runtime, "is_arm_host", lambda: False)
    monkeypatch.setattr(arm_runtime, "find_environment", lambda: None)
    fp32, _, x = _chain(tmp_path)
    with pytest.raises(BackendUnavailable, match="int8conv install-arm"):
        run_arm([ArmModel(*fp32, False, ["out"])], [{"data": x}])


def test_debian_mirror_from_apt_sources(tmp_path):
    """The mirror comes from apt's own sources: deb822 .sources and one-line .list, options in brackets."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "other.list").write_text(
        "deb [arch=amd64 signed-by=/k.gpg] https://example.invalid/apt stable main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\n"
        "Components: main\n"
    )
    assert install.debian_mirror(tmp_path) == "http://mirror.invalid/debian"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("# none\ndeb http://other.invalid/debian trixie main contrib\n")
    assert install.debian_mirror(tmp_path) == "http://other.invalid/debian"
    (tmp_path / "sources.list").write_text("deb http://archive.invalid/ubuntu jammy main\n")
    with pytest.raises(BackendUnavailable, match="--mirror"):
        install.debian_mirror(tmp_path)


@pytest.mark.arm
def test_install_arm_second_run_reuses_the_cache(arm):
    """install-arm is idempotent: with the rootfs cached it builds nothing and checks that ncnn imports."""
    if install.is_arm_host():
        pytest.skip("install-arm refuses on an ARM host")
    result = install.install_arm()
    assert result.built is False and result.environment.ncnn_version == install.host_ncnn_version()
