"""``fit`` over every registered guide family, the minibatch estimator, save/load/resume, iwae, bad input."""

from __future__ import annotations

import math
import operator

import pyro
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO
from safetensors.torch import load_file, save_file

from pyro_moe import ConfigurationError, patch_routers
from pyro_moe.guides.family import hooks_of
from pyro_moe.guides.registry import GUIDE_FAMILIES
from pyro_moe.guides.router_guide import RouterGuide
from pyro_moe.inference.checkpoint import CheckpointError
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.svi import NonFiniteError, make_elbo
from pyro_moe.models.expert_patch import patch_experts
from pyro_moe.models.likelihoods import MCQALikelihood
from tests.helpers import ANSWERS, FAMILY_SETUPS, SITES_FOR_SCOPE, mcqa_batches
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("name", sorted(GUIDE_FAMILIES))
def test_every_registered_family_trains_and_predicts(name):
    """Swapping the guide is one word: the same model, data and loop for every family."""
    setup = dict(FAMILY_SETUPS.get(name, {}))
    sites = setup.pop("sites", SITES_FOR_SCOPE[GUIDE_FAMILIES[name].scope])
    if sites == "experts":
        handle = patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=100.0)
    else:
        handle = patch_routers(tiny_model("granitemoe"), sites, layers=[1], selection=setup.pop("selection", "top-k"))
    batches = mcqa_batches()
    posterior = fit(handle, batches, name, answer_token_ids=ANSWERS, steps=24, lr=0.03, progress=False, **setup)
    assert posterior.fitted_post_hoc == GUIDE_FAMILIES[name].post_hoc  # the registry entry says what the part does
    losses = [record["loss"] for record in posterior.history]
    if hooks_of(posterior.guide.global_guide).trains:
        assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    else:
        assert losses == []  # nothing to optimise: no steps
    prediction = posterior.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=3)
    assert prediction.probs.shape == (8, 4)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(8))
    handle.unpatch()


def test_learned_prior_scales_train_and_hierarchical_scales_get_a_guide():
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"logits": {"scale": 1.0, "mode": "learned", "scale_per": "expert"}}, layers=[1])
    fit(handle, mcqa_batches(), "mfvr", answer_token_ids=ANSWERS, steps=10, lr=0.05, progress=False)
    (name,) = [name for name in pyro.get_param_store() if name.endswith("router.logits.prior_scale")]
    learned = pyro.param(name)
    assert learned.shape == (4,) and not torch.allclose(learned, torch.ones(4))
    handle.unpatch()
    pyro.clear_param_store()
    handle = patch_routers(model, {"logits": {"scale": 1.0, "mode": "hierarchical"}}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mean-field+mfvr", answer_token_ids=ANSWERS, steps=3, progress=False)
    assert posterior.guide.global_sites == ["model.layers.1.block_sparse_moe.router.logits_prior_scale"]
    handle.unpatch()


def test_learned_prior_scales_survive_clearing_the_param_store(tmp_path):
    """A live posterior keeps its learned scales through ``pyro.clear_param_store()``: its scales, its
    predictions, the steps it trains afterwards and what it saves are those of a twin fit whose store
    was never cleared (before, the cleared scales came back at their initial value and stopped training)."""
    batches = mcqa_batches()
    sites = {"weight": {"scale": 0.2, "mode": "learned"}, "logits": {"scale": 1.0, "mode": "learned"}}
    runs = []
    for clear in (False, True):
        pyro.clear_param_store()
        handle = patch_routers(tiny_model("granitemoe"), sites, layers=[1])
        posterior = fit(handle, batches, "mean-field+mfvr", answer_token_ids=ANSWERS, steps=6, lr=0.1, progress=False)
        fitted = posterior.prior_scales()
        if clear:
            pyro.clear_param_store()
            assert {site: scale.tolist() for site, scale in posterior.prior_scales().items()} == {
                site: scale.tolist() for site, scale in fitted.items()
            }
        pyro.set_rng_seed(1)
        probs = posterior.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=3).probs
        posterior.train(batches, steps=3, progress=False)
        posterior.save(tmp_path / str(clear))
        runs.append((fitted, probs, posterior.history, posterior.prior_scales()))
        handle.unpatch()
    (fitted, probs, history, scales), (fitted_c, probs_c, history_c, scales_c) = runs
    assert all(not torch.allclose(scale, torch.tensor(0.2)) for scale in fitted.values())  # they did train
    torch.testing.assert_close(probs_c, probs)
    assert [record["loss"] for record in history_c] == pytest.approx([record["loss"] for record in history])
    for site, scale in scales.items():
        torch.testing.assert_close(fitted_c[site], fitted[site])
        torch.testing.assert_close(scales_c[site], scale)
        assert not torch.equal(scale, fitted[site])  # and trained on after the clear
    pyro.clear_param_store()
    loaded = FittedPosterior.load(tmp_path / "True", tiny_model("granitemoe"))
    for site, scale in loaded.prior_scales().items():
        torch.testing.assert_close(scale, scales[site])
    loaded.patch.unpatch()


def test_minibatch_loss_is_an_unbiased_estimate_of_the_full_data_loss():
    model = tiny_model("olmoe")
    handle = patch_routers(model, {"weight": 0.3, "logits": 1.0}, layers=[1])
    batches = mcqa_batches(count=4, size=4)
    full = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
    likelihood = MCQALikelihood(handle, ANSWERS)
    guide = RouterGuide(likelihood, "mean-field+mfvr", {"mfvr": {"init_scale": 0.5}})
    guide.setup(**full, num_examples=16)
    elbo = make_elbo("elbo")
    draws = 40
    with torch.no_grad():
        minibatch = torch.tensor(
            [
                float(elbo.differentiable_loss(likelihood, guide, **batches[i % 4], num_examples=16))
                for i in range(4 * draws)
            ]
        )
        whole = torch.tensor(
            [float(elbo.differentiable_loss(likelihood, guide, **full, num_examples=16)) for _ in range(draws)]
        )
    # each minibatch estimate is unbiased for the full loss; average over the batches' cycle
    per_cycle = minibatch.reshape(draws, 4).mean(1)
    error = math.sqrt(per_cycle.var() / draws + whole.var() / draws)
    assert abs(per_cycle.mean() - whole.mean()) < 4 * error
    handle.unpatch()


def _hf_answer_log_likelihood(model, batches, router_path, weight):
    """``sum_i log p(y_i | x_i)`` of the unpatched HF ``model`` with the router at ``router_path`` set to
    ``weight``: every question alone, its padding stripped, HF's own forward and positions."""
    router = model.get_submodule(router_path)
    original = router.weight.detach().clone()
    total = 0.0
    with torch.no_grad():
        router.weight.copy_(weight)
        for batch in batches:
            for ids, mask, label in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
                logits = model(input_ids=ids[mask.bool()][None]).logits[0, -1, ANSWERS]
                total += float(torch.log_softmax(logits, -1)[label])
        router.weight.copy_(original)
    return total


def test_an_epoch_of_unequal_batches_averages_to_the_full_data_objective():
    """Batches of 8, 8, 8 and 2 rows: the losses of one epoch of the fit loop average to minus the
    full-data log joint ``sum_i log p(y_i | W) + log p(W)`` at the MAP point, computed on the
    unpatched HF model (each question alone) and ``torch.distributions`` (with ``N / B_j`` weights
    the 2-row batch's rows would weigh 3.25 times their share)."""
    model = tiny_model("granitemoe", dtype=torch.float64)
    model.config._experts_implementation = "eager"  # grouped_mm has no float64
    rows = {key: torch.cat([batch[key] for batch in mcqa_batches(count=4, size=8)]) for key in ("input_ids", "labels")}
    rows["attention_mask"] = torch.ones_like(rows["input_ids"])  # float64 HF models give padded rows NaN
    cuts = ((0, 8), (8, 16), (16, 24), (24, 26))
    batches = [{key: value[start:stop] for key, value in rows.items()} for start, stop in cuts]
    handle = patch_routers(model, {"weight": 0.3}, layers=[1])
    posterior = fit(handle, batches, "map", answer_token_ids=ANSWERS, steps=4, lr=0.05, progress=False)  # W leaves W0
    engine, losses = posterior.engine, []

    def record_loss(batch):  # the step's loss at the current W, without a step
        with torch.no_grad():
            losses.append(float(engine.loss(batch)))
        engine.step_count += 1
        return {"step": engine.step_count, "loss": losses[-1], "nll": math.nan, "kl": math.nan, "beta": 1.0}

    engine.step = record_loss
    posterior.train(batches, steps=4, progress=False)  # the second epoch: every batch once
    (site,) = posterior.guide.global_sites
    weight = operator.attrgetter(site)(posterior.guide.global_guide.locs).detach()
    router_path = site.removesuffix(".weight")
    handle.unpatch()
    pretrained = model.get_submodule(router_path).weight.detach()
    log_prior = torch.distributions.Normal(pretrained.double(), 0.3).log_prob(weight.double()).sum()
    full_log_joint = _hf_answer_log_likelihood(model, batches, router_path, weight.double()) + float(log_prior)
    assert len(losses) == 4
    assert sum(losses) / 4 == pytest.approx(-full_log_joint, abs=1e-4)  # the router sites are float32


def test_save_load_predict_reproduces_and_resume_continues_the_curve(tmp_path):
    batches = mcqa_batches()

    def patched():
        pyro.clear_param_store()
        return patch_routers(tiny_model("granitemoe"), {"weight": 0.2, "logits": 1.0}, layers=[1])

    handle = patched()
    straight = fit(handle, batches, "low-rank+mfvr", answer_token_ids=ANSWERS, steps=8, progress=False)
    reference = torch.tensor([record["loss"] for record in straight.history])

    handle = patched()
    first = fit(handle, batches, "low-rank+mfvr", answer_token_ids=ANSWERS, steps=4, progress=False)
    folder = first.save(tmp_path / "fit")
    pyro.set_rng_seed(5)
    expected = first.predict(batches[1]["input_ids"], batches[1]["attention_mask"], num_samples=4).probs

    pyro.clear_param_store()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    pyro.set_rng_seed(5)
    assert torch.equal(
        loaded.predict(batches[1]["input_ids"], batches[1]["attention_mask"], num_samples=4).probs, expected
    )

    pyro.clear_param_store()
    resumed = FittedPosterior.load(folder, tiny_model("granitemoe"))  # restores the random state of the save
    resumed.train(batches, steps=4, progress=False)
    torch.testing.assert_close(torch.tensor([record["loss"] for record in resumed.history]), reference)

    tensors = load_file(folder / "tensors.safetensors")  # checkpoints from before SGD named the state "adam/"
    assert any(key.startswith("optimizer/") for key in tensors)
    save_file(
        {key.replace("optimizer/", "adam/", 1): value for key, value in tensors.items()}, folder / "tensors.safetensors"
    )
    (folder / "manifest.json").unlink()  # as old as that: before manifests, read with a warning
    pyro.clear_param_store()
    with pytest.warns(UserWarning, match="no manifest.json"):
        resumed = FittedPosterior.load(folder, tiny_model("granitemoe"))
    resumed.train(batches, steps=4, progress=False)
    torch.testing.assert_close(torch.tensor([record["loss"] for record in resumed.history]), reference)


def test_iwae_with_the_prior_as_guide_is_the_log_monte_carlo_predictive():
    """alpha = 0, q = p: log w_k = log p(y | l_k), so the bound is log mean_k p(y | l_k) from the same draws."""
    batch = mcqa_batches(count=1)[0]
    model = tiny_model("qwen3_moe")
    handle = patch_routers(model, {"logits": 1.0}, layers=[1])
    likelihood = MCQALikelihood(handle, ANSWERS)
    guide = RouterGuide(likelihood, "mfvr", {"mfvr": {"init_scale": 1.0}})  # zero residual, prior scale: q = p
    guide.setup(**batch)
    with torch.no_grad():
        pyro.set_rng_seed(3)
        loss = make_elbo("iwae", num_particles=5, alpha=0.0).differentiable_loss(likelihood, guide, **batch)
        pyro.set_rng_seed(3)
        from pyro_moe import predict

        sample_probs = predict(
            handle,
            batch["input_ids"],
            batch["attention_mask"],
            answer_token_ids=ANSWERS,
            num_samples=5,
            guide=guide,
            return_samples=True,
        ).sample_probs  # (5, batch, choices)
    log_likelihood = sample_probs.gather(-1, batch["labels"].expand(5, -1).unsqueeze(-1)).log().squeeze(-1)  # (5, B)
    per_example = torch.logsumexp(log_likelihood, 0) - math.log(5)  # log mean_k p(y_i | l_ik), example by example
    torch.testing.assert_close(-loss, per_example.sum(), rtol=1e-5, atol=1e-4)


def test_iwae_with_a_global_site_is_the_joint_bound():
    """A weight site is shared by all examples: the particles are joint draws and the bound is Pyro's RenyiELBO."""
    batch = mcqa_batches(count=1)[0]
    handle = patch_routers(tiny_model("qwen3_moe"), {"weight": 0.2, "logits": 1.0}, layers=[1])
    likelihood = MCQALikelihood(handle, ANSWERS)
    guide = RouterGuide(likelihood, "mean-field+mfvr")
    guide.setup(**batch)
    options = dict(alpha=0.5, num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        pyro.set_rng_seed(5)
        ours = make_elbo("iwae", num_particles=3, alpha=0.5).differentiable_loss(likelihood, guide, **batch)
        pyro.set_rng_seed(5)
        pyros = RenyiELBO(**options).loss(likelihood, guide, **batch)
    torch.testing.assert_close(ours.item(), pyros, rtol=1e-5, atol=1e-3)


def test_iwae_per_example_scales_as_the_minibatch_estimator():
    """With N > B the per-example bound is N / B times the sum of the batch's per-example bounds."""
    batch = mcqa_batches(count=1)[0]
    handle = patch_routers(tiny_model("qwen3_moe"), {"logits": 1.0}, layers=[1])
    likelihood = MCQALikelihood(handle, ANSWERS)
    guide = RouterGuide(likelihood, "mfvr")
    guide.setup(**batch)
    elbo = make_elbo("iwae", num_particles=4)
    with torch.no_grad():
        pyro.set_rng_seed(6)
        alone = elbo.differentiable_loss(likelihood, guide, **batch)
        pyro.set_rng_seed(6)
        scaled = elbo.differentiable_loss(likelihood, guide, **batch, num_examples=5 * len(batch["labels"]))
    torch.testing.assert_close(scaled, 5 * alone, rtol=1e-5, atol=1e-3)


def test_iwae_with_one_particle_is_the_elbo():
    batch = mcqa_batches(count=1)[0]
    model = tiny_model("qwen3_moe")
    handle = patch_routers(model, {"weight": 0.2, "logits": 1.0}, layers=[1])
    likelihood = MCQALikelihood(handle, ANSWERS)
    guide = RouterGuide(likelihood, "mean-field+mfvr")
    guide.setup(**batch)
    trace_elbo = Trace_ELBO(num_particles=1, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        pyro.set_rng_seed(4)
        iwae = make_elbo("iwae", num_particles=1).differentiable_loss(likelihood, guide, **batch)
        pyro.set_rng_seed(4)
        elbo = trace_elbo.differentiable_loss(likelihood, guide, **batch)
    torch.testing.assert_close(iwae, elbo)


def test_non_finite_loss_stops_with_the_step_and_site_and_keeps_the_last_state():
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.2}, layers=[1])
    batches = mcqa_batches()
    posterior = fit(handle, batches, "mean-field", answer_token_ids=ANSWERS, steps=2, progress=False)
    before = {name: value.detach().clone() for name, value in posterior.engine.params.items()}
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(NonFiniteError, match=r"at step 2: .*model site 'answer'"):
        posterior.train(batches, steps=1, progress=False)
    hook.remove()
    for name, value in posterior.engine.params.items():
        assert torch.equal(value.detach(), before[name]), name


@pytest.mark.parametrize(
    ("sites", "guide", "data", "message"),
    [
        (
            {"weight": 0.1},
            "mean-feild",
            None,
            r"unknown guide 'mean-feild'; registered guides: .*mean-field \(global\)",
        ),
        ({"logits": 1.0}, "mean-field", None, r"no family for the logits sites.*the model has no global sites"),
        ({"weight": 0.1}, "mean-field+mfvr", None, r"the model has no logits sites for mfvr"),
        ({"weight": 0.1}, "mean-field", [], r"the data are empty"),
        ({"weight": 0.1}, "mean-field", "bad-labels", r"labels must be integers in \[0, 4\)"),
        ({"weight": 0.1}, "map+mean-field", None, r"two families for the global sites"),
        ({"logits": 1.0, "dropout": 0.1}, "mfvr", None, r"dropout or sample-k without per-token sites"),
    ],
)
def test_bad_input_is_refused_before_training(sites, guide, data, message):
    model = tiny_model("granitemoe")
    handle = patch_routers(model, sites, layers=[1])
    if data is None:
        data = mcqa_batches()
    elif data == "bad-labels":
        data = mcqa_batches()
        data[1]["labels"] = data[1]["labels"] + 3
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ConfigurationError, match=message):
        fit(handle, data, guide, answer_token_ids=ANSWERS, steps=1, progress=False)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert all(param.requires_grad for param in model.parameters())
    handle.unpatch()


def test_bad_training_options_and_tampered_checkpoints(tmp_path):
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.1}, layers=[1])
    with pytest.raises(ConfigurationError, match=r"alpha must be a number in \[0, 1\), got 1.0"):
        fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, objective="iwae", alpha=1.0, progress=False)
    with pytest.raises(ConfigurationError, match=r"unknown objective 'kl'; accepted: elbo, iwae"):
        fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, objective="kl", progress=False)
    posterior = fit(handle, mcqa_batches(), "map", answer_token_ids=ANSWERS, steps=1, progress=False)
    folder = posterior.save(tmp_path / "map")
    handle.unpatch()
    (folder / "tensors.safetensors").write_bytes((folder / "tensors.safetensors").read_bytes()[:50])
    fresh = tiny_model("granitemoe")
    with pytest.raises(CheckpointError, match=r"tensors.safetensors does not match its manifest .*truncated"):
        FittedPosterior.load(folder, fresh)
    assert not any("Bayesian" in type(m).__name__ for m in fresh.modules())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_cuda_moves_model_and_guide():
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.2, "logits": 1.0}, layers=[1])
    posterior = fit(handle, mcqa_batches(), "mean-field+mfvr", answer_token_ids=ANSWERS, steps=3, device="cuda")
    assert all(param.is_cuda for param in posterior.engine.params.values())
    batch = mcqa_batches(count=1)[0]
    assert posterior.predict(batch["input_ids"], batch["attention_mask"], num_samples=2).probs.is_cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resume_on_cuda_continues_the_gpu_random_stream(tmp_path):
    """Per-token logit draws happen on the GPU: the checkpoint keeps its generator's state too."""

    def fitted(steps: int) -> FittedPosterior:
        pyro.clear_param_store()
        handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
        return fit(handle, mcqa_batches(), "mfvr", answer_token_ids=ANSWERS, steps=steps, device="cuda", progress=False)

    reference = [record["loss"] for record in fitted(4).history]
    fitted(2).save(tmp_path / "fit")
    assert "rng/cuda" in load_file(tmp_path / "fit" / "tensors.safetensors")
    pyro.clear_param_store()
    resumed = FittedPosterior.load(tmp_path / "fit", tiny_model("granitemoe").to("cuda"))
    resumed.train(mcqa_batches(), steps=2, progress=False)
    assert [record["loss"] for record in resumed.history] == pytest.approx(reference, rel=1e-6)


def test_fitted_laplace_saves_loads_and_refuses_to_resume(tmp_path):
    batches = mcqa_batches(count=2, size=4)
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, batches, "laplace", answer_token_ids=ANSWERS, steps=20, progress=False)
    folder = posterior.save(tmp_path / "laplace")
    pyro.set_rng_seed(2)
    expected = posterior.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=4).probs
    pyro.clear_param_store()
    loaded = FittedPosterior.load(folder, tiny_model("granitemoe"))
    pyro.set_rng_seed(2)
    assert torch.equal(
        loaded.predict(batches[0]["input_ids"], batches[0]["attention_mask"], num_samples=4).probs, expected
    )
    with pytest.raises(ConfigurationError, match="cannot resume"):
        loaded.train(batches, steps=1, progress=False)


def test_fits_in_one_session_keep_their_own_parameters():
    """Comparing guides in one session: a second fit starts fresh and leaves the first posterior alone."""
    batches = mcqa_batches()
    batch = batches[0]

    def fresh_fit(guide):
        handle = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
        return fit(handle, batches, guide, answer_token_ids=ANSWERS, steps=3, progress=False)

    first = fresh_fit("mfvr")
    pyro.set_rng_seed(9)
    before = first.predict(batch["input_ids"], batch["attention_mask"], num_samples=3).probs
    second = fresh_fit("fcvr")  # a different encoder shape under the same router paths
    third = fresh_fit("mfvr")
    assert third.history[0]["loss"] == pytest.approx(first.history[0]["loss"])  # not warm-started by `first`
    pyro.set_rng_seed(9)
    assert torch.equal(first.predict(batch["input_ids"], batch["attention_mask"], num_samples=3).probs, before)
    assert math.isfinite(second.history[-1]["loss"])  # the differently shaped second guide trained


def test_fcvr_stays_finite_with_more_experts():
    handle = patch_routers(tiny_model("deepseek_v3"), {"logits": 1.0})  # 8 experts, two MoE layers
    posterior = fit(
        handle, mcqa_batches(), "fcvr", answer_token_ids=ANSWERS, steps=12, num_particles=3, lr=0.03, progress=False
    )
    losses = torch.tensor([record["loss"] for record in posterior.history])
    assert torch.isfinite(losses).all() and losses.min() > 0  # N * NLL + KL: no collapse of the Cholesky factor
