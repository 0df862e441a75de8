"""The Bayesian router's randomness: dropout, temperatures, Sample-K, dtypes and devices."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

from pyro_moe import ConfigurationError, at_prior_mean, find_moe_routers, patch_routers
from pyro_moe.models import NormalPrior, RouterSites, Selection
from tests.tiny_models import tiny_model


def first_router(model):
    location = find_moe_routers(model)[0]
    return location, model.get_submodule(location.path)


def test_dropout_is_on_in_eval_mode_and_off_at_prior_mean():
    model = tiny_model("mixtral")
    location, original = first_router(model)
    hidden = torch.randn(64, model.config.hidden_size)
    hf_logits, _hf_weights, hf_index = original(hidden)
    handle = patch_routers(model, {"dropout": 0.3}, layers=[location.layer_index])
    router = handle.routers[location.path]
    assert not router.training
    logits, _, _ = router(hidden)
    assert not torch.allclose(logits, hf_logits.float())
    trace = poutine.trace(router).get_trace(hidden)
    assert not [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    with at_prior_mean():
        logits, _weights, index = router(hidden)
    torch.testing.assert_close(logits, hf_logits.float())
    assert torch.equal(index, hf_index)


def test_dropout_rate_zero_is_no_site():
    with pytest.raises(ConfigurationError, match="no random site requested"):
        RouterSites(dropout=0.0)


def test_per_expert_temperature_divides_each_experts_logit():
    model = tiny_model("olmoe")
    location, original = first_router(model)
    hidden = torch.randn(16, model.config.hidden_size)
    hf_logits, _, _ = original(hidden)
    handle = patch_routers(model, {"temperature": {"scale": 0.5, "per": "expert"}}, layers=[location.layer_index])
    temperature = torch.linspace(0.5, 2.0, model.config.num_experts)
    router = handle.routers[location.path]
    logits, weights, index = poutine.condition(router, data={router.site_name("temperature"): temperature})(hidden)
    torch.testing.assert_close(logits, hf_logits.float() / temperature)
    rule = location.family.rule(router)
    expected_weights, expected_index = rule.select(rule.score(hf_logits.float() / temperature))
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(weights, expected_weights)


def test_sample_k_draws_experts_in_proportion_to_scores():
    """With Sample-K the first-chosen expert of a token follows its routing probabilities."""
    model = tiny_model("qwen3_moe")
    location, original = first_router(model)
    hidden = torch.randn(1, model.config.hidden_size).expand(20_000, -1)
    hf_logits, _, _ = original(hidden[:1])
    probs = torch.softmax(hf_logits.float(), -1)[0]
    handle = patch_routers(model, RouterSites(selection=Selection.SAMPLE_K), layers=[location.layer_index])
    _, weights, index = handle.routers[location.path](hidden)
    chosen = torch.zeros(model.config.num_experts).index_add_(0, index.reshape(-1), torch.ones(index.numel()))
    # P(expert i among the 2 drawn without replacement) = p_i + sum_j!=i p_j p_i / (1 - p_j)
    inclusion = probs + probs * ((probs / (1 - probs)).sum() - probs / (1 - probs))
    torch.testing.assert_close(chosen / len(hidden), inclusion, atol=0.01, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(hidden)))  # renormalised (norm_topk_prob)
    with at_prior_mean():
        _, _, deterministic = handle.routers[location.path](hidden[:5])
    assert torch.equal(deterministic, probs.topk(2).indices.expand(5, 2))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "granitemoe"])
def test_bf16_routing_in_float32_with_the_familys_output_dtype(family, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family, dtype=torch.bfloat16)
    location, original = first_router(model)
    hidden = torch.randn(32, model.config.hidden_size, dtype=torch.bfloat16)
    _hf_logits, hf_weights, hf_index = original(hidden)
    reference = model(input_ids, attention_mask=attention_mask).logits
    handle = patch_routers(model, {"weight": 0.1, "logits": 1.0})
    router = handle.routers[location.path]
    trace = poutine.trace(router).get_trace(hidden)
    for name in (router.site_name("weight"), router.site_name("logits")):
        assert trace.nodes[name]["value"].dtype == torch.float32
    with at_prior_mean():
        _logits, weights, index = router(hidden)
        pinned = model(input_ids, attention_mask=attention_mask).logits
    assert weights.dtype == hf_weights.dtype
    assert torch.equal(index.sort(-1).values, hf_index.sort(-1).values)
    torch.testing.assert_close(weights.float().sort(-1).values, hf_weights.float().sort(-1).values)
    torch.testing.assert_close(pinned, reference, atol=2e-2, rtol=0)


def test_custom_prior_callable_is_used():
    calls = []

    def wide(centre, scale):
        calls.append(centre.shape)
        return NormalPrior()(centre, 5 * scale)

    model = tiny_model("mixtral")
    location, _ = first_router(model)
    handle = patch_routers(model, {"logits": wide}, layers=[location.layer_index])
    handle.routers[location.path](torch.randn(6, model.config.hidden_size))
    assert calls == [torch.Size([6, model.config.num_local_experts])]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sites_follow_the_router_and_pinned_model_is_hf(batch):
    input_ids, attention_mask = (t.cuda() for t in batch)
    model = tiny_model("deepseek_v3").cuda()
    reference = model(input_ids, attention_mask=attention_mask).logits
    handle = patch_routers(model, ["weight", "logits", "temperature"])
    trace = poutine.trace(model).get_trace(input_ids, attention_mask=attention_mask)
    assert all(trace.nodes[name]["value"].is_cuda for name in handle.site_names)
    with at_prior_mean():
        pinned = model(input_ids, attention_mask=attention_mask).logits
    assert (pinned - reference).abs().max() <= 1e-5
