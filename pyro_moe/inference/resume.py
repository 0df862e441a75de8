"""Run checkpoints: a fit saved every few steps (and on Ctrl-C) with everything that continues it
bitwise, and resuming one.

A run checkpoint is a posterior folder (what :meth:`FittedPosterior.save
<pyro_moe.inference.fitting.FittedPosterior.save>` writes: the guide's parameters and buffers, the
optimiser state, torch's random state, the history and the step count, through
:func:`~pyro_moe.inference.checkpoint.save_checkpoint`) with, besides, Python's and NumPy's random
states (``rng/python*``, ``rng/numpy*``), the training callback's state (``callback/...`` tensors and
``config["checkpoint"]["callback"]``), a SHA-256 digest of the training batches and the caller's
options (``config["checkpoint"]``). :meth:`FittedPosterior.load` reads it like any posterior. The
batch order needs nothing saved: it is a function of the seed and the step count.

A checkpoint is written after a whole step, every :attr:`CheckpointOptions.every` steps and whenever
:attr:`CheckpointOptions.seconds` have passed since the last one: the step cadence puts checkpoints at
known steps, the time cadence bounds the work a crash loses when steps are slow (a large model). Writing
one reads the state only, so where checkpoints fall never changes the fit. While the steps run, SIGINT
(Ctrl-C) asks for a stop after the step under way: its checkpoint is written and :class:`FitInterrupted`
raised (a second Ctrl-C interrupts at once, as Python does; the previous checkpoint remains).

Example::

    options = CheckpointOptions("runs/fit/checkpoint", every=50)
    posterior = fit(patch, batches, "mfvr", answer_token_ids=letters, steps=2000, checkpoint=options)
    # after FitInterrupted or a crash, in a new process, with the same model, batches and options:
    resumed = CheckpointOptions("runs/fit/checkpoint", every=50, resume=True)
    posterior = fit(patch, batches, "mfvr", answer_token_ids=letters, steps=2000, checkpoint=resumed)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pyro_moe.atomic_files import committed_folder
from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.callbacks import TrainingCallback
from pyro_moe.inference.checkpoint import read_checkpoint_folder, save_checkpoint
from pyro_moe.inference.model_fingerprint import model_differences, model_fingerprint
from pyro_moe.validation import check_integer, check_number

__all__ = [
    "CHECKPOINT_SECONDS",
    "CHECKPOINT_STEPS",
    "CheckpointOptions",
    "Checkpointer",
    "FitInterrupted",
    "ResumeError",
    "batches_digest",
    "check_resumable",
    "read_checkpoint",
    "restore_host_random",
]

CHECKPOINT_STEPS = 100
"""Default step cadence: a checkpoint every 100 steps."""
CHECKPOINT_SECONDS = 300.0
"""Default time cadence: a checkpoint at the first step ending 5 minutes or more after the last one."""
_NOT_COMPARED = ("history", "step_count", "checkpoint", "calibration", "post_hoc_state", "post_hoc_fitted", "recipe")
"""Configuration entries a checkpoint and the fit resuming it may differ in (what the run produced)."""


class FitInterrupted(Exception):
    """A fit with checkpoints stopped by SIGINT after a whole step, its checkpoint written.

    Attributes:
        folder: the checkpoint.
        step: the steps done (the checkpoint's step count).
        steps: the steps the fit was to run in all.
    """

    def __init__(self, folder: Path, step: int, steps: int) -> None:
        super().__init__(f"interrupted after step {step} of {steps}; checkpoint: {folder}")
        self.folder, self.step, self.steps = folder, step, steps


class ResumeError(ConfigurationError):
    """A checkpoint that this fit cannot resume: other options or other data."""


@dataclass(frozen=True)
class CheckpointOptions:
    """Where and how often a fit writes run checkpoints, and whether it resumes one.

    Attributes:
        folder: the checkpoint folder (written over at every checkpoint).
        every: a checkpoint every this many steps (0: none by steps).
        seconds: a checkpoint at the first step ending this long after the last checkpoint (``None``:
            none by time).
        resume: continue from the checkpoint in ``folder`` when there is one (it must have been written
            by a fit with the same model, options and batches; otherwise :class:`ResumeError`); start
            from scratch when there is none.
        run: the caller's own options (JSON-ready, e.g. the command line's), kept in the checkpoint and
            compared on resume like the fit's options.
    """

    folder: str | Path
    every: int = CHECKPOINT_STEPS
    seconds: float | None = CHECKPOINT_SECONDS
    resume: bool = False
    run: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.folder, str | Path):
            raise ConfigurationError(f"the checkpoint folder must be a path, got {self.folder!r}.")
        object.__setattr__(self, "folder", Path(self.folder))
        check_integer("every", self.every, minimum=0)
        if self.seconds is not None:
            check_number("seconds", self.seconds)
        if not isinstance(self.resume, bool):
            raise ConfigurationError(f"resume must be True or False, got {self.resume!r}.")
        try:
            run = json.loads(json.dumps(dict(self.run), allow_nan=False))
        except (TypeError, ValueError) as error:
            raise ConfigurationError(f"run must be a mapping of JSON-ready values: {error}.") from None
        object.__setattr__(self, "run", run)


def batches_digest(batches: Sequence[Mapping[str, Tensor]]) -> str:
    """SHA-256 of the batches' tensors (names, dtypes, shapes and bytes, in order): equal batches, equal digest."""
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            tensor = torch.as_tensor(batch[name]).detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name} {tensor.dtype} {tuple(batch[name].shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _host_random_tensors() -> dict[str, Tensor]:
    """Python's and NumPy's generator states as tensors (``rng/python``, ``rng/numpy`` and their cached Gaussians)."""
    version, words, gauss = random.getstate()
    _, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "rng/python": torch.tensor([version, *words], dtype=torch.int64),
        "rng/python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "rng/numpy": torch.tensor([*keys.tolist(), position, has_gauss], dtype=torch.int64),
        "rng/numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }


def restore_host_random(tensors: Mapping[str, Tensor]) -> None:
    """Set Python's and NumPy's generators to the states of :func:`_host_random_tensors` in ``tensors``
    (where present)."""
    if "rng/python" in tensors:
        version, *words = tensors["rng/python"].tolist()
        has_gauss, gauss = tensors["rng/python_gauss"].tolist()
        random.setstate((version, tuple(words), gauss if has_gauss else None))
    if "rng/numpy" in tensors:
        *keys, position, has_gauss = tensors["rng/numpy"].tolist()
        (cached,) = tensors["rng/numpy_gauss"].tolist()
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def read_checkpoint(folder: str | Path, patch: Any | None = None) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """The run checkpoint in ``folder`` (tensors, configuration), ``None`` when there is none (neither the
    folder nor the copy a save killed between its two renames set aside); a damaged one raises
    :class:`~pyro_moe.inference.checkpoint.CheckpointError`, one that is not a run checkpoint (a posterior)
    or was written on another model than ``patch``'s (its fingerprint,
    :mod:`~pyro_moe.inference.model_fingerprint`) :class:`ResumeError`. ``patch=None``: the model is not
    checked (the command line looks at the checkpoint before it loads the model; :func:`fit` checks it)."""
    folder = Path(folder)
    if committed_folder(folder) is None:
        return None
    saved = read_checkpoint_folder(folder)
    tensors, config = saved.tensors, saved.config
    if not isinstance(config.get("checkpoint"), dict) or "step_count" not in config:
        raise ResumeError(f"{folder} is not a run checkpoint (no checkpoint record); resume needs one a fit wrote.")
    differences = (
        [] if saved.model is None or patch is None else model_differences(saved.model, model_fingerprint(patch))
    )
    if differences:
        raise ResumeError(
            f"the checkpoint in {folder} was written on another model: {'; '.join(differences)} differ. Resume "
            f"on the model it was fitted on, or start over (delete {folder})."
        )
    return tensors, config


def _first_difference(saved: Mapping[str, Any], current: Mapping[str, Any], skipped: Sequence[str] = ()) -> str | None:
    for key in sorted((set(saved) | set(current)) - set(skipped)):
        if saved.get(key) != current.get(key):
            return key
    return None


def check_resumable(
    folder: str | Path,
    saved: Mapping[str, Any],
    config: Mapping[str, Any],
    options: CheckpointOptions,
    digest: str,
    callback: TrainingCallback | None,
) -> None:
    """Refuse (:class:`ResumeError`, naming the first option that differs) a checkpoint configuration
    ``saved`` that a fit of ``config`` with ``options`` on batches of ``digest`` and with ``callback``
    does not continue (another callback, or the same with other options, would restore a wrong state)."""
    record = saved["checkpoint"]
    advice = f"resume with the checkpoint's options, or start over (delete {folder})."
    key = _first_difference(record.get("run", {}), options.run)
    if key is not None:
        before, now = record.get("run", {}).get(key), options.run.get(key)
        raise ResumeError(
            f"the checkpoint in {folder} was written with {key}={before!r}, this run has {now!r}: {advice}"
        )
    current = json.loads(json.dumps(config))  # as the checkpoint holds it (tuples as lists, ...)
    key = _first_difference(saved, current, _NOT_COMPARED)
    if key is not None:
        raise ResumeError(
            f"the checkpoint in {folder} was fitted with {key}={saved.get(key)!r}, this fit has "
            f"{current.get(key)!r}: {advice}"
        )
    before = record.get("callback_identity")
    now = None if callback is None else json.loads(json.dumps(callback.resume_identity()))
    if before != now:
        raise ResumeError(
            f"the checkpoint in {folder} was written with the callback {before or 'none'}, this fit has "
            f"{now or 'none'}: {advice}"
        )
    if record.get("data") != digest:
        raise ResumeError(
            f"the checkpoint in {folder} was fitted on other training batches (the data, their number, order or "
            f"tokenisation changed): {advice}"
        )


class Checkpointer:
    """Writes the run checkpoints of one :meth:`FittedPosterior.train` call (see the module docstring).

    Args:
        options: where and how often.
        posterior: the posterior being trained.
        callback: the training callback, whose state each checkpoint keeps.
        digest: :func:`batches_digest` of the training batches.
        steps: the step count the fit ends at.
    """

    def __init__(
        self,
        options: CheckpointOptions,
        posterior: Any,
        callback: TrainingCallback | None,
        digest: str,
        steps: int,
    ) -> None:
        self.options, self.posterior, self.callback = options, posterior, callback
        self.digest, self.steps = digest, steps
        self.stop_requested = False
        self._saved_step: int | None = None
        self._last_save = time.monotonic()

    def save(self, step: int) -> None:
        """Write the checkpoint of the state after ``step`` steps (data-parallel: rank 0 only)."""
        parallel = self.posterior.data_parallel
        self._saved_step, self._last_save = step, time.monotonic()
        if parallel is not None and not parallel.is_main:
            return
        tensors, config = self.posterior.training_state()
        callback_tensors, callback_values = ({}, {}) if self.callback is None else self.callback.checkpoint_state()
        tensors.update({f"callback/{name}": tensor for name, tensor in callback_tensors.items()})
        tensors.update(_host_random_tensors())
        config["checkpoint"] = {
            "run": dict(self.options.run),
            "data": self.digest,
            "callback": callback_values,
            "callback_identity": None if self.callback is None else self.callback.resume_identity(),
        }
        save_checkpoint(self.options.folder, tensors, config, model=model_fingerprint(self.posterior.patch))

    def after_step(self, step: int) -> None:
        """Write a checkpoint when one is due after ``step`` steps; after a SIGINT, write it and raise
        :class:`FitInterrupted`."""
        if self.stop_requested:
            if self._saved_step != step:
                self.save(step)
            raise FitInterrupted(self.options.folder, step, self.steps)
        every, seconds = self.options.every, self.options.seconds
        if (every and step % every == 0) or (seconds is not None and time.monotonic() - self._last_save >= seconds):
            self.save(step)

    @contextlib.contextmanager
    def stop_on_interrupt(self) -> Iterator[None]:
        """While the steps run (in the main thread of a single process that does not ignore SIGINT): SIGINT
        requests a stop after the step under way (:meth:`after_step`); a second SIGINT, or one that comes
        after the last step, interrupts as usual (``KeyboardInterrupt``)."""
        if self.posterior.data_parallel is not None or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:  # started with SIGINT ignored (nohup, a background job): keep it so
            yield
            return
        previous = signal.default_int_handler if previous is None else previous

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True
            signal.signal(signal.SIGINT, previous)

        signal.signal(signal.SIGINT, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.stop_requested:  # came after the last step's check: the usual interrupt
            raise KeyboardInterrupt
