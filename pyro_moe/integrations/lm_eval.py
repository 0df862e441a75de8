"""A pyro-moe model for EleutherAI's lm-evaluation-harness (``lm-eval``), registered as ``pyro-moe``.

Importing this module registers the model with the harness (``import pyro_moe`` does not import it; it
needs the optional dependency group ``pyro-moe[lm-eval]``). The harness then scores a fitted posterior
(or a patch's priors, or a plain model) on any of its tasks:

* ``loglikelihood``: the posterior predictive log-probability of every continuation. ``model-average``:
  ``log mean_s exp(sum_t log p_s(x_t | x_<t))`` over ``S`` joint samples; ``routing-average``: the sum of
  the log-probabilities of the one pass whose routers average their ``S`` draws. All continuations of
  one context (the choices of one question) are scored under the same draws, seeded with
  :func:`~pyro_moe.random_streams.question_seed` of ``seed`` and the context's tokens, so a question's score
  does not depend on which other questions are evaluated. When every continuation of a context is one token
  (multiple-choice tasks with answer letters), they are all read from ONE pass over the context alone (batch 1,
  no padding): the log-probability of each candidate token at the context's last position, as ``HFLM`` does;
  those are exactly the draws of ``pyro-moe evaluate --draws per-question`` on the same prompt and seed.
  Longer continuations are scored in passes of ``batch_size`` rows (the context and the continuation), the
  global draws (router weights, temperatures, a Laplace's draws) held across the passes of that context
  (:class:`~pyro_moe.inference.generation.HeldGlobalDraws`; per-token draws are drawn for every row and
  position of a pass, so they change with ``batch_size``).
  ``is_greedy``: every continuation token is the most probable token of the averaged next-token
  distribution ``mean_s p_s``.
* ``loglikelihood_rolling``: the harness's rolling windows for HF models (at most ``max_length`` tokens,
  the model's positions, each window after the previous one's last token), each scored as above.
* ``generate_until``: greedy decoding of the averaged distribution with
  :func:`pyro_moe.inference.generation.generate`, cut at the first stop string.

Tokenisation follows the harness's ``HFLM`` (the tokenizer's own special tokens, a trailing space moved
to the continuation, an empty context replaced by the BOS token, or EOS when there is none), so with every
site at its prior mean the scores are ``HFLM``'s on the unpatched model.

Example::

    lm_eval --model pyro-moe --model_args pretrained=Qwen/Qwen1.5-MoE-A2.7B,posterior=runs/fit/posterior \\
        --tasks arc_easy --include_path ...   # after `import pyro_moe.integrations.lm_eval`, or `pyro-moe lm-eval`

    lm = PyroMoELM(model=posterior, tokenizer=tokenizer, num_samples=8)   # in memory
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from pyro_moe.core.readout import at_least_float32, token_positions
from pyro_moe.core.routing_context import PARTICLE_DIM, PredictiveMode, routing_context
from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.generation import HeldGlobalDraws, generate
from pyro_moe.inference.predictive import predictive_mode
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.random_streams import question_seed, seeded
from pyro_moe.validation import check_integer

try:
    from lm_eval import utils as harness_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import has_bos_prefix, resolve_max_length
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pyro_moe.integrations.lm_eval needs lm-evaluation-harness: pip install 'pyro-moe[lm-eval]'."
    ) from error

__all__ = ["MODEL_ARGS", "PyroMoELM"]

MODEL_ARGS = ("pretrained", "posterior", "mode", "num_samples", "dtype", "device", "batch_size", "seed")
"""The ``model_args`` the harness may pass (``max_batch_size`` it passes itself is accepted and unused)."""

_DTYPES = ("float32", "float64", "bfloat16", "float16")
Request = tuple[tuple[str, str], list[int], list[int]]
Score = tuple[float, bool, Tensor]


def _count(name: str, value: Any) -> int:
    """``value`` (an int or its text, as the harness parses ``model_args``) as an integer of at least 1."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return check_integer(name, value)


def _load(pretrained: str, posterior: str | None, dtype: str, device: str | None) -> tuple[Any, Any]:
    """The model from ``pretrained`` (HF id or folder; the posterior folder loaded into it) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(pretrained)
    except (OSError, ValueError, KeyError, ImportError) as error:
        reason = " ".join(str(error).split())
        raise ConfigurationError(f"cannot load model {pretrained!r}: {reason[:300]}") from None
    if device is not None:
        model = model.to(device)
    model.eval()
    if posterior is None:
        return model, tokenizer
    return FittedPosterior.load(posterior, model), tokenizer  # CheckpointError: a posterior of another model


@register_model("pyro-moe")
class PyroMoELM(TemplateLM):
    """The harness's model for a pyro-moe posterior; see the module docstring.

    Args:
        pretrained: HF id or folder of the model (exclusive with ``model``).
        posterior: a folder :meth:`pyro_moe.FittedPosterior.save` wrote, fitted on ``pretrained``; default
            none (the plain model, deterministic).
        mode: ``"model-average"`` (default) or ``"routing-average"``.
        num_samples: S, at least 1.
        dtype: the weights' dtype when loading ``pretrained`` (``float32``, ``float64``, ``bfloat16``, ``float16``).
        device: where to put the loaded model (default: where ``from_pretrained`` puts it).
        batch_size: the most continuations of one context scored in one pass (continuations longer than one
            token; one-token continuations of a context share one pass over the context).
        seed: the seed the per-context seeds derive from (:func:`~pyro_moe.random_streams.question_seed`).
        max_batch_size: passed by the harness; unused.
        model: in memory instead of ``pretrained``: a :class:`~pyro_moe.FittedPosterior`, an active
            :class:`~pyro_moe.RouterPatch` (its priors) or a plain model.
        tokenizer: the tokenizer of ``model`` (needed with it).

    Raises:
        ConfigurationError: an unknown argument (naming the accepted ones), ``num_samples`` or ``batch_size``
            below 1, an unknown mode or one the patch does not predict in, a bad dtype, a model that cannot be
            loaded; CheckpointError: a posterior of another model. All before the harness loads any task.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        posterior: str | None = None,
        mode: str = PredictiveMode.MODEL_AVERAGE.value,
        num_samples: int | str = 16,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        seed: int | str = 0,
        max_batch_size: int | None = None,
        *,
        model: FittedPosterior | RouterPatch | nn.Module | None = None,
        tokenizer: Any = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ConfigurationError(
                f"unknown pyro-moe model_args {sorted(unknown)}; accepted: {', '.join(MODEL_ARGS)}."
            )
        self.mode = predictive_mode(mode)
        self.num_samples = _count("num_samples", num_samples)
        self._batch_size = _count("batch_size", 1 if batch_size == "auto" else batch_size)
        self.seed = check_integer("seed", int(seed) if isinstance(seed, str) and seed.isdigit() else seed, minimum=0)
        if dtype not in _DTYPES:
            raise ConfigurationError(f"unknown dtype {dtype!r}; accepted: {', '.join(_DTYPES)}.")
        if (model is None) == (pretrained is None):
            raise ConfigurationError("give the model as model_args pretrained=... or, in memory, as model=...")
        if model is not None and (tokenizer is None or posterior is not None):
            raise ConfigurationError("an in-memory model needs tokenizer=... and takes no posterior folder.")
        if model is None:
            model, tokenizer = _load(pretrained, posterior, dtype, device)
        self.patch, self.guide = None, None
        if isinstance(model, FittedPosterior):
            self.patch, self.guide = model.patch, model.guide
        elif isinstance(model, RouterPatch):
            self.patch = model
        elif not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"model must be a FittedPosterior, a RouterPatch or a model, got {type(model).__name__}."
            )
        if self.patch is not None:
            if not self.patch.active:
                raise ConfigurationError("the patch has been undone (unpatch); patch the model again.")
            if self.mode not in self.patch.predictive_modes:
                modes = ", ".join(m.value for m in self.patch.predictive_modes)
                raise ConfigurationError(f"this patch predicts in {modes} only, not {self.mode.value}.")
        self.model = model if self.patch is None else self.patch.model
        self.tokenizer = tokenizer
        self.draw_log_likelihoods: dict[tuple[str, str], Tensor] = {}
        """Per ``(context, continuation)`` scored by :meth:`loglikelihood`: its log-probability under every
        draw ``(S,)`` in model-average (``(1,)`` in routing-average or for a plain model)."""

    # -- what the harness asks of a model --------------------------------------------------------------

    @property
    def eot_token_id(self) -> int | None:
        """The end-of-text id (EOS, else BOS; ``None`` for a tokenizer with neither)."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token put before an empty context and a rolling text: BOS, else EOS (as ``HFLM``).

        Raises:
            ConfigurationError: the tokenizer declares neither (multiple-choice tasks, whose contexts are not
                empty, need neither).
        """
        bos = self.tokenizer.bos_token_id
        prefix = bos if bos is not None else self.tokenizer.eos_token_id
        if prefix is None:
            raise ConfigurationError(
                "the tokenizer declares neither a BOS nor an EOS token, which the harness puts before an empty "
                "context and a rolling text (loglikelihood_rolling); tasks with non-empty contexts need neither."
            )
        return prefix

    @property
    def max_length(self) -> int:
        """The longest input, from the model's configuration (its positions), as ``HFLM``."""
        return resolve_max_length(self.model.config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        """Default number of generated tokens (as ``HFLM``)."""
        return 256

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.model.get_input_embeddings().weight.device

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (the harness's cache key)."""
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` with the tokenizer's special tokens unless told otherwise (as ``HFLM``)."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        prefix = self.eot_token_id if self.tokenizer.bos_token_id is None else self.tokenizer.bos_token_id
        if add_special_tokens is None and prefix is not None and has_bos_prefix(string, self.tokenizer.decode(prefix)):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs: Any) -> list:
        """``(log-probability, is_greedy)`` of every request's continuation tokens after its context tokens,
        the requests of one context scored together under the same draws; every request's per-draw
        log-probabilities go into :attr:`draw_log_likelihoods`."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for context, members in groups.items():
            scores = self.continuation_scores(list(context), [requests[i][2] for i in members])
            for index, (total, greedy, per_draw) in zip(members, scores, strict=True):
                results[index] = (total, greedy)
                self.draw_log_likelihoods[requests[index][0]] = per_draw
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The log-probability of every request's whole text, in the windows ``HFLM`` uses."""
        totals = []
        for (text,) in (request.args for request in requests):
            windows = map(
                harness_utils.make_disjoint_window,
                harness_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            totals.append(
                sum(self.continuation_scores(context, [continuation])[0][0] for context, continuation in windows)
            )
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of every request's context up to ``max_gen_toks`` tokens or a stop string."""
        outputs = []
        for context, options in (request.args for request in requests):
            until = options.get("until", [])
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new) :]
            input_ids = torch.tensor([ids], device=self.device)
            if self.patch is None:
                tokens = self.model.generate(input_ids, max_new_tokens=max_new, do_sample=False)[0, len(ids) :]
            else:
                generation = generate(
                    self.patch,
                    input_ids,
                    max_new_tokens=max_new,
                    num_samples=self.num_samples,
                    mode=self.mode,
                    guide=self.guide,
                    seed=question_seed(self.seed, ids),
                    stop_strings=until,
                    tokenizer=self.tokenizer if until else None,
                )
                tokens = generation.tokens[0][generation.generated_mask[0]]
            text = self.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs

    # -- scoring -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def continuation_scores(self, context: list[int], continuations: list[list[int]]) -> list[Score]:
        """``(log-probability, is_greedy, per-draw log-probabilities (draws,))`` of every continuation after
        ``context``, all under the same draws, seeded with :func:`~pyro_moe.random_streams.question_seed` of
        ``seed`` and ``context``: one-token continuations from one pass over the context alone
        (:meth:`_score_next_tokens`), longer ones in passes of ``batch_size`` rows with the global draws held
        across them.

        The input is truncated on the left to the model's ``max_length`` (as ``HFLM``)."""
        with seeded(question_seed(self.seed, context)):
            if all(len(continuation) == 1 for continuation in continuations):
                return self._score_next_tokens(context[-self.max_length :], [c[0] for c in continuations])
            scores: list[Score] = []
            held = HeldGlobalDraws()
            for start in range(0, len(continuations), self._batch_size):
                chunk = continuations[start : start + self._batch_size]
                scores += self._score_rows([(context + c)[-(self.max_length + 1) :] for c in chunk], chunk, held)
        return scores

    def _score_next_tokens(self, context: list[int], tokens: list[int]) -> list[Score]:
        """One pass over ``context`` alone ``(1, length)``: every candidate next token's score read from the
        next-token distributions ``(draws, vocab)`` at its last position."""
        input_ids = torch.tensor([context], device=self.device)
        log_probs = self._log_probs(input_ids, torch.ones_like(input_ids), 1)[:, 0, -1]  # (draws, vocab)
        draws = log_probs.shape[0]
        mean_log_probs = torch.logsumexp(log_probs, 0) - math.log(draws)  # log mean_s p_s; one draw: itself
        best = int(mean_log_probs.argmax())
        per_draw = log_probs[:, torch.tensor(tokens, device=self.device)].double().cpu()  # (draws, tokens)
        totals = torch.logsumexp(per_draw, 0) - math.log(draws)
        return [(float(totals[i]), token == best, per_draw[:, i].clone()) for i, token in enumerate(tokens)]

    def _score_rows(
        self, sequences: list[list[int]], continuations: list[list[int]], held: HeldGlobalDraws
    ) -> list[Score]:
        """One pass over left-padded ``sequences`` (their last token dropped as the input)."""
        inputs = [sequence[:-1] for sequence in sequences]
        length = max(len(row) for row in inputs)
        input_ids = torch.zeros(len(inputs), length, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(inputs):
            input_ids[row, length - len(ids) :] = torch.tensor(ids)
            attention_mask[row, length - len(ids) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        keep = max(len(c) for c in continuations)
        log_probs = self._log_probs(input_ids, attention_mask, keep, held)  # (draws, rows, keep, vocab)
        if self.patch is None or self.mode is PredictiveMode.ROUTING_AVERAGE:
            mean_log_probs = log_probs[0]
        else:
            mean_log_probs = torch.logsumexp(log_probs, 0) - math.log(log_probs.shape[0])  # log mean_s p_s
        scores = []
        for row, continuation in enumerate(continuations):
            targets = torch.tensor(continuation, device=self.device)
            per_draw = log_probs[:, row, keep - len(continuation) :].gather(
                -1, targets.expand(log_probs.shape[0], -1).unsqueeze(-1)
            )
            sums = per_draw.squeeze(-1).sum(-1)  # (draws,)
            total = torch.logsumexp(sums, 0) - math.log(len(sums))  # log mean_s exp(sum_t log p_s); one draw: itself
            greedy = bool((mean_log_probs[row, keep - len(continuation) :].argmax(-1) == targets).all())
            scores.append((float(total), greedy, sums.double().cpu()))
        return scores

    def _log_probs(
        self, input_ids: Tensor, attention_mask: Tensor, keep: int, held: HeldGlobalDraws | None = None
    ) -> Tensor:
        """``(draws, rows, keep, vocab)`` next-token log-probabilities at the last ``keep`` positions of one pass
        (the ``S`` joint samples folded into the batch, sample-major, as :func:`pyro_moe.predict`); ``held``:
        global draws held from an earlier pass of the same context."""
        options: dict[str, Any] = {"position_ids": token_positions(attention_mask), "use_cache": False}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            options["logits_to_keep"] = keep
        rows = input_ids.shape[0]
        if self.patch is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **options).logits.unsqueeze(0)
        else:
            with (
                routing_context(mode=self.mode, local_reparameterization=self.mode is PredictiveMode.ROUTING_AVERAGE),
                pyro.plate("samples", self.num_samples, dim=PARTICLE_DIM),
                held if held is not None else contextlib.nullcontext(),
                self.guide.posterior(input_ids, attention_mask) if self.guide is not None else contextlib.nullcontext(),
            ):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **options).logits
            logits = logits.unflatten(0, (-1, rows))
        return torch.log_softmax(at_least_float32(logits[:, :, -keep:]), -1)
