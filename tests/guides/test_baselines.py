"""The weight-space baselines (temp-sampling, mc-dropout, swag, ensemble) save, load and resume as
every fitted posterior does (safetensors + JSON)."""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_moe import patch_routers
from pyro_moe.inference.fitting import FittedPosterior, fit
from tests.helpers import ANSWERS, FAMILY_SETUPS, mcqa_batches
from tests.tiny_models import tiny_model

BASELINES = ("temp-sampling", "mc-dropout", "swag", "ensemble")


def fitted(name: str, steps: int, **changes):
    setup = {**FAMILY_SETUPS[name], **changes}
    sites = setup.pop("sites", {"weight": 0.2, "temperature": 0.3})
    handle = patch_routers(tiny_model("granitemoe"), sites, layers=[1], selection=setup.pop("selection", "top-k"))
    return fit(handle, mcqa_batches(), name, answer_token_ids=ANSWERS, steps=steps, lr=0.03, progress=False, **setup)


@pytest.mark.parametrize("name", BASELINES)
def test_a_saved_baseline_loads_and_predicts_the_same(name, tmp_path):
    posterior = fitted(name, steps=24)
    folder = posterior.save(tmp_path / name)
    batch = mcqa_batches(count=1, seed=1)[0]
    pyro.set_rng_seed(3)
    expected = posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=6).probs

    pyro.clear_param_store()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    assert type(loaded.guide.global_guide) is type(posterior.guide.global_guide)
    assert loaded.history == posterior.history
    for (name_a, saved), (name_b, restored) in zip(
        posterior.guide.named_buffers(), loaded.guide.named_buffers(), strict=True
    ):
        assert name_a == name_b and torch.equal(saved, restored)
    pyro.set_rng_seed(3)
    assert torch.equal(loaded.predict(batch["input_ids"], batch["attention_mask"], num_samples=6).probs, expected)


def test_a_resumed_swag_collects_as_an_uninterrupted_run(tmp_path):
    options = {"guide_options": {"swag": {"rank": 2, "burn_in": 2, "every": 2}}}
    straight = fitted("swag", steps=16, **options).guide.global_guide
    pyro.clear_param_store()
    folder = fitted("swag", steps=8, **options).save(tmp_path / "swag")
    pyro.clear_param_store()
    resumed = FittedPosterior.load(folder, tiny_model("granitemoe"))
    resumed.train(mcqa_batches(), steps=8, progress=False)
    swag = resumed.guide.global_guide
    assert int(swag.num_snapshots) == int(straight.num_snapshots) == 7
    for buffer in ("snapshot_mean", "snapshot_variance", "deviations"):
        torch.testing.assert_close(getattr(swag, buffer), getattr(straight, buffer))
