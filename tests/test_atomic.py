"""Atomic output: an interrupted write leaves the previous file (or nothing), never a partial one."""
from __future__ import annotations

import os
import stat

import pytest

from int8conv.atomic import atomic_write, write_text_atomic


def test_interrupted_write_keeps_old_file(tmp_path):
    path = tmp_path / "model.table"
    write_text_atomic(path, "old\n")
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as handle:
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
