"""Routing rules against the transformers routers themselves, and Sample-K against closed forms."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyro_moe.core.families import find_moe_routers
from pyro_moe.core.routing import SigmoidGroupTopK, SoftmaxTopK, gumbel_top_k
from tests.tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_rule_reproduces_the_hf_router(family):
    """score + select on HF's logits give HF's weights and experts (up to the order of the k)."""
    model = tiny_model(family)
    hidden = torch.randn(50, model.config.hidden_size)
    for location in find_moe_routers(model):
        router = model.get_submodule(location.path)
        hf_logits, hf_weights, hf_index = router(hidden)
        rule = location.family.rule(router)
        logits = location.family.logits(hidden, router.weight, getattr(router, "bias", None))
        torch.testing.assert_close(logits, hf_logits.float())
        weights, index = rule.select(rule.score(logits))
        order, hf_order = index.argsort(-1), hf_index.argsort(-1)
        assert torch.equal(index.gather(-1, order), hf_index.gather(-1, hf_order))
        torch.testing.assert_close(
            weights.gather(-1, order), hf_weights.float().gather(-1, hf_order), rtol=1e-6, atol=1e-6
        )


def test_gumbel_top_k_first_pick_follows_the_scores():
    """P(first pick = i) = p_i and P(set {i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j)."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    draws = 200_000
    gumbel = -torch.empty(draws, 4).exponential_().log()
    index = gumbel_top_k(p.expand(draws, 4), gumbel, 2)
    first = torch.bincount(index[:, 0], minlength=4) / draws
    torch.testing.assert_close(first, p, atol=0.005, rtol=0)
    for i, j in itertools.combinations(range(4), 2):
        expected = p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])
        observed = ((index == i).any(-1) & (index == j).any(-1)).float().mean()
        assert abs(observed - expected) < 0.005, (i, j)


def test_softmax_top_k_renormalised_equals_softmax_over_top_logits():
    """Granite's rule (top-k on logits, softmax over the k) is the renormalised softmax top-k."""
    logits = torch.randn(100, 8)
    top, index = logits.topk(2, dim=-1)
    rule = SoftmaxTopK(top_k=2, normalize=True)
    weights, ours = rule.select(rule.score(logits))
    assert torch.equal(ours, index)
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1))


def test_sample_k_respects_the_group_limit():
    """DeepSeek-V3 style: Sample-K draws only from the groups the deterministic rule keeps."""
    torch.manual_seed(0)
    rule = SigmoidGroupTopK(
        top_k=2, correction_bias=torch.zeros(8), n_group=4, topk_group=2, normalize=True, scaling=1.0
    )
    scores = rule.score(torch.randn(500, 8))
    allowed = rule.allowed(scores)
    index = rule.sample(scores, -torch.empty_like(scores).exponential_().log())
    assert allowed.gather(-1, index).all()
    assert (allowed.sum(-1) == 4).all()  # two groups of two experts
    assert torch.equal(allowed.gather(-1, rule.choose(scores)), torch.ones(500, 2, dtype=torch.bool))
