"""``select_prior``: every candidate scored by the calibration NLL of the unfitted prior's explicit draws,
the lowest chosen, the model handed back unpatched, bad candidates refused before any prediction."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers, predict
from pyro_moe.errors import LayerSelectionError
from pyro_moe.inference import selection as selection_module
from pyro_moe.inference.selection import PriorCandidate, select_prior
from pyro_moe.models.bayesian_router import BayesianRouter
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

CALIBRATION = mcqa_batches(count=3, size=8, seed=1)


def prior_nll(model: torch.nn.Module, scale: float, layers, samples: int, seed: int) -> float:
    """Mean NLL of the calibration labels under the unfitted logit prior, written out here."""
    handle = patch_routers(model, {"logits": scale}, layers=layers)
    pyro.set_rng_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in CALIBRATION:
            probs = predict(
                handle, batch["input_ids"], batch["attention_mask"], answer_token_ids=ANSWERS, num_samples=samples
            ).probs
            total -= probs[torch.arange(len(probs)), batch["labels"]].log().sum().item()
            count += len(probs)
    handle.unpatch()
    return total / count


def test_every_candidate_is_scored_by_its_unfitted_prior_and_the_lowest_nll_wins():
    model = tiny_model("granitemoe")
    torch.manual_seed(7)
    after = torch.rand(2)
    torch.manual_seed(7)
    result = select_prior(
        model, CALIBRATION, answer_token_ids=ANSWERS, scales=[0.1, 1.0, 4.0], layer_sets=["all", [1]], num_samples=3
    )
    assert torch.equal(torch.rand(2), after)  # the caller's random stream is untouched
    assert not any(isinstance(module, BayesianRouter) for module in model.modules())  # unpatched again
    expected = {
        PriorCandidate(scale, layers): prior_nll(model, scale, layers, samples=3, seed=0)
        for layers in ("all", (1,))
        for scale in (0.1, 1.0, 4.0)
    }
    assert list(result.scores) == list(expected)  # layer sets outer, scales inner
    for candidate, nll in expected.items():
        assert result.scores[candidate] == pytest.approx(nll, rel=1e-5)
    assert len(set(result.scores.values())) == len(expected)  # the candidates predict differently
    assert result.chosen == min(expected, key=expected.get)
    rows = result.table()
    assert [row["chosen"] for row in rows].count(True) == 1
    chosen = result.chosen == PriorCandidate(0.1, (1,))
    assert rows[3] == {"scale": 0.1, "layers": [1], "nll": result.scores[PriorCandidate(0.1, (1,))], "chosen": chosen}
    assert result.to_json()["examples"] == 24


def test_the_seed_gives_the_same_scores_and_another_seed_other_draws():
    model = tiny_model("granitemoe")
    common = {"answer_token_ids": ANSWERS, "scales": [2.0], "num_samples": 2}
    first, again = (select_prior(model, CALIBRATION, seed=3, **common) for _ in range(2))
    other = select_prior(model, CALIBRATION, seed=4, **common)
    assert first.scores == again.scores
    assert first.scores != other.scores
    as_list = select_prior(model, CALIBRATION, seed=3, **{**common, "answer_token_ids": ANSWERS.tolist()})
    assert as_list.scores == first.scores  # answer ids as a list of ints work as the tensor does


def test_bad_candidates_are_refused_before_any_prediction(monkeypatch):
    model = tiny_model("granitemoe")
    predictions = []
    monkeypatch.setattr(selection_module, "predict", lambda *a, **k: predictions.append(1) or predict(*a, **k))
    common = {"answer_token_ids": ANSWERS, "scales": [1.0]}
    with pytest.raises(LayerSelectionError, match="out of range"):
        select_prior(model, CALIBRATION, layer_sets=["all", [5]], **common)
    cases = [
        ({"scales": []}, "scales must be a non-empty list"),
        ({"scales": [1.0, -2.0]}, r"scales\[1\] must be a positive number"),
        ({"scales": [1.0, 1.0]}, "scales must be distinct"),
        ({"layer_sets": []}, "at least one layer set"),
        ({"layer_sets": ["all", "all"]}, "layer_sets must be distinct"),
        ({"layer_sets": [3]}, "a layer set is 'all' or a list"),
        ({"num_samples": 0}, "num_samples must be a positive integer"),
        ({"site_kind": "mystery"}, "mystery"),
        ({"answer_token_ids": [7]}, "at least two answers"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            select_prior(model, CALIBRATION, **{**common, **options})
    with pytest.raises(ConfigurationError, match="the data are empty"):
        select_prior(model, [], **common)
    handle = patch_routers(model, {"weight": 0.1})
    with pytest.raises(ConfigurationError, match="already Bayesian"):
        select_prior(model, CALIBRATION, **common)
    handle.unpatch()
    assert predictions == []
    assert not any(isinstance(module, BayesianRouter) for module in model.modules())


def _brute_force_calibrated_nll(fit_probs, fit_labels, scored_probs, scored_labels) -> float:
    """NLL on the scored half under the temperature of least NLL on the fitted half, on a fine grid in numpy."""
    import numpy as np

    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 8001))

    def nll(probs, labels, temperatures):
        z = np.log(probs.double().numpy())[None] / temperatures[:, None, None]
        z -= np.logaddexp.reduce(z, axis=-1, keepdims=True)
        return (-z[:, np.arange(len(labels)), labels.numpy()]).mean(-1)

    best = grid[nll(fit_probs, fit_labels, grid).argmin()]
    return float(nll(scored_probs, scored_labels, np.array([best]))[0])


def test_the_calibrated_objective_scores_a_cross_fitted_temperature_and_picks_the_lowest():
    model = tiny_model("granitemoe")
    relabelled = []  # labels the model ranks first two times in three: finite temperatures on both halves
    for batch in CALIBRATION:
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1][:, ANSWERS]
        first = logits.argmax(-1)
        labels = torch.where(torch.arange(len(first)) % 3 == 2, (first + 1) % len(ANSWERS), first)
        relabelled.append({**batch, "labels": labels})
    scales = [0.1, 1.0, 4.0]
    result = select_prior(
        model, relabelled, answer_token_ids=ANSWERS, scales=scales, num_samples=3, seed=2, objective="calibrated"
    )
    assert result.objective == "calibrated" and result.to_json()["objective"] == "calibrated"
    for scale in scales:
        handle = patch_routers(model, {"logits": scale}, layers="all")
        pyro.set_rng_seed(2)
        with torch.no_grad():
            probs = torch.cat(
                [
                    predict(handle, b["input_ids"], b["attention_mask"], answer_token_ids=ANSWERS, num_samples=3).probs
                    for b in relabelled
                ]
            )
        handle.unpatch()
        labels = torch.cat([b["labels"] for b in relabelled])
        half = len(labels) // 2
        first = _brute_force_calibrated_nll(probs[:half], labels[:half], probs[half:], labels[half:])
        second = _brute_force_calibrated_nll(probs[half:], labels[half:], probs[:half], labels[:half])
        expected = (first * (len(labels) - half) + second * half) / len(labels)
        assert result.scores[PriorCandidate(scale, "all")] == pytest.approx(expected, abs=1e-3), scale
    assert result.chosen == min(result.scores, key=result.scores.get)
    raw = select_prior(model, relabelled, answer_token_ids=ANSWERS, scales=scales, num_samples=3, seed=2)
    assert raw.objective == "raw" and raw.scores != result.scores


def test_a_bad_selection_objective_is_refused_before_any_prediction(monkeypatch):
    monkeypatch.setattr(selection_module, "predict", lambda *a, **k: pytest.fail("predicted before the check"))
    with pytest.raises(
        ConfigurationError, match=r"unknown selection objective 'ood'; accepted: \['raw', 'calibrated'\]"
    ):
        select_prior(tiny_model("granitemoe"), CALIBRATION, answer_token_ids=ANSWERS, scales=[1.0], objective="ood")
    one = [{key: value[:1] for key, value in CALIBRATION[0].items()}]
    with pytest.raises(ConfigurationError, match="at least 2 calibration questions, got 1"):
        select_prior(tiny_model("granitemoe"), one, answer_token_ids=ANSWERS, scales=[1.0], objective="calibrated")
