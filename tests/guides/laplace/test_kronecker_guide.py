"""The kron-laplace and expert-laplace families through ``fit``: sites, draws, prediction, ArviZ export,
save/load, evidence, bad input; and expert Laplace against the MAP on the embedded benchmark."""

from __future__ import annotations

import copy

import pyro
import pytest
import torch
from pyro import poutine
from torch.func import functional_call, jacrev
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

from pyro_moe import at_prior_mean, fit, patch_routers, predict
from pyro_moe.core.readout import last_token_logits
from pyro_moe.data import mcqa_batches
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import expected_calibration_error, negative_log_likelihood
from pyro_moe.experiments.benchmark_model import load_benchmark
from pyro_moe.guides.laplace.kronecker_guide import KroneckerLaplaceGuide
from pyro_moe.guides.laplace.linearized_predictive import linearized_predict
from pyro_moe.guides.laplace.prior_precision import select_prior_precision
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.models.expert_patch import patch_experts
from tests.helpers import ANSWERS
from tests.helpers import mcqa_batches as tiny_batches
from tests.tiny_models import tiny_model

SITE = "model.layers.1.block_sparse_moe.experts.down_proj"


def test_expert_sites_at_their_prior_mean_are_the_hf_model_and_unpatch_restores_it():
    model = tiny_model("mixtral")
    batch = tiny_batches(1)[0]
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    handle = patch_experts(model, layers=[1], prior_precision=4.0)
    trace = poutine.trace(model).get_trace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    site = trace.nodes["model.layers.1.mlp.experts.down_proj"]
    assert site["value"].shape == model.model.layers[1].mlp.experts.down_proj.shape
    torch.testing.assert_close(site["fn"].base_dist.scale.max(), torch.tensor(0.5))
    with at_prior_mean():
        patched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(patched, reference)
    handle.unpatch()
    assert "forward" not in model.model.layers[1].mlp.experts.__dict__
    torch.testing.assert_close(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, reference
    )


def test_model_average_runs_each_draw_on_its_copy_of_the_batch():
    """S folded draws in one pass give what S separate passes with those weights give."""
    model = tiny_model("granitemoe")
    batch = tiny_batches(1, size=3)[0]
    handle = patch_experts(model, layers=[1], prior_precision=400.0)
    draws = torch.randn(3, 1, *model.model.layers[1].block_sparse_moe.experts.down_proj.shape) * 0.05
    with pyro.plate("samples", 3, dim=-2), poutine.condition(data={SITE: draws}):
        folded = last_token_logits(model, batch["input_ids"], batch["attention_mask"])
    for s in range(3):
        with poutine.condition(data={SITE: draws[s, 0]}):
            alone = last_token_logits(model, batch["input_ids"], batch["attention_mask"])[0]
        torch.testing.assert_close(folded[s], alone, rtol=1e-5, atol=1e-5)
    handle.unpatch()


def test_expert_laplace_fit_predicts_saves_loads_and_optimises_the_evidence(tmp_path):
    model = tiny_model("granitemoe")
    batches = tiny_batches()
    handle = patch_experts(model, layers=[1], prior_precision=50.0, prior_mean="zero")
    options = {"expert-laplace": {"rank": 6, "fisher": "exact", "optimize_prior": "layer"}}
    posterior = fit(handle, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, guide_options=options)
    guide = posterior.guide.global_guide
    assert isinstance(guide, KroneckerLaplaceGuide) and posterior.guide.global_sites == [SITE]
    (laplace,) = guide.posteriors().values()
    assert laplace.input_vectors.shape == (4, 48, 6) and laplace.output_vectors.shape == (4, 32, 6)
    torch.testing.assert_close(laplace.mean.float(), model.model.layers[1].block_sparse_moe.experts.down_proj)
    tau = guide.prior_precisions()[SITE]
    best = guide.log_evidence()
    for factor in (1.1, 1 / 1.1):  # the chosen tau is a maximum of the evidence
        guide.set_prior_precision({SITE: tau * factor})
        assert guide.log_evidence() < best
    guide.set_prior_precision({SITE: tau})
    prior_scale = handle.expert_sites[SITE.removesuffix(".down_proj")].prior().base_dist.scale  # the model follows
    torch.testing.assert_close(prior_scale.max().double(), tau.max().rsqrt(), rtol=1e-6, atol=0)
    with pyro.plate("samples", 5, dim=-2):
        draws = poutine.trace(guide).get_trace().nodes[SITE]["value"]
    assert draws.shape == (5, 1, 4, 32, 48)
    first = batches[0]
    pyro.set_rng_seed(3)
    prediction = posterior.predict(first["input_ids"], first["attention_mask"], num_samples=4, return_samples=True)
    assert prediction.sample_probs.shape == (4, 8, 4) and prediction.sample_probs.std(0).max() > 0
    posterior.save(tmp_path / "fit")
    handle.unpatch()
    loaded = FittedPosterior.load(tmp_path / "fit", tiny_model("granitemoe"))
    assert loaded.guide.global_guide.log_evidence() == pytest.approx(best)
    loaded_scale = loaded.patch.expert_sites[SITE.removesuffix(".down_proj")].prior().base_dist.scale
    torch.testing.assert_close(loaded_scale, prior_scale)  # the model's prior as fitted, not as first patched
    pyro.set_rng_seed(3)
    again = loaded.predict(first["input_ids"], first["attention_mask"], num_samples=4, return_samples=True)
    torch.testing.assert_close(again.sample_probs, prediction.sample_probs)
    loaded.patch.unpatch()


def test_kron_laplace_on_router_weights_is_a_global_family_like_any_other():
    """MAP by SVI, then the Kronecker Laplace at the mode, drawn like any global guide's sites."""
    model = tiny_model("olmoe")
    batches = tiny_batches()
    handle = patch_routers(model, {"weight": 0.3}, layers=[0, 1])
    posterior = fit(handle, batches, "kron-laplace", answer_token_ids=ANSWERS, steps=6, lr=0.03, progress=False)
    guide = posterior.guide.global_guide
    assert isinstance(guide, KroneckerLaplaceGuide)
    assert sorted(guide.site_names) == sorted(posterior.guide.global_sites)
    for name, laplace in guide.posteriors().items():
        torch.testing.assert_close(laplace.prior_precision, torch.full((1,), 0.3**-2, dtype=torch.float64))
        assert laplace.mean.shape == (1, 8, 32) and not torch.equal(laplace.mean, laplace.prior_mean)
        with pytest.raises(ConfigurationError, match="router prior"):
            guide.set_prior_precision({name: 1.0})
    first = batches[0]
    prediction = posterior.predict(first["input_ids"], first["attention_mask"], num_samples=3)
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(8))
    with pyro.plate("samples", 6, dim=-2):
        trace = poutine.trace(posterior.guide.global_guide).get_trace()
    for name in guide.site_names:
        assert trace.nodes[name]["value"].shape == (6, 1, 8, 32)
        assert trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"]).shape == (6, 1)
    handle.unpatch()


def test_bad_input():
    model = tiny_model("granitemoe")
    batches = tiny_batches(1)
    handle = patch_routers(model, {"weight": 0.3, "logits": 1.0}, layers=[1])
    with pytest.raises(ConfigurationError, match="steps must be a positive integer"):  # the mfvr part trains
        fit(handle, batches, "kron-laplace+mfvr", answer_token_ids=ANSWERS, steps=0, progress=False)
    handle.unpatch()
    pyro.clear_param_store()
    handle = patch_routers(model, {"weight": 0.3, "temperature": 0.3}, layers=[1])
    with pytest.raises(ConfigurationError, match="kron-laplace covers router weight"):
        fit(handle, batches, "kron-laplace", answer_token_ids=ANSWERS, steps=5, progress=False)
    handle.unpatch()
    pyro.clear_param_store()
    handle = patch_routers(model, {"weight": 0.3}, layers=[1])
    with pytest.raises(ConfigurationError, match="expert-laplace covers expert down_proj"):
        fit(handle, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="Normal prior"):
        handle = patch_routers(model, {"weight": {"family": "laplace", "scale": 0.1}}, layers=[1])
        fit(handle, batches, "kron-laplace", answer_token_ids=ANSWERS, steps=5, progress=False)
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="fixed prior scale"):
        handle = patch_routers(model, {"weight": {"scale": 0.1, "mode": "learned"}}, layers=[1])
        fit(handle, batches, "kron-laplace", answer_token_ids=ANSWERS, steps=5, progress=False)
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="optimize_prior is for expert-laplace"):
        handle = patch_routers(model, {"weight": 0.1}, layers=[1])
        options = {"kron-laplace": {"optimize_prior": "layer"}}
        fit(handle, batches, "kron-laplace", answer_token_ids=ANSWERS, steps=5, guide_options=options)
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="steps must be a positive integer"):
        fit(patch_routers(model, {"weight": 0.3}, layers=[1]), batches, "map", answer_token_ids=ANSWERS, steps=0)
    inputs = {"input_ids": batches[0]["input_ids"], "attention_mask": batches[0]["attention_mask"]}
    for options, match in (({"rank": 0}, "rank"), ({"fisher": "hessian"}, "Fisher"), ({"optimize_prior": "x"}, "opt")):
        model = tiny_model("granitemoe")
        reference = model(**inputs).logits  # the HF model before patching
        handle = patch_experts(model, layers=[1])
        with pytest.raises(ConfigurationError, match=match):
            fit(
                handle,
                batches,
                "expert-laplace",
                answer_token_ids=ANSWERS,
                steps=0,
                guide_options={"expert-laplace": options},
            )
        # a refused fit leaves the model as it was: patched, at its prior mean the HF model; unpatched, the HF model
        assert handle.active and "forward" in model.model.layers[1].block_sparse_moe.experts.__dict__
        with at_prior_mean():
            torch.testing.assert_close(model(**inputs).logits, reference)
        handle.unpatch()
        assert "forward" not in model.model.layers[1].block_sparse_moe.experts.__dict__
        torch.testing.assert_close(model(**inputs).logits, reference)
    with pytest.raises(ConfigurationError, match="prior_precision"):
        patch_experts(tiny_model("granitemoe"), prior_precision=0.0)
    handle = patch_experts(tiny_model("granitemoe"), layers=[1])
    with pytest.raises(ConfigurationError, match="model-average"):
        predict(handle, batches[0]["input_ids"], answer_token_ids=ANSWERS, num_samples=3, mode="routing-average")
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="grows without bound"):
        handle = patch_experts(model, layers=[1])
        fit(
            handle,
            batches,
            "expert-laplace",
            answer_token_ids=ANSWERS,
            steps=0,
            progress=False,
            guide_options={"expert-laplace": {"optimize_prior": "layer"}},
        )


def test_expert_laplace_lowers_nll_and_ece_against_the_map_on_the_benchmark():
    """Calibration split: curvature and the prior precision (validation NLL); a test slice: held-out figures."""
    benchmark = load_benchmark()
    model, tokenizer, answers = benchmark.model, benchmark.tokenizer, benchmark.answer_token_ids
    calibration = list(mcqa_batches(benchmark.benchmark.splits["calibration"][:200], tokenizer, 100))
    test = list(mcqa_batches(benchmark.benchmark.splits["test"][:300], tokenizer, 150))
    labels = torch.cat([batch["labels"] for batch in test])
    with torch.no_grad():
        map_probs = torch.cat(
            [last_token_logits(model, b["input_ids"], b["attention_mask"])[0, :, answers].softmax(-1) for b in test]
        )
    handle = patch_experts(model, layers=[-1])
    options = {"expert-laplace": {"rank": 10}}
    posterior = fit(handle, calibration, "expert-laplace", answer_token_ids=answers, steps=0, guide_options=options)
    tau, scores = select_prior_precision(posterior, calibration, grid=[3.0, 10.0, 30.0, 100.0], num_samples=8)
    assert scores[tau] == min(scores.values())
    pyro.set_rng_seed(0)
    probs = torch.cat([posterior.predict(b["input_ids"], b["attention_mask"], num_samples=16).probs for b in test])
    handle.unpatch()
    assert negative_log_likelihood(probs, labels) < negative_log_likelihood(map_probs, labels)
    assert expected_calibration_error(probs, labels, 15) < expected_calibration_error(map_probs, labels, 15)


def small_granite() -> GraniteMoeForCausalLM:
    """Hidden 16, intermediate 12, 2 layers, 4 experts, float64, eager: dense covariances stay small."""
    config = GraniteMoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    model = GraniteMoeForCausalLM(config).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.block_sparse_moe.router.weight.normal_(0.0, 0.5)
            layer.block_sparse_moe.experts.down_proj.normal_(0.0, 0.3)
    return model


def test_linearized_predictive_covariance_equals_the_dense_jacobian_sandwich():
    """J Sigma J^T from torch.func's Jacobian of the answer logits and the dense posterior covariance."""
    model = small_granite()
    reference = copy.deepcopy(model)
    batches = [{k: v for k, v in b.items()} for b in tiny_batches(2, size=3)]
    for batch in batches:
        batch["attention_mask"][:] = 1
    handle = patch_experts(model, layers="all", prior_precision=3.0)
    options = {"expert-laplace": {"rank": 4, "fisher": "exact", "tokens": "all"}}
    posterior = fit(handle, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, guide_options=options)
    batch = batches[0]
    prediction = linearized_predict(posterior, batch["input_ids"], batch["attention_mask"])
    names = posterior.guide.global_guide.site_names
    weights = {name: reference.get_submodule(name.removesuffix(".down_proj")).down_proj.detach() for name in names}

    def answer_logits(*values):
        out = functional_call(reference, dict(zip(names, values, strict=True)), (batch["input_ids"],))
        return out.logits[:, -1, ANSWERS]

    jacobians = jacrev(answer_logits, argnums=tuple(range(len(names))))(*weights.values())  # per site (B, C, E, H, I)

    def sandwich() -> torch.Tensor:
        """``J Sigma J^T`` ``(B, C, C)`` with the dense covariance of the current posteriors."""
        expected = torch.zeros(3, 4, 4, dtype=torch.float64)
        for name, jacobian in zip(names, jacobians, strict=True):
            precision = posterior.guide.global_guide.posteriors()[name].dense_precision()  # (E, HI, HI)
            flat = jacobian.reshape(3 * 4, 4, -1).transpose(0, 1)  # (E, B*C, HI)
            solved = torch.linalg.solve(precision, flat.transpose(1, 2))  # (E, HI, B*C)
            expected += (flat @ solved).sum(0).reshape(3, 4, 3, 4).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        return expected

    expected = sandwich()
    torch.testing.assert_close(prediction.covariance, expected, rtol=1e-8, atol=1e-12)
    variance = expected.diagonal(dim1=-2, dim2=-1)
    probit = torch.softmax(answer_logits(*weights.values()) / (1 + torch.pi / 8 * variance).sqrt(), -1)
    torch.testing.assert_close(prediction.probs, probit.float())
    # "mc": the mean softmax over N(f, J Sigma J^T), against 800,000 draws of the dense reference covariance
    # (a wide prior, tau = 1e-4, so that the logits' spread moves the answer probabilities)
    posterior.guide.global_guide.set_prior_precision(dict.fromkeys(names, 1e-4))
    expected = sandwich()
    mc = linearized_predict(posterior, batch["input_ids"], batch["attention_mask"], link="mc", num_samples=200_000)
    values, vectors = torch.linalg.eigh(expected)  # (B, C), (B, C, C)
    noise = torch.randn(800_000, 3, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    draws = answer_logits(*weights.values()) + (vectors @ (values.clamp_min(0).sqrt()[..., None] * noise)).squeeze(-1)
    softmaxes = draws.softmax(-1)  # (S, B, C)
    standard_error = softmaxes.std(0) * (1 / 200_000 + 1 / 800_000) ** 0.5
    assert float(((mc.probs.double() - softmaxes.mean(0)).abs() / standard_error).max()) < 5.0
    # the draws matter: the reference is away from the softmax at the mean by many standard errors
    plain = answer_logits(*weights.values()).softmax(-1)
    assert float(((plain - softmaxes.mean(0)).abs() / standard_error).max()) > 30.0
    handle.unpatch()


def test_linearized_predict_refuses_bad_num_samples_and_seed_before_any_forward_pass():
    model = small_granite()
    batch = dict(tiny_batches(1, size=2)[0])
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])  # eager attention: no padding
    handle = patch_experts(model, layers=[1], prior_precision=3.0)
    posterior = fit(handle, [batch], "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    for options, match in (
        ({"num_samples": 0}, "num_samples must be a positive integer, got 0"),
        ({"num_samples": -3}, "num_samples must be a positive integer"),
        ({"num_samples": 2.5}, "num_samples must be a positive integer"),
        ({"num_samples": True}, "num_samples must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": "0"}, "seed must be a non-negative integer"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            linearized_predict(posterior, batch["input_ids"], batch["attention_mask"], link="mc", **options)
    assert calls == []
    hook.remove()
    handle.unpatch()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mc_samples": 0}, "mc_samples must be a positive integer, got 0"),
        ({"mc_samples": 1.5}, "mc_samples must be a positive integer"),
        ({"mc_samples": True}, "mc_samples must be a positive integer"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"tokens": "first"}, "token selections"),
        ({"ranks": 4}, r"unknown kron-laplace option\(s\) \['ranks'\]; accepted: rank, fisher, tokens, mc_samples"),
        ({"optimize_prior": "layer"}, "optimize_prior is for expert-laplace"),
    ],
)
def test_kronecker_options_are_refused_before_the_map_stage_runs(options, match):
    model = tiny_model("granitemoe")
    batches = tiny_batches(1)
    handle = patch_routers(model, {"weight": 0.3}, layers=[1])
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ConfigurationError, match=match):
        fit(
            handle,
            batches,
            "kron-laplace",
            answer_token_ids=ANSWERS,
            steps=3,
            progress=False,
            guide_options={"kron-laplace": options},
        )
    assert calls == []  # refused when the guide is built, before RouterGuide.setup's trace of the sites
    hook.remove()
    handle.unpatch()


def test_expert_laplace_refuses_an_unknown_option_by_name_before_any_forward_pass():
    model = tiny_model("granitemoe")
    handle = patch_experts(model, layers=[1])
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    options = {"expert-laplace": {"rank": 4, "prior_precision": 3.0}}
    with pytest.raises(ConfigurationError, match=r"unknown expert-laplace option\(s\) \['prior_precision'\]; accepted"):
        fit(handle, tiny_batches(1), "expert-laplace", answer_token_ids=ANSWERS, steps=0, guide_options=options)
    assert calls == []
    hook.remove()
    handle.unpatch()


def test_kron_laplace_refuses_sample_k_selection_before_the_map_stage_runs():
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.3}, layers=[1], selection="sample-k")
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ConfigurationError, match=r"deterministic expert selection.*Sample-K.*selection='top-k'"):
        fit(handle, tiny_batches(1), "kron-laplace", answer_token_ids=ANSWERS, steps=3, progress=False)
    assert calls == [1, 1]  # RouterGuide.setup's trace of the sites and the guide's prototype trace; no SVI step
    hook.remove()
    handle.unpatch()


def test_kron_laplace_refuses_router_dropout_before_the_map_stage_runs():
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"weight": 0.3, "dropout": 0.2}, layers=[1])
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ConfigurationError, match=r"deterministic router input.*dropout=0.2.*'dropout' option"):
        fit(handle, tiny_batches(1), "kron-laplace", answer_token_ids=ANSWERS, steps=3, progress=False)
    assert calls == [1, 1]  # RouterGuide.setup's trace of the sites and the guide's prototype trace; no SVI step
    hook.remove()
    handle.unpatch()


@pytest.mark.parametrize("per", ["layer", "expert", "model"])
def test_the_optimised_prior_precision_is_the_argmax_of_the_reported_evidence_with_unrouted_experts(per):
    """Top-2 of 4 experts at 2 last tokens: some experts get no token. Those are left out of both the
    optimiser and log_evidence(), so a grid of the reported evidence around the chosen tau peaks there."""
    model = tiny_model("granitemoe")
    batches = [{key: value[:2] for key, value in tiny_batches(1)[0].items()}]
    handle = patch_experts(model, layers=[1], prior_precision=50.0, prior_mean="zero")
    options = {"expert-laplace": {"fisher": "exact", "optimize_prior": per}}
    posterior = fit(handle, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, guide_options=options)
    guide = posterior.guide.global_guide
    (laplace,) = guide.posteriors().values()
    unrouted = laplace.input_values.abs().amax(-1).eq(0)  # A = 0: no token reached the expert
    assert unrouted.any() and not unrouted.all()
    tau = guide.prior_precisions()[SITE].clone()
    best = guide.log_evidence()
    blocks = [slice(b, b + 1) for b in range(4) if not unrouted[b]] if per == "expert" else [slice(None)]
    for block in blocks:
        for factor in torch.logspace(-1, 1, 21, dtype=torch.float64).tolist():
            moved = tau.clone()
            moved[block] = moved[block] * factor
            guide.set_prior_precision({SITE: moved})
            assert guide.log_evidence() <= best + 1e-9
    guide.set_prior_precision({SITE: tau})
    handle.unpatch()
