"""Build pycaffe from source so the ``caffe`` engine can run.

Caffe is in neither Debian bookworm nor PyPI as a wheel, but PyPI has the ``brocolli-caffe`` sdist: BVLC Caffe
plus the SSD layers. Its ``setup.py`` insists on conda and Python 3.7-3.9, so this module drives its CMake
directly against Debian's libraries, the running interpreter and Debian's Boost.Python for it, then makes
``import caffe`` work through a ``.pth`` file. The build is cached per (sdist, Python ABI, NumPy major, recipe),
so a second run only re-links it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8conv.atomic import write_text_atomic
from int8conv.errors import BackendUnavailable, Int8ConvError

log = logging.getLogger(__name__)

CAFFE_VERSION = "9.0.2"
SDIST_REQUIREMENT = f"brocolli-caffe=={CAFFE_VERSION}"
SDIST_NAME = f"brocolli-caffe-{CAFFE_VERSION}.tar.gz"
SDIST_SHA256 = "c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a"
#: Bump when the patches or build flags change, so an old cached build is not reused.
RECIPE = 1
#: Debian bookworm packages the build needs (``--no-install-recommends`` is enough).
DEBIAN_PACKAGES = (
    "build-essential",
    "cmake",
    "protobuf-compiler",
    "libprotobuf-dev",
    "libboost-system-dev",
    "libboost-thread-dev",
    "libboost-filesystem-dev",
    "libboost-regex-dev",
    "libboost-python-dev",
    "libgoogle-glog-dev",
    "libgflags-dev",
    "libhdf5-dev",
    "libopenblas-dev",
)
#: Modules ``import caffe`` needs once ``caffe/io.py`` imports scikit-image and SciPy lazily.
PYTHON_MODULES = {"numpy": "numpy", "google.protobuf": "protobuf", "six": "six"}
#: Written beside the ``caffe`` package; the engine reads it to know whether this pycaffe has CUDA.
BUILD_INFO = "int8conv_build.json"
PTH_NAME = "int8conv-pycaffe.pth"


def _source_patches(boost_python: str) -> list[tuple[str, str, str]]:
    """Exact source edits: (file, text in the sdist, replacement). Each is applied once; a file matching neither
    means the sdist is not the one this recipe was written for."""
    return [
        # Debian names Boost.Python after the Python version it was built for.
        ("python/CMakeLists.txt", "-lboost_python ", f"-l{boost_python} "),
        # caffe/io.py is imported by `import caffe`; only load_image/resize_image need scikit-image/SciPy.
        (
            "python/caffe/io.py",
            "import numpy as np\nimport skimage.io\nfrom scipy.ndimage import zoom\n",
            "import numpy as np\n",
        ),
        ("python/caffe/io.py", "datum.data = arr.tostring()", "datum.data = arr.tobytes()"),
        (
            "python/caffe/io.py",
            "np.fromstring(datum.data, dtype=np.uint8)",
            "np.frombuffer(datum.data, dtype=np.uint8)",
        ),
        (
            "python/caffe/io.py",
            "    img = skimage.img_as_float(skimage.io.imread(filename, as_grey=not color))",
            "    import skimage.io\n    img = skimage.img_as_float(skimage.io.imread(filename, as_gray=not color))",
        ),
        (
            "python/caffe/io.py",
            "    if im.shape[-1] == 1 or im.shape[-1] == 3:\n        im_min, im_max",
            "    from scipy.ndimage import zoom\n    from skimage.transform import resize\n"
            "    if im.shape[-1] == 1 or im.shape[-1] == 3:\n        im_min, im_max",
        ),
    ]


@dataclass
class InstallResult:
    """What ``install_caffe`` did, for the CLI's summary."""

    build_dir: Path
    python_dir: Path
    pth_file: Path
    built: bool  # False when a cached build was re-linked
    seconds: float


class BuildFailed(Int8ConvError):
    """A build step failed; the message names the step and the log file."""


# ---------------------------------------------------------------- platform and prerequisites


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def boost_python_name() -> str:
    """Debian's Boost.Python library for the running interpreter, e.g. ``boost_python311``."""
    return f"boost_python{sys.version_info.major}{sys.version_info.minor}"


def multiarch() -> str:
    """Debian's multiarch triplet (``x86_64-linux-gnu``): where the HDF5 and Boost libraries live."""
    triplet = sysconfig.get_config_var("MULTIARCH")
    if not triplet:
        try:
            triplet = subprocess.run(
                ["gcc", "-print-multiarch"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            triplet = f"{platform.machine()}-linux-gnu"
    return triplet


def check_platform() -> None:
    """Refuse early, with the reason, where this recipe cannot work."""
    if sys.platform != "linux":
        raise BackendUnavailable(
            f"install-caffe builds on Debian/Ubuntu Linux only; this is {platform.system()}. "
            "Use --backend opencv (the default engine), or build Caffe yourself."
        )
    if sys.version_info[:2] != (3, 11):
        raise BackendUnavailable(
            f"install-caffe supports Python 3.11 only (Debian bookworm's Boost.Python is built for it); this is "
            f"Python {platform.python_version()}. Run it from a Python 3.11 environment, or use --backend opencv."
        )
    if shutil.which("dpkg-query") is None or not Path("/etc/debian_version").exists():
        raise BackendUnavailable(
            "install-caffe needs a Debian-based system (it uses Debian's Boost.Python, glog, "
            "protobuf, HDF5 and OpenBLAS packages); dpkg-query was not found."
        )


def missing_packages(packages: Sequence[str] = DEBIAN_PACKAGES) -> list[str]:
    """The Debian packages of ``packages`` that are not installed."""
    missing = []
    for package in packages:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
        if status.returncode != 0 or "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


def apt_command(packages: Sequence[str]) -> list[str]:
    return ["apt-get", "install", "-y", "--no-install-recommends", *packages]


def install_packages(packages: Sequence[str], log_file: Path) -> None:
    """Run apt-get (root only): what ``--install-deps`` does."""
    if os.geteuid() != 0:
        raise BackendUnavailable(
            "--install-deps runs apt-get and needs root; run as root, or install them first:\n"
            f"  sudo {shlex.join(apt_command(packages))}"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("installing Debian packages: %s", " ".join(packages))
    _run_logged(["apt-get", "update"], "apt-get update", log_file, env=env)
    _run_logged(apt_command(packages), "apt-get install", log_file, env=env)


def python_include_dir() -> Path:
    return Path(sysconfig.get_paths()["include"])


def check_toolchain(install_deps: bool, log_file: Path) -> None:
    """Debian packages, Python headers and Boost.Python for this interpreter; say exactly what is missing."""
    packages = list(DEBIAN_PACKAGES)
    system_python = Path(sys.base_prefix) == Path("/usr")
    if system_python:
        packages.append(f"libpython{sys.version_info.major}.{sys.version_info.minor}-dev")
    missing = missing_packages(packages)
    if missing and install_deps:
        install_packages(missing, log_file)
        missing = missing_packages(packages)
    if missing:
        raise BackendUnavailable(
            "building pycaffe needs these Debian packages, which are not installed:\n"
            f"  {shlex.join(apt_command(missing))}\n"
            "(or run `int8conv install-caffe --install-deps` as root)"
        )
    if not (python_include_dir() / "Python.h").exists():
        raise BackendUnavailable(
            f"Python.h is missing from {python_include_dir()}: this interpreter has no "
            "development headers (for a Debian system Python: apt-get install python3-dev)"
        )
    library = Path("/usr/lib") / multiarch() / f"lib{boost_python_name()}.so"
    if not library.exists():
        raise BackendUnavailable(
            f"{library} does not exist: Debian's Boost.Python is not built for Python "
            f"{sys.version_info.major}.{sys.version_info.minor}, so pycaffe cannot be built "
            "for this interpreter"
        )
    for tool in ("cmake", "make", "g++"):
        if shutil.which(tool) is None:
            raise BackendUnavailable(f"'{tool}' is not on PATH (Debian packages: build-essential cmake)")


def missing_python_modules() -> list[str]:
    """pip names of the modules ``import caffe`` needs that this environment lacks."""
    missing = []
    for module, pip_name in PYTHON_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(pip_name)
    return missing


def check_python_modules(install_deps: bool, log_file: Path) -> None:
    missing = missing_python_modules()
    if missing and install_deps:
        _run_logged([sys.executable, "-m", "pip", "install", *missing], "pip install", log_file)
        missing = missing_python_modules()
    if missing:
        raise BackendUnavailable(
            "`import caffe` needs these Python packages: "
            f"{shlex.join([sys.executable, '-m', 'pip', 'install', *missing])} "
            "(or run `int8conv install-caffe --install-deps`)"
        )


def cuda_toolkit() -> Path | None:
    """nvcc, when a CUDA toolkit is installed."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.exists() else None


def check_cuda_request() -> None:
    """``--cuda``: say why this recipe builds CPU-only pycaffe even with a toolkit present."""
    nvcc = cuda_toolkit()
    if nvcc is None:
        raise BackendUnavailable(
            "--cuda: no CUDA toolkit found (nvcc is not on PATH or in /usr/local/cuda/bin); "
            "run without --cuda for a CPU-only pycaffe"
        )
    raise BackendUnavailable(
        f"--cuda: a CUDA toolkit is present ({nvcc}), but brocolli-caffe {CAFFE_VERSION}'s CMake is CPU-only (it "
        "defines CPU_ONLY unconditionally and has no CUDA build rules), so this recipe cannot build a GPU pycaffe. "
        "Run without --cuda for a CPU-only build; for --gpu, install a CUDA-enabled pycaffe yourself (e.g. BVLC "
        "Caffe built with CUDA): int8conv uses any importable pycaffe."
    )


# ---------------------------------------------------------------- cache layout


def cache_root() -> Path:
    """``$INT8CONV_CACHE``, else ``$XDG_CACHE_HOME/int8conv`` (``~/.cache/int8conv``)."""
    if os.environ.get("INT8CONV_CACHE"):
        return Path(os.environ["INT8CONV_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "int8conv"


def build_key() -> str:
    """What makes a build reusable: the sdist, the Python ABI, NumPy's ABI major, the machine and this recipe."""
    parts = [SDIST_SHA256, python_tag(), f"numpy{np.__version__.split('.')[0]}", platform.machine(), str(RECIPE)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def build_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"caffe-{CAFFE_VERSION}-{build_key()}"


def python_dir(build: Path) -> Path:
    """The folder that holds the built ``caffe`` package (what goes on ``sys.path``)."""
    return build / "src" / f"brocolli-caffe-{CAFFE_VERSION}" / "python"


def read_build_info(package_dir: Path) -> dict | None:
    """The build record written next to a ``caffe`` package by this module, or None."""
    path = package_dir.parent / BUILD_INFO
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- steps


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _run_logged(
    command: Sequence[str], step: str, log_file: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> None:
    """Run ``command`` with its output appended to ``log_file``; a failure names the step and the log."""
    log.debug("%s: %s", step, shlex.join(command))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(f"\n### {step}: {shlex.join(command)}\n")
        handle.flush()
        try:
            code = subprocess.run(command, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        except OSError as exc:
            raise BuildFailed(f"{step} could not start ({exc}); build log: {log_file}") from exc
    if code != 0:
        raise BuildFailed(
            f"{step} failed with exit code {code}. Last lines of the build log {log_file}:\n"
            f"{textwrap.indent(_tail(log_file), '  ')}\nfull log: {log_file}"
        )


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify_sdist(path: Path) -> None:
    """A wrong hash is fatal: the file is removed so the next run downloads it again."""
    actual = sha256_of(path)
    if actual != SDIST_SHA256:
        path.unlink(missing_ok=True)
        raise BuildFailed(
            f"{path.name}: sha256 {actual} does not match the expected {SDIST_SHA256}; "
            "the download was removed (a corrupted download or a changed package on the index)"
        )


def fetch_sdist(download_dir: Path, log_file: Path) -> Path:
    """The verified sdist, downloaded with pip unless a verified copy is cached."""
    target = download_dir / SDIST_NAME
    if target.exists():
        verify_sdist(target)
        log.info("sdist cached: %s", target)
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip", SDIST_REQUIREMENT)
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        _run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                SDIST_REQUIREMENT,
            ],
            "pip download",
            log_file,
        )
        got = Path(tmp) / SDIST_NAME
        if not got.exists():
            raise BuildFailed(f"pip download did not produce {SDIST_NAME}; build log: {log_file}")
        verify_sdist(got)
        os.replace(got, target)
    log.info("sdist sha256 verified: %s", SDIST_SHA256)
    return target


def unpack(sdist: Path, src_root: Path) -> Path:
    """Unpack once into ``src_root``; an existing tree (from an interrupted build) is kept for ``make``."""
    source = src_root / f"brocolli-caffe-{CAFFE_VERSION}"
    if (source / "CMakeLists.txt").exists():
        return source
    src_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=src_root) as tmp:
        with tarfile.open(sdist) as archive:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 (and distributions' backports)
                archive.extractall(tmp, filter="data")
            else:
                root = Path(tmp).resolve()
                for member in archive.getmembers():
                    if member.islnk() or member.issym() or not (root / member.name).resolve().is_relative_to(root):
                        raise BuildFailed(f"{sdist}: unsafe archive member {member.name!r}")
                archive.extractall(tmp)
        os.replace(Path(tmp) / source.name, source)
    log.info("unpacked to %s", source)
    return source


def patch_sources(source: Path) -> None:
    """Apply ``_source_patches``; each is idempotent, and an unexpected file is an error."""
    for relative, old, new in _source_patches(boost_python_name()):
        path = source / relative
        text = path.read_text(encoding="utf-8")
        if new in text and (old not in text or old in new):
            continue
        if old not in text:
            raise BuildFailed(
                f"{path}: expected text not found ({old.splitlines()[0]!r}); this is not the "
                f"brocolli-caffe {CAFFE_VERSION} source this recipe patches"
            )
        write_text_atomic(path, text.replace(old, new, 1))


def configure(source: Path, build: Path, log_file: Path) -> None:
    """CMake for a CPU-only pycaffe against the running interpreter and Debian's libraries."""
    lib_dir = f"/usr/lib/{multiarch()}/hdf5/serial"
    cxx_flags = " ".join(
        [
            f"-I{python_include_dir()}",
            f"-I{np.get_include()}",
            "-I/usr/include/hdf5/serial",
            f"-I{source / 'src'}",
            "-DWITH_PYTHON_LAYER",
        ]
    )
    build.mkdir(parents=True, exist_ok=True)
    _run_logged(
        [
            "cmake",
            str(source),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCPU_ONLY=ON",
            "-DBUILD_python=ON",
            f"-DANACONDA_HOME={sys.base_prefix}",
            f"-DPYTHON_VERSION=python{sys.version_info.major}.{sys.version_info.minor}",
            f"-DCMAKE_CXX_FLAGS={cxx_flags}",
            f"-DCMAKE_SHARED_LINKER_FLAGS=-L{lib_dir}",
            f"-DCMAKE_EXE_LINKER_FLAGS=-L{lib_dir}",
        ],
        "cmake configure",
        log_file,
        cwd=build,
    )


def compile_pycaffe(build: Path, jobs: int, log_file: Path) -> None:
    """Only the ``pycaffe`` target: it compiles Caffe's sources into ``_caffe.so`` and skips the tests."""
    log.info("compiling pycaffe with %d jobs (minutes; progress in %s)", jobs, log_file)
    _run_logged(["make", f"-j{jobs}", "pycaffe"], "make pycaffe", log_file, cwd=build)


def _check_script(package_parent: Path) -> str:
    """A fresh interpreter must import caffe beside int8conv's own schema and run a one-layer net."""
    return textwrap.dedent(f"""
        import os, sys, tempfile, json
        sys.path.insert(0, {str(package_parent)!r})
        import numpy as np
        import caffe
        from caffe.proto import caffe_pb2 as theirs
        from int8conv.caffe.proto import caffe_pb2 as ours
        assert theirs.DESCRIPTOR.package == "caffe" and ours.DESCRIPTOR.package == "int8conv_caffe"
        net_text = 'input: "x" input_shape {{ dim: 1 dim: 1 dim: 2 dim: 3 }} ' \\
                   'layer {{ name: "r" type: "ReLU" bottom: "x" top: "y" }}'
        with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
            f.write(net_text)
        try:
            caffe.set_mode_cpu()
            net = caffe.Net(f.name, caffe.TEST)
        finally:
            os.unlink(f.name)
        x = np.arange(-3, 3, dtype=np.float32).reshape(1, 1, 2, 3)
        net.blobs["x"].data[...] = x
        y = net.forward()["y"]
        assert np.array_equal(y, np.maximum(x, 0)), y
        print(json.dumps({{"caffe": caffe.__file__, "protobuf": __import__("google.protobuf").protobuf.__version__}}))
    """)


def verify_import(package_parent: Path, log_file: Path) -> dict:
    """Run the check in a subprocess (with GLOG quiet) so a crash in ``_caffe.so`` cannot take us down."""
    int8conv_root = str(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ,
        GLOG_minloglevel="2",
        PYTHONPATH=os.pathsep.join(filter(None, [int8conv_root, os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-c", _check_script(package_parent)], capture_output=True, text=True, env=env
    )
    return check_report(done, log_file, "import check", "the built pycaffe does not import or run")


def check_report(done: subprocess.CompletedProcess, log_file: Path, title: str, failure: str) -> dict:
    """The JSON a check script printed last; its output goes to the build log under ``### title``, and a failed
    run is a ``BuildFailed`` that starts with ``failure`` and shows the end of its stderr."""
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(f"\n### {title}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise BuildFailed(
            f"{failure} (exit {done.returncode}):\n"
            f"{textwrap.indent(done.stderr.strip()[-3000:], '  ')}\nbuild log: {log_file}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def site_packages() -> Path:
    """Where a ``.pth`` file makes ``caffe`` importable: this environment's, else the user's site-packages."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    if os.access(purelib, os.W_OK):
        return purelib
    if site.ENABLE_USER_SITE:
        return Path(site.getusersitepackages())
    raise BackendUnavailable(
        f"cannot write to {purelib} and user site-packages are disabled; run from a "
        "virtual environment you own, or add the printed folder to PYTHONPATH yourself"
    )


def link_into_environment(package_parent: Path) -> Path:
    """Write the ``.pth`` file (atomically); warn when another ``caffe`` would shadow or be shadowed by ours."""
    target = site_packages() / PTH_NAME
    write_text_atomic(target, f"{package_parent}\n")
    spec = importlib.util.find_spec("caffe") if "caffe" not in sys.modules else None
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent.parent != package_parent.resolve():
        log.warning(
            "another 'caffe' package is importable here (%s); check `python -c 'import caffe; "
            "print(caffe.__file__)'` shows %s",
            spec.origin,
            package_parent / "caffe",
        )
    return target


class _Lock:
    """An exclusive lock beside the build folder, so two installs never build into one tree."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another install is building in %s; waiting for it", self.path.parent)
            fcntl.flock(self._handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


def _steps(build: Path, install_deps: bool, jobs: int, log_file: Path) -> Iterator[str]:
    """The build proper, one named step at a time (the caller logs progress)."""
    yield "checking prerequisites"
    check_toolchain(install_deps, log_file)
    check_python_modules(install_deps, log_file)
    yield "fetching the sdist"
    sdist = fetch_sdist(build / "download", log_file)
    yield "unpacking and patching"
    source = unpack(sdist, build / "src")
    patch_sources(source)
    yield "configuring"
    configure(source, build / "build", log_file)
    yield "compiling"
    compile_pycaffe(build / "build", jobs, log_file)


def install_caffe(
    root: Path | None = None,
    jobs: int | None = None,
    cuda: bool = False,
    install_deps: bool = False,
    rebuild: bool = False,
) -> InstallResult:
    """Build (or reuse) pycaffe and make ``import caffe`` work in this Python environment."""
    started = time.monotonic()
    check_platform()
    if cuda:
        check_cuda_request()
    build = build_dir(root)
    package_parent = python_dir(build)
    info_path = package_parent / BUILD_INFO
    log_file = build / "build.log"
    with _Lock(build.with_name(build.name + ".lock")):
        if rebuild and build.exists():
            log.info("--rebuild: removing %s", build)
            shutil.rmtree(build)
        built = not (info_path.exists() and (package_parent / "caffe" / "_caffe.so").exists())
        if built:
            log.info("building pycaffe (brocolli-caffe %s, CPU only) in %s", CAFFE_VERSION, build)
            build.mkdir(parents=True, exist_ok=True)
            log_file.write_text(f"int8conv install-caffe {time.strftime('%Y-%m-%d %H:%M:%S')}\n", encoding="utf-8")
            for step in _steps(build, install_deps, jobs or os.cpu_count() or 1, log_file):
                log.info("install-caffe: %s", step)
        else:
            log.info("cached pycaffe build found in %s", build)
        log.info("install-caffe: checking that caffe imports and runs")
        check_python_modules(install_deps, log_file)
        found = verify_import(package_parent, log_file)
        if built:
            write_text_atomic(
                info_path,
                json.dumps(
                    {
                        "version": CAFFE_VERSION,
                        "sdist_sha256": SDIST_SHA256,
                        "recipe": RECIPE,
                        "cuda": False,
                        "python": platform.python_version(),
                        "numpy": np.__version__,
                        "protobuf": found["protobuf"],
                        "build_seconds": round(time.monotonic() - started, 1),
                    },
                    indent=2,
                )
                + "\n",
            )
        pth = link_into_environment(package_parent)
    log.info("pycaffe ready: %s (import caffe via %s)", found["caffe"], pth)
    return InstallResult(build, package_parent, pth, built, time.monotonic() - started)
