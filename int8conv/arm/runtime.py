"""Run ncnn models on ncnn's ARM kernels: in the arm64 rootfs under qemu, or natively on an aarch64 host.

The host writes the models and inputs to a job folder, ``runner.py`` runs them with the rootfs's ncnn (numpy and
ncnn only) and writes the raw output blobs back as ``.npz``; every comparison stays on the host. One runner
process takes all models and images of a job, since qemu's start-up and ncnn's import take seconds there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from int8conv.arm.install import binfmt_enabled, chroot_command, find_environment, is_arm_host
from int8conv.errors import BackendUnavailable, Int8ConvError, ModelError
from int8conv.ncnn.runtime import dequantize_blob, requantized_scales
from int8conv.progress import progress

log = logging.getLogger(__name__)

#: QEMU_CPU models: ARMv8.0 (no fp16 arithmetic, no dot product), ARMv8.2 + dot product (a phone), everything
#: qemu emulates (fp16, dot product, i8mm, bf16, SVE).
ARM_CPUS = ("cortex-a53", "cortex-a76", "max")
RUNNER = Path(__file__).with_name("runner.py")


@dataclass(frozen=True)
class ArmOptions:
    """How the ARM kernels run: the emulated CPU and whether fp16 storage/arithmetic is on (a phone's default)."""

    cpu: str = "cortex-a76"
    fp16: bool = True
    threads: int = 1

    def __post_init__(self) -> None:
        if self.cpu not in ARM_CPUS:
            raise Int8ConvError(f"--arm-cpu must be one of {', '.join(ARM_CPUS)}, not '{self.cpu}'")


@dataclass
class ArmModel:
    """One ncnn model of a job and the blobs to bring back."""

    param: Path
    bin: Path
    int8: bool
    blobs: Sequence[str]
    winograd: bool = True


@dataclass
class ArmResult:
    """Per model, per image: the blobs as float32 (int8 blobs dequantized); and how the run went."""

    outputs: list[list[dict[str, np.ndarray]]]
    ms: list[list[float]]
    info: dict = field(default_factory=dict)


@dataclass
class _Target:
    """Where the runner runs: ``prefix`` starts it, job folders go in ``jobs``, and ``rootfs`` (when emulated) is
    the root the runner sees, so host paths under it are given to the runner relative to it."""

    prefix: list[str]
    jobs: Path
    rootfs: Path | None = None

    def path(self, host_path: Path) -> str:
        return "/" + str(host_path.relative_to(self.rootfs)) if self.rootfs else str(host_path)


def unavailable() -> str | None:
    """Why ARM kernels cannot run here (what to do about it), or None when they can."""
    if is_arm_host():
        return None
    if find_environment() is None:
        return (
            "the arm64 environment is not installed (or not for this ncnn version): run `int8conv install-arm` "
            "as root once (minutes, then cached)"
        )
    if not binfmt_enabled():
        return (
            "qemu-aarch64 is not registered with binfmt_misc (the host rebooted?): run `int8conv install-arm` "
            "again as root (seconds: the rootfs is cached)"
        )
    if os.geteuid() != 0:
        return "running the ARM kernels under qemu uses chroot, which needs root; run as root"
    return None


def _target() -> _Target:
    """This environment's own Python on an ARM host, else the arm64 rootfs under qemu."""
    reason = unavailable()
    if reason is not None:
        raise BackendUnavailable(reason)
    if is_arm_host():
        return _Target([sys.executable], Path(tempfile.gettempdir()))
    environment = find_environment()
    return _Target(
        chroot_command(environment.rootfs, [environment.python]), environment.rootfs / "tmp", environment.rootfs
    )


def run_arm(
    models: Sequence[ArmModel], inputs: Sequence[Mapping[str, np.ndarray]], options: ArmOptions | None = None
) -> ArmResult:
    """Run every model on every input (CHW float32 per input blob) on ARM kernels; one runner process."""
    options = options or ArmOptions()
    if not inputs:
        raise ModelError("run_arm needs at least one input")
    names = list(inputs[0])
    target = _target()
    with tempfile.TemporaryDirectory(prefix="int8conv-arm-", dir=target.jobs) as tmp:
        job = Path(tmp)
        shutil.copy2(RUNNER, job / "runner.py")
        (job / "inputs").mkdir()
        for index, arrays in enumerate(inputs):
            np.savez(
                job / "inputs" / f"{index}.npz",
                **{f"i{k}": np.asarray(arrays[name], dtype=np.float32) for k, name in enumerate(names)},
            )
        described = []
        for m, model in enumerate(models):
            shutil.copy2(model.param, job / f"m{m}.param")
            shutil.copy2(model.bin, job / f"m{m}.bin")
            described.append(
                {
                    "param": f"m{m}.param",
                    "bin": f"m{m}.bin",
                    "int8": model.int8,
                    "winograd": model.winograd,
                    "blobs": list(model.blobs),
                }
            )
        (job / "job.json").write_text(
            json.dumps(
                {
                    "threads": options.threads,
                    "fp16": options.fp16,
                    "input_names": names,
                    "inputs": len(inputs),
                    "models": described,
                }
            ),
            encoding="utf-8",
        )
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "QEMU_CPU": options.cpu,
            "OMP_NUM_THREADS": str(options.threads),
        }
        _execute(target.prefix + [target.path(job / "runner.py"), target.path(job)], env, len(models) * len(inputs))
        info = json.loads((job / "result.json").read_text(encoding="utf-8"))
        outputs = [
            [_read_outputs(job / "outputs" / f"{m}_{i}.npz", model) for i in range(len(inputs))]
            for m, model in enumerate(models)
        ]
    info["emulated"] = not is_arm_host()
    return ArmResult(outputs, info.pop("ms"), info)


def _execute(command: list[str], env: dict[str, str], steps: int) -> None:
    """Run the runner with a progress bar fed by its ``done`` lines; a failure shows its stderr."""
    log.debug("ARM runner: %s", " ".join(command))
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
        with progress(
            total=steps, desc="ARM kernels (emulated)" if not is_arm_host() else "ARM kernels", unit="run"
        ) as bar:
            for line in process.stdout:
                if line.startswith("done "):
                    bar.update(1)
        code = process.wait()
        if code != 0:
            errors.seek(0)
            raise BackendUnavailable(f"the ARM runner failed (exit {code}): {errors.read().strip()[-3000:]}")


def _read_outputs(path: Path, model: ArmModel) -> dict[str, np.ndarray]:
    scales: dict[str, float] | None = None
    out = {}
    with np.load(path) as data:
        for j, blob in enumerate(model.blobs):
            array = data[f"b{j}"]
            if scales is None and (model.int8 or array.dtype == np.int8):  # as on x86: NcnnRunner.extract
                scales = requantized_scales(model.param, model.bin)
            out[blob] = dequantize_blob(array, blob, scales, model.param)
    return out
