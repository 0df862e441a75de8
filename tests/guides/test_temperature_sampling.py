"""Temperature sampling (fixed T, Sample-K) against the unpatched transformers router and the
Plackett-Luce law of drawing K experts without replacement from ``softmax(l / T)``."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.inference.fitting import fit
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

TEMPERATURE = 2.0


def router(model):
    return model.model.layers[1].block_sparse_moe.router


def hf_router_logits(batch) -> torch.Tensor:
    """``(tokens, experts)`` logits of the plain transformers router of layer 1."""
    model, recorded = tiny_model("granitemoe"), []
    router(model).register_forward_hook(lambda module, args, out: recorded.append(out[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return recorded[0]


def fitted_temperature_sampling():
    handle = patch_routers(tiny_model("granitemoe"), ["temperature"], layers=[1], selection="sample-k")
    options = {"temp-sampling": {"temperature": TEMPERATURE}}
    return fit(
        handle, mcqa_batches(), "temp-sampling", answer_token_ids=ANSWERS, steps=5, guide_options=options,
        progress=False,
    )  # fmt: skip


def test_the_routers_divide_the_hf_logits_by_the_fixed_temperature_and_nothing_trains():
    posterior = fitted_temperature_sampling()
    assert posterior.history == [] and posterior.engine.optimizer is None
    batch = mcqa_batches(count=1, seed=1)[0]
    prediction = posterior.predict(
        batch["input_ids"], batch["attention_mask"], num_samples=3, return_samples=True, return_router_logits=True
    )
    (logits,) = prediction.router_logits.values()  # (samples, batch, length, experts)
    expected = hf_router_logits(batch) / TEMPERATURE
    for sample in logits:
        torch.testing.assert_close(sample.reshape(expected.shape), expected)
    assert prediction.sample_probs.std(0).max() > 0  # the Sample-K draws differ between samples


def test_sample_k_draws_expert_pairs_with_the_plackett_luce_probabilities():
    posterior = fitted_temperature_sampling()
    batch = {key: value[:2] for key, value in mcqa_batches(count=1, seed=1)[0].items()}
    draws, chosen = 3000, []
    router(posterior.patch.model).register_forward_hook(lambda module, args, out: chosen.append(out[2]))
    posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=draws)
    (index,) = chosen
    index = index.reshape(draws, -1, 2)  # (samples, tokens, top-k)
    probs = torch.softmax(hf_router_logits(batch) / TEMPERATURE, -1)  # (tokens, experts)
    for first, second in itertools.combinations(range(4), 2):
        p_first, p_second = probs[:, first], probs[:, second]
        expected = p_first * p_second * (1 / (1 - p_first) + 1 / (1 - p_second))  # either order
        observed = ((index == first).any(-1) & (index == second).any(-1)).double().mean(0)
        tolerance = 4.5 * (expected * (1 - expected) / draws).sqrt()
        assert ((observed - expected).abs() < tolerance).all(), (first, second)


@pytest.mark.parametrize(
    ("sites", "selection", "options", "message"),
    [
        (["temperature"], "top-k", {}, r"temp-sampling samples the experts, but the patch selects by top-k"),
        ({"weight": 0.1, "temperature": 0.3}, "sample-k", {}, r"the model has other global sites \['model.layers"),
        (["temperature"], "sample-k", {"temperature": 0.0}, r"temperature must be a positive number, got 0.0"),
    ],
)
def test_bad_temperature_sampling_setups_are_refused(sites, selection, options, message):
    model = tiny_model("granitemoe")
    handle = patch_routers(model, sites, layers=[1], selection=selection)
    with pytest.raises(ConfigurationError, match=message):
        fit(handle, mcqa_batches(), "temp-sampling", answer_token_ids=ANSWERS, guide_options={"temp-sampling": options})
    assert all(param.requires_grad for param in model.parameters())
    handle.unpatch()
