"""``FittedPosterior.calibrate``: temperature scaling of a posterior's averaged answer probabilities.

On a deterministic predictive (a MAP guide) the calibration equals temperature scaling of the unpatched
HF model's answer logits; on a random one, temperature scaling of the log of the averaged probabilities
of explicit draws; the temperature is kept per mode, saved and loaded, dropped by further training."""

from __future__ import annotations

import copy
import json
import operator

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.evaluation.temperature_scaling import fit_temperature
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

CALIBRATION = mcqa_batches(count=3, size=8, seed=1)
TEST = mcqa_batches(count=2, size=8, seed=2)


@torch.no_grad()
def hf_answer_logits(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Answer logits ``(examples, choices)`` of a plain HF forward (left padding: the last position)."""
    return torch.cat(
        [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, -1, ANSWERS] for b in batches]
    )


def labels_of(batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([batch["labels"] for batch in batches])


def test_calibrating_a_map_posterior_is_temperature_scaling_of_the_hf_model_with_its_weights():
    model = tiny_model("granitemoe")
    reference = copy.deepcopy(model)  # stays an unpatched HF model
    handle = patch_routers(model, {"weight": 0.2}, layers=[0, 1])
    posterior = fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, steps=10, lr=0.05, progress=False)
    with torch.no_grad():  # the HF model with the MAP router weights: the posterior's one network
        for site in handle.site_names:
            weight = operator.attrgetter(site)(posterior.guide.global_guide.locs)
            assert not torch.equal(weight, reference.get_submodule(site.removesuffix(".weight")).weight)
            reference.get_submodule(site.removesuffix(".weight")).weight.copy_(weight)

    scaling = posterior.calibrate(CALIBRATION, num_samples=3, seed=5)
    expected = fit_temperature(hf_answer_logits(reference, CALIBRATION), labels_of(CALIBRATION))
    assert scaling.temperature == pytest.approx(expected.temperature, rel=1e-4)
    assert scaling.calibration_nll == pytest.approx(expected.calibration_nll, rel=1e-5)
    assert abs(scaling.temperature - 1) > 0.05  # a temperature that changes the probabilities

    test_logits = hf_answer_logits(reference, TEST)
    for batch, logits in zip(TEST, test_logits.split(8), strict=True):
        prediction = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=3)
        torch.testing.assert_close(prediction.probs, expected.probs(logits), rtol=1e-4, atol=1e-5)
        assert prediction.temperature == scaling.temperature
        plain = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=3, calibrated=False)
        torch.testing.assert_close(plain.probs, logits.softmax(-1), rtol=1e-4, atol=1e-5)
        assert plain.temperature is None


def test_calibrating_a_random_predictive_tempers_the_average_of_its_draws():
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mfvr", answer_token_ids=ANSWERS, steps=5, progress=False)
    pyro.set_rng_seed(9)  # the explicit draws: per batch, every sample's answer probabilities
    draws = [
        posterior.predict(b["input_ids"], b["attention_mask"], num_samples=4, calibrated=False, return_samples=True)
        for b in CALIBRATION
    ]
    average = torch.cat([draw.sample_probs.mean(0) for draw in draws])
    expected = fit_temperature(average.log(), labels_of(CALIBRATION))

    torch.manual_seed(123)  # the caller's stream goes on as if calibrate had drawn nothing
    before = torch.rand(3)
    torch.manual_seed(123)
    scaling = posterior.calibrate(CALIBRATION, num_samples=4, seed=9)
    assert torch.equal(torch.rand(3), before)
    assert scaling.temperature == pytest.approx(expected.temperature, rel=1e-5)

    batch = TEST[0]
    pyro.set_rng_seed(3)
    calibrated = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=4, return_samples=True)
    assert calibrated.temperature == scaling.temperature
    mean = calibrated.sample_probs.mean(0)  # the draws stay untempered: their mean is the plain average
    torch.testing.assert_close(calibrated.probs, torch.softmax(mean.log() / scaling.temperature, -1))
    pyro.set_rng_seed(3)
    plain = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=4, calibrated=False)
    torch.testing.assert_close(plain.probs, mean)
    assert torch.equal(plain.probs.argmax(-1), calibrated.probs.argmax(-1))  # the answer never changes


def test_temperatures_are_kept_per_mode_saved_loaded_and_dropped_by_training(tmp_path):
    model = tiny_model("granitemoe")
    fresh = copy.deepcopy(model)
    handle = patch_routers(model, {"logits": 1.0}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mfvr", answer_token_ids=ANSWERS, steps=4, progress=False)
    routing = posterior.calibrate(CALIBRATION, mode="routing-average", num_samples=2)
    assert list(posterior.calibration) == ["routing-average"]
    batch = TEST[0]
    assert posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=2).temperature is None
    averaged = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=2, mode="routing-average")
    assert averaged.temperature == routing.temperature
    model_average = posterior.calibrate(CALIBRATION, num_samples=2)
    assert posterior.calibration == {"routing-average": routing, "model-average": model_average}

    posterior.save(tmp_path / "posterior")
    saved = json.loads((tmp_path / "posterior" / "config.json").read_text())["calibration"]
    assert saved["model-average"]["temperature"] == model_average.temperature
    assert saved["model-average"]["examples"] == 24 and saved["model-average"]["num_samples"] == 2
    loaded = FittedPosterior.load(tmp_path / "posterior", fresh)
    assert loaded.calibration == posterior.calibration
    for mode in ("model-average", "routing-average"):
        pyro.set_rng_seed(4)
        expected = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=2, mode=mode)
        pyro.set_rng_seed(4)
        got = loaded.predict(batch["input_ids"], batch["attention_mask"], num_samples=2, mode=mode)
        torch.testing.assert_close(got.probs, expected.probs)
        assert got.temperature == expected.temperature

    loaded.train(mcqa_batches(), steps=1, progress=False)  # a changed predictive: its temperatures are gone
    assert loaded.calibration == {} and "calibration" not in loaded.config
    assert loaded.predict(batch["input_ids"], batch["attention_mask"], num_samples=2).temperature is None


def test_bad_calibration_input_is_refused_before_anything_changes():
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mfvr", answer_token_ids=ANSWERS, steps=2, progress=False)
    posterior.calibrate(CALIBRATION, num_samples=2)
    config = copy.deepcopy(posterior.config)
    wrong_labels = [{**CALIBRATION[0], "labels": CALIBRATION[0]["labels"] + 4}]
    cases = [
        ({"calibration_batches": []}, "the data are empty"),
        ({"calibration_batches": wrong_labels}, r"labels must be integers in \[0, 4\)"),
        ({"calibration_batches": CALIBRATION, "mode": "average"}, "unknown predictive mode 'average'"),
        ({"calibration_batches": CALIBRATION, "num_samples": 0}, "num_samples must be a positive integer"),
        ({"calibration_batches": CALIBRATION, "seed": -1}, "seed must be a non-negative integer"),
    ]
    for arguments, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            posterior.calibrate(**arguments)
        assert posterior.config == config

    experts = patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=100.0)
    laplace = fit(experts, mcqa_batches(), "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    with pytest.raises(ConfigurationError, match="predicts in model-average, not routing-average"):
        laplace.calibrate(CALIBRATION, mode="routing-average")
    assert laplace.calibration == {}
