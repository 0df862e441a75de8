"""Checkpoints as one atomic, verified folder: safetensors plus JSON plus a manifest; nothing unpickled.

A checkpoint (a posterior) is a folder of three files:

* ``tensors.safetensors``: the tensors (guide parameters, optimiser state, random states, buffers);
* ``config.json``: everything that rebuilds the patch, the guide and the training;
* ``manifest.json``: :data:`FORMAT_VERSION`, the SHA-256 and size of the two others, and the
  fingerprint of the model the posterior was fitted on (``model``; see
  :mod:`pyro_moe.inference.model_fingerprint`), or ``null`` when the writer gave none.

:func:`save_checkpoint` writes the three into a temporary sibling folder, flushes every file and the
folder, and swaps it in with :func:`pyro_moe.atomic_files.replace_folder`: a reader sees the old
checkpoint or the new one, complete, never a mix. :func:`read_checkpoint_folder` checks the bytes against the
manifest before parsing anything: a changed byte, a missing file or one the manifest does not list
(a file from another run) is refused with :class:`CheckpointError` naming the file. When a save was
killed between its two renames (the folder missing, the old copy aside), the old copy is read, with a
warning. A folder without ``manifest.json`` (written before pyro-moe had manifests) is read with a
warning that nothing is verified; saving it again (``FittedPosterior.load(...).save(folder)``) adds one.

Example::

    save_checkpoint("runs/fit", {"loc": torch.zeros(3)}, {"guide": "mean-field"})
    tensors, config = load_checkpoint("runs/fit")
    saved = read_checkpoint_folder("runs/fit")        # also saved.model (the fingerprint) and saved.folder
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pyro_moe.atomic_files import committed_folder, replace_folder
from pyro_moe.errors import PyroMoEError

__all__ = [
    "CONFIG",
    "FORMAT_VERSION",
    "MANIFEST",
    "TENSORS",
    "CheckpointError",
    "SavedCheckpoint",
    "load_checkpoint",
    "read_checkpoint_folder",
    "save_checkpoint",
]

TENSORS, CONFIG, MANIFEST = "tensors.safetensors", "config.json", "manifest.json"
FORMAT_VERSION = 1
"""Version of the folder layout and manifest; a reader refuses a newer one."""
_CHUNK = 1 << 22


class CheckpointError(PyroMoEError):
    """A checkpoint is missing, truncated, tampered, mixed from two runs, bound to another model or
    not what pyro-moe wrote."""


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint as :func:`read_checkpoint_folder` found it.

    Attributes:
        tensors: the tensors by name, on the CPU.
        config: the configuration.
        model: the fingerprint of the model it was fitted on (``None``: none recorded, or no manifest).
        folder: the folder read (the aside copy when a save was killed between its renames).
        verified: whether a manifest vouched for the bytes (``False``: a folder from before manifests).
    """

    tensors: dict[str, Tensor]
    config: dict[str, Any]
    model: dict[str, Any] | None
    folder: Path
    verified: bool


def _file_digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _check_replaceable(folder: Path) -> None:
    """``folder`` is new, empty or a checkpoint: a save replaces it as a whole and must not take other files along."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise CheckpointError(f"cannot save a checkpoint to {folder}: it is a file; give a folder.")
    others = sorted(path.name for path in folder.iterdir() if path.name not in (TENSORS, CONFIG, MANIFEST))
    if others:
        raise CheckpointError(
            f"cannot save a checkpoint to {folder}: it holds {', '.join(others[:5])}, which a checkpoint does not; "
            "a save replaces the folder as a whole, so give a new or empty folder (or a checkpoint's)."
        )


def save_checkpoint(
    folder: str | os.PathLike,
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    *,
    model: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` (contiguous CPU copies), the JSON-serialisable ``config`` and the manifest
    into ``folder``, atomically (see the module docstring); ``model``: the fingerprint of the model
    (:func:`pyro_moe.inference.model_fingerprint.model_fingerprint`) loading should check against.

    Raises:
        CheckpointError: ``folder`` is a file or holds files a checkpoint does not (they are kept).
        TypeError: ``config`` is not JSON-serialisable; before anything is written.
    """
    folder = Path(folder)
    _check_replaceable(folder)
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    fingerprint = None if model is None else json.loads(json.dumps(dict(model)))

    def fill(incoming: Path) -> None:
        save_file(cpu, incoming / TENSORS)
        (incoming / CONFIG).write_text(text, encoding="utf-8")
        files = {}
        for name in (TENSORS, CONFIG):
            sha256, size = _file_digest(incoming / name)
            files[name] = {"sha256": sha256, "size": size}
        manifest = {"format_version": FORMAT_VERSION, "files": files, "model": fingerprint}
        (incoming / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return replace_folder(folder, fill)


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} is unreadable (truncated or tampered?): {error}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or {TENSORS, CONFIG} - set(files)
        or not all(
            isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)
            for entry in files.values()
        )
        or any(name != Path(name).name or name in (MANIFEST, ".", "..") for name in files)
        or not isinstance(manifest.get("model"), dict | None)
    ):
        raise CheckpointError(
            f"checkpoint file {path} is not a pyro-moe manifest (format_version, files with sha256 and size of "
            f"{TENSORS} and {CONFIG}, model)."
        )
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"checkpoint file {path} has format_version {version!r}; this pyro-moe reads 1 to {FORMAT_VERSION} "
            "(a newer pyro-moe wrote it?)."
        )
    return manifest


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced (saves never modify a file in place: they write new ones)."""
    status = path.stat()
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _verify(folder: Path, manifest: Mapping[str, Any]) -> dict[str, tuple[int, int, int, int]]:
    """Check every file the manifest lists against its size and SHA-256 (streamed: a large tensors
    file is not held in memory twice) and that no other file is there; returns each file's identity,
    so that the caller can tell whether one was replaced while it read them."""
    listed = manifest["files"]
    extra = sorted(
        path.name
        for path in folder.iterdir()
        if path.name not in listed and path.name != MANIFEST and not path.name.startswith(".")  # .DS_Store, ...
    )
    if extra:
        raise CheckpointError(
            f"checkpoint folder {folder} holds {', '.join(extra[:5])}, which its manifest does not list (a file "
            "from another run?); a checkpoint folder holds only what its save wrote."
        )
    identities = {}
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (its manifest lists it).")
        identities[name] = _identity(path)
        sha256, size = _file_digest(path)
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint file {path} does not match its manifest ({size} bytes, the manifest says "
                f"{entry['size']}): truncated or tampered, or from another run."
            )
        if sha256 != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} does not match its manifest (SHA-256 differs): truncated or tampered, "
                "or from another run."
            )
    return identities


def _parse(folder: Path, config_text: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors_path, config_path = folder / TENSORS, folder / CONFIG
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint file {tensors_path} is unreadable (truncated or tampered?): {error}"
        ) from None
    try:
        config = json.loads(config_text)
    except ValueError as error:
        raise CheckpointError(
            f"checkpoint file {config_path} is unreadable (truncated or tampered?): {error}"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint file {config_path} does not hold a JSON object.")
    return tensors, config


class _ReplacedWhileRead(Exception):
    """The folder was swapped for a newer save while it was read (internal: the read starts again)."""


def _folder_identity(folder: Path) -> tuple[int, int] | None:
    """Device and inode of ``folder`` (a save renames a new folder in: another inode); ``None``: gone."""
    try:
        status = folder.stat()
    except OSError:
        return None
    return status.st_dev, status.st_ino


def read_checkpoint_folder(folder: str | os.PathLike) -> SavedCheckpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint` (see the module docstring);
    errors name the file and the reason. Nothing is parsed before its bytes match the manifest.

    A save to the same folder while it is read (another process) swaps the whole folder: the read then
    starts again on the new one (three times at most) rather than taking the mix for a damaged checkpoint."""
    for _ in range(3):
        try:
            return _read_once(Path(folder))
        except _ReplacedWhileRead:
            continue
    raise CheckpointError(
        f"checkpoint folder {folder} was replaced by another save three times while it was read; load it again "
        "once the saving process has finished."
    )


def _read_once(requested: Path) -> SavedCheckpoint:
    """One attempt of :func:`read_checkpoint_folder`; raises :class:`_ReplacedWhileRead` when the folder it
    reads is swapped meanwhile (a refusal is only raised for a folder that stayed in place)."""
    found = committed_folder(requested)
    if found is None or not found.is_dir():
        what = "does not exist" if found is None else "is a file, not a checkpoint folder"
        raise CheckpointError(f"checkpoint folder {requested} {what}.")
    started = _folder_identity(found)
    try:
        return _read_found(requested, found)
    except CheckpointError:
        if _folder_identity(found) != started or committed_folder(requested) != found:
            raise _ReplacedWhileRead from None
        raise


def _read_found(requested: Path, found: Path) -> SavedCheckpoint:
    """Read ``found``, the committed folder of ``requested``: verify its bytes against the manifest, then parse."""
    if found != requested:
        warnings.warn(
            f"checkpoint folder {requested} is missing: a save was killed between its two renames; reading the "
            f"previous checkpoint it had set aside, {found} (complete). Saving again to {requested} cleans up.",
            stacklevel=4,  # the caller of read_checkpoint_folder
        )
    if not (found / MANIFEST).exists():
        for name in (TENSORS, CONFIG):
            if not (found / name).is_file():
                raise CheckpointError(f"checkpoint file {found / name} is missing.")
        warnings.warn(
            f"checkpoint folder {found} has no {MANIFEST} (written before pyro-moe verified checkpoints): its bytes "
            "and the model it was fitted on are not checked; load it and save it again to add one.",
            stacklevel=4,  # the caller of read_checkpoint_folder
        )
        try:
            config_text = (found / CONFIG).read_text(encoding="utf-8")
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint file {found / CONFIG} is unreadable (truncated or tampered?): {error}"
            ) from None
        tensors, config = _parse(found, config_text)
        return SavedCheckpoint(tensors, config, None, found, verified=False)
    manifest = _manifest(found)
    identities = _verify(found, manifest)
    try:
        config_text = (found / CONFIG).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"checkpoint file {found / CONFIG} is not UTF-8 text: {error}") from None
    tensors, config = _parse(found, config_text)
    for name, identity in identities.items():
        if not (found / name).is_file() or _identity(found / name) != identity:
            raise CheckpointError(
                f"checkpoint file {found / name} was replaced while it was read (a save at the same time?); load again."
            )
    return SavedCheckpoint(tensors, config, manifest["model"], found, verified=True)


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and configuration of :func:`read_checkpoint_folder`."""
    saved = read_checkpoint_folder(folder)
    return saved.tensors, saved.config
