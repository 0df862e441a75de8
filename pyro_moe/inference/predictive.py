"""Predictions of a patched model with S samples of its routing, both modes vectorised.

* ``routing-average``: every Bayesian router draws S samples, averages their scores and selects
  once; the network runs once on the batch. Routers whose weight sites have diagonal-Normal
  marginals (mean-field posterior, Normal prior) draw each token's logits from their Normal
  marginal by default (``local_reparameterization``; see
  :class:`~pyro_moe.models.bayesian_router.BayesianRouter`): exact per token, with Monte Carlo
  errors independent across tokens; ``local_reparameterization=False`` draws S weight matrices.
* ``model-average`` (default): S joint samples of all sites; the network runs once on the batch
  with the S samples folded into the batch dimension (sample-major), the layers in front of the
  first Bayesian layer once for all samples (``share_prefix``); answer probabilities are averaged
  over samples.

The readout is the next-token distribution at each row's last real position, restricted to
``answer_token_ids`` and renormalised (the MCQA readout), or over the whole vocabulary.

Example::

    prediction = predict(handle, input_ids, attention_mask, answer_token_ids=letter_ids, num_samples=16)
    prediction.probs            # (batch, choices)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import pyro
import torch
from torch import Tensor

from pyro_moe.core.readout import last_token_logits
from pyro_moe.core.routing_context import PARTICLE_DIM, PredictiveMode, RoutingContext, routing_context
from pyro_moe.errors import ConfigurationError
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_integer

__all__ = ["PosteriorGuide", "RoutedPrediction", "predict", "predictive_mode"]


class PosteriorGuide(Protocol):
    """A fitted posterior that can stand in for the priors during a forward pass."""

    def posterior(self, input_ids: Tensor, attention_mask: Tensor) -> contextlib.AbstractContextManager[None]:
        """Within the current plate of joint samples, make the routers draw from the posterior."""


@dataclass
class RoutedPrediction:
    """What :func:`predict` returns.

    Attributes:
        probs: ``(batch, choices)`` answer probabilities averaged over samples.
        sample_probs: ``(samples, batch, choices)`` per joint sample (model-average mode), or
            ``(1, batch, choices)`` in routing-average mode; ``None`` unless requested.
        router_logits: per Bayesian router path, its sampled (tempered) logits
            ``(samples, batch, length, experts)``; ``None`` unless requested.
        temperature: the calibration temperature ``T`` applied to :attr:`probs` (``softmax(log p / T)``
            of the average ``p``, see :meth:`pyro_moe.FittedPosterior.calibrate`); ``None``: ``probs`` is
            the plain average. :attr:`sample_probs` is never tempered.
    """

    probs: Tensor
    sample_probs: Tensor | None = None
    router_logits: dict[str, Tensor] | None = None
    temperature: float | None = None


def predictive_mode(mode: PredictiveMode | str) -> PredictiveMode:
    """``mode`` as a :class:`~pyro_moe.core.routing_context.PredictiveMode`; an unknown one is refused
    with the accepted names."""
    try:
        return PredictiveMode(mode)
    except ValueError:
        accepted = ", ".join(m.value for m in PredictiveMode)
        raise ConfigurationError(f"unknown predictive mode {mode!r}; accepted: {accepted}.") from None


def _check(
    patch: RouterPatch,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    num_samples: int,
    max_samples_per_pass: int | None,
) -> None:
    if not isinstance(patch, RouterPatch) or not patch.active:
        raise ConfigurationError("predict needs an active RouterPatch (from patch_routers).")
    check_integer("num_samples", num_samples)
    if max_samples_per_pass is not None:
        check_integer("max_samples_per_pass", max_samples_per_pass)
    if input_ids.dim() != 2:
        raise ConfigurationError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}.")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ConfigurationError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}."
        )


@torch.no_grad()
def predict(
    patch: RouterPatch,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    answer_token_ids: Tensor | None = None,
    num_samples: int = 16,
    mode: PredictiveMode | str = PredictiveMode.MODEL_AVERAGE,
    share_prefix: bool = True,
    max_samples_per_pass: int | None = None,
    guide: PosteriorGuide | None = None,
    return_samples: bool = False,
    return_router_logits: bool = False,
    local_reparameterization: bool | None = None,
) -> RoutedPrediction:
    """Predictive answer distribution of a patched model; see the module docstring.

    Args:
        patch: the active patch of the model.
        input_ids: ``(batch, length)`` token ids.
        attention_mask: ``(batch, length)``, 1 for real tokens; default all ones.
        answer_token_ids: ``(choices,)`` token ids of the answers; default the whole vocabulary.
        num_samples: S, the number of samples of the routing.
        mode: ``"model-average"`` or ``"routing-average"``.
        share_prefix: model-average only: run the layers before the first Bayesian layer once.
        max_samples_per_pass: model-average only: fold at most this many joint samples into one pass
            (default all S). Activation memory grows with the folded batch; on CPU, HF's expert
            kernels also run faster on cache-sized batches (see the speed table in docs/speed.md).
        guide: a fitted posterior (:mod:`pyro_moe.guides`); default the priors.
        return_samples: also return the per-sample answer probabilities.
        return_router_logits: also return every Bayesian router's sampled logits.
        local_reparameterization: routing-average only: draw each token's logits from their Normal
            marginal where the weight sites have diagonal-Normal marginals (``None``, the default: on
            in routing-average, off in model-average; ``True`` in model-average is refused).
    """
    _check(patch, input_ids, attention_mask, num_samples, max_samples_per_pass)
    mode = predictive_mode(mode)
    if local_reparameterization is None:
        local_reparameterization = mode is PredictiveMode.ROUTING_AVERAGE
    settings = dict(mode=mode, share_prefix=share_prefix, local_reparameterization=local_reparameterization)
    RoutingContext(**settings)  # refuses a bad local_reparameterization before any work
    model = patch.model
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    batch, length = input_ids.shape
    if mode is PredictiveMode.ROUTING_AVERAGE or max_samples_per_pass is None:
        max_samples_per_pass = num_samples
    chunks = [min(max_samples_per_pass, num_samples - start) for start in range(0, num_samples, max_samples_per_pass)]
    last, recorded = [], []
    for samples in chunks:
        record: dict[str, Tensor] | None = {} if return_router_logits else None
        with (
            routing_context(**settings, recorded_logits=record),
            pyro.plate("samples", samples, dim=PARTICLE_DIM),
            guide.posterior(input_ids, attention_mask) if guide is not None else contextlib.nullcontext(),
        ):
            last.append(last_token_logits(model, input_ids, attention_mask))  # (samples or 1, batch, vocab)
        recorded.append(record)
    last = torch.cat(last)
    if answer_token_ids is not None:
        last = last[..., answer_token_ids.to(device)]
    sample_probs = torch.softmax(last, dim=-1)  # (S or 1, batch, choices), the model's dtype (float32 at least)
    router_logits = None
    if return_router_logits:
        router_logits = {
            path: torch.cat([record[path] for record in recorded]).unflatten(1, (batch, length)) for path in recorded[0]
        }
    return RoutedPrediction(
        probs=sample_probs.mean(0),
        sample_probs=sample_probs if return_samples else None,
        router_logits=router_logits,
    )
