"""``int8conv install-caffe``: build pycaffe (CPU) from the brocolli-caffe sdist and make it importable."""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv.engines.caffe_build import CAFFE_VERSION, DEBIAN_PACKAGES, SDIST_REQUIREMENT, install_caffe

#: the line ``int8conv --help`` shows for this command
SUMMARY = "build pycaffe for the optional 'caffe' FP32 backend"
#: its ``--help`` description (it names the pinned versions, so it is not the docstring)
DESCRIPTION = (
    f"Download {SDIST_REQUIREMENT} (sha256-checked), build a CPU-only pycaffe with CMake against "
    "Debian's libraries and make `import caffe` work in this Python environment (a .pth file). "
    "The build is cached: a second run only re-links it. Needs Linux, Python 3.11 and the Debian "
    f"packages {' '.join(DEBIAN_PACKAGES)}."
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--install-deps",
        action="store_true",
        help="install missing Debian packages with apt-get (root) and Python packages with pip",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where builds are cached (default: $INT8CONV_CACHE or ~/.cache/int8conv)",
    )
    parser.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--rebuild", action="store_true", help="discard the cached build and build again")
    parser.add_argument(
        "--cuda",
        action="store_true",
        help=f"ask for a CUDA build (brocolli-caffe {CAFFE_VERSION} builds CPU-only; this says why)",
    )


def run(args: argparse.Namespace) -> int:
    result = install_caffe(
        root=args.cache_dir, jobs=args.jobs, cuda=args.cuda, install_deps=args.install_deps, rebuild=args.rebuild
    )
    how = "built" if result.built else "re-linked the cached build"
    print(
        f"pycaffe {how} in {result.seconds:.0f} s: {result.python_dir / 'caffe'} "
        f"(made importable by {result.pth_file}); use it with --backend caffe"
    )
    return 0
