"""Atomic file output: an interrupted or failed run leaves the user's files as they were.

One file: written to a temporary file beside its target and renamed over it on success. A set of files that
belong together (``.param`` + ``.bin``; a table with its models; export-trt's five files; a report folder):
inside ``with output_set():`` every write is staged in a temporary folder beside its target, and the files are
renamed into place only when the whole set is written. On failure or interrupt nothing of the new set is
left and the old files are intact (renames that already happened are rolled back).

Targets are resolved first: a symlink is written THROUGH to its target (the link stays a link), an existing
file keeps its permission bits, a character device (``/dev/null``) is written directly (it cannot be replaced
atomically, and replacing it would turn the device node into a file), and anything else that is not a regular
file (a directory, a FIFO) is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from int8conv.errors import OutputError


def resolve_target(path: str | os.PathLike[str]) -> tuple[Path, os.stat_result | None]:
    """The file a write to ``path`` must change (symlinks followed) and its stat, or None when it is new.

    Raises ``OutputError`` for a target that cannot be a file: a directory, a FIFO, a socket, a block device,
    a path under a file, or an empty name."""
    if not str(path):
        raise OutputError("an output path is empty")
    target = Path(os.path.realpath(path))
    try:
        info = target.stat()
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        raise OutputError(f"{path}: a parent of this output path is a file, not a directory") from None
    if info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISCHR(info.st_mode)):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise OutputError(f"{path}: is {kind}; give the path of a file to write")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{path}: its folder {parent} is a file, not a directory")
    return target, info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class _Staged:
    target: Path
    tmp: Path
    mode: int


@dataclass
class OutputSet:
    """Files staged for one output set; ``commit`` renames them all into place, ``discard`` drops them."""

    staged: list[_Staged] = field(default_factory=list)
    direct: list[tuple[Path, Path]] = field(default_factory=list)  # (device, staged content) written in place
    _dirs: dict[Path, Path] = field(default_factory=dict)  # target folder -> its staging folder
    _made: list[Path] = field(default_factory=list)  # folders created for the set, outermost first

    def stage(self, path: str | os.PathLike[str]) -> tuple[Path, Path, int, bool]:
        """(resolved target, staging file, mode it will get, written in place) for a write to ``path``."""
        target, info = resolve_target(path)
        if any(s.target == target for s in self.staged) or any(d == target for d, _ in self.direct):
            raise OutputError(f"{path}: this output set writes the same file twice (two outputs, one path)")
        parent = target.parent
        missing = [p for p in (parent, *parent.parents) if not p.exists()]
        parent.mkdir(parents=True, exist_ok=True)
        self._made += reversed(missing)
        if parent not in self._dirs:
            self._dirs[parent] = Path(tempfile.mkdtemp(prefix=".int8conv-staging-", dir=parent))
        tmp = self._dirs[parent] / target.name
        mode = stat.S_IMODE(info.st_mode) if info is not None else 0o666 & ~_umask()
        in_place = info is not None and stat.S_ISCHR(info.st_mode)
        return target, tmp, mode, in_place

    def add(self, target: Path, tmp: Path, mode: int, in_place: bool) -> None:
        if in_place:
            self.direct.append((target, tmp))
        else:
            self.staged.append(_Staged(target, tmp, mode))

    def staged_file(self, path: str | os.PathLike[str]) -> Path:
        """Where the staged content of ``path`` can be read before the set lands (e.g. to evaluate a model)."""
        target, _ = resolve_target(path)
        for item in self.staged:
            if item.target == target:
                return item.tmp
        for device, tmp in self.direct:
            if device == target:
                return tmp
        raise KeyError(f"{path} is not staged in this output set")

    def commit(self) -> None:
        """Devices first (nothing to roll back if one fails), then each rename; a failed rename rolls back."""
        with _interrupts_deferred():
            for device, tmp in self.direct:
                try:
                    with open(device, "wb") as sink, open(tmp, "rb") as source:
                        shutil.copyfileobj(source, sink)
                except OSError as exc:  # name the device: a failed write() carries no file name
                    raise OSError(exc.errno, exc.strerror, str(device)) from exc
            done: list[tuple[_Staged, Path | None]] = []
            try:
                for item in self.staged:
                    os.chmod(item.tmp, item.mode)
                    backup = None
                    if item.target.exists():
                        owner = os.stat(item.target)
                        with contextlib.suppress(OSError):  # root replacing a user's file keeps it theirs
                            os.chown(item.tmp, owner.st_uid, owner.st_gid)
                        backup = item.tmp.with_name(item.tmp.name + ".old")
                        try:
                            os.link(item.target, backup)
                        except OSError:
                            backup = None
                    os.replace(item.tmp, item.target)
                    done.append((item, backup))
                COMMITTED.extend([device for device, _ in self.direct] + [item.target for item in self.staged])
            except BaseException:
                for item, backup in reversed(done):
                    with contextlib.suppress(OSError):
                        if backup is not None:
                            os.replace(backup, item.target)
                        else:
                            os.unlink(item.target)
                raise
            finally:
                self.discard()  # a folder made for the set and now holding a landed file is not empty: it stays

    def discard(self) -> None:
        """Drop the staged files, and the folders made for them (an aborted set leaves no new empty folder)."""
        for folder in self._dirs.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._dirs.clear()
        for folder in reversed(self._made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: something else may have put files there
        self._made.clear()


#: Files this process has put in place, in order: what the CLI's interrupt message can truthfully name.
COMMITTED: list[Path] = []

_CURRENT: contextvars.ContextVar[OutputSet | None] = contextvars.ContextVar("int8conv_output_set", default=None)
_SCRATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("int8conv_scratch", default=False)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C while a set is renamed into place, so an interrupt cannot land between two renames."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def output_set() -> Iterator[OutputSet]:
    """Every atomic write inside lands with the others at the end, or not at all. Nested sets join the outer one."""
    if _CURRENT.get() is not None:
        yield _CURRENT.get()
        return
    current = OutputSet()
    token = _CURRENT.set(current)
    try:
        yield current
    except BaseException:
        current.discard()
        raise
    finally:
        _CURRENT.reset(token)
    current.commit()


@contextlib.contextmanager
def scratch_files() -> Iterator[None]:
    """Writes inside are scratch (a search's temporary models): they land at once, outside the current output set,
    and are not named among the files this process wrote."""
    token, scratch = _CURRENT.set(None), _SCRATCH.set(True)
    landed = len(COMMITTED)
    try:
        yield
    finally:
        _CURRENT.reset(token)
        _SCRATCH.reset(scratch)
        del COMMITTED[landed:]


def in_scratch() -> bool:
    """Whether the writes now are scratch (``scratch_files``): not worth telling the user about."""
    return _SCRATCH.get()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO]:
    """Write ``path`` through a staging file; it replaces ``path`` on success (or with its set)."""
    with output_set() as current:
        target, tmp, file_mode, in_place = current.stage(path)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        current.add(target, tmp, file_mode, in_place)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with ``text``."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
