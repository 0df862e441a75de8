"""The training progress bar shows the terms each registered objective has, and no NaN (the iwae bound
has no KL term: it showed ``kl=nan``)."""

from __future__ import annotations

import math
import re

import pytest

from pyro_moe import patch_routers
from pyro_moe.inference.fitting import fit
from pyro_moe.inference.options import Objective
from pyro_moe.inference.svi import OBJECTIVE_TERMS
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

RECORD_TERMS = ("loss", "kl", "nll")
"""The terms of a step's record that a bar may show."""


def test_every_objective_says_which_terms_it_has():
    assert set(OBJECTIVE_TERMS) == set(Objective)  # a new objective must say what its bar shows
    for objective, terms in OBJECTIVE_TERMS.items():
        assert "loss" in terms and set(terms) <= set(RECORD_TERMS), objective


@pytest.mark.parametrize("objective", list(Objective))
def test_the_bar_shows_the_finite_terms_of_the_record(objective, capsys):
    handle = patch_routers(tiny_model("granitemoe"), "logits", layers=[1])
    posterior = fit(
        handle,
        mcqa_batches(count=2),
        "mfvr",
        answer_token_ids=ANSWERS,
        steps=3,
        objective=objective.value,
        num_particles=2,
        progress=True,
    )
    handle.unpatch()
    bar = capsys.readouterr().err.split("\r")[-1]  # the bar's last redraw, after the last step
    shown = dict(re.findall(r"(\w+)=([^,\]\s]+)", bar))
    record = posterior.history[-1]
    assert set(shown) == {name for name in RECORD_TERMS if math.isfinite(record[name])}, bar
    assert "nan" not in bar.lower()
    for name, text in shown.items():
        assert float(text) == pytest.approx(record[name], rel=5e-3), (name, bar)
