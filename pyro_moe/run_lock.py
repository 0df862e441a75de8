"""A lock on a run folder: one pyro-moe process writes into a folder at a time.

:func:`lock_run_folder` takes an exclusive ``filelock.FileLock`` on ``FOLDER/.pyro-moe.lock`` at once
(no waiting) and writes who holds it (PID, host, command, start time) into ``FOLDER/.pyro-moe.lock.json``.
A second writer is refused with :class:`RunFolderLocked` naming that holder. The lock is an OS lock
(``flock`` on POSIX): the kernel releases it when its holder exits or is killed, so a lock is never
left held by a dead process; what a killed holder leaves is its holder file, which the next writer
finds on taking the lock and reports (:attr:`RunLock.stale_holder`) before replacing it. The lock
file itself stays (removing it would race with a writer opening it); the holder file is removed on
release. On network filesystems without working ``flock`` the lock is only as good as theirs.

Example::

    with lock_run_folder(Path("runs/fit"), "pyro-moe fit --out runs/fit") as lock:
        if lock.stale_holder:
            print("took over from", lock.stale_holder["pid"])
        ...  # write into runs/fit
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from filelock import FileLock, Timeout

from pyro_moe.atomic_files import process_alive, write_text_atomically
from pyro_moe.errors import PyroMoEError

__all__ = ["HOLDER_NAME", "LOCK_NAME", "RunFolderLocked", "RunLock", "describe_holder", "lock_run_folder"]

LOCK_NAME = ".pyro-moe.lock"
HOLDER_NAME = ".pyro-moe.lock.json"


class RunFolderLocked(PyroMoEError):
    """Another process holds the lock on the run folder."""


def _read_holder(folder: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads((folder / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any]) -> str:
    """``PID 123 on host (pyro-moe fit ..., started 2026-12-07 10:00:00 UTC)``."""
    return (
        f"PID {holder.get('pid')} on {holder.get('host', 'an unknown host')} "
        f"({holder.get('command', 'an unknown command')}, started {holder.get('started', 'at an unknown time')})"
    )


@dataclass
class RunLock:
    """The held lock on :attr:`folder`; release it with :meth:`release` or a ``with`` block.

    Attributes:
        folder: the run folder.
        stale_holder: the holder file a killed earlier holder left (``pid``, ``host``, ``command``,
            ``started``), found when this lock was taken; ``None`` when there was none.
    """

    folder: Path
    stale_holder: dict[str, Any] | None
    _lock: FileLock = field(repr=False)

    def release(self) -> None:
        """Remove the holder file (if still ours) and release the lock; calling it twice does nothing."""
        if not self._lock.is_locked:
            return
        holder = _read_holder(self.folder)
        if holder is not None and holder.get("pid") == os.getpid():
            (self.folder / HOLDER_NAME).unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def lock_run_folder(folder: str | os.PathLike, command: str) -> RunLock:
    """Lock the existing folder ``folder`` for this process, which runs ``command`` (recorded for others).

    Raises:
        RunFolderLocked: another process holds it (named by PID, host, command and start time when its
            holder file says; a holder that has just taken the lock may not have written it yet).
    """
    folder = Path(folder)
    # an OS lock only (no soft-lock file a killed holder would leave held), releasable from any thread
    lock = FileLock(folder / LOCK_NAME, thread_local=False, fallback_to_soft=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _read_holder(folder)
        who = (
            describe_holder(holder)
            if holder is not None and process_alive(holder.get("pid"))
            else "another process (starting: it has not written its PID yet)"
        )
        raise RunFolderLocked(
            f"--out {folder} is in use by {who}; wait for it to finish or give another --out."
        ) from None
    try:
        stale = _read_holder(folder)  # we hold the lock: a holder file left is a killed holder's
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        write_text_atomically(folder / HOLDER_NAME, json.dumps(holder, indent=2) + "\n")
    except BaseException:
        lock.release()
        raise
    return RunLock(folder, stale, lock)
