"""Checkpoints as safetensors plus JSON, written atomically, read with clear errors.

A checkpoint is a folder with ``tensors.safetensors`` and ``config.json``. Both files are
written to temporary names and renamed into place, so a crash never leaves a half-written
checkpoint; reading never unpickles anything.

Example::

    save_checkpoint("runs/fit", {"loc": torch.zeros(3)}, {"guide": "mean-field"})
    tensors, config = load_checkpoint("runs/fit")
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from pyro_moe.errors import PyroMoEError

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

TENSORS, CONFIG = "tensors.safetensors", "config.json"


class CheckpointError(PyroMoEError):
    """A checkpoint is missing, truncated or not what pyro-moe wrote."""


def _atomic_write(path: Path, write: Any) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(folder: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write ``tensors`` (contiguous CPU copies) and the JSON-serialisable ``config`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cpu = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(folder / TENSORS, lambda path: save_file(cpu, path))
    _atomic_write(folder / CONFIG, lambda path: Path(path).write_text(text))
    return folder


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; errors name the file and the reason."""
    folder = Path(folder)
    tensors_path, config_path = folder / TENSORS, folder / CONFIG
    for path in (tensors_path, config_path):
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing.")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint file {tensors_path} is unreadable (truncated or tampered?): {error}"
        ) from None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint file {config_path} is unreadable (truncated or tampered?): {error}"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint file {config_path} does not hold a JSON object.")
    return tensors, config
