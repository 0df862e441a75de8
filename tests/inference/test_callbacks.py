"""Training callbacks: the evaluation callback's steps and values (against posterior.predict and the
evaluation package's NLL), keep_best against a run stopped at the best step, the best checkpoint,
options refused before training; and FittedPosterior.prior_scales() against the param store."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.evaluation.metrics import negative_log_likelihood
from pyro_moe.inference.callbacks import EvaluationCallback
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.models.priors import learned_scale_name
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

TRAIN, HELD_OUT = mcqa_batches(4, 8, seed=0), mcqa_batches(2, 6, seed=1)
SETTINGS = dict(answer_token_ids=ANSWERS, lr=0.2, progress=False, objective="iwae", num_particles=2)


def _fit(steps, callback=None, sites=None):
    handle = patch_routers(tiny_model("granitemoe"), sites or {"logits": {"scale": 1.0, "mode": "learned"}}, layers=[1])
    return fit(handle, TRAIN, "mfvr", steps=steps, callback=callback, **SETTINGS)


def _params(posterior):
    return {key: value for key, value in posterior.engine.state_tensors().items() if key.startswith("param/")}


def test_evaluation_runs_at_every_nth_step_with_the_nll_of_the_predictive():
    steps_seen = []
    evaluation = EvaluationCallback(HELD_OUT, every=2, num_samples=3, seed=5)
    posterior = _fit(6, evaluation)
    assert sorted(evaluation.values) == [2, 4, 6]
    recorded = {record["step"] + 1: record["held_out_nll"] for record in posterior.history if "held_out_nll" in record}
    assert recorded == evaluation.values
    pyro.set_rng_seed(5)
    with torch.no_grad():
        probs = torch.cat(
            [posterior.predict(b["input_ids"], b["attention_mask"], num_samples=3).probs for b in HELD_OUT]
        )
    labels = torch.cat([b["labels"] for b in HELD_OUT])
    assert evaluation.values[6] == pytest.approx(negative_log_likelihood(probs, labels), rel=1e-6)
    plain = _fit(6, lambda p, step: steps_seen.append(step))
    assert steps_seen == [1, 2, 3, 4, 5, 6]
    # evaluation restores the random streams: the same optimisation path as without it
    assert [r["loss"] for r in plain.history] == [r["loss"] for r in posterior.history]
    posterior.patch.unpatch()
    plain.patch.unpatch()


def test_calibrated_evaluation_scores_the_nll_after_a_temperature_and_restores_every_random_stream():
    """The calibrated value against a brute-force temperature grid in numpy on the predictive's own
    probabilities; Python's, NumPy's and torch's streams continue as if nothing had been drawn."""
    import random

    import numpy as np

    held_out = []  # labels the model ranks first two times in three: a finite temperature
    for batch in HELD_OUT:
        with torch.no_grad():
            logits = tiny_model("granitemoe")(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        first = logits[:, -1][:, torch.as_tensor(ANSWERS)].argmax(-1)
        shifted = torch.where(torch.arange(len(first)) % 3 == 2, (first + 1) % len(ANSWERS), first)
        held_out.append({**batch, "labels": shifted})
    evaluation = EvaluationCallback(held_out, every=3, num_samples=3, seed=2, calibrated=True)
    posterior = _fit(3, evaluation)
    pyro.set_rng_seed(2)
    with torch.no_grad():
        probs = torch.cat(
            [posterior.predict(b["input_ids"], b["attention_mask"], num_samples=3).probs for b in held_out]
        )
    labels = torch.cat([b["labels"] for b in held_out]).numpy()
    log_p = np.log(probs.double().numpy())
    grid = np.exp(np.linspace(np.log(0.01), np.log(100), 8001))
    scaled = log_p[None] / grid[:, None, None]
    scaled -= np.logaddexp.reduce(scaled, axis=-1, keepdims=True)
    best = (-scaled[:, np.arange(len(labels)), labels]).mean(-1).min()
    assert evaluation.values[3] == pytest.approx(best, abs=1e-4) and best < np.log(len(ANSWERS)) - 0.05
    assert evaluation.values[3] <= negative_log_likelihood(probs, torch.from_numpy(labels)) + 1e-6

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    evaluation(posterior, 3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    posterior.patch.unpatch()


def test_keep_best_restores_the_parameters_of_the_best_step_and_writes_its_checkpoint(tmp_path):
    evaluation = EvaluationCallback(HELD_OUT, every=2, num_samples=3, keep_best=True, folder=tmp_path / "best")
    posterior = _fit(12, evaluation)
    best = evaluation.best_step
    assert evaluation.best_value == min(evaluation.values.values())
    assert best < 12, evaluation.values  # the last step is not the best here: the restore does something
    stopped = _fit(best)
    for name, value in _params(stopped).items():
        assert torch.equal(_params(posterior)[name], value), name
    loaded = FittedPosterior.load(tmp_path / "best", tiny_model("granitemoe"))
    assert loaded.engine.step_count == best
    for name, value in _params(stopped).items():
        assert torch.equal(_params(loaded)[name], value), name
    for handle in (posterior.patch, stopped.patch, loaded.patch):
        handle.unpatch()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batches": []}, r"held-out batches are empty"),
        ({"every": 0}, r"every"),
        ({"num_samples": 0}, r"num_samples"),
        ({"keep_best": "yes"}, r"keep_best must be True or False"),
        ({"folder": 3}, r"folder must be a path"),
    ],
)
def test_bad_evaluation_options_are_refused_when_built(options, message):
    with pytest.raises(ConfigurationError, match=message):
        EvaluationCallback(**{"batches": HELD_OUT, **options})


def test_evaluations_that_cannot_run_are_refused_before_any_step():
    posterior = _fit(2)
    before = _params(posterior)
    bad_labels = [{**HELD_OUT[0], "labels": torch.full((6,), 9)}]
    for callback, message in [
        (EvaluationCallback(HELD_OUT, every=6), r"every=6: no evaluation would run in steps 3..5"),
        (EvaluationCallback(bad_labels, every=1), r"labels must be integers in \[0, 4\)"),
        ("not callable", r"a callback must be a TrainingCallback or a callable"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            posterior.train(TRAIN, steps=3, progress=False, callback=callback)
        assert posterior.engine.step_count == 2 and len(posterior.history) == 2
        for name, value in _params(posterior).items():
            assert torch.equal(before[name], value), name
    posterior.patch.unpatch()


def test_prior_scales_are_the_param_store_values_and_empty_for_fixed_scales():
    sites = {
        "weight": {"scale": 0.2, "mode": "learned"},
        "logits": {"scale": 1.0, "mode": "learned", "scale_per": "expert"},
    }
    posterior = fit(
        patch_routers(tiny_model("granitemoe"), sites, layers=[1]),
        TRAIN,
        "mean-field+mfvr",
        steps=3,
        answer_token_ids=ANSWERS,
        lr=0.05,
        progress=False,
    )
    scales = posterior.prior_scales()
    router = "model.layers.1.block_sparse_moe.router"
    assert sorted(scales) == [f"{router}.logits", f"{router}.weight"]
    assert scales[f"{router}.logits"].shape == (4,) and scales[f"{router}.weight"].shape == ()
    for site, value in scales.items():
        stored = pyro.param(learned_scale_name(site, posterior.engine.param_prefix))  # constrained, positive
        assert torch.equal(value, stored.detach()) and (value > 0).all()
        assert not torch.allclose(value, torch.tensor(0.2 if site.endswith("weight") else 1.0))  # trained
    posterior.patch.unpatch()
    for fixed, guide in (
        ({"logits": 1.0}, "mfvr"),
        ({"logits": {"scale": 1.0, "mode": "hierarchical"}}, "mean-field+mfvr"),
    ):
        other = fit(
            patch_routers(tiny_model("granitemoe"), fixed, layers=[1]),
            TRAIN,
            guide,
            steps=2,
            answer_token_ids=ANSWERS,
            progress=False,
        )
        assert other.prior_scales() == {}
        other.patch.unpatch()
