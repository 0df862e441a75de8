"""Atomic files: the old content or the new one, 0644, no temporary file left when the writer fails."""

from __future__ import annotations

import stat

import pytest

from pyro_moe.atomic_files import replace_folder, write_atomically, write_text_atomically


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = write_text_atomically(tmp_path / "fit.json", '{"old": true}\n')
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    def broken(temporary):
        temporary.write_text('{"new": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomically(path, broken)
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["fit.json"]
    write_atomically(tmp_path / "plot.png", lambda temporary: temporary.write_bytes(temporary.suffix.encode()))
    assert (tmp_path / "plot.png").read_bytes() == b".png"  # the temporary name keeps the suffix (savefig's format)


def test_a_folder_is_replaced_whole_and_a_failed_fill_leaves_the_old_one(tmp_path):
    folder = replace_folder(tmp_path / "posterior", lambda new: (new / "a.txt").write_text("old"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755

    def broken(new):
        (new / "a.txt").write_text("new")
        raise RuntimeError("killed mid-fill")

    with pytest.raises(RuntimeError):
        replace_folder(folder, broken)
    assert (folder / "a.txt").read_text() == "old"
    replace_folder(folder, lambda new: (new / "b.txt").write_text("new"))
    assert [p.name for p in folder.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["posterior"]
