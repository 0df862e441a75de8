"""Hierarchical prior scales (``mode: "hierarchical"``) with every registered family: their hyperprior
sites ``<site>_prior_scale`` are global sites like any other, fitted, drawn and exported, or refused by
name, before any work, by a global family that cannot carry them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro
import pytest
import torch
from safetensors.torch import load_file, save_file

from pyro_moe import ConfigurationError, FittedPosterior, fit, patch_routers
from pyro_moe.diagnostics.arviz_export import to_inference_data
from pyro_moe.diagnostics.draws import draw_global_sites
from pyro_moe.guides.family import GuideScope
from pyro_moe.guides.registry import GUIDE_FAMILIES
from pyro_moe.models.expert_patch import patch_experts
from pyro_moe.models.priors import hyperprior_site_name
from tests.helpers import ANSWERS, FAMILY_SETUPS, SITES_FOR_SCOPE, mcqa_batches
from tests.tiny_models import tiny_model

SITE_KINDS = ("weight", "logits", "temperature")


def _hierarchical(sites: Mapping[str, Any] | list[str]) -> dict[str, Any]:
    """``sites`` with every prior scale hierarchical (other options, e.g. ``dropout``, kept)."""
    sites = {kind: None for kind in sites} if isinstance(sites, list) else dict(sites)
    hierarchical = {}
    for kind, options in sites.items():
        if kind not in SITE_KINDS:
            hierarchical[kind] = options
        elif isinstance(options, Mapping):
            hierarchical[kind] = {**options, "mode": "hierarchical"}
        else:
            hierarchical[kind] = {"scale": 0.3 if options is None else options, "mode": "hierarchical"}
    return hierarchical


def _hierarchical_fit_setup(name: str) -> tuple[Any, str, dict[str, Any]]:
    """The patch, the guide and the fit options of family ``name`` with hierarchical prior scales; a
    per-token family gets ``mean-field`` for the hyperprior sites (they are global)."""
    family = GUIDE_FAMILIES[name]
    setup = dict(FAMILY_SETUPS.get(name, {}))
    sites = setup.pop("sites", SITES_FOR_SCOPE[family.scope])
    selection = setup.pop("selection", "top-k")
    guide = name if family.scope is GuideScope.GLOBAL else f"mean-field+{name}"
    if sites == "experts":  # the expert sites' prior is a fixed precision: hierarchical router sites beside them
        patch = patch_experts(
            tiny_model("granitemoe"), layers=[1], prior_precision=100.0, router_sites=_hierarchical({"logits": 1.0})
        )
        return patch, f"{name}+mfvr", setup
    return patch_routers(tiny_model("granitemoe"), _hierarchical(sites), layers=[1], selection=selection), guide, setup


@pytest.mark.parametrize("name", sorted(GUIDE_FAMILIES))
def test_hierarchical_prior_scales_fit_with_every_family_or_are_refused_by_name(name):
    patch, guide, setup = _hierarchical_fit_setup(name)
    hyperpriors = [hyperprior_site_name(site) for site in patch.site_names]
    batches = mcqa_batches()
    refusal = GUIDE_FAMILIES[guide.split("+")[0]].hierarchical_refusal
    if refusal is not None:
        with pytest.raises(
            ConfigurationError, match=rf"'{name}' cannot carry hierarchical prior scales .*_prior_scale"
        ):
            fit(patch, batches, guide, answer_token_ids=ANSWERS, steps=24, progress=False, **setup)
        assert not list(pyro.get_param_store())  # refused before any guide parameter exists
        patch.unpatch()
        return
    posterior = fit(patch, batches, guide, answer_token_ids=ANSWERS, steps=24, lr=0.03, progress=False, **setup)
    carried = [site for site in posterior.guide.global_sites if site in hyperpriors]
    assert carried and set(carried) <= set(hyperprior_site_name(site) for site in patch.site_names)
    draws = draw_global_sites(posterior, 4, batches[0]["input_ids"], batches[0]["attention_mask"]).values
    for site in carried:
        assert torch.all(draws[site] > 0) and torch.isfinite(draws[site]).all()
    prediction = posterior.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=3)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(8))
    patch.unpatch()


def test_a_hierarchical_scale_exports_as_its_kind_prior_scale_next_to_its_site():
    patch = patch_routers(tiny_model("granitemoe"), {"weight": {"scale": 0.2, "mode": "hierarchical"}}, layers=[1])
    posterior = fit(patch, mcqa_batches(), "map", answer_token_ids=ANSWERS, steps=3, progress=False)
    data = to_inference_data(posterior, num_draws=2)
    assert data.posterior["weight_prior_scale"].dims == ("chain", "draw", "layer")
    assert data.posterior["weight"].shape == (1, 2, 1, 4, 32)
    patch.unpatch()


def test_a_checkpoint_with_the_old_hyperprior_names_loads(tmp_path):
    """Checkpoints written when the hyperprior sites were ``<site>.prior_scale`` load and predict as saved."""
    batches = mcqa_batches()
    sites = {"logits": {"scale": 1.0, "mode": "hierarchical"}, "weight": {"scale": 0.2, "mode": "learned"}}
    patch = patch_routers(tiny_model("granitemoe"), sites, layers=[1])
    posterior = fit(patch, batches, "mean-field+mfvr", answer_token_ids=ANSWERS, steps=3, progress=False)
    posterior.save(tmp_path)
    pyro.set_rng_seed(3)
    saved = posterior.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=4).probs
    patch.unpatch()
    tensors = load_file(tmp_path / "tensors.safetensors")
    old = {key.replace("logits_prior_scale", "logits.prior_scale"): value for key, value in tensors.items()}
    assert sum(key.endswith("logits.prior_scale") for key in old) == 2  # the guide's loc and scale
    save_file(old, tmp_path / "tensors.safetensors")
    (tmp_path / "manifest.json").unlink()  # such checkpoints predate manifests too
    with pytest.warns(UserWarning, match="no manifest"):
        loaded = FittedPosterior.load(tmp_path, tiny_model("granitemoe"))
    pyro.set_rng_seed(3)
    again = loaded.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=4).probs
    torch.testing.assert_close(again, saved)
    loaded.patch.unpatch()
