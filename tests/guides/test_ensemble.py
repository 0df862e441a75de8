"""Deep ensemble of routers (DER) against the unpatched transformers model and against separate MAP fits."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.guides.router_guide import RouterGuide
from pyro_moe.inference.fitting import fit
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.svi import SVIEngine
from pyro_moe.models.likelihoods import MCQALikelihood
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

WEIGHT = "model.layers.1.block_sparse_moe.router.weight"


def router(model):
    return model.model.layers[1].block_sparse_moe.router


def hf_answer_probs(weight: torch.Tensor, batch) -> torch.Tensor:
    """``(batch, choices)`` answer probabilities of the plain transformers model with router weight ``weight``."""
    model = tiny_model("granitemoe")
    with torch.no_grad():
        router(model).weight.copy_(weight)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
    return torch.softmax(logits[:, ANSWERS], -1)


def fitted_ensemble(members: int, steps: int = 4):
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    options = {"ensemble": {"members": members}}
    return fit(
        handle, mcqa_batches(), "ensemble", answer_token_ids=ANSWERS, steps=steps, num_particles=members,
        guide_options=options, progress=False,
    )  # fmt: skip


def test_identical_members_predict_as_the_single_member():
    posterior = fitted_ensemble(3)
    values = posterior.guide.global_guide.member_values(WEIGHT)
    with torch.no_grad():
        values.copy_(values[1].expand_as(values))
    batch = mcqa_batches(count=1, seed=1)[0]
    prediction = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=3, return_samples=True)
    expected = hf_answer_probs(values[1], batch)
    torch.testing.assert_close(prediction.probs, expected, rtol=1e-5, atol=1e-6)
    for sample in prediction.sample_probs:
        torch.testing.assert_close(sample, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_samples", [3, 6])
def test_different_members_predict_their_average_in_one_pass(num_samples):
    posterior = fitted_ensemble(3)
    values = posterior.guide.global_guide.member_values(WEIGHT).detach()
    assert (values[0] - values[1]).abs().max() > 0.05  # the members differ
    batch = mcqa_batches(count=1, seed=1)[0]
    prediction = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=num_samples)
    members = torch.stack([hf_answer_probs(value, batch) for value in values])
    assert members.std(0).max() > 2e-4  # and so do their answers (well beyond the tolerance below)
    torch.testing.assert_close(prediction.probs, members.mean(0), rtol=1e-5, atol=1e-6)


def test_each_member_follows_its_own_map_fit():
    """Trained together (one particle each, the mean of their losses), every member takes the steps a
    separate MAP fit from its start takes (Adam is invariant to the 1 / M on the gradients)."""
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    batches = [{**batch, "num_examples": 32} for batch in mcqa_batches()]
    ensemble = RouterGuide(MCQALikelihood(handle, ANSWERS), "ensemble", {"ensemble": {"members": 2}})
    ensemble.setup(**batches[0])
    starts = ensemble.global_guide.member_values(WEIGHT).detach().clone()
    engine = SVIEngine(ensemble.likelihood, ensemble, TrainingOptions(num_particles=2, lr=0.02, clip_norm=None))
    for batch in batches:
        engine.step(batch)
    for member, start in enumerate(starts):
        single = RouterGuide(MCQALikelihood(handle, ANSWERS), "map")
        single.setup(**batches[0])
        (point,) = [value for name, value in single.global_guide.named_parameters()]
        with torch.no_grad():
            point.copy_(start)
        engine = SVIEngine(single.likelihood, single, TrainingOptions(num_particles=1, lr=0.02, clip_norm=None))
        for batch in batches:
            engine.step(batch)
        trained = ensemble.global_guide.member_values(WEIGHT)[member]
        assert (trained - start).abs().max() > 0.01
        torch.testing.assert_close(trained, point.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("members", "num_particles", "message"),
    [
        (0, 1, r"ensemble's members M must be a positive integer, got 0"),
        (-2, 1, r"ensemble's members M must be a positive integer, got -2"),
        (2.5, 1, r"ensemble's members M must be a positive integer, got 2.5"),
        (3, 1, r"trains its 3 members together, one per particle: fit with num_particles=3 \(got 1\)"),
    ],
)
def test_bad_ensemble_sizes_are_refused_before_any_step(members, num_particles, message):
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.2}, layers=[1])
    weight = router(model).weight.detach().clone()
    with pytest.raises(ConfigurationError, match=message):
        fit(
            handle, mcqa_batches(), "ensemble", answer_token_ids=ANSWERS, num_particles=num_particles,
            guide_options={"ensemble": {"members": members}}, progress=False,
        )  # fmt: skip
    assert torch.equal(router(model).weight, weight) and all(param.requires_grad for param in model.parameters())
    members_trained = [value for name, value in pyro.get_param_store().items() if name.endswith(WEIGHT)]
    assert all(value.grad is None for value in members_trained)  # no step was taken
    handle.unpatch()
