"""Likelihoods: the Pyro models that tie a patched network to data.

Both run the (frozen) network, whose Bayesian routers declare their sample sites, and observe
data in a plate ``examples`` of the full data size ``num_examples``: a minibatch of ``B`` of ``N``
examples scales the observation by ``N / B``, and the routers' per-token sites by the same factor
(``RoutingContext.local_scale``), so the ELBO of a minibatch is an unbiased estimate of the
full-data ELBO; global sites count once.

Inside a plate of ``K`` vectorised particles (dim -2) the network folds the particles into its
batch and the observation has batch shape ``(K, B)``.

Example::

    model = MCQALikelihood(handle, answer_token_ids)
    answer_logits = model(input_ids, attention_mask, labels=labels, num_examples=len(dataset))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyro_moe.core.readout import last_token_logits
from pyro_moe.core.routing_context import routing_context
from pyro_moe.errors import ConfigurationError, NonFiniteError
from pyro_moe.models.router_patch import RouterPatch

__all__ = ["BATCH_KEYS", "MCQALikelihood", "NextTokenLikelihood", "check_batches", "data_scale"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels")
"""The keys of an MCQA batch (what :class:`MCQALikelihood` is called with)."""


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
                f"batch {index} lacks {missing}; every batch needs {', '.join(BATCH_KEYS)} tensors."
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


def data_scale(batch_size: int, num_examples: int | None) -> float:
    """``N / B``: the factor that makes a minibatch of ``B`` of ``N`` examples stand for all."""
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

    def __init__(self, patch: RouterPatch, answer_token_ids: Tensor, param_prefix: str = "") -> None:
        self.patch, self.param_prefix = patch, param_prefix
        self.answer_token_ids = torch.as_tensor(answer_token_ids).long()
        if self.answer_token_ids.dim() != 1 or len(self.answer_token_ids) < 2:
            raise ConfigurationError("answer_token_ids must be a 1-D tensor of at least two token ids.")
        self.last_nll = float("nan")

    @property
    def num_choices(self) -> int:
        return len(self.answer_token_ids)

    def answer_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(draws, batch, choices)`` answer logits of the network (float32)."""
        logits = last_token_logits(self.patch.model, input_ids, attention_mask)
        return logits[..., self.answer_token_ids.to(logits.device)].float()

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
    """The causal-LM objective: every real next token observed at site ``next_tokens``
    (event shape ``(length - 1,)``, padded positions masked out)."""

    def __init__(self, patch: RouterPatch) -> None:
        self.patch = patch
        self.last_nll = float("nan")

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, num_examples: int | None = None) -> Tensor:
        """Observe ``input_ids[:, 1:]``; returns the logits ``(draws, batch, length - 1, vocab)``."""
        batch = input_ids.shape[0]
        with routing_context(local_scale=data_scale(batch, num_examples)):
            logits = self.patch.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        logits = logits.unflatten(0, (-1, batch))[:, :, :-1].float()  # (draws, batch, length - 1, vocab)
        targets, real = input_ids[:, 1:], attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
        token_logp = torch.log_softmax(logits.detach(), -1).gather(-1, targets.expand(logits.shape[:-1]).unsqueeze(-1))
        self.last_nll = float(-(token_logp.squeeze(-1) * real).sum(-1).mean())
        observed = logits if logits.shape[0] > 1 else logits[0]
        subsample = torch.arange(batch, device=logits.device)
        with pyro.plate("examples", num_examples or batch, subsample=subsample, dim=-1):
            pyro.sample("next_tokens", dist.Categorical(logits=observed).mask(real).to_event(1), obs=targets)
        return logits
