"""Likelihoods: the Pyro models that tie a patched network to data.

Two kinds (:class:`LikelihoodKind`): :class:`MCQALikelihood` observes the answer letter of
multiple-choice questions (batches with ``labels``), :class:`NextTokenLikelihood` every real next
token of plain text (batches of ``input_ids`` and ``attention_mask`` alone). ``fit`` chooses by its
``answer_token_ids`` (:func:`likelihood_kind`) and both offer what ``fit``, the guides and the SVI
engine use: ``param_prefix``, ``last_nll``, ``check_batches``, ``network_logits``, ``to_config``
(what a checkpoint keeps; :func:`likelihood_from_config` rebuilds it) and ``placeholder_batch``.

Both run the (frozen) network, whose Bayesian routers declare their sample sites, and observe
data in a plate ``examples`` of size ``num_examples``, the number of examples the batch stands for:
a batch of ``B`` rows scales the observation by ``num_examples / B`` (:func:`data_scale`), and the
routers' per-token sites by the same factor (``RoutingContext.local_scale``); global sites count
once. For a uniformly random ``B`` of ``N`` examples ``num_examples = N``; ``fit`` visits ``J``
fixed batches once per epoch and passes ``J B_j`` (each row weighs ``J``), which keeps the
minibatch ELBO an unbiased estimate of the full-data ELBO when the batches differ in size
(:meth:`~pyro_moe.inference.fitting.FittedPosterior.train`).

Inside a plate of ``K`` vectorised particles (dim -2) the network folds the particles into its
batch and the observation has batch shape ``(K, B)``.

Example::

    model = MCQALikelihood(handle, answer_token_ids)
    answer_logits = model(input_ids, attention_mask, labels=labels, num_examples=len(dataset))
    text = NextTokenLikelihood(handle)
    token_logits = text(input_ids, attention_mask, num_examples=len(documents))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyro_moe.core.readout import last_token_logits, next_token_logits, next_token_mask
from pyro_moe.core.routing_context import routing_context
from pyro_moe.errors import ConfigurationError, NonFiniteError
from pyro_moe.models.router_patch import RouterPatch

__all__ = [
    "BATCH_KEYS",
    "TEXT_BATCH_KEYS",
    "Likelihood",
    "LikelihoodKind",
    "MCQALikelihood",
    "NextTokenLikelihood",
    "check_batches",
    "check_text_batches",
    "data_scale",
    "likelihood_from_config",
    "likelihood_kind",
]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")
"""The keys of an MCQA batch (what :class:`MCQALikelihood` is called with)."""

TEXT_BATCH_KEYS = ("input_ids", "attention_mask")
"""The keys of a text batch (what :class:`NextTokenLikelihood` is called with)."""


class LikelihoodKind(StrEnum):
    """What a fit observes; the ``likelihood`` entry of a checkpoint's configuration."""

    MCQA = "mcqa"
    """The answer letter of multiple-choice questions (:class:`MCQALikelihood`)."""

    NEXT_TOKEN = "next-token"
    """Every real next token of plain text (:class:`NextTokenLikelihood`)."""


def likelihood_kind(answer_token_ids: Tensor | Sequence[int] | None) -> LikelihoodKind:
    """The likelihood ``fit`` uses: MCQA with the answer letters' ids, next-token with ``None``."""
    return LikelihoodKind.NEXT_TOKEN if answer_token_ids is None else LikelihoodKind.MCQA


def check_batches(data: Iterable[Mapping[str, Tensor]], num_choices: int) -> list[dict[str, Tensor]]:
    """The batches as a list, checked before any work: at least one example, every batch mapping
    :data:`BATCH_KEYS` to tensors, ``input_ids`` and ``attention_mask`` ``(batch, length)``, integer
    ``labels`` ``(batch,)`` in ``[0, num_choices)``."""
    if isinstance(data, Mapping):
        raise ConfigurationError("give an iterable of batches (dicts of input_ids, attention_mask, labels), not one.")
    batches = [dict(batch) for batch in data]
    empty = ConfigurationError("the data are empty: give at least one batch of input_ids, attention_mask, labels.")
    if not batches:
        raise empty
    for index, batch in enumerate(batches):
        missing = [key for key in BATCH_KEYS if not isinstance(batch.get(key), Tensor)]
        if missing:
            raise ConfigurationError(
                f"batch {index} lacks {missing}; every batch needs {', '.join(BATCH_KEYS)} tensors"
                + (" (text batches without labels: fit with answer_token_ids=None)." if missing == ["labels"] else ".")
            )
        ids, mask, labels = (batch[key] for key in BATCH_KEYS)
        if ids.dim() != 2 or mask.shape != ids.shape or labels.shape != ids.shape[:1]:
            raise ConfigurationError(
                f"batch {index}: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} and labels "
                f"{tuple(labels.shape)} must be (batch, length), (batch, length) and (batch,)."
            )
        integers = not labels.dtype.is_floating_point and labels.dtype != torch.bool
        if not integers or (len(labels) and (labels.min() < 0 or labels.max() >= num_choices)):
            values = (
                f"{labels.dtype} values"
                if not integers or not len(labels)
                else (f"values in [{labels.min().item()}, {labels.max().item()}]")
            )
            raise ConfigurationError(
                f"batch {index}: labels must be integers in [0, {num_choices}) (one per answer letter), got {values}."
            )
    if not any(len(batch["labels"]) for batch in batches):
        raise empty
    return batches


def check_text_batches(data: Iterable[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The text batches as a list, checked before any work: every batch maps exactly
    :data:`TEXT_BATCH_KEYS` to integer tensors ``(batch, length)`` of one shape, and at least one
    real token follows a real token somewhere (a next token to observe). A batch with ``labels`` is
    an MCQA batch and is refused with the way to fit those."""
    if isinstance(data, Mapping):
        raise ConfigurationError("give an iterable of text batches (dicts of input_ids, attention_mask), not one.")
    batches = [dict(batch) for batch in data]
    if not batches:
        raise ConfigurationError("the text data are empty: give at least one batch of input_ids, attention_mask.")
    for index, batch in enumerate(batches):
        if "labels" in batch:
            raise ConfigurationError(
                f"batch {index} has labels: an MCQA batch. Fit MCQA with answer_token_ids (the answer letters' "
                "ids); text batches for the next-token likelihood hold input_ids and attention_mask only."
            )
        missing = [key for key in TEXT_BATCH_KEYS if not isinstance(batch.get(key), Tensor)]
        stray = sorted(set(batch) - set(TEXT_BATCH_KEYS))
        if missing or stray:
            problem = f"lacks {missing}" if missing else f"has keys {stray} the likelihood does not take"
            raise ConfigurationError(
                f"text batch {index} {problem}; every text batch holds {', '.join(TEXT_BATCH_KEYS)} tensors only."
            )
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ConfigurationError(
                f"text batch {index}: input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must "
                "both be (batch, length)."
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ConfigurationError(f"text batch {index}: input_ids must be integer token ids, got {ids.dtype}.")
    if not any(bool(next_token_mask(batch["attention_mask"]).any()) for batch in batches):
        raise ConfigurationError(
            "the text batches have no real token after a real token: no next token to observe (every document "
            "needs two tokens or more)."
        )
    return batches


def data_scale(batch_size: int, num_examples: int | None) -> float:
    """``num_examples / B``: the weight of each row of a batch of ``B`` that stands for ``num_examples``
    examples (1 when ``None``: the batch is the data). ``N / B`` for a uniformly random ``B`` of ``N``
    examples; ``J`` for one of ``J`` fixed batches visited uniformly (``fit`` passes ``J B``): the
    inverse of the batch's probability, so that the minibatch objective is unbiased."""
    if num_examples is None:
        return 1.0
    if num_examples < batch_size:
        raise ConfigurationError(f"num_examples ({num_examples}) is smaller than the batch ({batch_size}).")
    return num_examples / batch_size


class MCQALikelihood:
    """Multiple-choice answers: ``Categorical`` over the answer letters' next-token logits at the
    last prompt position, observed at site ``answer``.

    Args:
        patch: the patched model (its backbone is not trained).
        answer_token_ids: ``(choices,)`` token ids of the answer letters.
        param_prefix: prefix of the names of learned prior scales (one per fit).

    Attributes:
        last_nll: mean negative log-likelihood per example of the last call (a float, for progress
            reports), averaged over particles.
    """

    kind = LikelihoodKind.MCQA

    def __init__(self, patch: RouterPatch, answer_token_ids: Tensor, param_prefix: str = "") -> None:
        self.patch, self.param_prefix = patch, param_prefix
        self.answer_token_ids = torch.as_tensor(answer_token_ids).long()
        if self.answer_token_ids.dim() != 1 or len(self.answer_token_ids) < 2:
            raise ConfigurationError("answer_token_ids must be a 1-D tensor of at least two token ids.")
        self.last_nll = float("nan")

    @classmethod
    def from_config(cls, patch: RouterPatch, config: Mapping[str, Any], param_prefix: str = "") -> MCQALikelihood:
        """The likelihood :meth:`to_config` describes."""
        return cls(patch, torch.tensor(config["answer_token_ids"]), param_prefix)

    def to_config(self) -> dict[str, Any]:
        """What a checkpoint keeps of the likelihood: its kind and the answer letters' ids."""
        return {"likelihood": self.kind.value, "answer_token_ids": self.answer_token_ids.tolist()}

    @property
    def num_choices(self) -> int:
        return len(self.answer_token_ids)

    def check_batches(self, data: Iterable[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """:func:`check_batches` with this likelihood's number of choices."""
        return check_batches(data, self.num_choices)

    def placeholder_batch(self, device: torch.device) -> dict[str, Tensor]:
        """A one-row batch of two tokens (what a loaded posterior rebuilds its guide on)."""
        ones = torch.ones(1, 2, dtype=torch.long, device=device)
        return {
            "input_ids": ones * 0,
            "attention_mask": ones,
            "labels": torch.zeros(1, dtype=torch.long, device=device),
        }

    def answer_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(draws, batch, choices)`` answer logits of the network, in its dtype (float32 at least: a
        float64 model gives float64 logits and log-likelihoods)."""
        logits = last_token_logits(self.patch.model, input_ids, attention_mask)
        return logits[..., self.answer_token_ids.to(logits.device)]

    network_logits = answer_logits
    """What a pass of the network gives this likelihood (per-token guides run it: :meth:`answer_logits`)."""

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        num_examples: int | None = None,
    ) -> Tensor:
        """Run the network and observe ``labels`` ``(batch,)``; returns the answer logits
        ``(draws, batch, choices)`` (draws is 1 outside a particle plate)."""
        batch = input_ids.shape[0]
        scale = data_scale(batch, num_examples)
        with routing_context(local_scale=scale, param_prefix=self.param_prefix):
            answer_logits = self.answer_logits(input_ids, attention_mask)
        if not torch.isfinite(answer_logits).all():
            raise NonFiniteError("the network's answer logits (model site 'answer') are not finite.")
        logits = answer_logits if answer_logits.shape[0] > 1 else answer_logits[0]
        if labels is not None:
            labels = labels.to(logits.device)
            self.last_nll = float(
                -torch.log_softmax(answer_logits.detach(), -1)
                .gather(-1, labels.expand(answer_logits.shape[:-1]).unsqueeze(-1))
                .mean()
            )
        subsample = torch.arange(batch, device=logits.device)
        with pyro.plate("examples", num_examples or batch, subsample=subsample, dim=-1):
            pyro.sample("answer", dist.Categorical(logits=logits), obs=labels)
        return answer_logits


class NextTokenLikelihood:
    """The causal-LM objective: every real next token of a text batch, observed at site
    ``next_tokens`` (event shape ``(length - 1,)``, positions that are not a real token after a real
    token masked out), so an example's log-likelihood is the sum over its tokens; the forward pass
    gets the positions of the unpadded rows (:func:`~pyro_moe.core.readout.next_token_logits`), so
    left and right padding give the same values.

    Args:
        patch: the patched model (its backbone is not trained).
        param_prefix: prefix of the names of learned prior scales (one per fit).

    Attributes:
        last_nll: negative log-likelihood per example (its tokens summed) of the last call, averaged
            over the batch and the particles (a float, for progress reports).
    """

    kind = LikelihoodKind.NEXT_TOKEN

    def __init__(self, patch: RouterPatch, param_prefix: str = "") -> None:
        self.patch, self.param_prefix = patch, param_prefix
        self.last_nll = float("nan")

    @classmethod
    def from_config(cls, patch: RouterPatch, config: Mapping[str, Any], param_prefix: str = "") -> NextTokenLikelihood:
        """The likelihood :meth:`to_config` describes."""
        return cls(patch, param_prefix)

    def to_config(self) -> dict[str, Any]:
        """What a checkpoint keeps of the likelihood: its kind."""
        return {"likelihood": self.kind.value}

    @property
    def answer_token_ids(self) -> Tensor:
        """Refused: text has no answer letters (what MCQA predictions, their diagnostics and the
        Kronecker Laplace need)."""
        raise ConfigurationError(
            "this posterior was fitted on text (the next-token likelihood): it has no answer letters to predict "
            "or score MCQA answers with; measure it with pyro_moe.perplexity(posterior, text_batches), or fit it "
            "on MCQA batches with answer_token_ids."
        )

    @property
    def num_choices(self) -> int:
        """Refused, as :attr:`answer_token_ids`."""
        return len(self.answer_token_ids)

    def check_batches(self, data: Iterable[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
        """:func:`check_text_batches`."""
        return check_text_batches(data)

    def placeholder_batch(self, device: torch.device) -> dict[str, Tensor]:
        """A one-row batch of two tokens (what a loaded posterior rebuilds its guide on)."""
        ones = torch.ones(1, 2, dtype=torch.long, device=device)
        return {"input_ids": ones * 0, "attention_mask": ones}

    def network_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(draws, batch, length - 1, vocab)`` logits of the next tokens (the network's dtype, float32 at least)."""
        return next_token_logits(self.patch.model, input_ids, attention_mask)

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, num_examples: int | None = None) -> Tensor:
        """Run the network and observe ``input_ids[:, 1:]``; returns the logits
        ``(draws, batch, length - 1, vocab)`` (draws is 1 outside a particle plate)."""
        batch = input_ids.shape[0]
        with routing_context(local_scale=data_scale(batch, num_examples), param_prefix=self.param_prefix):
            logits = self.network_logits(input_ids, attention_mask)
        if not torch.isfinite(logits).all():
            raise NonFiniteError("the network's next-token logits (model site 'next_tokens') are not finite.")
        targets, scored = input_ids[:, 1:], next_token_mask(attention_mask)
        token_logp = torch.log_softmax(logits.detach(), -1).gather(-1, targets.expand(logits.shape[:-1]).unsqueeze(-1))
        self.last_nll = float(-(token_logp.squeeze(-1) * scored).sum(-1).mean())
        observed = logits if logits.shape[0] > 1 else logits[0]
        subsample = torch.arange(batch, device=logits.device)
        with pyro.plate("examples", num_examples or batch, subsample=subsample, dim=-1):
            pyro.sample("next_tokens", dist.Categorical(logits=observed).mask(scored).to_event(1), obs=targets)
        return logits


Likelihood = MCQALikelihood | NextTokenLikelihood
"""Either likelihood."""

_LIKELIHOODS: dict[LikelihoodKind, type[MCQALikelihood] | type[NextTokenLikelihood]] = {
    LikelihoodKind.MCQA: MCQALikelihood,
    LikelihoodKind.NEXT_TOKEN: NextTokenLikelihood,
}


def likelihood_from_config(patch: RouterPatch, config: Mapping[str, Any], param_prefix: str = "") -> Likelihood:
    """The likelihood a fit's configuration names (``to_config``); configurations without a
    ``likelihood`` entry (checkpoints from before text fits) are MCQA."""
    name = config.get("likelihood", LikelihoodKind.MCQA.value)
    try:
        kind = LikelihoodKind(name)
    except ValueError:
        accepted = ", ".join(kind.value for kind in LikelihoodKind)
        raise ConfigurationError(f"unknown likelihood {name!r} in the configuration; accepted: {accepted}.") from None
    return _LIKELIHOODS[kind].from_config(patch, config, param_prefix)
