"""The experiments' predictions on MCQA batches: the deterministic model's answer logits
(:func:`deterministic_logits`), its temperature scaling, and a posterior's predictions with their
uncertainty scores (:func:`predict_batches`, drawn from one stream over the batches or per question:
:data:`DRAWS`), as :class:`PredictionSettings` (the base of the experiments' own settings) and
:class:`MCQAPredictionSettings` (which adds how the answers' draws are taken) say.

Example::

    logits = deterministic_logits(model, test_batches, letters)      # (examples, choices)
    scored = predict_batches(posteriors["mfvr"], test_batches, "model-average", 16, scores=True)
    PredictionSettings(num_samples=0)                                # ConfigurationError, nothing fitted
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.handlers import at_prior_mean
from pyro_moe.core.readout import last_token_logits
from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.data import MCQAExample, mcqa_batches
from pyro_moe.data import answer_token_ids as letter_token_ids
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import mutual_information, router_logit_variance
from pyro_moe.evaluation.temperature_scaling import TemperatureScaling, fit_temperature
from pyro_moe.experiments.checks import MODES, Posterior, check_modes
from pyro_moe.random_streams import question_seed, seeded
from pyro_moe.validation import check_integer

__all__ = [
    "DRAWS",
    "PER_BATCH",
    "PER_QUESTION",
    "MCQAPredictionSettings",
    "PredictionSettings",
    "Predictions",
    "default_answer_token_ids",
    "deterministic_logits",
    "fit_temperature_scaling",
    "predict_batches",
    "split_batches",
    "split_labels",
]


PER_BATCH = "per-batch"
"""Draws of :func:`predict_batches`: one stream, seeded once, over the batches (a question's draws depend on
its batch and on the questions before it)."""

PER_QUESTION = "per-question"
"""Draws of :func:`predict_batches`: every question predicted alone (batch 1, no padding) under
:func:`~pyro_moe.random_streams.question_seed` of the seed and its prompt tokens: the draws of the
lm-evaluation-harness model (:mod:`pyro_moe.integrations.lm_eval`) on the same prompt and seed, independent
of the batch size and of the other questions (one pass per question: slower)."""

DRAWS = (PER_BATCH, PER_QUESTION)
"""How a posterior's predictions draw their samples (:data:`PER_BATCH`, :data:`PER_QUESTION`)."""


@dataclass(frozen=True, kw_only=True)
class PredictionSettings:
    """How the experiments predict with the posteriors; the base of the experiments' own settings
    (e.g. :class:`pyro_moe.experiments.calibration.CalibrationSettings`). The numbers and modes
    are checked when the settings are built, before any fit.

    Attributes:
        num_samples: S, samples of the routing per prediction.
        modes: the predictive modes of the posteriors (see :data:`MODES`), a tuple once built.
        batch_size: questions per prediction batch.
        seed: seed of the sampling.
    """

    num_samples: int = 16
    modes: Sequence[str] = MODES
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        check_integer("num_samples", self.num_samples)
        object.__setattr__(self, "modes", check_modes(self.modes))
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, minimum=0)


@dataclass(frozen=True, kw_only=True)
class MCQAPredictionSettings(PredictionSettings):
    """:class:`PredictionSettings` of the experiments that predict the posteriors' answers with
    :func:`predict_batches` (calibration, OoD), and how they draw their samples.

    Example::

        CalibrationSettings(num_samples=8, seed=3, draws=PER_QUESTION)   # the draws of pyro-moe lm-eval

    Attributes:
        draws: :data:`PER_BATCH` (default: one stream seeded once over the batches) or :data:`PER_QUESTION`
            (every question alone under :func:`~pyro_moe.random_streams.question_seed` of ``seed`` and its
            prompt: the draws of the lm-evaluation-harness model on the same questions and seed).
    """

    draws: str = PER_BATCH

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draws not in DRAWS:
            raise ConfigurationError(f"unknown draws {self.draws!r}; accepted: {', '.join(DRAWS)}.")


def split_batches(
    examples: Sequence[MCQAExample], tokenizer: Any, batch_size: int, limit: int | None = None
) -> list[dict[str, Tensor]]:
    """Left-padded batches (:func:`pyro_moe.data.mcqa_batches`) of the first ``limit`` examples (all by default)."""
    if limit is not None:
        examples = examples[:limit]
    return list(mcqa_batches(examples, tokenizer, batch_size))


def split_labels(examples: Sequence[MCQAExample]) -> Tensor:
    """Indices ``(examples,)`` (int64) of the correct choices."""
    return torch.tensor([example.answer for example in examples], dtype=torch.long)


def default_answer_token_ids(tokenizer: Any, examples: Sequence[MCQAExample]) -> Tensor:
    """Token ids ``(choices,)`` of the letters ``A, B, ...`` of the questions' choices."""
    return letter_token_ids(tokenizer, list("ABCDEFGHIJ"[: len(examples[0].choices)]))


def _model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def deterministic_logits(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], answer_token_ids: Tensor) -> Tensor:
    """Answer logits ``(examples, choices)`` (the model's dtype, float32 at least; CPU) of the
    deterministic model: every router site at its prior mean (:func:`pyro_moe.at_prior_mean`), so a
    patched model gives the HF model."""
    device = _model_device(model)
    answer_token_ids = answer_token_ids.to(device)
    chunks = []
    with at_prior_mean():
        for batch in tqdm(batches, desc="deterministic predictions", leave=False):
            logits = last_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            chunks.append(logits[0][:, answer_token_ids].cpu())
    return torch.cat(chunks)


def fit_temperature_scaling(
    model: nn.Module, tokenizer: Any, examples: Sequence[MCQAExample], answer_token_ids: Tensor, batch_size: int
) -> TemperatureScaling:
    """Temperature scaling of the deterministic model's answer logits, fitted on ``examples``
    (:func:`pyro_moe.evaluation.temperature_scaling.fit_temperature`)."""
    logits = deterministic_logits(model, split_batches(examples, tokenizer, batch_size), answer_token_ids)
    return fit_temperature(logits, split_labels(examples))


@dataclass(frozen=True)
class Predictions:
    """A posterior's predictions on a split.

    Attributes:
        probs: ``(examples, choices)`` predictive answer probabilities.
        mutual_information: ``(examples,)`` mutual information of the answer (``model-average``
            only: ``routing-average`` returns one answer distribution), or ``None``.
        router_logit_variance: ``(examples,)`` variance of the sampled router logits, or ``None``.
    """

    probs: Tensor
    mutual_information: Tensor | None = None
    router_logit_variance: Tensor | None = None


def predict_batches(
    posterior: Posterior,
    batches: Sequence[Mapping[str, Tensor]],
    mode: str,
    num_samples: int,
    *,
    scores: bool = False,
    seed: int = 0,
    draws: str = PER_BATCH,
) -> Predictions:
    """``posterior.predict`` over ``batches`` in predictive ``mode``, results on the CPU, in the questions' order.

    ``draws``: :data:`PER_BATCH` seeds Pyro (torch, Python, NumPy) once with ``seed`` and predicts batch by
    batch; :data:`PER_QUESTION` predicts every question alone, its prompt without padding ``(1, length)``,
    under ``seeded(question_seed(seed, prompt tokens))`` (the caller's streams left as they were).

    With ``scores``, also the mutual information (``model-average``) and the router-logit
    variance per example, computed batch by batch so the sampled logits are never all kept.
    """
    if draws not in DRAWS:
        raise ConfigurationError(f"unknown draws {draws!r}; accepted: {', '.join(DRAWS)}.")
    if draws == PER_BATCH:
        pyro.set_rng_seed(seed)
        passes = list(batches)
    else:
        passes = [
            {"input_ids": ids[mask.bool()][None], "attention_mask": mask[mask.bool()][None]}
            for batch in batches
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]
    probs, information, variance = [], [], []
    for batch in tqdm(passes, desc=f"predictions, {mode}", leave=False):
        per_question = draws == PER_QUESTION
        with seeded(question_seed(seed, batch["input_ids"][0])) if per_question else contextlib.nullcontext():
            prediction = posterior.predict(
                batch["input_ids"],
                batch["attention_mask"],
                num_samples=num_samples,
                mode=mode,
                return_samples=scores,
                return_router_logits=scores,
            )
        probs.append(prediction.probs.float().cpu())
        if scores:
            if mode == PredictiveMode.MODEL_AVERAGE.value:
                information.append(mutual_information(prediction.sample_probs).cpu())
            if prediction.router_logits and num_samples > 1:
                mask = batch["attention_mask"].to(prediction.probs.device)
                variance.append(router_logit_variance(prediction.router_logits, mask).cpu())
    return Predictions(
        probs=torch.cat(probs),
        mutual_information=torch.cat(information) if information else None,
        router_logit_variance=torch.cat(variance) if variance else None,
    )
