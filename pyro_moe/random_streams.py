"""The state of torch's random generators: the CPU's and, where CUDA is in use, every GPU's.

Checkpoints save it so that a resumed fit continues the same random stream; data-parallel steps
switch between the stream all ranks share and a rank's own (:mod:`pyro_moe.distributed`).
:func:`seeded` draws from a seed of its own and leaves the caller's streams (torch, CUDA, Python,
NumPy) as they were: held-out evaluations, generation, harness requests. :func:`question_seed` is
the seed of one question's draws, from a run's seed and the question's tokens: the lm-eval adapter's
and ``pyro-moe evaluate --draws per-question``'s, so both draw the same samples for the same prompt.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from torch import Tensor

__all__ = ["RandomState", "preserved_random_streams", "question_seed", "seeded"]


@dataclass(frozen=True)
class RandomState:
    """A snapshot of the generators.

    Attributes:
        cpu: the CPU generator's state ``(bytes,)`` (uint8).
        cuda: every GPU's state, ``(devices, bytes)`` (uint8), or ``None`` where CUDA is not in use.
    """

    cpu: Tensor
    cuda: Tensor | None = None

    @classmethod
    def current(cls) -> RandomState:
        """The generators' state now."""
        in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(torch.get_rng_state(), torch.stack(torch.cuda.get_rng_state_all()) if in_use else None)

    def restore(self) -> None:
        """Set the generators to this state (the GPUs' only where as many GPUs are in use)."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(self.cuda):
            torch.cuda.set_rng_state_all(list(self.cuda))

    def tensors(self) -> dict[str, Tensor]:
        """As checkpoint entries ``rng/torch`` and ``rng/cuda``."""
        return {"rng/torch": self.cpu} | ({} if self.cuda is None else {"rng/cuda": self.cuda})

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> RandomState | None:
        """From checkpoint entries (``None`` when there are none)."""
        if "rng/torch" not in tensors:
            return None
        return cls(tensors["rng/torch"], tensors.get("rng/cuda"))


@contextlib.contextmanager
def preserved_random_streams() -> Iterator[None]:
    """Restore torch's (and CUDA's), Python's and NumPy's generators afterwards, however the block ends."""
    torch_state, python_state, numpy_state = RandomState.current(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch_state.restore()
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Pyro's seed (torch, Python, NumPy) set to ``seed`` for the block, the caller's streams restored after it."""
    with preserved_random_streams():
        pyro.set_rng_seed(seed)
        yield


def question_seed(seed: int, token_ids: Sequence[int] | Tensor) -> int:
    """The seed of one question's draws: ``seed`` and the question's prompt tokens ``(length,)`` (no padding),
    a number in ``[0, 2**32)``. It depends on nothing else (not on the other questions, their order or the
    batch), so a question draws the same samples wherever it is scored.

    Example::

        with seeded(question_seed(0, [12, 7, 42])):
            prediction = posterior.predict(torch.tensor([[12, 7, 42]]))
    """
    if isinstance(token_ids, Tensor):
        token_ids = token_ids.detach().cpu().reshape(-1).tolist()
    tokens = np.asarray(list(token_ids), dtype="<i8")  # little-endian int64: the same seed on every machine
    return (int(seed) * 1_000_003 + zlib.crc32(tokens.tobytes())) % (2**32)
