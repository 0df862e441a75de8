"""The lock on a run folder: a second holder is refused naming the first; the holder file goes on release."""

from __future__ import annotations

import json
import os

import pytest

from pyro_moe.run_lock import HOLDER_NAME, LOCK_NAME, RunFolderLocked, lock_run_folder


def test_a_second_holder_is_refused_naming_the_first_and_released_locks_are_free(tmp_path):
    with lock_run_folder(tmp_path, "pyro-moe fit --out x") as lock:
        holder = json.loads((tmp_path / HOLDER_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "pyro-moe fit --out x"
        assert lock.stale_holder is None
        with pytest.raises(RunFolderLocked, match=rf"in use by PID {os.getpid()} on .*\(pyro-moe fit --out x, started"):
            lock_run_folder(tmp_path, "pyro-moe evaluate --out x")
        (tmp_path / HOLDER_NAME).unlink()  # a holder that has not written its file yet
        with pytest.raises(RunFolderLocked, match=r"in use by another process \(starting"):
            lock_run_folder(tmp_path, "pyro-moe evaluate --out x")
    assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_NAME]
    lock.release()  # twice: nothing
    with lock_run_folder(tmp_path, "pyro-moe evaluate --out x") as again:
        assert again.stale_holder is None


def test_a_holder_file_left_behind_is_reported_as_stale(tmp_path):
    left = {"pid": 2**22 + 12345, "host": "elsewhere", "command": "pyro-moe fit", "started": "then"}
    (tmp_path / HOLDER_NAME).write_text(json.dumps(left))
    with lock_run_folder(tmp_path, "pyro-moe fit --out x") as lock:
        assert lock.stale_holder == left
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
