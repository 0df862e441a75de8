"""Recipes by name: the registry, its checks, and ``run_recipe`` = select, patch with learned scales, fit,
calibrate, each step the library's own function on the same inputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from pyro_moe import ConfigurationError
from pyro_moe.errors import LayerSelectionError
from pyro_moe.guides.registry import parse_guide
from pyro_moe.inference.callbacks import EvaluationCallback
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.recipe_fit import RecipeFit, run_recipe
from pyro_moe.inference.recipes import RECIPES, Recipe, named_recipe
from pyro_moe.inference.selection import select_prior
from pyro_moe.models.bayesian_router import BayesianRouter
from pyro_moe.models.router_patch import patch_routers
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

TRAIN = mcqa_batches(count=4, size=8, seed=0)
CALIBRATION = mcqa_batches(count=3, size=8, seed=1)
QUICK = dict(steps=6, seed=2)


def quick(name: str) -> Recipe:
    """A registered recipe with few steps and draws (the tests' budget)."""
    recipe = named_recipe(name).with_training(**QUICK)
    return dataclasses.replace(
        recipe, scale_grid=(0.3, 1.0, 3.0), selection_samples=2, calibration_samples=2, evaluate_every=2
    )


def test_the_registry_holds_an_iwae_recipe_per_logit_family_and_scale_sharing():
    assert set(RECIPES) == {
        f"{family}-iwae-{per}" for family in ("mfvr", "fcvr", "low-rank-logits") for per in ("layer", "expert")
    }
    for name, recipe in RECIPES.items():
        assert recipe.name == name and recipe.calibrate
        assert parse_guide(recipe.guide)  # a registered guide family
        assert recipe.training.objective == "iwae" and recipe.training.num_particles > 1
        assert name.endswith(recipe.scale_per)


def test_an_unknown_recipe_is_refused_with_the_registered_names():
    with pytest.raises(ConfigurationError, match=r"unknown recipe 'mfvr-elbo'; registered recipes: mfvr-iwae-layer, "):
        named_recipe("mfvr-elbo")
    model = tiny_model("granitemoe")
    with pytest.raises(ConfigurationError, match="unknown recipe"):
        run_recipe(model, "nope", TRAIN, CALIBRATION, answer_token_ids=ANSWERS)


def test_bad_recipes_are_refused_when_built_and_bad_runs_before_any_work(monkeypatch):
    with pytest.raises(ConfigurationError, match="scale_grid must hold distinct scales"):
        Recipe("r", "mfvr", "d", scale_grid=(1.0, 1.0))
    with pytest.raises(ConfigurationError, match=r"scale_grid\[0\] must be a positive number"):
        Recipe("r", "mfvr", "d", scale_grid=(0.0,))
    with pytest.raises(ConfigurationError, match="other than init_scale"):
        Recipe("r", "mfvr", "d", guide_options={"init_scale": 2.0})
    with pytest.raises(ConfigurationError, match="training must be TrainingOptions"):
        Recipe("r", "mfvr", "d", training={"steps": 3})
    with pytest.raises(ConfigurationError, match="name must be a non-empty string"):
        Recipe(" ", "mfvr", "d")
    with pytest.raises(ConfigurationError, match=r"unknown training option\(s\) \['step'\]"):
        named_recipe("mfvr-iwae-layer").with_training(step=3)
    with pytest.raises(ConfigurationError, match="needs at least 1 step"):
        named_recipe("mfvr-iwae-layer").with_training(steps=0)

    import pyro_moe.inference.fitting as fitting
    import pyro_moe.inference.selection as selection

    work = []
    monkeypatch.setattr(selection, "predict", lambda *a, **k: work.append("predict"))
    monkeypatch.setattr(fitting.FittedPosterior, "train", lambda *a, **k: work.append("train"))
    model = tiny_model("granitemoe")
    with pytest.raises(ConfigurationError, match="unknown guide 'nfvr'"):
        run_recipe(model, Recipe("r", "nfvr", "d"), TRAIN, CALIBRATION, answer_token_ids=ANSWERS)
    with pytest.raises(ConfigurationError, match="does not cover the per-token logit sites"):
        run_recipe(model, Recipe("r", "mean-field", "d"), TRAIN, CALIBRATION, answer_token_ids=ANSWERS)
    with pytest.raises(ConfigurationError, match="prior scale 'per' must be one of layer, expert"):
        run_recipe(model, Recipe("r", "mfvr", "d", scale_per="token"), TRAIN, CALIBRATION, answer_token_ids=ANSWERS)
    with pytest.raises(ConfigurationError, match="the data are empty"):
        run_recipe(model, quick("mfvr-iwae-layer"), TRAIN, [], answer_token_ids=ANSWERS)
    wrong = [{**TRAIN[0], "labels": TRAIN[0]["labels"] + 4}]
    with pytest.raises(ConfigurationError, match="labels must be integers"):
        run_recipe(model, quick("mfvr-iwae-layer"), wrong, CALIBRATION, answer_token_ids=ANSWERS)
    with pytest.raises(LayerSelectionError, match="out of range"):
        run_recipe(model, quick("mfvr-iwae-layer"), TRAIN, CALIBRATION, answer_token_ids=ANSWERS, layers=[7])
    assert work == []
    assert not any(isinstance(module, BayesianRouter) for module in model.modules())


@pytest.mark.parametrize("name", ["mfvr-iwae-expert", "low-rank-logits-iwae-layer"])
def test_a_recipe_is_the_selection_then_a_learned_scale_fit_from_there_then_calibration(name):
    recipe = quick(name)
    model = tiny_model("granitemoe")
    reference = copy.deepcopy(model)
    result = run_recipe(model, recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, layer_candidates=["all", [1]])

    # 1. the selection is select_prior on the calibration batches with the recipe's grid, draws, seed and objective
    expected = select_prior(
        reference,
        CALIBRATION,
        answer_token_ids=ANSWERS,
        scales=recipe.scale_grid,
        layer_sets=["all", [1]],
        num_samples=recipe.selection_samples,
        seed=recipe.training.seed,
        objective=recipe.selection,
    )
    assert result.selection.scores == expected.scores and result.selection.chosen == expected.chosen
    chosen = expected.chosen

    # 2.-3. the fit is pyro_moe.fit of learned scales starting at the chosen scale, the guide at the prior,
    # the calibration NLL checked every 2 steps and the best step kept: a recipe that calibrates ranks the
    # steps by the calibrated NLL it ends with
    posterior = result.posterior
    assert posterior.patch.model is model and posterior.config["guide"] == recipe.guide
    assert posterior.config["layers"] == ([0, 1] if chosen.layers == "all" else list(chosen.layers))
    sites = {"logits": {"scale": chosen.scale, "mode": "learned", "scale_per": recipe.scale_per}}
    checks = EvaluationCallback(
        CALIBRATION, every=2, num_samples=2, keep_best=True, seed=recipe.training.seed, calibrated=recipe.calibrate
    )
    assert recipe.calibrate
    by_hand = fit(
        patch_routers(reference, sites, layers=chosen.layers),
        TRAIN,
        recipe.guide,
        answer_token_ids=ANSWERS,
        training=recipe.training,
        guide_options={recipe.guide: {"init_scale": chosen.scale}},
        progress=False,
        callback=checks,
    )
    assert [r["loss"] for r in posterior.history] == pytest.approx([r["loss"] for r in by_hand.history], rel=1e-5)
    assert list(result.calibration_nll) == [2, 4, 6]
    assert result.calibration_nll == pytest.approx(checks.values, rel=1e-5) and result.best_step == checks.best_step
    scales = posterior.prior_scales()
    for site, scale in by_hand.prior_scales().items():
        torch.testing.assert_close(scales[site], scale)
        assert scale.shape == ((4,) if recipe.scale_per == "expert" else ())

    # the trajectory starts at the chosen scale, moves, and passes through the kept scales at the best step
    trajectory = result.scale_trajectory
    assert list(trajectory) == list(range(recipe.training.steps + 1))
    for site, scale in scales.items():
        assert trajectory[0][site] == (scale.numel() * [chosen.scale] if scale.dim() else chosen.scale)
        assert torch.tensor(trajectory[result.best_step][site]) == pytest.approx(scale)
        moved = torch.tensor(trajectory[recipe.training.steps][site])
        assert not torch.allclose(moved, torch.full_like(moved, chosen.scale))  # the scales trained

    # 4. calibration of both modes, as calibrate on the calibration batches gives it
    assert set(posterior.calibration) == {"model-average", "routing-average"}
    for mode, scaling in posterior.calibration.items():
        again = by_hand.calibrate(CALIBRATION, mode=mode, num_samples=2, seed=recipe.training.seed)
        assert again.temperature == pytest.approx(scaling.temperature, rel=1e-4)
    assert posterior.config["recipe"] == {"name": name, "selection": expected.to_json(), "best_step": result.best_step}
    json.dumps(result.to_json())  # JSON-ready
    assert result.scale_drift() > 0
    posterior.patch.unpatch()
    assert not any(isinstance(module, BayesianRouter) for module in model.modules())


def test_the_starting_scale_and_grid_are_options_of_the_run(monkeypatch):
    recipe = quick("mfvr-iwae-layer")
    fixed = run_recipe(tiny_model("granitemoe"), recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, scale=0.7)
    assert [candidate.scale for candidate in fixed.selection.scores] == [0.7] and fixed.selection.chosen.scale == 0.7
    assert {scale for scale in fixed.scale_trajectory[0].values()} == {0.7}  # the fit starts there
    grid = run_recipe(
        tiny_model("granitemoe"), recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, scale_grid=(0.4, 0.9)
    )
    assert [candidate.scale for candidate in grid.selection.scores] == [0.4, 0.9]

    # the selection objective by name, on the run or the recipe
    model, reference = tiny_model("granitemoe"), tiny_model("granitemoe")
    calibrated = run_recipe(
        model, recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, scale_grid=(0.4, 0.9), selection="calibrated"
    )
    expected = select_prior(
        reference,
        CALIBRATION,
        answer_token_ids=ANSWERS,
        scales=(0.4, 0.9),
        num_samples=recipe.selection_samples,
        seed=recipe.training.seed,
        objective="calibrated",
    )
    assert calibrated.selection == expected and calibrated.selection.objective == "calibrated"
    assert calibrated.posterior.config["recipe"]["selection"]["objective"] == "calibrated"
    assert dataclasses.replace(recipe, selection="calibrated").to_json()["selection"] == "calibrated"
    with pytest.raises(
        ConfigurationError, match=r"unknown selection objective 'nll'; accepted: \['raw', 'calibrated'\]"
    ):
        dataclasses.replace(recipe, selection="nll")

    import pyro_moe.inference.selection as selection

    monkeypatch.setattr(selection, "predict", lambda *a, **k: pytest.fail("predicted before the check"))
    model = tiny_model("granitemoe")
    with pytest.raises(ConfigurationError, match=r"give scale .* or scale_grid .*, not both"):
        run_recipe(model, recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, scale=0.7, scale_grid=(0.4,))
    with pytest.raises(ConfigurationError, match="scale must be a positive number, got -1"):
        run_recipe(model, recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, scale=-1.0)
    with pytest.raises(ConfigurationError, match=r"scales\[1\] must be a positive number"):
        run_recipe(model, recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, scale_grid=(0.4, 0.0))
    assert not any(isinstance(module, BayesianRouter) for module in model.modules())


def test_a_saved_recipe_posterior_loads_calibrated_with_its_recipe(tmp_path):
    model = tiny_model("granitemoe")
    fresh = copy.deepcopy(model)
    result = run_recipe(model, quick("fcvr-iwae-layer"), TRAIN, CALIBRATION, answer_token_ids=ANSWERS, progress=False)
    result.posterior.save(tmp_path / "posterior")
    loaded = FittedPosterior.load(tmp_path / "posterior", fresh)
    assert loaded.calibration == result.posterior.calibration
    assert loaded.config["recipe"] == result.posterior.config["recipe"]
    for site, scale in result.posterior.prior_scales().items():
        torch.testing.assert_close(loaded.prior_scales()[site], scale)


def test_a_recipe_without_calibration_leaves_the_posterior_uncalibrated():
    recipe = dataclasses.replace(quick("mfvr-iwae-layer"), calibrate=False)
    result = run_recipe(tiny_model("granitemoe"), recipe, TRAIN, CALIBRATION, answer_token_ids=ANSWERS, layers=[1])
    assert result.posterior.calibration == {}
    assert result.to_json()["temperatures"] == {}


def test_the_registry_imports_without_torch():
    """The command line checks --recipe names at parsing, before torch loads."""
    script = (
        "import sys\n"
        "from pyro_moe.inference.recipes import RECIPES, named_recipe\n"
        "named_recipe('mfvr-iwae-layer')\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'torch', 'pyro', 'transformers', 'numpy'}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr
    assert isinstance(RECIPES["mfvr-iwae-layer"].training, TrainingOptions)


def test_the_scale_drift_compares_window_means_of_the_last_two_quarters():
    steady = {step: {"a": 2.0, "b": [1.0, 3.0]} for step in range(0, 101, 10)}
    assert RecipeFit(named_recipe("mfvr-iwae-layer"), None, None, steady, {}, 0).scale_drift() == 0.0
    rising = {step: {"a": 1.0 + step / 100, "b": [1.0, 1.0 + step / 50]} for step in range(0, 101, 10)}
    # last quarter: steps 80, 90, 100; the quarter before: 60, 70
    expected = max((1 + 0.9) / (1 + 0.65) - 1, (1 + 1.8) / (1 + 1.3) - 1)
    assert RecipeFit(named_recipe("mfvr-iwae-layer"), None, None, rising, {}, 0).scale_drift() == pytest.approx(
        expected
    )
    with pytest.raises(ConfigurationError, match="fraction must be a number in"):
        RecipeFit(named_recipe("mfvr-iwae-layer"), None, None, rising, {}, 0).scale_drift(0.75)
