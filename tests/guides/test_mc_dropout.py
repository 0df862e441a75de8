"""MC dropout router (MCDR) against the unpatched transformers model: rate 0 is the deterministic
router, and the S-sample average is the average of S plain forward passes with the same masks."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.inference.fitting import fit
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

WEIGHT = "model.layers.1.block_sparse_moe.router.weight"


def router(model):
    return model.model.layers[1].block_sparse_moe.router


def hf_answer_probs(model, batch) -> torch.Tensor:
    """``(batch, choices)`` answer probabilities of a plain transformers forward (left padding: last position)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
    return torch.softmax(logits[:, ANSWERS], -1)


def fitted_mc_dropout(rate: float):
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2, "dropout": rate}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mc-dropout", answer_token_ids=ANSWERS, steps=6, lr=0.03, progress=False)
    batch = mcqa_batches(count=1, seed=1)[0]
    weight = posterior.guide.global_guide(batch["input_ids"], batch["attention_mask"])[WEIGHT]
    reference = tiny_model("granitemoe")
    with torch.no_grad():
        router(reference).weight.copy_(weight)  # the plain model with the MAP router weights
    return posterior, reference, batch


def test_rate_zero_is_the_deterministic_model_with_the_map_weights():
    posterior, reference, batch = fitted_mc_dropout(0.0)
    assert not torch.equal(router(reference).weight, router(tiny_model("granitemoe")).weight)  # MAP moved them
    prediction = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=4, return_samples=True)
    expected = hf_answer_probs(reference, batch)
    for sample in prediction.sample_probs:
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-6)


def test_the_sample_average_is_the_average_over_the_same_masks(monkeypatch):
    rate, samples = 0.3, 5
    posterior, reference, batch = fitted_mc_dropout(rate)
    masks, dropout = [], torch.nn.functional.dropout

    def recording_dropout(hidden, p=0.5, training=True, inplace=False):
        if not training:  # the attention's (inactive) dropout
            return dropout(hidden, p, training, inplace)
        masks.append(torch.bernoulli(torch.full_like(hidden, 1 - p)))
        return hidden * masks[-1] / (1 - p)

    monkeypatch.setattr(torch.nn.functional, "dropout", recording_dropout)
    prediction = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=samples)
    monkeypatch.undo()
    (mask,) = masks  # one call: the S samples in one pass, one mask per sample
    assert mask.shape == (samples, batch["input_ids"].numel(), 32) and 0.6 < mask.mean() < 0.8

    loop = []
    for sample_mask in mask:
        hook = router(reference).register_forward_pre_hook(
            lambda module, args, m=sample_mask: (args[0] * m.reshape(args[0].shape) / (1 - rate),)
        )
        loop.append(hf_answer_probs(reference, batch))
        hook.remove()
    torch.testing.assert_close(prediction.probs, torch.stack(loop).mean(0), rtol=1e-5, atol=1e-6)
    assert torch.stack(loop).std(0).max() > 1e-4  # the masks do change the answers


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_dropout_rate_outside_zero_one_is_refused(rate):
    model = tiny_model("granitemoe")
    with pytest.raises(ConfigurationError, match=rf"dropout rate must be a number in \[0, 1\), got {rate}"):
        patch_routers(model, {"weight": 0.2, "dropout": rate}, layers=[1])
    assert not any("Bayesian" in type(module).__name__ for module in model.modules())
    assert pyro.get_param_store().keys() == set()
