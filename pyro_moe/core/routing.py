"""Routing rules: how a family turns router logits into expert weights and indices.

Every transformers MoE router computes ``logits = W u`` and then applies a rule. We write each
rule once as a pure pair::

    scores = rule.score(logits)            # (..., experts) -> (..., experts), float32
    weights, index = rule.select(scores)   # (..., experts) -> (..., top_k), (..., top_k)

``select`` is ``choose`` (which experts) followed by ``weights_at`` (their weights), so that
stochastic selection (Sample-K) can replace ``choose`` and keep the family's weighting.

With these pieces the thesis' prediction rule ("average the scores of S samples, then Top-K") is
``rule.select(rule.score(logits_s).mean(0))``.

Example::

    rule = SoftmaxTopK(top_k=2, normalize=True)       # Mixtral
    weights, index = rule.select(rule.score(logits))   # logits: (tokens, experts)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DeepseekV2TopK",
    "RoutingRule",
    "SigmoidGroupTopK",
    "SoftmaxTopK",
    "gumbel_top_k",
]


class RoutingRule(ABC):
    """A family's rule from router logits to ``(weights, index)``; all methods are pure."""

    top_k: int

    @abstractmethod
    def score(self, logits: Tensor) -> Tensor:
        """Per-expert routing scores ``(..., experts)`` from logits ``(..., experts)``, in float32."""

    @abstractmethod
    def choose(self, scores: Tensor) -> Tensor:
        """Indices ``(..., top_k)`` of the experts the deterministic rule selects."""

    @abstractmethod
    def weights_at(self, scores: Tensor, index: Tensor) -> Tensor:
        """Routing weights ``(..., top_k)`` of the experts ``index`` (``(..., top_k)``)."""

    def choice_scores(self, scores: Tensor) -> Tensor:
        """Non-negative scores ``(..., experts)`` that stochastic selection samples in proportion to."""
        return scores

    def allowed(self, scores: Tensor) -> Tensor | None:
        """Boolean mask ``(..., experts)`` of the experts the rule may choose (group limits), or ``None``."""
        return None

    def sample(self, scores: Tensor, gumbel: Tensor) -> Tensor:
        """Sample-K: indices ``(..., top_k)`` drawn without replacement in proportion to the
        choice scores, among the allowed experts."""
        return gumbel_top_k(self.choice_scores(scores), gumbel, self.top_k, self.allowed(scores))

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """Weights ``(..., top_k)`` and indices ``(..., top_k)`` of the deterministic rule."""
        index = self.choose(scores)
        return self.weights_at(scores, index), index


def gumbel_top_k(choice_scores: Tensor, gumbel: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """Sample-K: ``k`` indices drawn without replacement, each with probability proportional to
    ``choice_scores`` (Gumbel-top-k trick).

    Args:
        choice_scores: ``(..., experts)`` non-negative scores.
        gumbel: ``(..., experts)`` standard Gumbel noise.
        k: number of experts per token.
        allowed: ``(..., experts)`` boolean mask of the experts that may be drawn (default all).

    Returns:
        ``(..., k)`` expert indices.
    """
    tiny = torch.finfo(choice_scores.dtype).tiny
    log_scores = choice_scores.clamp_min(tiny).log()
    if allowed is not None:
        log_scores = log_scores.masked_fill(~allowed, float("-inf"))
    return (log_scores + gumbel).topk(k, dim=-1).indices


@dataclass(frozen=True)
class SoftmaxTopK(RoutingRule):
    """Softmax over experts, Top-K, optional renormalisation over the K.

    Mixtral, MiniMax, Qwen2/3-MoE, OLMoE, FlexOlmo (``normalize`` from ``norm_topk_prob``) and,
    since a softmax over the top-k logits equals the renormalised top-k of the softmax, also
    Granite-MoE and GPT-OSS.
    """

    top_k: int
    normalize: bool

    def score(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    def choose(self, scores: Tensor) -> Tensor:
        return scores.topk(self.top_k, dim=-1).indices

    def weights_at(self, scores: Tensor, index: Tensor) -> Tensor:
        weights = scores.gather(-1, index)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights


def _group_mask(group_scores: Tensor, topk_group: int, group_size: int) -> Tensor:
    """Boolean mask ``(..., experts)`` of the experts in the ``topk_group`` best groups.

    ``group_scores`` is ``(..., groups)``; every group holds ``group_size`` consecutive experts.
    """
    group_index = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, group_index, True)
    return keep.unsqueeze(-1).expand(*keep.shape, group_size).flatten(-2)


@dataclass(frozen=True)
class DeepseekV2TopK(RoutingRule):
    """DeepSeek-V2: softmax, greedy or group-limited greedy Top-K, weights scaled, not renormalised."""

    top_k: int
    group_limited: bool
    n_group: int
    topk_group: int
    scaling: float

    def score(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1, dtype=torch.float32)

    def allowed(self, scores: Tensor) -> Tensor | None:
        if not self.group_limited:
            return None
        groups = scores.unflatten(-1, (self.n_group, -1))
        return _group_mask(groups.amax(dim=-1), self.topk_group, groups.shape[-1])

    def choose(self, scores: Tensor) -> Tensor:
        keep = self.allowed(scores)
        if keep is not None:
            scores = scores.masked_fill(~keep, 0.0)
        return scores.topk(self.top_k, dim=-1, sorted=False).indices

    def weights_at(self, scores: Tensor, index: Tensor) -> Tensor:
        return scores.gather(-1, index) * self.scaling


@dataclass(frozen=True, eq=False)
class SigmoidGroupTopK(RoutingRule):
    """DeepSeek-V3, GLM-4-MoE, dots1: sigmoid scores; the choice adds a correction bias and keeps
    the ``topk_group`` groups with the best two-expert sums; weights are the plain sigmoid scores
    of the chosen experts, optionally renormalised, then scaled.
    """

    top_k: int
    correction_bias: Tensor
    n_group: int
    topk_group: int
    normalize: bool
    scaling: float

    def score(self, logits: Tensor) -> Tensor:
        return logits.float().sigmoid()

    def choice_scores(self, scores: Tensor) -> Tensor:
        return scores + self.correction_bias

    def allowed(self, scores: Tensor) -> Tensor:
        groups = self.choice_scores(scores).unflatten(-1, (self.n_group, -1))
        return _group_mask(groups.topk(2, dim=-1).values.sum(dim=-1), self.topk_group, groups.shape[-1])

    def choose(self, scores: Tensor) -> Tensor:
        biased = self.choice_scores(scores).masked_fill(~self.allowed(scores), float("-inf"))
        return biased.topk(self.top_k, dim=-1, sorted=False).indices

    def weights_at(self, scores: Tensor, index: Tensor) -> Tensor:
        weights = scores.gather(-1, index)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling
