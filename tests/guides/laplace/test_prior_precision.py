"""select_prior_precision: its choice against the NLL recomputed from the posterior's own predictions,
the caller's random streams (Python, NumPy, torch) left as they were, the prior precision restored on
any failure, and every argument checked before any forward pass."""

from __future__ import annotations

import random

import numpy as np
import pyro
import pytest
import torch

from pyro_moe import fit
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.laplace.prior_precision import select_prior_precision
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

SITE = "model.layers.1.block_sparse_moe.experts.down_proj"


@pytest.fixture
def fitted():
    model = tiny_model("granitemoe")
    handle = patch_experts(model, layers=[1], prior_precision=5.0)
    batches = mcqa_batches(2, size=4)
    posterior = fit(handle, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    yield model, posterior, batches
    handle.unpatch()


def _taus(posterior) -> list[float]:
    return posterior.guide.global_guide.prior_precisions()[SITE].tolist()


def _model_tau(posterior) -> list[float]:
    """The prior precision of the model's own site, ``1 / scale^2`` per expert."""
    trace = pyro.poutine.trace(posterior.patch.model).get_trace(
        input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 2, dtype=torch.long)
    )
    fn = trace.nodes[SITE]["fn"].base_dist
    return (fn.scale.reshape(len(_taus(posterior)), -1)[:, 0] ** -2).tolist()


def test_the_choice_is_the_least_nll_recomputed_from_predictions(fitted):
    _, posterior, batches = fitted
    tau, scores = select_prior_precision(posterior, batches, grid=[0.5, 50.0], num_samples=3, seed=4)
    guide = posterior.guide.global_guide
    for candidate in (0.5, 50.0):
        guide.set_prior_precision({SITE: candidate})
        pyro.set_rng_seed(4)
        probs = torch.cat(
            [posterior.predict(b["input_ids"], b["attention_mask"], num_samples=3).probs for b in batches]
        )
        labels = torch.cat([b["labels"] for b in batches])
        reference = torch.nn.functional.nll_loss(probs.log(), labels).item()
        assert scores[candidate] == pytest.approx(reference, rel=1e-5)
    assert tau == min(scores, key=scores.__getitem__)


def test_the_callers_random_streams_go_on_as_if_the_search_had_not_run(fitted):
    _, posterior, batches = fitted
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    select_prior_precision(posterior, batches, grid=[1.0, 10.0], num_samples=2, seed=0)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_a_failure_during_the_search_restores_the_prior_precision(fitted, monkeypatch):
    _, posterior, batches = fitted
    before = _taus(posterior)
    predict, calls = posterior.predict, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second candidate's first batch
            raise RuntimeError("out of memory")
        return predict(*args, **kwargs)

    monkeypatch.setattr(posterior, "predict", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        select_prior_precision(posterior, batches, grid=[1.0, 10.0], num_samples=2)
    assert _taus(posterior) == before == pytest.approx([5.0] * len(before))
    assert _model_tau(posterior) == pytest.approx(before)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"grid": []}, "at least one"),
        ({"grid": [1.0, float("nan")]}, r"grid\[1\] must be a positive number, got nan"),
        ({"grid": [1.0, -2.0]}, r"grid\[1\] must be a positive number"),
        ({"grid": [True]}, r"grid\[0\] must be a positive number"),
        ({"grid": "10"}, "grid must be a list"),
        ({"num_samples": 0}, "num_samples must be a positive integer, got 0"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"batches": []}, "the data are empty"),
        ({"batches": "drop input_ids"}, r"batch 1 lacks \['input_ids'\]"),
        ({"batches": "float labels"}, r"batch 1: labels must be integers in \[0, 4\).*got torch.float32"),
        ({"batches": "labels out of range"}, r"batch 1: labels must be integers in \[0, 4\)"),
        ({"batches": "short mask"}, r"batch 1: input_ids \(\d+, \d+\), attention_mask \(\d+, \d+\)"),
    ],
)
def test_every_argument_is_checked_before_any_forward_pass(fitted, arguments, match):
    model, posterior, batches = fitted
    bad = [dict(b) for b in batches]
    change = arguments.get("batches")
    if change == "drop input_ids":
        del bad[1]["input_ids"]
    elif change == "float labels":
        bad[1]["labels"] = bad[1]["labels"].float()
    elif change == "labels out of range":
        bad[1]["labels"] = bad[1]["labels"] + 4
    elif change == "short mask":
        bad[1]["attention_mask"] = bad[1]["attention_mask"][:, 1:]
    options = {"batches": bad, "grid": [1.0, 10.0], "num_samples": 2, "seed": 0}
    options.update({k: v for k, v in arguments.items() if k != "batches"})
    if change == []:
        options["batches"] = []
    before = _taus(posterior)
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ConfigurationError, match=match):
        select_prior_precision(posterior, **options)
    hook.remove()
    assert calls == []
    assert _taus(posterior) == before
