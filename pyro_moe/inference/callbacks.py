"""Callbacks of :meth:`FittedPosterior.train <pyro_moe.inference.fitting.FittedPosterior.train>`:
code that runs after optimisation steps, records a value in the history and may act at the end.

A callback is a :class:`TrainingCallback` (three hooks: :meth:`~TrainingCallback.check` before any
step, ``__call__`` after every step, :meth:`~TrainingCallback.finish` after the last one) or any
callable ``callback(posterior, step) -> float | None``. ``step`` is the number of steps done (1
after the first); a returned number is recorded in that step's history record under the
callback's :attr:`~TrainingCallback.name` (``"callback"`` for a plain callable).

:class:`EvaluationCallback` is the one a fit usually wants: the held-out negative log-likelihood of
the ``model-average`` predictive every ``every`` steps, and optionally the parameters of the best
evaluation restored at the end (and the best state written as a checkpoint).

Example::

    evaluation = EvaluationCallback(validation_batches, every=50, num_samples=16, keep_best=True)
    posterior = fit(patch, batches, "mfvr", answer_token_ids=letters, steps=300, callback=evaluation)
    evaluation.values            # {50: 0.71, 100: 0.66, ...}: held-out NLL per evaluated step
    evaluation.best_step         # the step whose parameters the posterior now holds
    posterior.history[99]["held_out_nll"] == evaluation.values[100]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.calibration import predictive_nll
from pyro_moe.models.likelihoods import check_batches
from pyro_moe.validation import check_integer

_Posterior = Any  # a pyro_moe.inference.fitting.FittedPosterior (that module imports this one)

__all__ = ["EvaluationCallback", "TrainingCallback", "as_callback", "held_out_nll"]


class TrainingCallback:
    """A callback with hooks; override ``__call__`` and whichever of the others it needs."""

    name: ClassVar[str] = "callback"
    """The key of the callback's values in the history records."""

    def check(self, posterior: _Posterior, start: int, steps: int) -> None:
        """Raise :class:`~pyro_moe.errors.ConfigurationError` if the callback cannot run on ``posterior``
        for ``steps`` steps from step count ``start``; called before any step."""

    def __call__(self, posterior: _Posterior, step: int) -> float | None:
        """Called after every step with the number of steps done; a number is recorded in the history."""
        raise NotImplementedError

    def finish(self, posterior: _Posterior) -> None:
        """Called after the last step of :meth:`FittedPosterior.train` (not when a step failed)."""

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What a run checkpoint (:mod:`pyro_moe.inference.resume`) keeps of this callback so that a resumed
        fit continues it: tensors by name and JSON-ready values; none by default (a stateless callback)."""
        return {}, {}

    def restore_checkpoint_state(self, tensors: Mapping[str, Tensor], values: Mapping[str, Any]) -> None:
        """Take back :meth:`checkpoint_state` (before the resumed fit's first step)."""

    def resume_identity(self) -> dict[str, Any] | None:
        """What a resumed fit's callback must share with the one its checkpoint was written with (compared
        by :func:`~pyro_moe.inference.resume.check_resumable`); ``None`` (the default): a callback with no
        :meth:`checkpoint_state`, which any other stateless callback (or none) may continue."""
        return None


@dataclass
class _FunctionCallback(TrainingCallback):
    function: Callable[[_Posterior, int], float | None]

    def __call__(self, posterior: _Posterior, step: int) -> float | None:
        return self.function(posterior, step)


def as_callback(callback: TrainingCallback | Callable[[_Posterior, int], float | None]) -> TrainingCallback:
    """``callback`` as a :class:`TrainingCallback` (a plain callable runs after every step)."""
    if isinstance(callback, TrainingCallback):
        return callback
    if not callable(callback):
        raise ConfigurationError(
            f"a callback must be a TrainingCallback or a callable (posterior, step) -> float | None, got {callback!r}."
        )
    return _FunctionCallback(callback)


def held_out_nll(
    posterior: _Posterior,
    batches: Sequence[Mapping[str, Tensor]],
    num_samples: int,
    seed: int,
    *,
    calibrated: bool = False,
) -> float:
    """Mean ``-log p(label)`` over the examples of ``batches`` under the ``model-average`` predictive
    with ``num_samples`` joint draws (the plain average, never a kept temperature), through the path
    the prior selection and the calibration share
    (:func:`pyro_moe.inference.calibration.predictive_nll`): Pyro's seed set to ``seed`` first, every
    random stream (torch, CUDA, Python, NumPy) restored afterwards; the guide in evaluation mode, no gradients.

    Args:
        posterior: the fitted posterior.
        batches: dicts of ``input_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)``, ``labels`` ``(B,)``.
        num_samples: ``S`` joint draws per batch.
        seed: seeds the draws.
        calibrated: the NLL after a temperature fitted on ``batches`` (what a recipe that calibrates ends with).
    """
    device = posterior.patch.model.get_input_embeddings().weight.device

    def averaged(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        ids, mask = input_ids.to(device), attention_mask.to(device)
        return posterior.predict(ids, mask, num_samples=num_samples, calibrated=False).probs

    was_training = posterior.guide.training
    posterior.guide.eval()
    try:
        return predictive_nll(averaged, batches, seed, calibrated=calibrated)
    finally:
        posterior.guide.train(was_training)


@dataclass
class EvaluationCallback(TrainingCallback):
    """Held-out NLL of the ``model-average`` predictive every ``every`` steps; optionally the best.

    The options are checked when it is built, the batches against the posterior before any step.
    Evaluation draws with its own seed and restores every random stream afterwards (:func:`held_out_nll`),
    so a fit with the callback follows the same optimisation path as one without.

    Attributes:
        batches: held-out batches (dicts of ``input_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)``,
            ``labels`` ``(B,)``), e.g. from :func:`pyro_moe.data.mcqa_batches`.
        every: evaluate after every ``every``-th step (step counts ``every, 2 every, ...``).
        num_samples: ``S`` joint draws of the predictive.
        keep_best: restore, at the end of training, the guide's parameters, buffers and optimiser state
            (Adam's moments) of the evaluated step with the lowest held-out NLL (the earliest on ties), so
            that training resumed from the result continues from that step's state. The step count and
            history stay those of the last step (what ran; the batch order continues from there).
        folder: write the posterior there (:meth:`FittedPosterior.save`, atomically) at every new
            best evaluation: a checkpoint of the best step that :meth:`FittedPosterior.load` reads
            and resumes from; ``None``: none.
        seed: seeds the predictive draws (the same draws at every evaluation).
        calibrated: rank by the held-out NLL after a temperature fitted on the held-out batches (what a
            fit that is calibrated afterwards ends with) instead of the plain average's NLL.
        values: ``{step: held-out NLL}`` of the evaluations so far (filled while training).
        best_step, best_value: the best evaluation so far (``None``, ``inf`` before any).
    """

    name: ClassVar[str] = "held_out_nll"

    batches: Sequence[Mapping[str, Tensor]]
    every: int = 50
    num_samples: int = 16
    keep_best: bool = False
    folder: str | Path | None = None
    seed: int = 0
    calibrated: bool = False
    values: dict[int, float] = field(default_factory=dict, init=False)
    best_step: int | None = field(default=None, init=False)
    best_value: float = field(default=math.inf, init=False)
    _best_state: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.batches, Mapping) or not isinstance(self.batches, Sequence):
            raise ConfigurationError("batches must be a list of held-out batches (dicts of input_ids, ...).")
        self.batches = [dict(batch) for batch in self.batches]
        if not self.batches:
            raise ConfigurationError("the held-out batches are empty: give at least one batch to evaluate on.")
        check_integer("every", self.every)
        check_integer("num_samples", self.num_samples)
        check_integer("seed", self.seed, minimum=0)
        for name in ("keep_best", "calibrated"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.folder is not None and not isinstance(self.folder, str | Path):
            raise ConfigurationError(f"folder must be a path or None, got {self.folder!r}.")

    def check(self, posterior: _Posterior, start: int, steps: int) -> None:
        """Refuse held-out batches the posterior cannot score and a run with no evaluation at all."""
        check_batches(self.batches, posterior.likelihood.num_choices)
        if (start + steps) // self.every == start // self.every:
            raise ConfigurationError(
                f"every={self.every}: no evaluation would run in steps {start + 1}..{start + steps}; "
                f"choose every <= {max(steps, 1)} or train longer."
            )

    def __call__(self, posterior: _Posterior, step: int) -> float | None:
        if step % self.every:
            return None
        value = held_out_nll(posterior, self.batches, self.num_samples, self.seed, calibrated=self.calibrated)
        self.values[step] = value
        if value < self.best_value:
            self.best_step, self.best_value = step, value
            if self.keep_best:
                state = _state(posterior) | posterior.engine.optimizer_tensors()
                self._best_state = {name: tensor.detach().clone() for name, tensor in state.items()}
            if self.folder is not None:
                posterior.save(self.folder)
        return value

    def finish(self, posterior: _Posterior) -> None:
        """With ``keep_best``: copy the best evaluation's parameters and buffers into the guide and its
        optimiser state into the optimiser."""
        if not self.keep_best or not self._best_state:
            return
        with torch.no_grad():
            for name, tensor in _state(posterior).items():
                tensor.copy_(self._best_state[name])
        posterior.engine.load_optimizer_tensors(self._best_state)

    def checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The evaluations so far, the best one and (``keep_best``) its state."""
        values = {
            "values": {str(step): value for step, value in self.values.items()},
            "best_step": self.best_step,
            "best_value": None if self.best_step is None else self.best_value,
        }
        return {f"best/{name}": tensor for name, tensor in self._best_state.items()}, values

    def resume_identity(self) -> dict[str, Any]:
        """The class whose state it keeps (the nearest that defines :meth:`checkpoint_state`) and the options
        that decide that state (a changed one would make the resumed state wrong)."""
        keeper = next(cls for cls in type(self).__mro__ if "checkpoint_state" in vars(cls))
        options = {"every": self.every, "num_samples": self.num_samples, "keep_best": self.keep_best}
        return {"type": keeper.__qualname__, **options, "seed": self.seed, "calibrated": self.calibrated}

    def restore_checkpoint_state(self, tensors: Mapping[str, Tensor], values: Mapping[str, Any]) -> None:
        self.values = {int(step): float(value) for step, value in values["values"].items()}
        self.best_step = values["best_step"]
        self.best_value = math.inf if values["best_value"] is None else float(values["best_value"])
        self._best_state = {
            name.removeprefix("best/"): tensor.clone() for name, tensor in tensors.items() if name.startswith("best/")
        }


def _state(posterior: _Posterior) -> dict[str, Tensor]:
    """The trained tensors of ``posterior``: the engine's parameters (unconstrained; named without the fit's
    prefix, as checkpoints name them) and the guide's buffers."""
    prefix = posterior.engine.param_prefix
    state = {f"param/{name.removeprefix(prefix)}": value for name, value in posterior.engine.params.items()}
    state.update({f"buffer/{name}": value for name, value in posterior.guide.named_buffers()})
    return state
