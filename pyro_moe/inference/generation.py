"""Text generation with uncertainty: every generated token with its predictive entropy and mutual information.

Both predictive modes of :func:`pyro_moe.predict`, one token at a time with HF's KV cache:

* ``model-average`` (default): ``S`` joint samples of all sites, the samples folded into the batch
  (sample-major, ``S x B`` rows, in passes of at most ``max_samples_per_pass`` samples, each pass with
  its own cache). The **global** sites (router weights and biases, per-layer or per-expert
  temperatures, hierarchical prior scales, expert weights: a Laplace's draws) are drawn once per
  sample at the first pass and held for the whole sequence (:class:`HeldGlobalDraws`); the
  **per-token** sites (logits, per-token temperatures) are drawn for every new position. All samples
  continue with the same token, chosen from the averaged next-token distribution
  ``p(x_t) = mean_s p_s(x_t)``.
* ``routing-average``: one pass per step, every router averaging the scores of its ``S`` draws (global
  draws held as above; per-token draws, local reparameterisation's included, new at every position).
  It gives one next-token distribution: expected entropy equals predictive entropy and the mutual
  information is 0 by construction.

For every generated position the result holds the chosen token's averaged probability, the predictive
entropy ``H[mean_s p_s]``, the expected entropy ``mean_s H[p_s]`` and their difference, the mutual
information between the token and the draws (epistemic uncertainty), all in nats over the whole
vocabulary; optionally each sample's top-k. Greedy decoding (``do_sample=False``) takes the averaged
distribution's most probable token; sampling draws from it after ``temperature`` and ``top_p``
(the figures are always those of the untempered average).

Prompts are left-padded batches (every row's last column real); each row keeps the positions it has
alone (as :func:`~pyro_moe.core.readout.token_positions`), stops at an end-of-sequence id or a stop
string of its own, and is padded with the model's pad id afterwards (as HF's ``generate``).

Example::

    generation = generate(handle, input_ids, attention_mask, max_new_tokens=32, num_samples=8)
    generation.tokens                    # (batch, new) token ids, pad after a row stopped
    generation.mutual_information        # (batch, new) nats, 0 where generated_mask is False
    generation.mean_mutual_information   # (batch,)
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import Tensor, nn

from pyro_moe.core.readout import at_least_float32, token_positions
from pyro_moe.core.routing_context import PARTICLE_DIM, PredictiveMode, RoutingContext, routing_context
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.router_guide import is_local_site
from pyro_moe.inference.predictive import PosteriorGuide, predictive_mode
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.random_streams import seeded
from pyro_moe.validation import check_integer, check_number

__all__ = ["Generation", "HeldGlobalDraws", "TextDecoder", "generate"]


class TextDecoder(Protocol):
    """What stop strings need: a tokenizer's ``decode``."""

    def decode(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``."""


class HeldGlobalDraws(Messenger):
    """Holds the draws of every global sample site: the first value a site takes is kept and replayed
    at every later forward pass inside this handler (per-token sites, observed sites and plates' subsample
    sites pass through). Values keep their plate shape (``(S, 1, *value shape)`` under ``S`` joint samples).

    Entered outside a guide's ``posterior`` it holds the guide's own draws (sites ``posterior/<name>``), so
    re-entering the posterior at every step conditions the model on the same values.

    Attributes:
        values: the held draws by site name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, Tensor] = {}

    @staticmethod
    def _holds(msg: dict) -> bool:
        return not msg["is_observed"] and not isinstance(msg["fn"], _Subsample) and not is_local_site(msg)

    def _pyro_sample(self, msg: dict) -> None:
        if msg["value"] is None and msg["name"] in self.values and self._holds(msg):
            msg["value"] = self.values[msg["name"]]

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] not in self.values and self._holds(msg):
            self.values[msg["name"]] = msg["value"]


@dataclass
class Generation:
    """What :func:`generate` returns; ``new`` is the number of generation steps run.

    Attributes:
        tokens: ``(batch, new)`` generated token ids (the model's pad id after a row stopped).
        generated_mask: ``(batch, new)`` bool, True for the tokens a row generated (its stop token included).
        token_probs: ``(batch, new)`` the chosen token's averaged probability ``mean_s p_s(x_t)``.
        predictive_entropy: ``(batch, new)`` ``H[mean_s p_s]`` (nats).
        expected_entropy: ``(batch, new)`` ``mean_s H[p_s]`` (nats).
        mutual_information: ``(batch, new)`` predictive minus expected entropy (nats, clamped at 0).
        stopped: ``(batch,)`` bool, a row ended at an end-of-sequence id or a stop string (else at
            ``max_new_tokens``).
        sample_top_k_probs: ``(samples, batch, new, k)`` every sample's ``k`` largest next-token
            probabilities (``samples`` is 1 in routing-average mode), or ``None``.
        sample_top_k_ids: ``(samples, batch, new, k)`` their token ids, or ``None``.
        num_samples: S.
        mode: the predictive mode.

    Figures are float32 at least (a float64 model's are float64) and 0 where ``generated_mask`` is False.
    """

    tokens: Tensor
    generated_mask: Tensor
    token_probs: Tensor
    predictive_entropy: Tensor
    expected_entropy: Tensor
    mutual_information: Tensor
    stopped: Tensor
    num_samples: int
    mode: PredictiveMode
    sample_top_k_probs: Tensor | None = None
    sample_top_k_ids: Tensor | None = None

    @property
    def lengths(self) -> Tensor:
        """``(batch,)`` number of tokens every row generated."""
        return self.generated_mask.sum(-1)

    @property
    def mean_mutual_information(self) -> Tensor:
        """``(batch,)`` mean mutual information over a row's generated tokens."""
        return self.mutual_information.sum(-1) / self.lengths.clamp_min(1)

    @property
    def max_mutual_information(self) -> Tensor:
        """``(batch,)`` largest mutual information of a row's generated tokens."""
        return self.mutual_information.masked_fill(~self.generated_mask, 0.0).amax(-1)

    @property
    def mean_predictive_entropy(self) -> Tensor:
        """``(batch,)`` mean predictive entropy over a row's generated tokens."""
        return self.predictive_entropy.sum(-1) / self.lengths.clamp_min(1)

    @property
    def log_prob_sum(self) -> Tensor:
        """``(batch,)`` sum of the log averaged probabilities of a row's generated tokens."""
        log_probs = self.token_probs.clamp_min(torch.finfo(self.token_probs.dtype).tiny).log()
        return log_probs.masked_fill(~self.generated_mask, 0.0).sum(-1)


@dataclass
class _Pass:
    """One pass of at most ``max_samples_per_pass`` joint samples: its held draws and its KV cache."""

    samples: int
    held: HeldGlobalDraws = field(default_factory=HeldGlobalDraws)
    cache: Any = None


def _eos_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for token in ids:
        check_integer("eos_token_id", token, minimum=0)
    return ids


def _pad_id(model: nn.Module, eos: list[int]) -> int:
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, list | tuple):
        pad = pad[0] if pad else None
    return int(pad) if pad is not None else (eos[0] if eos else 0)


def _check(
    patch: RouterPatch,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    mode: PredictiveMode,
    max_new_tokens: int,
    num_samples: int,
    max_samples_per_pass: int | None,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop_strings: Sequence[str],
    tokenizer: TextDecoder | None,
    top_k_per_sample: int,
) -> None:
    if not isinstance(patch, RouterPatch) or not patch.active:
        raise ConfigurationError(
            "generate needs an active patch with sample sites (patch_routers or patch_experts); "
            + (
                "this one was undone (unpatch)."
                if isinstance(patch, RouterPatch)
                else f"got {type(patch).__name__} (a plain model generates with model.generate)."
            )
        )
    if mode not in patch.predictive_modes:
        modes = ", ".join(m.value for m in patch.predictive_modes)
        raise ConfigurationError(f"this patch predicts in {modes} only, not {mode.value}.")
    check_integer("max_new_tokens", max_new_tokens)
    check_integer("num_samples", num_samples)
    if max_samples_per_pass is not None:
        check_integer("max_samples_per_pass", max_samples_per_pass)
    check_number("temperature", temperature)
    if check_number("top_p", top_p) > 1.0:
        raise ConfigurationError(f"top_p must be a number in (0, 1], got {top_p!r}.")
    if seed is not None:
        check_integer("seed", seed, minimum=0)
    check_integer("top_k_per_sample", top_k_per_sample, minimum=0)
    if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
        raise ConfigurationError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r}.")
    if stop_strings and tokenizer is None:
        raise ConfigurationError("stop_strings need a tokenizer (tokenizer=...) to read the generated text.")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ConfigurationError(f"input_ids must be (batch, length) token ids, got {shape}.")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ConfigurationError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}."
            )
        if not bool(attention_mask[:, -1].bool().all()):
            rows = torch.nonzero(~attention_mask[:, -1].bool()).flatten().tolist()
            raise ConfigurationError(
                f"generate needs left padding (every row's last token real); rows {rows[:5]} end with padding."
            )
    vocab = patch.model.get_input_embeddings().weight.shape[0]
    if top_k_per_sample > vocab:
        raise ConfigurationError(f"top_k_per_sample is {top_k_per_sample}, above the vocabulary size {vocab}.")
    limit = getattr(patch.model.config, "max_position_embeddings", None)
    longest = int(input_ids.shape[1] if attention_mask is None else attention_mask.sum(-1).max())
    if isinstance(limit, int) and longest + max_new_tokens > limit:
        raise ConfigurationError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's {limit} positions."
        )


def _entropy(probs: Tensor, log_probs: Tensor) -> Tensor:
    """``-sum p log p`` over the last dimension (``0 log 0 = 0``)."""
    return -(probs * log_probs).nan_to_num(nan=0.0).sum(-1)


def _choose(probs: Tensor, do_sample: bool, temperature: float, top_p: float) -> Tensor:
    """The next token ``(batch,)`` from the averaged distribution ``probs`` ``(batch, vocab)``."""
    if not do_sample:
        return probs.argmax(-1)
    weights = probs.clamp_min(torch.finfo(probs.dtype).tiny).log().div(temperature).softmax(-1)
    if top_p < 1.0:
        sorted_weights, order = weights.sort(-1, descending=True)
        before = sorted_weights.cumsum(-1) - sorted_weights  # mass of the more probable tokens
        sorted_weights = sorted_weights.masked_fill(before >= top_p, 0.0)  # the most probable one always stays
        weights = torch.zeros_like(weights).scatter(-1, order, sorted_weights)
    return torch.multinomial(weights, 1).squeeze(-1)


@torch.no_grad()
def generate(
    patch: RouterPatch,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    num_samples: int = 16,
    mode: PredictiveMode | str = PredictiveMode.MODEL_AVERAGE,
    guide: PosteriorGuide | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer: TextDecoder | None = None,
    top_k_per_sample: int = 0,
    max_samples_per_pass: int | None = None,
    local_reparameterization: bool | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after every prompt, with per-token uncertainty; see the module
    docstring.

    Args:
        patch: the active patch of the model (its priors, or the posterior ``guide``).
        input_ids: ``(batch, length)`` left-padded prompts.
        attention_mask: ``(batch, length)``, 1 for real tokens (default all ones); every last column real.
        max_new_tokens: the most tokens generated per row.
        num_samples: S joint samples (``model-average``) or draws per router (``routing-average``).
        mode: ``"model-average"`` or ``"routing-average"`` (one of the patch's ``predictive_modes``).
        guide: a fitted posterior (:meth:`pyro_moe.FittedPosterior.generate` passes its own); default the priors.
        do_sample: sample the next token from the averaged distribution instead of taking its most probable one.
        temperature: ``do_sample`` only: divides the log averaged probabilities.
        top_p: ``do_sample`` only: nucleus sampling, keep the most probable tokens up to this mass.
        seed: seeds Pyro (the draws and the sampled tokens) and restores the caller's random streams
            afterwards; ``None``: the current streams go on.
        eos_token_id: the id(s) that end a row; default the model's ``generation_config.eos_token_id``;
            ``[]``: none.
        stop_strings: a row also ends when its generated text contains one of these (needs ``tokenizer``).
        tokenizer: decodes the generated tokens for ``stop_strings``.
        top_k_per_sample: also return every sample's ``k`` most probable next tokens (0: no).
        max_samples_per_pass: model-average only: fold at most this many samples into one pass (default
            all S); every pass keeps its own KV cache and held draws.
        local_reparameterization: as :func:`pyro_moe.predict` (default on in routing-average).

    Raises:
        ConfigurationError: no active patch (a plain model, an undone patch), a mode the patch does not
            predict in or an unknown one, ``num_samples`` or ``max_new_tokens`` below 1, other bad numbers,
            stop strings without a tokenizer, right padding, prompts too long for the model's positions;
            all before any work.
    """
    mode = predictive_mode(mode)
    stop_strings = list(stop_strings) if not isinstance(stop_strings, str) else stop_strings
    _check(
        patch,
        input_ids,
        attention_mask,
        mode,
        max_new_tokens,
        num_samples,
        max_samples_per_pass,
        temperature,
        top_p,
        seed,
        stop_strings,
        tokenizer,
        top_k_per_sample,
    )
    if local_reparameterization is None:
        local_reparameterization = mode is PredictiveMode.ROUTING_AVERAGE
    settings = dict(mode=mode, share_prefix=True, local_reparameterization=local_reparameterization)
    RoutingContext(**settings)  # refuses a bad local_reparameterization before any work
    model = patch.model
    eos = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, eos)
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    prompt_ids, prompt_mask = input_ids, attention_mask
    batch = input_ids.shape[0]
    per_pass = (
        num_samples if mode is PredictiveMode.ROUTING_AVERAGE or max_samples_per_pass is None else max_samples_per_pass
    )
    passes = [_Pass(min(per_pass, num_samples - start)) for start in range(0, num_samples, per_pass)]
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    parameters = inspect.signature(model.forward).parameters
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (argument and output field)
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}  # only the last position's logits

    tokens, live_masks, figures, top_k = [], [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    positions = token_positions(attention_mask)
    step_ids = input_ids
    with contextlib.nullcontext() if seed is None else seeded(seed):
        for _ in range(max_new_tokens):
            log_probs = []
            for chunk in passes:
                with (
                    routing_context(**settings),
                    pyro.plate("samples", chunk.samples, dim=PARTICLE_DIM),
                    chunk.held,
                    guide.posterior(prompt_ids, prompt_mask) if guide is not None else contextlib.nullcontext(),
                ):
                    output = model(
                        input_ids=step_ids,
                        attention_mask=attention_mask,
                        position_ids=positions,
                        use_cache=True,
                        **keep,
                        **{cache_keyword: chunk.cache},
                    )
                chunk.cache = getattr(output, cache_keyword)
                logits = at_least_float32(output.logits[:, -1].unflatten(0, (-1, batch)))  # (draws, batch, vocab)
                log_probs.append(torch.log_softmax(logits, -1))
            sample_log_probs = torch.cat(log_probs)  # (S or 1, batch, vocab)
            sample_probs = sample_log_probs.exp()
            mean_probs = sample_probs.mean(0)
            mean_log_probs = torch.logsumexp(sample_log_probs, 0) - math.log(len(sample_log_probs))
            predictive = _entropy(mean_probs, mean_log_probs)
            expected = _entropy(sample_probs, sample_log_probs).mean(0)
            chosen = _choose(mean_probs, do_sample, temperature, top_p)
            chosen = chosen.masked_fill(finished, pad)
            live = ~finished
            live_masks.append(live)
            figures.append(
                torch.stack(
                    [
                        mean_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1),
                        predictive,
                        expected,
                        (predictive - expected).clamp_min(0.0),
                    ]
                )
                * live
            )
            if top_k_per_sample:
                top_k.append(sample_probs.topk(top_k_per_sample, dim=-1))
            tokens.append(chosen)
            ended = torch.isin(chosen, eos_ids) if eos else torch.zeros_like(finished)
            if stop_strings:
                generated, kept = torch.stack(tokens, -1), torch.stack(live_masks, -1)
                texts = [tokenizer.decode(row[keep].tolist()) for row, keep in zip(generated, kept, strict=True)]
                ended = ended | torch.tensor([any(s in text for s in stop_strings) for text in texts], device=device)
            stopped |= ended & live
            finished |= ended
            if bool(finished.all()):
                break
            step_ids = chosen.unsqueeze(-1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], -1)
            positions = (attention_mask.sum(-1, keepdim=True) - 1).clamp_min(0)
    stacked = torch.stack(figures, -1)  # (4, batch, new)
    return Generation(
        tokens=torch.stack(tokens, -1),
        generated_mask=torch.stack(live_masks, -1),
        token_probs=stacked[0],
        predictive_entropy=stacked[1],
        expected_entropy=stacked[2],
        mutual_information=stacked[3],
        stopped=stopped,
        num_samples=num_samples,
        mode=mode,
        sample_top_k_probs=torch.stack([values for values, _ in top_k], 2) if top_k else None,
        sample_top_k_ids=torch.stack([ids for _, ids in top_k], 2) if top_k else None,
    )
