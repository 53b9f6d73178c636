"""Atomic writes: all or nothing, and the new file gets the mode an ordinary write would give it."""

from __future__ import annotations

import os
import stat

import pytest

from textkeep.fileio import atomic_dir, atomic_path, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_dirs_get_the_umask_mode_not_tempfiles_0600(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    (tmp_path / "plain.txt").write_text("x")  # what open() gives: the reference
    write_json(tmp_path / "results.json", {"a": 1})
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "f").write_text("y")
    assert _mode(tmp_path / "results.json") == _mode(tmp_path / "plain.txt") == 0o666 & ~mask
    assert _mode(tmp_path / "ckpt") == 0o777 & ~mask
    if not mask & stat.S_IROTH:  # under the usual umask, a web server (another user) can read the report
        assert _mode(tmp_path / "results.json") & stat.S_IROTH


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "index.html"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["index.html"]
