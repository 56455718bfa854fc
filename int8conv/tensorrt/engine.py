"""Build and run TensorRT engines from the exported files.

Three ways to give TensorRT the calibration, by TensorRT version:

* ``qdq``: the Q/DQ ONNX (explicit quantization), the only INT8 path of TensorRT 11, supported since 8.0;
  also what TensorRT-RTX (``tensorrt_rtx``) reads.
* ``cache``: the FP32 ONNX plus the calibration cache, handed over by a calibrator whose
  ``read_calibration_cache`` returns the file (TensorRT 8-10; the calibrators are gone in 11).
* ``ranges``: the FP32 ONNX plus ``ITensor.set_dynamic_range(-amax, amax)`` per tensor (TensorRT 8-10).

Parsing and building run on the CPU with TensorRT-RTX (the acceptance test of the exports); building
with full TensorRT and running any engine need the ``tensorrt`` package and a CUDA GPU. When one of
them is missing, :class:`~int8conv.errors.BackendUnavailable` says which.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np

from int8conv.errors import BackendUnavailable, ModelError
from int8conv.tables.tensorrt_files import read_calibration_cache

log = logging.getLogger(__name__)

MODES = ("qdq", "cache", "ranges")
#: Python packages of the two TensorRT flavours this module drives.
PACKAGES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}


def import_tensorrt(flavour: str = "tensorrt") -> ModuleType:
    """The TensorRT Python module, or a BackendUnavailable naming what to install."""
    if flavour not in PACKAGES:
        raise BackendUnavailable(f"unknown TensorRT flavour '{flavour}'; choose one of {', '.join(PACKAGES)}")
    try:
        return importlib.import_module(PACKAGES[flavour])
    except ImportError as exc:
        hint = (
            "install TensorRT from NVIDIA (pip install tensorrt --extra-index-url https://pypi.nvidia.com, "
            "or the TensorRT tar/deb packages); it needs a CUDA GPU to build and run engines"
            if flavour == "tensorrt"
            else "pip install tensorrt-rtx-cu12"
        )
        raise BackendUnavailable(f"the Python package '{PACKAGES[flavour]}' is not importable ({exc}): {hint}") from exc


def version_of(trt: ModuleType) -> tuple[int, int]:
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def _flag(enum, name: str):
    return getattr(enum, name, None)


_LOGGERS: dict[str, object] = {}


def trt_logger(trt: ModuleType):
    """One logger per TensorRT module: TensorRT keeps the first one it was given and warns about any other."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


class ParsedNetwork:
    """A TensorRT builder with the network its ONNX parser made from one model (kept alive together)."""

    def __init__(self, trt: ModuleType, onnx_model: bytes | str | Path, strongly_typed: bool) -> None:
        self.trt = trt
        self.logger = trt_logger(trt)
        self.builder = trt.Builder(self.logger)
        flags = 0
        explicit = _flag(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
        if explicit is not None and version_of(trt)[0] < 10:
            flags |= 1 << int(explicit)
        typed = _flag(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
        if strongly_typed and typed is not None:
            flags |= 1 << int(typed)
        self.strongly_typed = bool(strongly_typed and typed is not None)
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)
        data = Path(onnx_model).read_bytes() if isinstance(onnx_model, (str, Path)) else onnx_model
        if not self.parser.parse(data):
            errors = "; ".join(str(self.parser.get_error(i)) for i in range(self.parser.num_errors))
            raise ModelError(f"the {trt.__name__} ONNX parser rejected the model: {errors}")

    def tensors(self) -> dict[str, object]:
        """Every tensor of the parsed network by name: inputs and all layer outputs."""
        found = {}
        for i in range(self.network.num_inputs):
            tensor = self.network.get_input(i)
            found[tensor.name] = tensor
        for i in range(self.network.num_layers):
            layer = self.network.get_layer(i)
            for j in range(layer.num_outputs):
                tensor = layer.get_output(j)
                found[tensor.name] = tensor
        return found

    def layer_types(self) -> list[str]:
        return [str(self.network.get_layer(i).type).split(".")[-1] for i in range(self.network.num_layers)]

    def profile_for_dynamic_batch(self, config, max_batch: int) -> None:
        """An optimization profile covering batch 1..max_batch for inputs exported with a dynamic batch."""
        profile = None
        for i in range(self.network.num_inputs):
            tensor = self.network.get_input(i)
            shape = tuple(tensor.shape)
            if shape and shape[0] == -1:
                profile = profile or self.builder.create_optimization_profile()
                rest = shape[1:]
                profile.set_shape(tensor.name, (1,) + rest, (max_batch,) + rest, (max_batch,) + rest)
        if profile is not None:
            config.add_optimization_profile(profile)


def _cache_calibrator(trt: ModuleType, cache_text: bytes, algorithm: str):
    """A calibrator that never calibrates: it hands TensorRT the cache (the header picks the class)."""
    base = {
        "EntropyCalibration2": "IInt8EntropyCalibrator2",
        "MinMaxCalibration": "IInt8MinMaxCalibrator",
        "EntropyCalibration": "IInt8EntropyCalibrator",
        "LegacyCalibration": "IInt8LegacyCalibrator",
    }.get(algorithm)
    parent = getattr(trt, base or "", None)
    if parent is None:
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} has no {base or algorithm} calibrator: calibration "
            "caches need TensorRT 8-10; use the Q/DQ ONNX with TensorRT 11"
        )

    class CacheCalibrator(parent):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            parent.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # no data: TensorRT must use the cache
            return None

        def read_calibration_cache(self):
            return cache_text

        def write_calibration_cache(self, cache) -> None:
            return None

    return CacheCalibrator()


def build_plan(
    onnx_model: bytes | str | Path,
    mode: str = "qdq",
    *,
    flavour: str = "tensorrt",
    cache: str | Path | None = None,
    ranges: Mapping[str, float] | None = None,
    max_batch: int = 1,
) -> bytes:
    """A serialized engine (plan) for the ONNX model; ``mode`` says where the INT8 ranges come from.

    TensorRT-RTX builds on the CPU; full TensorRT needs a GPU at build time.
    """
    if mode not in MODES:
        raise ModelError(f"unknown TensorRT INT8 mode '{mode}'; choose one of {', '.join(MODES)}")
    trt = import_tensorrt(flavour)
    if flavour == "tensorrt":
        require_gpu()
    parsed = ParsedNetwork(trt, onnx_model, strongly_typed=(mode == "qdq" and version_of(trt)[0] >= 10))
    config = parsed.builder.create_builder_config()
    parsed.profile_for_dynamic_batch(config, max_batch)
    int8 = _flag(trt.BuilderFlag, "INT8")
    if mode == "qdq":
        if not parsed.strongly_typed and int8 is not None:
            config.set_flag(int8)
    else:
        if int8 is None:
            raise BackendUnavailable(
                f"{trt.__name__} {trt.__version__} has no implicit INT8 (BuilderFlag.INT8): "
                f"'{mode}' needs TensorRT 8-10; use the Q/DQ ONNX (mode qdq)"
            )
        config.set_flag(int8)
        if mode == "cache":
            if cache is None:
                raise ModelError("mode 'cache' needs the calibration cache file")
            header = read_calibration_cache(cache)
            config.int8_calibrator = _cache_calibrator(trt, Path(cache).read_bytes(), header.algorithm)
        else:
            if ranges is None:
                raise ModelError("mode 'ranges' needs the dynamic ranges")
            tensors = parsed.tensors()
            unknown = [name for name in ranges if name not in tensors]
            if unknown:
                raise ModelError(f"the ranges name tensors the network does not have: {', '.join(unknown[:5])}")
            for name, amax in ranges.items():
                tensors[name].set_dynamic_range(-float(amax), float(amax))
    plan = parsed.builder.build_serialized_network(parsed.network, config)
    if plan is None:
        raise ModelError(f"{trt.__name__} could not build an engine from the model (see its log above)")
    return bytes(plan)


# running (GPU) -----------------------------------------------------------------------------------------------
def _cudart():
    """CUDA runtime bindings from cuda-python (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise BackendUnavailable(
        "cuda-python is not installed (pip install cuda-python): int8conv uses it to find the "
        "GPU and to move data to and from it"
    )


def _check(result):
    """cuda-python returns (error, *values); raise on an error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendUnavailable(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


def require_gpu() -> None:
    """BackendUnavailable unless cuda-python sees at least one CUDA GPU."""
    cudart = _cudart()
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0 or count == 0:
        raise BackendUnavailable(f"no CUDA GPU is visible (cudaGetDeviceCount: {error}, {count} devices)")


class EngineRunner:
    """Deserializes a plan and runs it on the GPU with TensorRT's tensor-address API (TensorRT >= 8.5)."""

    def __init__(self, plan: bytes, flavour: str = "tensorrt") -> None:
        self.trt = import_tensorrt(flavour)
        require_gpu()
        self.cudart = _cudart()
        self.logger = trt_logger(self.trt)
        self.runtime = self.trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ModelError("TensorRT could not deserialize the engine (built by another TensorRT version or GPU?)")
        if not hasattr(self.engine, "num_io_tensors"):
            raise BackendUnavailable(f"TensorRT {self.trt.__version__} lacks the tensor-address API (needs >= 8.5)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs to the GPU, execute, copy every output back."""
        cudart = self.cudart
        stream = _check(cudart.cudaStreamCreate())
        buffers = []
        try:
            for name in self.inputs:
                array = np.ascontiguousarray(feeds[name], dtype=np.float32)
                self.context.set_input_shape(name, array.shape)
                pointer = _check(cudart.cudaMalloc(array.nbytes))
                buffers.append(pointer)
                _check(
                    cudart.cudaMemcpy(
                        pointer, array.ctypes.data, array.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                    )
                )
                self.context.set_tensor_address(name, pointer)
            results = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = self.trt.nptype(self.engine.get_tensor_dtype(name))
                results[name] = np.empty(shape, dtype=dtype)
                pointer = _check(cudart.cudaMalloc(max(results[name].nbytes, 1)))
                buffers.append(pointer)
                self.context.set_tensor_address(name, pointer)
            if not self.context.execute_async_v3(int(stream)):
                raise ModelError("TensorRT failed to execute the engine")
            _check(cudart.cudaStreamSynchronize(stream))
            for name, pointer in zip(self.outputs, buffers[len(self.inputs) :], strict=True):
                out = results[name]
                _check(
                    cudart.cudaMemcpy(
                        out.ctypes.data, pointer, out.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
                    )
                )
            return results
        finally:
            for pointer in buffers:
                cudart.cudaFree(pointer)
            cudart.cudaStreamDestroy(stream)
