"""Kronecker-factored curvature (K-FAC) of the linear maps inside HF MoE blocks, from the MCQA likelihood.

Two kinds of weight matrices, each a ``(out, in)`` map ``s = W x`` applied to some tokens:

* **expert down-projections** ``down_proj[e]`` ``(H, I)`` of a transformers 5.x experts module (3-D
  Parameter ``(experts, H, I)``): ``x`` is the expert's input ``act(gate(u)) * up(u)`` ``(I,)`` and the
  tokens are those routed to expert ``e``; the output gradient includes the routing weight, as the
  expert's output is scaled by it before it joins the residual stream;
* **router weights** ``W`` ``(E, H)``: ``x = u`` the router input, ``s`` the router logits.

For every matrix the factors are ``A = (1/n) sum_t x_t x_t^T`` (``in x in``, mean over its ``n``
selected tokens) and ``G = sum_t g_t g_t^T`` (``out x out``, sum over tokens and Fisher draws), so that
``G (x) A`` (row-major ``vec(W)``; the convention is stated in
:mod:`~pyro_moe.guides.laplace.kronecker_posterior`) is the usual K-FAC approximation of the
full-data Fisher/GGN, exact for one token. The
gradients ``g_t = dL / ds_t`` come from the MCQA loss ``L`` over the answer letters with labels

* ``mc`` (default): drawn from the model's own predictive (Monte Carlo Fisher, ``mc_samples`` draws;
  the GGN in expectation),
* ``empirical``: the true labels (empirical Fisher),
* ``exact``: every answer letter ``c`` weighted by its probability (one backward pass per letter):
  the categorical GGN exactly.

Tokens: ``last`` (the last prompt token of every example, the MCQA readout position) or ``all``
(every real token). The inputs and outputs are read from the HF modules as they run (a forward
hook on routers; on experts, the eager implementation's ``linear(x, down_proj[e])`` calls seen
through a ``TorchFunctionMode``), the output gradients by ``torch.autograd.grad`` at those outputs.

Monte Carlo labels are drawn with a generator of their own per batch (``seed`` plus the batch's
index), so the factors do not depend on how the batches are shared out: data-parallel
(``data_parallel``), the ranks take the batches round-robin, and the factors, token counts and
log-likelihood are reduced once at the end, equal to one process's. Every factor stays on the
device of the layer it belongs to (a model spread over GPUs with ``device_map`` is never gathered).

Example: the experts of the last layer of a tiny Granite-MoE built in code (hidden ``H = 16``,
expert width ``I = 8``, 4 experts, top-2), on one batch of 3 random prompts:

>>> import torch
>>> from transformers import GraniteMoeConfig, GraniteMoeForCausalLM
>>> from pyro_moe.core.curvature_targets import expert_targets
>>> from pyro_moe.guides.laplace.kronecker_curvature import kronecker_curvature
>>> _ = torch.manual_seed(0)
>>> config = GraniteMoeConfig(
...     vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
...     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
... )
>>> model = GraniteMoeForCausalLM(config).eval()
>>> input_ids = torch.randint(8, 32, (3, 5))  # (batch, length)
>>> batches = [{"input_ids": input_ids, "attention_mask": torch.ones(3, 5), "labels": torch.tensor([0, 2, 1])}]
>>> answer_token_ids = torch.tensor([4, 5, 6, 7])  # the answer letters' ids
>>> targets = expert_targets(model, layers=[-1])
>>> run = kronecker_curvature(model, targets, batches, answer_token_ids, rank=4, progress=False)
>>> curvature = run.curvature["model.layers.1.block_sparse_moe.experts.down_proj"]
>>> curvature.input_factors[3].vectors.shape  # eigenvectors of expert 3's A: (I, rank)
torch.Size([8, 4])
>>> curvature.output_factors[3].dense().shape  # its G: (H, H)
torch.Size([16, 16])
>>> int(curvature.tokens.sum()), run.num_examples  # top-2: every last token reached two experts
(6, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.curvature_targets import (
    CurvatureTarget,
    captured_linear_maps,
)
from pyro_moe.core.readout import last_positions, last_token_logits
from pyro_moe.distributed import DataParallel
from pyro_moe.errors import ConfigurationError, CurvatureError, NonFiniteError
from pyro_moe.guides.laplace.kronecker_factors import EigenFactor, make_factor
from pyro_moe.validation import check_integer

__all__ = [
    "CurvatureOptions",
    "CurvatureRun",
    "FisherType",
    "KroneckerCurvature",
    "TokenSelection",
    "kronecker_curvature",
]


class FisherType(StrEnum):
    """Which labels the output gradients are taken at."""

    MC = "mc"
    """Labels drawn from the model's predictive (Monte Carlo Fisher; the GGN in expectation)."""

    EMPIRICAL = "empirical"
    """The true labels (empirical Fisher)."""

    EXACT = "exact"
    """Every answer letter weighted by its probability: the categorical GGN, one backward per letter."""


class TokenSelection(StrEnum):
    """Which token positions contribute."""

    LAST = "last"
    """The last real (prompt) token of every example."""

    ALL = "all"
    """Every real token."""


@dataclass(frozen=True)
class CurvatureOptions:
    """How :func:`kronecker_curvature` collects the factors; checked when built.

    Attributes:
        fisher: ``"mc"``, ``"empirical"`` or ``"exact"`` (:class:`FisherType`).
        tokens: ``"last"`` or ``"all"`` (:class:`TokenSelection`).
        rank: eigenpairs kept per factor (``None``: full factors).
        mc_samples: label draws per example of the Monte Carlo Fisher.
    """

    fisher: str = "mc"
    tokens: str = "last"
    rank: int | None = None
    mc_samples: int = 1

    def __post_init__(self) -> None:
        try:
            FisherType(self.fisher), TokenSelection(self.tokens)
        except ValueError as error:
            raise ConfigurationError(
                f"{error}; accepted Fisher types: {', '.join(f.value for f in FisherType)}; "
                f"token selections: {', '.join(t.value for t in TokenSelection)}."
            ) from None
        if self.rank is not None:
            check_integer("rank", self.rank)  # None: full factors
        check_integer("mc_samples", self.mc_samples)


@dataclass
class KroneckerCurvature:
    """The factors of every block of one target.

    Attributes:
        target: what they belong to.
        input_factors: per block, ``A`` ``(in, in)`` (mean over the block's tokens).
        output_factors: per block, ``G`` ``(out, out)`` (sum over tokens and Fisher draws).
        tokens: ``(blocks,)`` number of tokens each block saw.
    """

    target: CurvatureTarget
    input_factors: list[EigenFactor]
    output_factors: list[EigenFactor]
    tokens: Tensor


@dataclass
class CurvatureRun:
    """What :func:`kronecker_curvature` returns besides the factors.

    Attributes:
        curvature: per target name, its factors.
        log_likelihood: ``sum_n log p(y_n | x_n)`` at the current weights (true labels; NaN without).
        num_examples: number of examples seen.
        fisher: the Fisher type used.
    """

    curvature: dict[str, KroneckerCurvature]
    log_likelihood: float
    num_examples: int
    fisher: FisherType


def _losses(
    logits: Tensor, labels: Tensor | None, fisher: FisherType, mc_samples: int, generator: torch.Generator
) -> list[tuple[Tensor, float]]:
    """``(loss, scale)`` pairs whose output-gradient outer products, scaled and summed, give ``G``."""
    log_probs = torch.log_softmax(logits, dim=-1)  # (batch, choices)
    if fisher is FisherType.EMPIRICAL:
        return [(-log_probs.gather(-1, labels[:, None]).sum(), 1.0)]
    probs = log_probs.detach().exp()
    if fisher is FisherType.EXACT:
        return [(-(probs[:, c].sqrt() * log_probs[:, c]).sum(), 1.0) for c in range(logits.shape[-1])]
    draws = torch.multinomial(probs.cpu(), mc_samples, replacement=True, generator=generator).to(logits.device)
    return [(-log_probs.gather(-1, draws[:, s, None]).sum(), 1.0 / mc_samples) for s in range(mc_samples)]


def _check_finite(value: Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteError(
            f"non-finite curvature: {what} holds NaN or infinite values; check the model's weights and inputs "
            "(a Laplace approximation needs a finite loss at the mode)."
        )


def kronecker_curvature(
    model: nn.Module,
    targets: Sequence[CurvatureTarget],
    batches: Iterable[Mapping[str, Tensor]],
    answer_token_ids: Tensor,
    *,
    fisher: FisherType | str = FisherType.MC,
    tokens: TokenSelection | str = TokenSelection.LAST,
    rank: int | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    answer_logits: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
    data_parallel: DataParallel | None = None,
) -> CurvatureRun:
    """Accumulate the Kronecker factors of ``targets`` over MCQA ``batches``; see the module docstring.

    Args:
        model: the HF model (patched or not).
        targets: from :func:`expert_targets` / :func:`router_targets`.
        batches: dicts of ``input_ids`` and ``attention_mask`` ``(batch, length)`` and ``labels``
            ``(batch,)`` (labels are needed for ``empirical`` and for the log-likelihood).
        answer_token_ids: ``(choices,)`` ids of the answer letters.
        fisher: ``"mc"``, ``"empirical"`` or ``"exact"``.
        tokens: ``"last"`` or ``"all"``.
        rank: keep the top ``rank`` eigenpairs of every factor, streaming; ``None``: full factors.
        mc_samples: label draws per example for the MC Fisher.
        seed: seeds the label draws (batch ``i``'s with ``seed + i``).
        answer_logits: ``(input_ids, attention_mask) -> (batch, choices)``; default the MCQA readout
            of ``model`` (for a patched model with sampled sites, pass a conditioned readout).
        progress: show a progress bar (rank 0's only, data-parallel).
        data_parallel: share the batches among the ranks and reduce the sums once; every rank
            gives all ``batches`` and gets the same result.

    Raises:
        ConfigurationError: unknown Fisher type or token selection, ``rank <= 0``, ``mc_samples < 1``,
            no targets, empty data, or missing labels with the empirical Fisher (before any work).
        NonFiniteError: NaN or infinite logits, inputs or output gradients.
        CurvatureError: a target that received selected tokens gets no output gradient at one of its
            records, or output gradients that are zero over all of them (named; never filled with zeros).
    """
    options = CurvatureOptions(fisher, tokens, rank, mc_samples)
    fisher, tokens = FisherType(options.fisher), TokenSelection(options.tokens)
    if not targets:
        raise ConfigurationError("no curvature targets: give expert_targets(...) or router_targets(...).")
    batches = [dict(batch) for batch in batches]
    if not batches:
        raise ConfigurationError("the data are empty: give at least one batch of input_ids, attention_mask, labels.")
    for index, batch in enumerate(batches):
        missing = [key for key in ("input_ids", "attention_mask") if key not in batch]
        if fisher is FisherType.EMPIRICAL and "labels" not in batch:
            missing.append("labels (the empirical Fisher uses the true labels)")
        if missing:
            raise ConfigurationError(f"batch {index} lacks {', '.join(missing)}.")
    answer_token_ids = torch.as_tensor(answer_token_ids).long()
    if answer_logits is None:

        def answer_logits(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            logits = last_token_logits(model, input_ids, attention_mask)[0]
            return logits[:, answer_token_ids.to(logits.device)].float()

    input_factors = {t.name: [make_factor(t.in_features, rank) for _ in range(t.blocks)] for t in targets}
    output_factors = {t.name: [make_factor(t.out_features, rank) for _ in range(t.blocks)] for t in targets}
    device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") else None
    device = device or targets[0].parameter.device
    token_counts = {t.name: torch.zeros(t.blocks, dtype=torch.long) for t in targets}
    log_likelihood, labelled, num_examples = 0.0, True, 0
    mine = data_parallel.shard_batches(batches) if data_parallel else list(enumerate(batches))
    show = progress and (data_parallel is None or data_parallel.is_main)
    for index, batch in tqdm(mine, desc="Kronecker curvature", disable=not show):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch.get("labels")
        labels = None if labels is None else labels.to(device)
        with torch.enable_grad(), captured_linear_maps(targets) as (calls, router_records):
            logits = answer_logits(input_ids, attention_mask)
        _check_finite(logits, "the answer logits")
        labels = None if labels is None else labels.to(logits.device)
        records = calls.records + router_records
        selected = torch.zeros_like(attention_mask, dtype=torch.bool)
        if tokens is TokenSelection.LAST:
            selected[torch.arange(len(selected), device=device), last_positions(attention_mask)] = True
        else:
            selected = attention_mask.bool()
        selected = selected.reshape(-1)
        keep = [selected.to(record.tokens.device)[record.tokens] for record in records]
        for record, rows in zip(records, keep, strict=True):
            inputs = record.inputs[rows]
            _check_finite(inputs, f"the inputs of {record.target} block {record.block}")
            input_factors[record.target][record.block].update(inputs)
            token_counts[record.target][record.block] += int(rows.sum())
        losses = _losses(logits, labels, fisher, mc_samples, torch.Generator().manual_seed(seed + index))
        for position, (loss, scale) in enumerate(losses):
            gradients = torch.autograd.grad(
                loss, [record.outputs for record in records], retain_graph=position < len(losses) - 1, allow_unused=True
            )
            for record, rows, gradient in zip(records, keep, gradients, strict=True):
                if gradient is None:
                    if not rows.any():
                        continue  # none of its tokens is selected: it contributes nothing
                    raise CurvatureError(
                        f"no output gradient reaches {record.target} (block {record.block}), which received "
                        f"{int(rows.sum())} selected token(s): the recorded output is not upstream of the answer "
                        "logits, so its curvature would be zero."
                    )
                gradient = gradient.reshape(-1, gradient.shape[-1])
                _check_finite(gradient, f"the output gradients of {record.target} block {record.block}")
                output_factors[record.target][record.block].update(gradient[rows], scale)
        if labels is None:
            labelled = False
        else:
            log_likelihood += float(torch.log_softmax(logits.detach(), -1).gather(-1, labels[:, None]).sum())
        num_examples += len(input_ids)
    if data_parallel is not None:
        for target in targets:
            for factor in (*input_factors[target.name], *output_factors[target.name]):
                factor.reduce(data_parallel, target.parameter.device)
        totals = torch.tensor([log_likelihood, float(not labelled), num_examples], dtype=torch.float64)
        counts = [token_counts[target.name] for target in targets]
        data_parallel.all_reduce_([totals, *counts], "the all-reduce of the token counts and the log-likelihood")
        log_likelihood, labelled, num_examples = float(totals[0]), not totals[1], int(totals[2])
    curvature = {}
    for target in targets:
        outputs = [factor.eigen(target.parameter.device) for factor in output_factors[target.name]]
        received = int(token_counts[target.name].sum())
        if received > 0 and not any(bool(factor.values.ne(0).any()) for factor in outputs):
            # one expert may legitimately see only tokens the answer does not depend on (tokens="all" in
            # the last layer); a whole target may not
            raise CurvatureError(
                f"the output gradients of {target.name} are identically zero over its {received} selected "
                "token(s): the answer does not depend on it through them (e.g. routing weights that are "
                "constant in the router logits), and its Laplace would be the prior."
            )
        inputs = []
        for factor, count in zip(input_factors[target.name], token_counts[target.name], strict=True):
            eigen = factor.eigen(target.parameter.device)
            inputs.append(EigenFactor(eigen.vectors, eigen.values / max(int(count), 1), int(count)))
        curvature[target.name] = KroneckerCurvature(target, inputs, outputs, token_counts[target.name])
    return CurvatureRun(curvature, log_likelihood if labelled else float("nan"), num_examples, fisher)
