"""Expert sites and router logit sites in one patch, and ``expert-laplace+mfvr``: the combined fit against the
two fitted by hand on separate patches (the mfvr on a logits-only patch, the expert Laplace on an experts-only
patch), save/load, and bad combinations refused before the model changes."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

from pyro_moe import at_prior_mean, fit, patch_routers
from pyro_moe.core.readout import last_token_logits
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context
from pyro_moe.errors import ConfigurationError, LayerSelectionError
from pyro_moe.guides.amortized import AmortizedLogitGuide
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.models.bayesian_router import BayesianRouter, RouterSites
from pyro_moe.models.expert_patch import ExpertSites, patch_experts
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model

EXPERTS = "model.layers.1.block_sparse_moe.experts"
ROUTERS = [f"model.layers.{i}.block_sparse_moe.router" for i in (0, 1)]
LAPLACE = {"rank": 6, "fisher": "exact"}  # deterministic curvature: no MC labels to line up


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _combined(model, **options):
    return patch_experts(model, layers=[1], prior_precision=50.0, router_sites={"logits": 1.0}, **options)


def test_one_patch_holds_expert_and_logit_sites_and_unpatch_restores_the_model_bitwise():
    model = tiny_model("granitemoe")
    batch = mcqa_batches(1)[0]
    reference, state = _logits(model, batch), {k: v.clone() for k, v in model.state_dict().items()}
    routers = [model.get_submodule(path) for path in ROUTERS]
    handle = _combined(model, router_layers="all")
    assert handle.site_names == [f"{ROUTERS[0]}.logits", f"{ROUTERS[1]}.logits", f"{EXPERTS}.down_proj"]
    trace = poutine.trace(model).get_trace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert [n for n, s in trace.nodes.items() if s["type"] == "sample" and not n.endswith(".tokens")] == (
        handle.site_names
    )
    assert trace.nodes[f"{ROUTERS[0]}.logits"]["value"].shape == (8 * 6, 4)
    with at_prior_mean():  # every site at its prior mean: the HF model
        torch.testing.assert_close(_logits(model, batch), reference)
    with pytest.raises(ConfigurationError, match="already carries ExpertPatch"):  # a second patch would fold twice
        patch_experts(model, layers=[0])
    handle.unpatch()
    assert [model.get_submodule(path) for path in ROUTERS] == routers and "forward" not in vars(
        model.get_submodule(EXPERTS)
    )
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(_logits(model, batch), reference)
    patch_routers(model, {"logits": 1.0}).unpatch()  # unpatched: free for another patch
    experts_only = patch_experts(model, layers=[1])
    with pytest.raises(ConfigurationError, match="already carries ExpertPatch"):  # its routers are the model's
        patch_routers(model, {"logits": 1.0}, layers=[0])
    experts_only.unpatch()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"router_sites": {"logits": 1.0, "dropout": 0.1}}, ConfigurationError, "MC dropout and Sample-K"),
        ({"router_sites": RouterSites.parse({"logits": 1.0}, "sample-k")}, ConfigurationError, "selection='sample-k'"),
        ({"router_sites": {"logits": 1.0}, "router_layers": [5]}, LayerSelectionError, "out of range"),
        ({"router_layers": [0]}, ConfigurationError, "router_layers go with router_sites"),
        ({"router_sites": {"logit": 1.0}}, ConfigurationError, "unknown site kind"),
        ({"router_sites": {"logits": 1.0}, "sites": ExpertSites()}, ConfigurationError, "either in sites"),
        ({"sites": {"experts": {}, "routers": {"sites": {"logits": 1.0}, "rate": 1}}}, ConfigurationError, "'rate'"),
    ],
)
def test_bad_combinations_are_refused_before_the_model_changes(options, error, match):
    model = tiny_model("granitemoe")
    with pytest.raises(error, match=match):
        patch_experts(model, layers=[1], **options)
    assert "forward" not in vars(model.get_submodule(EXPERTS))
    assert not any(isinstance(model.get_submodule(path), BayesianRouter) for path in ROUTERS)
    patch_experts(model, layers=[1]).unpatch()  # no patch was claimed


def test_expert_laplace_without_a_logit_family_names_the_accepted_guides_before_any_work():
    model = tiny_model("granitemoe")
    batch = mcqa_batches(1)[0]
    handle = _combined(model)
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    accepted = r"'expert-laplace\+fcvr', 'expert-laplace\+low-rank-logits', 'expert-laplace\+mfvr'"
    with pytest.raises(ConfigurationError, match=rf"no family for the logits sites \(accepted: {accepted}\)"):
        fit(handle, [batch], "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    with pytest.raises(ConfigurationError, match="steps must be a positive integer"):  # the mfvr part trains
        fit(handle, [batch], "expert-laplace+mfvr", answer_token_ids=ANSWERS, steps=0, progress=False)
    # the sites' trace; then the sites' trace and the MAP part's prototype: no SVI step, no curvature
    assert calls == [1, 1, 1]
    hook.remove()
    assert handle.active  # a refused fit leaves the patch as it was given
    handle.unpatch()
    assert "forward" not in vars(model.get_submodule(EXPERTS))


class _SameStart:
    """Records the first mfvr part built (its encoders and the random state right after) and gives them to
    the second: the two fits then start their SVI steps from the same parameters and random stream."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.start: tuple[dict, torch.Tensor] | None = None
        build = AmortizedLogitGuide.__init__

        def recorded(guide, *args, **kwargs):
            build(guide, *args, **kwargs)
            if self.start is None:
                self.start = ({k: v.clone() for k, v in guide.state_dict().items()}, torch.get_rng_state())
            else:
                guide.load_state_dict(self.start[0])
                torch.set_rng_state(self.start[1])

        monkeypatch.setattr(AmortizedLogitGuide, "__init__", recorded)


def test_the_combined_fit_is_the_two_fitted_by_hand_and_predicts_with_their_joint_draws(monkeypatch, tmp_path):
    batches = mcqa_batches()
    first = batches[0]
    same_start = _SameStart(monkeypatch)
    training = {"steps": 6, "lr": 0.1, "seed": 4, "progress": False}
    combined_model = tiny_model("granitemoe")
    handle = _combined(combined_model, router_layers="all")
    options = {"expert-laplace": LAPLACE}
    combined = fit(handle, batches, "expert-laplace+mfvr", answer_token_ids=ANSWERS, guide_options=options, **training)
    # by hand: the mfvr on a logits-only patch, the expert Laplace (post hoc, steps=0) on an experts-only patch
    mfvr = fit(
        patch_routers(tiny_model("granitemoe"), {"logits": 1.0}), batches, "mfvr", answer_token_ids=ANSWERS, **training
    )
    experts = patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=50.0)
    laplace = fit(experts, batches, "expert-laplace", answer_token_ids=ANSWERS, steps=0, guide_options=options)
    assert same_start.start is not None
    # the logit part: trained with the experts held at their weights, it is the mfvr fitted by hand
    by_hand = mfvr.guide.local_guide.logits.state_dict()
    trained = combined.guide.local_guide.logits.state_dict()
    assert any(not torch.equal(trained[k], same_start.start[0][k]) for k in trained)  # it did train
    for key, value in by_hand.items():
        assert torch.equal(trained[key], value), key
    # the expert part: the Laplace at the weights, curvature with the logits at W u (the HF routing)
    (mean,) = [p.mean for p in combined.guide.global_guide.posteriors().values()]
    assert torch.equal(mean.float(), combined_model.get_submodule(EXPERTS).down_proj)  # the steps left it there
    ours = combined.guide.global_guide.posteriors()[f"{EXPERTS}.down_proj"]
    theirs = laplace.guide.global_guide.posteriors()[f"{EXPERTS}.down_proj"]
    for field in ("input_values", "output_values", "prior_precision"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=1e-5, atol=1e-8)
    for field in ("input_vectors", "output_vectors"):  # eigenvectors up to sign
        torch.testing.assert_close(getattr(ours, field).abs(), getattr(theirs, field).abs(), rtol=1e-4, atol=1e-6)
    # prediction: S joint draws, experts from the Laplace and logits from the amortized guide, on a fresh
    # combined patch built by hand from the two parts (same order of draws: the experts, then the logits)
    pyro.set_rng_seed(11)
    prediction = combined.predict(first["input_ids"], first["attention_mask"], num_samples=5, return_samples=True)
    assert prediction.sample_probs.std(0).max() > 1e-3  # the draws differ
    reference_model = tiny_model("granitemoe")
    reference = _combined(reference_model, router_layers="all")
    pyro.set_rng_seed(11)
    with routing_context(mode="model-average"), pyro.plate("samples", 5, dim=PARTICLE_DIM):
        draws = poutine.trace(laplace.guide.global_guide).get_trace().nodes[f"{EXPERTS}.down_proj"]["value"]
        with (
            poutine.condition(data={f"{EXPERTS}.down_proj": draws}),
            routing_context(local_guide=mfvr.guide.local_guide),
        ):
            answers = last_token_logits(reference_model, first["input_ids"], first["attention_mask"])[..., ANSWERS]
    torch.testing.assert_close(prediction.sample_probs, answers.softmax(-1), rtol=1e-4, atol=1e-5)
    reference.unpatch()
    # save and load on a fresh model: the same patch, the same predictions under the same seed, bit for bit
    combined.save(tmp_path / "fit")
    handle.unpatch()
    loaded = FittedPosterior.load(tmp_path / "fit", tiny_model("granitemoe"))
    assert loaded.patch.site_names == handle.site_names and loaded.patch.sites == handle.sites
    pyro.set_rng_seed(11)
    again = loaded.predict(first["input_ids"], first["attention_mask"], num_samples=5, return_samples=True)
    assert torch.equal(again.sample_probs, prediction.sample_probs)
    loaded.patch.unpatch()
