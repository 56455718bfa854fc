"""Runs ncnn models on ARM kernels: executed by the arm64 rootfs's Python (numpy and ncnn only, no int8conv).

``python runner.py JOB_DIR`` reads ``JOB_DIR/job.json``::

    {"threads": 1, "fp16": true, "input_names": ["data"], "inputs": 3,
     "models": [{"param": "m0.param", "bin": "m0.bin", "int8": false, "winograd": true, "blobs": ["prob"]}]}

with inputs in ``inputs/<i>.npz`` (key ``i<k>`` for ``input_names[k]``, CHW float32), and writes for model ``m`` and
image ``i`` ``outputs/<m>_<i>.npz`` (key ``b<j>`` for ``blobs[j]``, the raw ncnn blob: int8 blobs stay int8, the
host dequantizes them), then ``result.json`` (versions, CPU features, ms per image). One line per finished image
goes to stdout for the host's progress bar. All the logic that compares outputs stays on the host.
"""

import ctypes
import json
import os
import platform
import sys
import time

import ncnn
import numpy as np

#: aarch64 HWCAP / HWCAP2 bits ncnn dispatches its kernels on (linux/arch/arm64/include/uapi/asm/hwcap.h)
HWCAP = {"asimd": 1 << 1, "asimdhp": 1 << 10, "asimddp": 1 << 20, "sve": 1 << 22}
HWCAP2 = {"i8mm": 1 << 13, "bf16": 1 << 14}
AT_HWCAP, AT_HWCAP2 = 16, 26


def cpu_features():
    """The CPU features the kernel (or qemu) reports, as ncnn sees them through getauxval."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        getauxval.argtypes = [ctypes.c_ulong]
        hwcap, hwcap2 = getauxval(AT_HWCAP), getauxval(AT_HWCAP2)
    except (OSError, AttributeError):
        return None
    return [name for name, bit in HWCAP.items() if hwcap & bit] + [name for name, bit in HWCAP2.items() if hwcap2 & bit]


def load(job_dir, model, threads, fp16):
    net = ncnn.Net()
    opt = net.opt
    opt.num_threads = threads
    opt.use_vulkan_compute = False
    opt.use_int8_inference = bool(model["int8"])
    opt.use_winograd_convolution = bool(model.get("winograd", True))
    for flag in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic"):
        setattr(opt, flag, bool(fp16))
    for flag in ("use_bf16_storage", "use_bf16_packed"):
        if hasattr(opt, flag):
            setattr(opt, flag, False)
    param, weights = os.path.join(job_dir, model["param"]), os.path.join(job_dir, model["bin"])
    if net.load_param(param) != 0 or net.load_model(weights) != 0:
        raise SystemExit(f"ncnn could not load {model['param']} / {model['bin']}")
    return net


def main(job_dir):
    with open(os.path.join(job_dir, "job.json"), encoding="utf-8") as handle:
        job = json.load(handle)
    names = job["input_names"]
    inputs = []
    for index in range(job["inputs"]):
        with np.load(os.path.join(job_dir, "inputs", f"{index}.npz")) as data:
            inputs.append([np.ascontiguousarray(data[f"i{k}"], dtype=np.float32) for k in range(len(names))])
    os.makedirs(os.path.join(job_dir, "outputs"), exist_ok=True)
    milliseconds = []
    for m, model in enumerate(job["models"]):
        net = load(job_dir, model, job["threads"], job["fp16"])
        blobs = model["blobs"]
        times = []
        for index, arrays in enumerate(inputs):
            start = time.perf_counter()
            ex = net.create_extractor()
            ex.set_light_mode(False)
            for name, array in zip(names, arrays, strict=True):
                ex.input(name, ncnn.Mat(array).clone())
            out = {}
            for j, blob in enumerate(blobs):
                ret, mat = ex.extract(blob)
                if ret != 0:
                    raise SystemExit(f"{model['param']}: ncnn failed to compute blob '{blob}' (error {ret})")
                out[f"b{j}"] = np.array(mat, copy=True)
            times.append((time.perf_counter() - start) * 1000.0)
            np.savez(os.path.join(job_dir, "outputs", f"{m}_{index}.npz"), **out)
            print(f"done {m} {index}", flush=True)
        milliseconds.append(times)
    result = {
        "ncnn": ncnn.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_features": cpu_features(),
        "qemu_cpu": os.environ.get("QEMU_CPU"),
        "ms": milliseconds,
    }
    with open(os.path.join(job_dir, "result.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1])
