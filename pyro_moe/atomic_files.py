"""Files and folders written so that a reader sees the old version or the new one, never a mix.

A file is written to a temporary sibling, flushed to disk (``fsync``), made ``0644`` and renamed over
the target in one step (:func:`write_atomically`, :func:`write_text_atomically`); the folder's entry
is then flushed too. A folder (a posterior: several files that belong together) is filled as a
temporary sibling ``.NAME.incoming-PID-XXXX`` and swapped in by :func:`replace_folder`:

1. the new folder is complete and flushed (every file, then the folder);
2. an existing ``NAME`` is renamed aside to ``.NAME.previous`` (a leftover aside is removed first);
3. the new folder is renamed to ``NAME``;
4. the aside copy is removed.

A process killed at any point leaves ``NAME`` old or new and complete, except between steps 2 and 3,
where ``NAME`` is missing and ``.NAME.previous`` holds the old folder complete:
:func:`committed_folder` then answers the aside copy (the next :func:`replace_folder` cleans up).
Temporary siblings of dead processes are removed by the next write of the same name. Renames are
atomic only within one filesystem: the temporary siblings sit beside their targets for that reason.

Example::

    write_text_atomically(Path("runs/fit/fit.json"), json.dumps(summary))
    write_atomically(Path("runs/fit/scales.png"), lambda path: figure.savefig(path))
    replace_folder(Path("runs/fit/posterior"), lambda folder: (folder / "a.txt").write_text("a"))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "FILE_MODE",
    "FOLDER_MODE",
    "aside_folder",
    "committed_folder",
    "fsync_file",
    "fsync_folder",
    "process_alive",
    "remove_folder",
    "replace_folder",
    "write_atomically",
    "write_text_atomically",
]

FILE_MODE = 0o644
"""Permissions of every file written here (``tempfile`` would leave ``0600``)."""
FOLDER_MODE = 0o755
"""Permissions of every folder :func:`replace_folder` puts in place."""
INCOMING = "incoming"


def fsync_file(path: Path) -> None:
    """Flush ``path``'s bytes to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def fsync_folder(path: Path) -> None:
    """Flush ``path``'s entries (names created, renamed or removed in it) to disk (a no-op where
    folders cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems refuse fsync on a folder
        pass
    finally:
        os.close(handle)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Have ``write(temporary)`` write the file, then flush it, make it ``0644`` and rename it to
    ``path`` (same folder, so the rename is atomic); a failure removes the temporary file and leaves
    ``path`` as it was. The temporary name keeps ``path``'s suffix (``savefig`` reads the format from it)."""
    path = Path(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        fsync_file(temporary)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomically` of ``text`` (UTF-8)."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def aside_folder(folder: Path) -> Path:
    """Where :func:`replace_folder` keeps the old ``folder`` while it renames the new one in."""
    return folder.parent / f".{folder.name}.previous"


def committed_folder(folder: str | os.PathLike) -> Path | None:
    """The complete folder a reader should open: ``folder``, or its aside copy when a replacement was
    killed between its two renames (``folder`` missing); ``None`` when neither exists."""
    folder = Path(folder)
    if folder.exists():
        return folder
    aside = aside_folder(folder)
    return aside if aside.is_dir() else None


def remove_folder(folder: str | os.PathLike) -> None:
    """Remove ``folder`` with its aside copy and every temporary sibling its replacements left, so that no
    reader (:func:`committed_folder`) takes a left-over for it (the caller holds the run folder's lock)."""
    folder = Path(folder)
    for path in (folder, aside_folder(folder), *folder.parent.glob(f".{folder.name}.{INCOMING}-*")):
        shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: object) -> bool:
    """Whether ``pid`` (an integer > 0) names a running process on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove_dead_incoming(folder: Path) -> None:
    """Remove the temporary siblings of ``folder`` that processes no longer running left behind."""
    for leftover in folder.parent.glob(f".{folder.name}.{INCOMING}-*"):
        pid = leftover.name.rsplit(f".{INCOMING}-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def replace_folder(folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Have ``fill(temporary)`` write the files of the new ``folder`` into an empty temporary sibling,
    then flush and swap it in (see the module docstring); returns ``folder``. A failure in ``fill``
    removes the temporary sibling and leaves ``folder`` as it was. One writer per folder at a time
    (the command line's lock on ``--out`` ensures it)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_incoming(folder)
    incoming = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.{INCOMING}-{os.getpid()}-"))
    try:
        fill(incoming)
        for path in incoming.iterdir():
            os.chmod(path, FILE_MODE)
            fsync_file(path)
        os.chmod(incoming, FOLDER_MODE)
        fsync_folder(incoming)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    aside = aside_folder(folder)
    try:
        if folder.exists():
            if aside.exists():  # left by a replacement killed after its second rename: folder is complete
                shutil.rmtree(aside)
            os.rename(folder, aside)
            fsync_folder(folder.parent)
        os.rename(incoming, folder)
    except OSError:  # e.g. another writer's folder landed in between: it stays, this one is dropped
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    fsync_folder(folder.parent)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(aside)
    return folder
