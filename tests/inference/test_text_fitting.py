"""``fit`` on plain text (the next-token likelihood): held-out perplexity falls on a model trained in
the test, save/load/resume, which likelihood a fit uses and the refusals of the wrong one."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_experts, patch_routers
from pyro_moe.inference.callbacks import EvaluationCallback
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.perplexity import perplexity
from pyro_moe.inference.presets import family_specs, fit_families
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model


def _walks(successor: torch.Tensor, count: int, generator: torch.Generator, length: int = 10) -> torch.Tensor:
    """``(count, length)`` documents: a random first token, then each token's fixed successor."""
    rows = [torch.randint(4, 64, (count,), generator=generator)]
    for _ in range(length - 1):
        rows.append(successor[rows[-1] - 4])
    return torch.stack(rows, 1)


def _batches(documents: torch.Tensor, size: int = 8) -> list[dict[str, torch.Tensor]]:
    return [
        {
            "input_ids": documents[start : start + size],
            "attention_mask": torch.ones_like(documents[start : start + size]),
        }
        for start in range(0, len(documents), size)
    ]


def test_a_text_fit_lowers_held_out_perplexity_below_the_wide_prior():
    """A tiny Granite-MoE learns a synthetic text (each token has one successor) with plain AdamW; its
    routers then get per-token logit sites at a wide prior (scale 6: routing noise that hurts, the prior
    predictive's perplexity well above the deterministic model's), and an ``mfvr`` guide started at that
    prior is fitted on the training text: the held-out perplexity of its predictive falls."""
    generator = torch.Generator().manual_seed(0)
    successor = torch.randperm(60, generator=generator) + 4
    train, held_out = _batches(_walks(successor, 64, generator)), _batches(_walks(successor, 32, generator))
    torch.manual_seed(0)
    model = tiny_model("granitemoe").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for step in range(60):
        ids = train[step % len(train)]["input_ids"]
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    deterministic = perplexity(model, held_out, progress=False)
    assert deterministic.value < 1.1  # the text has structure the model learnt (64 tokens: chance is 64)

    handle = patch_routers(model, {"logits": 6.0}, layers="all")
    pyro.set_rng_seed(1)
    prior = perplexity(handle, held_out, num_samples=16, progress=False)
    assert prior.nll > deterministic.nll + 0.1  # the wide prior's routing noise hurts

    posterior = fit(
        handle,
        train,
        "mfvr",
        answer_token_ids=None,
        steps=200,
        lr=0.05,
        guide_options={"mfvr": {"init_scale": 6.0}},  # the guide starts at the prior
        progress=False,
    )
    pyro.set_rng_seed(1)
    fitted = perplexity(posterior, held_out, num_samples=16, progress=False)
    assert math.isfinite(fitted.value) and fitted.tokens == prior.tokens == 32 * 9
    assert fitted.nll < prior.nll - 0.03
    losses = [record["loss"] for record in posterior.history]
    assert sum(losses[-20:]) < sum(losses[:20])


def _text(count: int = 3, size: int = 4, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random text batches; the first row of each is left-padded."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(4, 60, (size, 6), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :2] = 0
        batches.append({"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask})
    return batches


def test_a_text_posterior_saves_loads_and_resumes_the_curve(tmp_path):
    batches = _text()

    def patched():
        pyro.clear_param_store()
        return patch_routers(tiny_model("granitemoe"), {"weight": 0.2, "logits": 1.0}, layers=[1])

    straight = fit(patched(), batches, "mean-field+mfvr", answer_token_ids=None, steps=8, progress=False)
    reference = torch.tensor([record["loss"] for record in straight.history])

    first = fit(patched(), batches, "mean-field+mfvr", answer_token_ids=None, steps=4, progress=False)
    folder = first.save(tmp_path / "fit")
    pyro.set_rng_seed(5)
    expected = perplexity(first, batches, num_samples=4, progress=False)

    pyro.clear_param_store()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    assert loaded.config["likelihood"] == "next-token" and "answer_token_ids" not in loaded.config
    pyro.set_rng_seed(5)
    assert perplexity(loaded, batches, num_samples=4, progress=False) == expected

    pyro.clear_param_store()
    resumed = FittedPosterior.load(folder, tiny_model("granitemoe"))
    resumed.train(batches, steps=4, progress=False)
    torch.testing.assert_close(torch.tensor([record["loss"] for record in resumed.history]), reference)
    with pytest.raises(ConfigurationError, match=r"batch 0 has labels: an MCQA batch"):
        resumed.train(mcqa_batches(), steps=1, progress=False)


def test_a_text_posterior_refuses_mcqa_answers():
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    posterior = fit(handle, _text(), "mfvr", answer_token_ids=None, steps=2, progress=False)
    batch = _text()[0]
    with pytest.raises(ConfigurationError, match=r"fitted on text \(the next-token likelihood\).*perplexity"):
        posterior.predict(batch["input_ids"], batch["attention_mask"])
    with pytest.raises(ConfigurationError, match="fitted on text"):
        posterior.train(_text(), steps=2, callback=EvaluationCallback(mcqa_batches(count=1), every=1), progress=False)


def test_the_likelihood_follows_answer_token_ids_and_mismatches_are_refused_before_any_work():
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    before = {name: tensor.clone() for name, tensor in handle.model.state_dict().items()}
    cases = [
        (mcqa_batches(), None, "batch 0 has labels: an MCQA batch. Fit MCQA with answer_token_ids"),
        (_text(), ANSWERS, r"batch 0 lacks \['labels'\].*text batches without labels: fit with answer_token_ids=None"),
        (_text(), [], "answer_token_ids must be a 1-D tensor of at least two token ids"),
        (
            [{"input_ids": torch.ones(2, 1, dtype=torch.long), "attention_mask": torch.ones(2, 1)}],
            None,
            "no next token",
        ),
    ]
    for data, answers, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            fit(handle, data, "mean-field", answer_token_ids=answers, steps=1, progress=False)
        assert len(pyro.get_param_store()) == 0  # no guide was set up
    with pytest.raises(ConfigurationError, match="'kron-laplace' fits the mcqa likelihood only, not next-token"):
        fit(handle, _text(), "kron-laplace", answer_token_ids=None, steps=1, progress=False)
    handle.unpatch()
    experts = patch_experts(tiny_model("granitemoe"), layers=[-1])
    with pytest.raises(ConfigurationError, match="'expert-laplace' fits the mcqa likelihood only"):
        fit(experts, _text(), "expert-laplace", answer_token_ids=None, steps=0, progress=False)
    experts.unpatch()
    specs = family_specs(["mfvr", "expert-laplace"], steps=1)  # expert-laplace would tune on validation data
    with pytest.raises(ConfigurationError, match="'expert-laplace' fits the mcqa likelihood only"):
        fit_families(tiny_model("granitemoe"), _text(), specs, answer_token_ids=None, steps=1, progress=False)
    assert all(torch.equal(before[name], tensor) for name, tensor in handle.model.state_dict().items())


@pytest.mark.parametrize("guide", ["laplace", "swag"])
def test_global_and_post_hoc_families_fit_text_and_load(guide, tmp_path):
    """Families that need nothing of the MCQA readout fit text like any other data (the dense Laplace's
    Hessian and SWAG's moments come from the next-token likelihood) and load with their fitted state."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    options = {"swag": {"guide_options": {"swag": {"rank": 2, "burn_in": 4, "every": 2}}}}.get(guide, {})
    posterior = fit(handle, _text(), guide, answer_token_ids=None, steps=10, progress=False, **options)
    pyro.set_rng_seed(3)
    expected = perplexity(posterior, _text(), num_samples=3, progress=False)
    assert math.isfinite(expected.value)
    folder = posterior.save(tmp_path / guide)
    pyro.clear_param_store()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    pyro.set_rng_seed(3)
    assert perplexity(loaded, _text(), num_samples=3, progress=False) == expected
