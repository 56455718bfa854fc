"""``int8conv install-arm``: the arm64 rootfs (qemu-user) that ``eval --arch arm64`` runs ncnn's ARM kernels in."""

from __future__ import annotations

import argparse
from pathlib import Path

from int8conv.arm.install import HOST_PACKAGES, SUITE, install_arm

#: the line ``int8conv --help`` shows for this command
SUMMARY = "set up ncnn's ARM kernels under qemu for `eval --arch arm64` (root, once)"
#: its ``--help`` description (it names the packages and the Debian suite, so it is not the docstring)
DESCRIPTION = (
    f"Install {' '.join(HOST_PACKAGES)} with apt-get, register qemu-aarch64 with binfmt_misc, "
    f"debootstrap an arm64 Debian {SUITE} from the mirror apt uses and create a venv in it with the "
    "aarch64 ncnn wheel of the host's ncnn version and numpy. Needs root and an x86 host; 7 to 15 "
    "minutes on 2 cores the first time, seconds afterwards (cached in $INT8CONV_CACHE, default "
    "~/.cache/int8conv). A second run re-registers binfmt_misc after a reboot."
)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the rootfs is cached (default: $INT8CONV_CACHE or ~/.cache/int8conv)",
    )
    parser.add_argument(
        "--mirror",
        default=None,
        help="Debian mirror URL to debootstrap from (default: the Debian archive in apt's sources)",
    )
    parser.add_argument("--rebuild", action="store_true", help="discard the cached rootfs and build it again")


def run(args: argparse.Namespace) -> int:
    result = install_arm(root=args.cache_dir, mirror=args.mirror, rebuild=args.rebuild)
    how = "built" if result.built else "found cached"
    print(
        f"arm64 environment {how} in {result.seconds:.0f} s: {result.environment.rootfs} "
        f"(ncnn {result.environment.ncnn_version} in {result.environment.python}); "
        "run `int8conv eval --arch arm64 ...`"
    )
    return 0
