"""Perplexity against HF's own causal-LM loss, padded against unpadded rows, the model average against
explicit draws run through the unpatched model, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from pyro.poutine.messenger import Messenger

from pyro_moe import ConfigurationError, patch_experts, patch_routers
from pyro_moe.inference.perplexity import perplexity
from tests.helpers import mcqa_batches, padded_text_batch, text_documents
from tests.tiny_models import tiny_model


class _Draws(Messenger):
    """Records the values of every sample site, pass after pass (names repeat across passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, list[torch.Tensor]] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"].endswith(".weight"):
            self.values.setdefault(msg["name"], []).append(msg["value"])


@pytest.mark.parametrize("family", ["granitemoe", "qwen2_moe"])
def test_the_deterministic_models_perplexity_is_exp_of_hfs_loss(family):
    """On an unpadded batch: ``exp(model(ids, labels=ids).loss)``, for the unpatched model and for the
    patched one (every site at its prior mean)."""
    input_ids = torch.randint(4, 60, (3, 8), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    model = tiny_model(family)
    with torch.no_grad():
        loss = float(model(input_ids, labels=input_ids).loss)
    result = perplexity(model, [batch], progress=False)
    assert result.tokens == 3 * 7
    assert result.nll == pytest.approx(loss, rel=1e-6)
    assert result.value == pytest.approx(math.exp(loss), rel=1e-6)
    patched = patch_routers(model, {"logits": 2.0, "weight": 0.5}, layers="all")
    assert perplexity(patched.model, [batch], progress=False).nll == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_scores_as_its_documents_one_by_one(side):
    documents, model = text_documents(), tiny_model("qwen2_moe")
    with torch.no_grad():
        sums = [float(model(ids[None], labels=ids[None]).loss) * (len(ids) - 1) for ids in documents]
    tokens = sum(len(ids) - 1 for ids in documents)
    result = perplexity(model, [padded_text_batch(documents, side)], progress=False)
    assert result.tokens == tokens
    assert result.nll == pytest.approx(sum(sums) / tokens, rel=1e-5)
    halves = [
        padded_text_batch(documents[:2], side),
        padded_text_batch(documents[2:], side),
    ]  # batches of the same documents
    assert perplexity(model, halves, progress=False).nll == pytest.approx(sum(sums) / tokens, rel=1e-5)


def _peaked_model():
    """The tiny Granite-MoE with its experts and output layer scaled up (HF's init, std 0.02, leaves the
    experts' share of the residual stream and the next-token probabilities tiny): confident next tokens
    that depend on the routing, so the draws and how they are averaged move the perplexity."""
    model = tiny_model("granitemoe")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".experts." in name or name == "lm_head.weight":
                parameter.mul_(20.0)
    return model


def test_the_model_average_is_the_mean_token_probability_over_the_joint_draws():
    """Reference: the unpatched model run once per drawn set of router weights (copied into it), each
    token's probability averaged over the draws."""
    batch = padded_text_batch(text_documents(), "left")
    handle = patch_routers(_peaked_model(), {"weight": 1.0}, layers="all")
    with _Draws() as recorder:  # three passes of 2, 2 and 1 joint samples
        result = perplexity(handle, [batch], num_samples=5, max_samples_per_pass=2, progress=False)
    draws = {name: torch.cat(values) for name, values in recorder.values.items()}  # (5, 1, experts, hidden)
    assert len(draws) == 2  # one router weight per MoE layer
    reference, token_probs = _peaked_model(), []
    targets, scored = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
    scored &= batch["attention_mask"][:, :-1].bool()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    for sample in range(5):
        with torch.no_grad():
            for name, value in draws.items():
                parameter = reference.get_parameter(name)
                parameter.copy_(value.reshape(5, *parameter.shape)[sample])
            logits = reference(**batch, position_ids=positions).logits[:, :-1]
        token_probs.append(torch.softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0])
    mean_probs = torch.stack(token_probs).mean(0)
    expected = float(-mean_probs.log()[scored].mean())
    assert expected < float(-torch.stack(token_probs).log()[:, scored].mean()) - 0.1  # not the mean log-probability
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.value == pytest.approx(math.exp(expected), rel=1e-5)


def test_passes_follow_the_mode_and_the_samples_per_pass():
    batch = padded_text_batch(text_documents(), "right")
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers="all")
    passes = []
    hook = handle.model.register_forward_hook(lambda module, args, output: passes.append(output.logits.shape[0]))
    perplexity(handle, [batch], num_samples=5, max_samples_per_pass=2, progress=False)
    assert passes == [2 * 4, 2 * 4, 1 * 4]  # samples folded into the batch of 4
    passes.clear()
    result = perplexity(handle, [batch], num_samples=5, mode="routing-average", progress=False)
    assert passes == [4] and math.isfinite(result.value)  # the routers average their draws in one pass
    hook.remove()


def test_bad_input_is_refused_before_any_pass():
    batch = padded_text_batch(text_documents(), "right")
    model = tiny_model("granitemoe")
    cases = [
        ((model, mcqa_batches(count=1)), {}, "has labels: an MCQA batch"),
        (("model", [batch]), {}, "takes a FittedPosterior, a RouterPatch or a model, got str"),
        ((model, [batch]), {"num_samples": 0}, "num_samples must be a positive integer"),
        ((model, [batch]), {"mode": "vote"}, "unknown predictive mode 'vote'"),
    ]
    for args, options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            perplexity(*args, progress=False, **options)
    experts = patch_experts(model, layers=[-1])
    with pytest.raises(ConfigurationError, match="model-average only, not routing-average"):
        perplexity(experts, [batch], mode="routing-average", progress=False)
    experts.unpatch()
    with pytest.raises(ConfigurationError, match="undone"):
        perplexity(experts, [batch], progress=False)
