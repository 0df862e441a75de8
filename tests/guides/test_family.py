"""A new posterior family is one module and one registration line: a post-hoc family written here
(a MAP by SVI, then an isotropic Gaussian of fixed scale around it) trains, fits post hoc, predicts,
saves, loads and exports through the same calls as the built-in ones, with no change elsewhere."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoContinuous, init_to_mean
from torch import Tensor, nn

from pyro_moe import (
    ConfigurationError,
    FittedPosterior,
    GuideFamily,
    GuideScope,
    PosteriorPart,
    fit,
    patch_routers,
    register_guide,
)
from pyro_moe.diagnostics.draws import draw_global_sites, fit_parameters
from pyro_moe.guides.family import PostHocData
from pyro_moe.guides.registry import GUIDE_FAMILIES
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

SCALE = 0.07


class IsotropicGaussian(AutoContinuous, PosteriorPart):
    """``N(loc, s^2 I)`` over the unconstrained global sites, ``loc`` a buffer."""

    def __init__(self, model: Any, loc: Tensor, scale: float) -> None:
        super().__init__(model)
        self.register_buffer("fitted_loc", loc)
        self.scale = scale

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        return dist.Normal(self.fitted_loc, self.scale).to_event(1)

    def fitted_metadata(self) -> dict[str, Any]:
        return {"scale": self.scale}


class IsotropicLaplace(AutoContinuous, PosteriorPart):
    """A MAP by SVI, then post hoc ``N(MAP, s^2 I)``."""

    post_hoc = True

    def __init__(self, model: Any, scale: float = SCALE) -> None:
        super().__init__(model, init_loc_fn=init_to_mean)
        self.scale = scale

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.loc = nn.Parameter(self._init_loc())

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        return dist.Delta(self.loc, event_dim=1)

    def _gaussian(self, data: PostHocData, loc: Tensor, scale: float) -> IsotropicGaussian:
        gaussian = IsotropicGaussian(data.global_model, loc, scale)
        gaussian._setup_prototype(**data.batches[0], num_examples=data.num_examples)
        return gaussian

    def finish_fit(self, data: PostHocData) -> IsotropicGaussian:
        return self._gaussian(data, self.loc.detach().clone(), self.scale)

    def restore_fitted(self, buffers: Mapping[str, Tensor], metadata: Mapping[str, Any], data: PostHocData):
        return self._gaussian(data, buffers["fitted_loc"], metadata["scale"])


@pytest.fixture
def isotropic_family():
    register_guide(GuideFamily("isotropic-laplace", GuideScope.GLOBAL, IsotropicLaplace, "MAP plus fixed noise"))
    yield
    del GUIDE_FAMILIES["isotropic-laplace"]


def test_a_family_written_outside_the_library_fits_post_hoc_saves_loads_and_exports(isotropic_family, tmp_path):
    batches = mcqa_batches()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, batches, "isotropic-laplace", answer_token_ids=ANSWERS, steps=6, lr=0.03, progress=False)
    fitted = posterior.guide.global_guide
    assert isinstance(fitted, IsotropicGaussian) and posterior.fitted_post_hoc and len(posterior.history) == 6

    with fit_parameters(posterior):
        draws = draw_global_sites(posterior, 4000, batches[0]["input_ids"], batches[0]["attention_mask"])
    (name,) = draws.values
    weight = draws.values[name].reshape(4000, -1)
    torch.testing.assert_close(weight.std(0), torch.full_like(weight[0], SCALE), atol=0.006, rtol=0)
    torch.testing.assert_close(weight.mean(0), fitted.fitted_loc, atol=0.006, rtol=0)

    pyro.set_rng_seed(3)
    before = posterior.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=4).probs
    folder = posterior.save(tmp_path / "isotropic")
    handle.unpatch()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    assert isinstance(loaded.guide.global_guide, IsotropicGaussian) and loaded.guide.global_guide.scale == SCALE
    pyro.set_rng_seed(3)
    after = loaded.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=4).probs
    torch.testing.assert_close(after, before)
    with pytest.raises(ConfigurationError, match="fitted post hoc"):
        loaded.train(batches, 2)


def test_a_post_hoc_family_takes_zero_steps_and_others_do_not(isotropic_family):
    batches = mcqa_batches()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, batches, "isotropic-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    assert posterior.history == [] and isinstance(posterior.guide.global_guide, IsotropicGaussian)
    handle.unpatch()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    with pytest.raises(ConfigurationError, match="steps must be a positive integer, got 0"):
        fit(handle, batches, "map", answer_token_ids=ANSWERS, steps=0, progress=False)
