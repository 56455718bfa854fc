"""Atomic output: an interrupted write leaves the previous file (or nothing), never a partial one."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from int8conv.atomic import atomic_write, output_set, write_bytes_atomic, write_text_atomic
from int8conv.errors import OutputError


def test_interrupted_write_keeps_old_file(tmp_path):
    path = tmp_path / "model.table"
    write_text_atomic(path, "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as handle:
        handle.write("half a ta")
        raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.table"]


def test_new_file_has_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "x.bin"
    write_text_atomic(path, "data")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def _state(path):
    info = os.lstat(path)
    content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
    return stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), content


def test_symlink_is_written_through_and_keeps_the_target_mode(tmp_path):
    target = tmp_path / "real.table"
    target.write_text("old\n")
    os.chmod(target, 0o600)
    link = tmp_path / "link.table"
    link.symlink_to(target)
    write_text_atomic(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new\n" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_character_devices_are_written_in_place_never_replaced():
    write_text_atomic("/dev/null", "discarded\n")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OSError) as caught:
        write_text_atomic("/dev/full", "no room\n")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == "/dev/full"
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_other_special_targets_are_refused(tmp_path, kind):
    path = tmp_path / kind
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    with pytest.raises(OutputError, match=str(path)):
        write_text_atomic(path, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [kind]


def _old_set(tmp_path):
    files = {tmp_path / "m.param": b"old param", tmp_path / "m.bin": b"old bin", tmp_path / "m.table": b"old table"}
    for path, data in files.items():
        path.write_bytes(data)
    os.chmod(tmp_path / "m.bin", 0o600)
    return {path: _state(path) for path in files}


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
def test_a_set_interrupted_after_some_files_leaves_the_old_set(tmp_path, failure):
    before = _old_set(tmp_path)
    with pytest.raises(type(failure)), output_set():
        write_bytes_atomic(tmp_path / "m.bin", b"new bin")
        write_text_atomic(tmp_path / "m.param", "new param")
        raise failure
    assert {path: _state(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.param", "m.table"]


def test_a_failed_rename_rolls_back_the_renames_before_it(tmp_path, monkeypatch):
    before = _old_set(tmp_path)
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the third file of the set cannot land
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError), output_set():
        for path in before:
            write_bytes_atomic(path, b"new " + path.name.encode())
    monkeypatch.setattr(os, "replace", real_replace)
    assert {path: _state(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.param", "m.table"]


def test_a_set_lands_whole_and_new_folders_of_an_aborted_set_are_removed(tmp_path):
    with output_set():
        write_text_atomic(tmp_path / "out" / "a.txt", "a")
        write_text_atomic(tmp_path / "out" / "figures" / "b.txt", "b")
        assert not (tmp_path / "out" / "a.txt").exists()  # staged, not landed yet
    assert (tmp_path / "out" / "a.txt").read_text() == "a" and (tmp_path / "out" / "figures" / "b.txt").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", "figures"]
    with pytest.raises(RuntimeError), output_set():
        write_text_atomic(tmp_path / "new" / "deeper" / "c.txt", "c")
        raise RuntimeError("late failure")
    assert not (tmp_path / "new").exists()


def test_one_set_refuses_two_writes_to_one_file(tmp_path):
    with pytest.raises(OutputError, match="same file twice"), output_set():
        write_text_atomic(tmp_path / "x", "1")
        write_text_atomic(tmp_path / "x", "2")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_root_replacing_a_users_file_keeps_its_owner(tmp_path):
    path = tmp_path / "user.table"
    path.write_text("old\n")
    os.chown(path, 1234, 5678)
    write_text_atomic(path, "new\n")
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 5678) and path.read_text() == "new\n"
