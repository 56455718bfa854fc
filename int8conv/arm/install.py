"""``int8conv install-arm``: an arm64 Debian rootfs with ncnn in it, run on x86 through qemu-user.

ncnn's ARM kernels (NEON, dot-product, i8mm, ARM INT8 Winograd, fp16 storage/arithmetic) are different code from
the x86 ones every other number in this project comes from. ncnn's own CI runs its ARM builds under qemu-user; this
module builds the same kind of environment for a user's model: ``debootstrap --foreign`` an arm64 bookworm, finish
it in a chroot through binfmt_misc + ``qemu-aarch64-static``, then a venv with the aarch64 ``ncnn`` and ``numpy``
wheels, pinned to the host's ncnn version so ARM and x86 differ only in their kernels. Everything is cached under
``$INT8CONV_CACHE``; a second run only re-registers binfmt (lost on reboot) and checks the venv imports.
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from int8conv.atomic import write_text_atomic
from int8conv.engines.caffe_build import (
    BuildFailed,
    _Lock,
    _run_logged,
    cache_root,
    check_report,
    install_packages,
    missing_packages,
)
from int8conv.errors import BackendUnavailable

log = logging.getLogger(__name__)

SUITE = "bookworm"
#: Bump when the rootfs recipe changes, so an old cached rootfs is not reused.
RECIPE = 1
HOST_PACKAGES = ("qemu-user-static", "debootstrap", "binfmt-support")
ROOTFS_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "qemu-aarch64"
QEMU = Path("/usr/bin/qemu-aarch64-static")
ARM_MACHINES = ("aarch64", "arm64")
#: Marker files in the rootfs: each stage is done once.
STAGE1_DONE = ".int8conv-stage1"
STAGE2_DONE = ".int8conv-stage2"
#: Where the venvs live inside the rootfs, one per ncnn version.
VENV_PARENT = "/opt/int8conv"
VENV_INFO = "int8conv_venv.json"
#: pip configuration files copied into the rootfs at the same paths (HOME becomes /root there).
PIP_SYSTEM_CONFIGS = ("/etc/pip.conf", "/etc/xdg/pip")
PIP_USER_CONFIGS = (".config/pip", ".pip")
PASSED_ENV_PREFIXES = ("PIP_",)
PASSED_ENV = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
)


@dataclass
class ArmEnvironment:
    """A finished arm64 rootfs: ``python`` is the venv's interpreter as seen inside the chroot."""

    rootfs: Path
    python: str
    ncnn_version: str


@dataclass
class InstallResult:
    environment: ArmEnvironment
    built: bool  # False when everything was cached
    seconds: float


# ---------------------------------------------------------------- host checks


def is_arm_host() -> bool:
    return platform.machine().lower() in ARM_MACHINES


def check_host() -> None:
    """Refuse, with the reason, where this recipe cannot or need not run."""
    if is_arm_host():
        raise BackendUnavailable(
            f"this host is already ARM ({platform.machine()}): `int8conv eval --arch arm64` runs ncnn's ARM kernels "
            "natively with this environment's ncnn, so install-arm has nothing to build"
        )
    if sys.platform != "linux" or not Path("/etc/debian_version").exists() or shutil.which("dpkg-query") is None:
        raise BackendUnavailable(
            "install-arm needs a Debian-based Linux host (it uses apt-get, debootstrap and "
            f"qemu-user-static); this is {platform.system()}"
        )
    if os.geteuid() != 0:
        raise BackendUnavailable(
            "install-arm needs root: it installs qemu-user-static/debootstrap with apt-get, "
            "registers qemu with binfmt_misc and runs debootstrap and chroot. Run it as root "
            "(e.g. `sudo $(which int8conv) install-arm`)."
        )


def host_ncnn_version() -> str:
    try:
        return metadata.version("ncnn")
    except metadata.PackageNotFoundError as exc:
        raise BackendUnavailable(
            "the host has no ncnn Python package; `pip install ncnn` first (the ARM venv is "
            "pinned to the host's ncnn version)"
        ) from exc


def binfmt_enabled() -> bool:
    """True when the kernel hands aarch64 ELF files to qemu."""
    entry = BINFMT_DIR / BINFMT_NAME
    try:
        return entry.read_text(encoding="utf-8").splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return False


def register_binfmt(log_file: Path) -> None:
    """Mount binfmt_misc if needed and enable qemu-aarch64; say plainly when the kernel or container forbids it."""
    if binfmt_enabled():
        return
    if not (BINFMT_DIR / "register").exists():
        done = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise BackendUnavailable(
                f"binfmt_misc cannot be mounted at {BINFMT_DIR} ({done.stderr.strip() or done.returncode}): the "
                "kernel lacks binfmt_misc or this container may not mount it (it needs a privileged container), so "
                "aarch64 programs cannot run under qemu here"
            )
    try:
        _run_logged(["update-binfmts", "--enable", BINFMT_NAME], "update-binfmts", log_file)
    except BuildFailed as exc:
        raise BackendUnavailable(f"qemu-aarch64 cannot be registered with binfmt_misc: {exc}") from exc
    if not binfmt_enabled():
        raise BackendUnavailable(
            f"{BINFMT_DIR / BINFMT_NAME} is not enabled after update-binfmts; aarch64 programs "
            "cannot run under qemu on this host"
        )
    log.info("registered %s with binfmt_misc", BINFMT_NAME)


# ---------------------------------------------------------------- the Debian mirror apt uses


def _sources_entries(path: Path) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of the ``deb`` entries of one .list or deb822 .sources file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = []
    if path.suffix == ".sources":
        for stanza in text.split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.strip().startswith("#") or ":" not in line:
                    continue
                key, value = line.split(":", 1)
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
    else:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line.startswith("deb "):
                continue
            rest = line[4:].strip()
            if rest.startswith("["):  # options: deb [arch=... signed-by=...] uri suite components
                rest = rest.split("]", 1)[1]
            words = rest.split()
            if len(words) >= 2:
                entries.append((words[0], [words[1]], words[2:]))
    return entries


def apt_sources_files(apt_dir: Path = Path("/etc/apt")) -> list[Path]:
    files = [apt_dir / "sources.list"] if (apt_dir / "sources.list").exists() else []
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    return files


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive apt already uses: an entry for ``SUITE`` itself, else any archive ending in /debian."""
    entries = [entry for path in apt_sources_files(apt_dir) for entry in _sources_entries(path)]
    for uri, suites, components in entries:
        if SUITE in suites and "main" in components:
            return uri.rstrip("/")
    for uri, _, components in entries:
        if uri.rstrip("/").endswith("/debian") and "main" in components:
            return uri.rstrip("/")
    raise BackendUnavailable(
        f"no Debian archive found in {apt_dir}/sources.list(.d) to debootstrap arm64 "
        f"{SUITE} from; pass --mirror URL (a Debian mirror that carries arm64)"
    )


# ---------------------------------------------------------------- cache layout


def rootfs_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"arm64-{SUITE}-r{RECIPE}" / "rootfs"


def venv_path(ncnn_version: str) -> str:
    """The venv inside the rootfs (a chroot path), one per ncnn version."""
    return f"{VENV_PARENT}/ncnn-{ncnn_version}"


def find_environment(root: Path | None = None, ncnn_version: str | None = None) -> ArmEnvironment | None:
    """The installed environment for ``ncnn_version`` (default: the host's), or None."""
    rootfs = rootfs_dir(root)
    version = ncnn_version or host_ncnn_version()
    python = f"{venv_path(version)}/bin/python"
    if (rootfs / STAGE2_DONE).exists() and (rootfs / python.lstrip("/")).parent.parent.joinpath(VENV_INFO).exists():
        return ArmEnvironment(rootfs, python, version)
    return None


# ---------------------------------------------------------------- steps


def debootstrap_first_stage(rootfs: Path, mirror: str, log_file: Path) -> None:
    """Download and unpack the arm64 packages (no arm64 code runs yet); a half-done tree is started again."""
    if (rootfs / STAGE1_DONE).exists():
        return
    if rootfs.exists():
        log.info("removing an unfinished rootfs %s", rootfs)
        shutil.rmtree(rootfs)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    log.info("debootstrap (first stage) arm64 %s into %s (downloads ~100 MB)", SUITE, rootfs)
    _run_logged(
        [
            "debootstrap",
            "--arch=arm64",
            "--foreign",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            SUITE,
            str(rootfs),
            mirror,
        ],
        "debootstrap first stage",
        log_file,
    )
    write_text_atomic(rootfs / STAGE1_DONE, f"{mirror}\n")


def copy_into_rootfs(rootfs: Path, host_path: Path, inside: str | None = None) -> None:
    """Copy a host file or folder to the same path (or ``inside``) in the rootfs."""
    target = rootfs / (inside or str(host_path)).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if host_path.is_dir():
        shutil.copytree(host_path, target, dirs_exist_ok=True)
    else:
        shutil.copy2(host_path, target)


def install_qemu(rootfs: Path) -> None:
    """The static qemu inside the rootfs, for binfmt entries without the F (fix binary) flag."""
    copy_into_rootfs(rootfs, QEMU)


def debootstrap_second_stage(rootfs: Path, log_file: Path) -> None:
    """Configure the packages by running arm64 code in the chroot; on failure the next run starts over."""
    if (rootfs / STAGE2_DONE).exists():
        return
    log.info("debootstrap (second stage) under qemu: 5 to 15 minutes on 2 cores")
    try:
        _run_logged(
            chroot_command(rootfs, ["/debootstrap/debootstrap", "--second-stage"]), "debootstrap second stage", log_file
        )
    except BuildFailed:
        (rootfs / STAGE1_DONE).unlink(missing_ok=True)
        raise
    write_text_atomic(rootfs / STAGE2_DONE, time.strftime("%Y-%m-%d %H:%M:%S\n"))


def ca_bundles() -> list[Path]:
    """The CA files the host's pip trusts (its config's ``cert``, PIP_CERT, SSL_CERT_FILE ...), copied as-is so a
    TLS-intercepting proxy that the host trusts is trusted in the rootfs too."""
    paths = {os.environ.get(name) for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")}
    for config in pip_config_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(config, encoding="utf-8")
        except configparser.Error:
            continue
        paths.update(section.get("cert") for section in parser.values())
    return sorted(Path(p) for p in paths if p and Path(p).is_file())


def pip_config_files() -> list[Path]:
    files = [Path(p) for p in PIP_SYSTEM_CONFIGS]
    files += [Path.home() / p for p in PIP_USER_CONFIGS]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    found = []
    for path in files:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix == ".conf")
        elif path.is_file():
            found.append(path)
    return found


def chroot_pip_env() -> dict[str, str]:
    """The environment pip gets in the chroot: the host's PIP_* and proxy settings, HOME=/root."""
    env = {"HOME": "/root", "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for name, value in os.environ.items():
        if name.startswith(PASSED_ENV_PREFIXES) or name in PASSED_ENV:
            env[name] = value
    return env


def prepare_network(rootfs: Path) -> None:
    """DNS, pip configuration and CA bundles of the host, at the same paths inside the rootfs."""
    for name in ("/etc/resolv.conf", "/etc/hosts"):
        if Path(name).is_file():
            target = rootfs / name.lstrip("/")
            target.unlink(missing_ok=True)  # may be a dangling symlink into the host's /run
            copy_into_rootfs(rootfs, Path(name))
    for path in PIP_SYSTEM_CONFIGS:
        if Path(path).exists():
            copy_into_rootfs(rootfs, Path(path))
    for relative in PIP_USER_CONFIGS:
        if (Path.home() / relative).exists():
            copy_into_rootfs(rootfs, Path.home() / relative, f"/root/{relative}")
    if os.environ.get("PIP_CONFIG_FILE") and Path(os.environ["PIP_CONFIG_FILE"]).is_file():
        copy_into_rootfs(rootfs, Path(os.environ["PIP_CONFIG_FILE"]))
    for bundle in ca_bundles():
        copy_into_rootfs(rootfs, bundle)


def chroot_command(rootfs: Path, command: Sequence[str]) -> list[str]:
    """``chroot ROOTFS command...``, with chroot found on the host's PATH (the command's own PATH is the rootfs's)."""
    chroot = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
    if chroot is None:
        raise BackendUnavailable("chroot is not installed (Debian package coreutils)")
    return [chroot, str(rootfs), *command]


def create_venv(rootfs: Path, ncnn_version: str, log_file: Path) -> str:
    """A venv with ``ncnn==<host version>`` and numpy (aarch64 wheels); its record is written last."""
    venv = venv_path(ncnn_version)
    info = rootfs / venv.lstrip("/") / VENV_INFO
    python = f"{venv}/bin/python"
    if info.exists():
        return python
    prepare_network(rootfs)
    env = chroot_pip_env()
    log.info(
        "creating %s in the rootfs and installing ncnn==%s and numpy with pip (aarch64 wheels)", venv, ncnn_version
    )
    _run_logged(chroot_command(rootfs, ["/usr/bin/python3", "-m", "venv", "--clear", venv]), "venv", log_file, env=env)
    _run_logged(
        chroot_command(
            rootfs, [python, "-m", "pip", "install", "--only-binary", ":all:", f"ncnn=={ncnn_version}", "numpy"]
        ),
        "pip install ncnn numpy",
        log_file,
        env=env,
    )
    found = check_venv(rootfs, python, log_file)
    write_text_atomic(
        info,
        json.dumps(
            {"ncnn": found["ncnn"], "numpy": found["numpy"], "recipe": RECIPE, "python": found["python"]}, indent=2
        )
        + "\n",
    )
    return python


def check_venv(rootfs: Path, python: str, log_file: Path) -> dict:
    """Import ncnn and numpy in the chroot and report their versions (a few seconds under qemu)."""
    script = (
        "import json, platform, ncnn, numpy; print(json.dumps({'ncnn': ncnn.__version__, "
        "'numpy': numpy.__version__, 'python': platform.python_version(), 'machine': platform.machine()}))"
    )
    done = subprocess.run(
        chroot_command(rootfs, [python, "-c", script]),
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    found = check_report(done, log_file, "venv check", "ncnn does not import in the arm64 rootfs")
    if found["machine"] != "aarch64":
        raise BuildFailed(f"the rootfs python reports machine {found['machine']!r}, not aarch64")
    return found


def install_arm(root: Path | None = None, mirror: str | None = None, rebuild: bool = False) -> InstallResult:
    """Build (or reuse) the arm64 rootfs and its ncnn venv; re-register binfmt when the host rebooted."""
    started = time.monotonic()
    check_host()
    version = host_ncnn_version()
    rootfs = rootfs_dir(root)
    log_file = rootfs.parent / "install.log"
    with _Lock(rootfs.parent.with_name(rootfs.parent.name + ".lock")):
        if rebuild and rootfs.parent.exists():
            log.info("--rebuild: removing %s", rootfs.parent)
            shutil.rmtree(rootfs.parent)
        rootfs.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"\nint8conv install-arm {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        built = find_environment(root, version) is None
        missing = missing_packages(HOST_PACKAGES)
        if missing:
            install_packages(missing, log_file)
        if not QEMU.exists():
            raise BackendUnavailable(f"{QEMU} is missing after installing qemu-user-static")
        register_binfmt(log_file)
        if built:
            debootstrap_first_stage(rootfs, mirror or debian_mirror(), log_file)
            install_qemu(rootfs)
            debootstrap_second_stage(rootfs, log_file)
            python = create_venv(rootfs, version, log_file)
        else:
            python = venv_path(version) + "/bin/python"
            log.info("cached arm64 rootfs found in %s", rootfs)
            check_venv(rootfs, python, log_file)
    return InstallResult(ArmEnvironment(rootfs, python, version), built, time.monotonic() - started)
