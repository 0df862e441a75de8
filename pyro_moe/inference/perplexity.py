"""Perplexity of text under the deterministic model, the prior predictive or a fitted posterior.

Every real next token (a real token after a real token, :func:`~pyro_moe.core.readout.next_token_mask`)
is scored by its predictive probability; perplexity is ``exp`` of the mean negative log of it over
all scored tokens of all batches. The predictor decides the probability:

* a model (``nn.Module``): the deterministic model, one pass with every router site at its prior
  mean (a plain HF model as it is); its perplexity on an unpadded batch is ``exp`` of HF's own
  ``model(input_ids, labels=input_ids).loss``;
* a :class:`~pyro_moe.models.router_patch.RouterPatch`: the prior predictive of its sites;
* a :class:`~pyro_moe.inference.fitting.FittedPosterior`: its posterior predictive.

For the last two, ``mode="model-average"`` draws ``S`` joint samples and averages each token's
probability over them, ``p(x_t | x_<t) = mean_s p_s(x_t | x_<t)``, in passes of at most
``max_samples_per_pass`` samples; ``"routing-average"`` runs one pass, every router averaging its
``S`` draws (as :func:`pyro_moe.predict`). Padded rows get the positions they have alone, so a padded
batch scores as its rows one by one.

Example::

    deterministic = perplexity(model, held_out)                        # Perplexity(value=..., nll=..., tokens=...)
    prior = perplexity(patch_routers(model, {"logits": 2.0}), held_out, num_samples=8)
    fitted = perplexity(posterior, held_out, num_samples=8, mode="model-average")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.handlers import at_prior_mean
from pyro_moe.core.readout import next_token_logits, next_token_mask
from pyro_moe.core.routing_context import PARTICLE_DIM, PredictiveMode, routing_context
from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.predictive import predictive_mode
from pyro_moe.models.likelihoods import check_text_batches
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_integer

__all__ = ["Perplexity", "perplexity"]


@dataclass(frozen=True)
class Perplexity:
    """The perplexity of a text and what it is made of.

    Attributes:
        value: ``exp(nll)``.
        nll: mean negative log predictive probability per scored token (nats).
        tokens: number of scored tokens (real tokens after a real token).
    """

    value: float
    nll: float
    tokens: int


def _token_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(draws, batch, length - 1)`` log-probabilities of the next tokens under each draw of one pass."""
    logits = next_token_logits(model, input_ids, attention_mask)
    targets = input_ids[:, 1:].expand(logits.shape[:-1])
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def perplexity(
    predictor: FittedPosterior | RouterPatch | nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    num_samples: int = 16,
    mode: PredictiveMode | str = PredictiveMode.MODEL_AVERAGE,
    max_samples_per_pass: int | None = None,
    progress: bool = True,
) -> Perplexity:
    """The perplexity of the text ``batches`` under ``predictor``; see the module docstring.

    Args:
        predictor: a fitted posterior, an active patch (its priors) or a model (the deterministic model).
        batches: text batches (dicts of ``input_ids`` and ``attention_mask`` ``(batch, length)``), e.g.
            from :func:`pyro_moe.data.text_batches`.
        num_samples: S, joint samples (``model-average``) or draws per router (``routing-average``);
            not used for a model.
        mode: ``"model-average"`` or ``"routing-average"`` (a patch's ``predictive_modes``); not used
            for a model.
        max_samples_per_pass: ``model-average``: fold at most this many samples into one pass (default S).
        progress: show a progress bar over the batches.

    Raises:
        ConfigurationError: a predictor of another type or an inactive patch, a mode the patch does not
            have, bad numbers, or batches that are not text batches with a next token to score.
    """
    batches = check_text_batches(batches)
    check_integer("num_samples", num_samples)
    if max_samples_per_pass is not None:
        check_integer("max_samples_per_pass", max_samples_per_pass)
    mode = predictive_mode(mode)
    guide = None
    if isinstance(predictor, FittedPosterior):
        patch, guide = predictor.patch, predictor.guide
    elif isinstance(predictor, RouterPatch):
        patch = predictor
    elif isinstance(predictor, nn.Module):
        patch = None
    else:
        raise ConfigurationError(
            f"perplexity takes a FittedPosterior, a RouterPatch or a model, got {type(predictor).__name__}."
        )
    if patch is not None and not patch.active:
        raise ConfigurationError("the patch has been undone (unpatch); patch the model again.")
    if patch is not None and mode not in patch.predictive_modes:
        modes = ", ".join(m.value for m in patch.predictive_modes)
        raise ConfigurationError(f"this patch predicts in {modes} only, not {mode.value}.")
    model = predictor if patch is None else patch.model
    device = model.get_input_embeddings().weight.device
    per_pass = (
        num_samples if mode is PredictiveMode.ROUTING_AVERAGE or max_samples_per_pass is None else max_samples_per_pass
    )
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if patch is None:
            with at_prior_mean():
                log_probs = _token_log_probs(model, input_ids, attention_mask)[0]
        else:
            draws = []
            for start in range(0, num_samples, per_pass):
                with (
                    # as predict's default: routing-average draws logits from their marginals where it can
                    routing_context(mode=mode, local_reparameterization=mode is PredictiveMode.ROUTING_AVERAGE),
                    pyro.plate("samples", min(per_pass, num_samples - start), dim=PARTICLE_DIM),
                    guide.posterior(input_ids, attention_mask) if guide is not None else contextlib.nullcontext(),
                ):
                    draws.append(_token_log_probs(model, input_ids, attention_mask))
            draws = torch.cat(draws)  # (S, batch, length - 1), or (1, ...) when the routers averaged
            log_probs = torch.logsumexp(draws, 0) - math.log(len(draws))
        scored = next_token_mask(attention_mask)
        total -= float(log_probs[scored].double().sum())
        count += int(scored.sum())
    nll = total / count
    return Perplexity(value=math.exp(nll), nll=nll, tokens=count)
