"""``generate``: against HF's own ``generate``, against no-cache recomputations of the whole prefix with
the recorded draws, against ``predict`` on the first position, and its stops, padding and refusals."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger

from pyro_moe import ConfigurationError, at_prior_mean, fit, generate, patch_experts, patch_routers, predict
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context
from pyro_moe.models import RouterSites
from pyro_moe.models.priors import PriorScale, SitePrior
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import FAMILIES, TINY_VOCAB_SIZE, tiny_model

NEW = 5


class DrawRecorder(Messenger):
    """Every value the named sample sites take, one dict per forward pass (each pass declares each site once)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names, self.passes = names, []

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] not in self.names:
            return
        if not self.passes or msg["name"] in self.passes[-1]:
            self.passes.append({})
        self.passes[-1][msg["name"]] = msg["value"].detach().clone()


def point_mass(centre: torch.Tensor, scale: torch.Tensor) -> dist.Delta:
    """A prior with zero scale: all its mass at its centre."""
    return dist.Delta(centre)


def categorical_figures(sample_probs: torch.Tensor, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference figures from torch.distributions: ``sample_probs`` ``(S, batch, vocab)``, ``chosen`` ``(batch,)``."""
    mean = sample_probs.mean(0)
    predictive = torch.distributions.Categorical(probs=mean).entropy()
    expected = torch.distributions.Categorical(probs=sample_probs).entropy().mean(0)
    return {
        "token_probs": mean.gather(-1, chosen.unsqueeze(-1)).squeeze(-1),
        "predictive_entropy": predictive,
        "expected_entropy": expected,
        "mutual_information": predictive - expected,
    }


def full_distributions(generation, position: int) -> torch.Tensor:
    """Every sample's whole next-token distribution ``(S, batch, vocab)`` at ``position`` from its top-k = vocab."""
    probs, ids = generation.sample_top_k_probs[:, :, position], generation.sample_top_k_ids[:, :, position]
    return torch.zeros_like(probs).scatter(-1, ids, probs)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_at_the_prior_mean_equals_hf_generate(family, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family)
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False)
    with patch_routers(model, {"logits": 2.0, "weight": 0.3, "temperature": 0.5}) as handle, at_prior_mean():
        for mode in ("model-average", "routing-average"):
            generation = generate(handle, input_ids, attention_mask, max_new_tokens=NEW, num_samples=3, mode=mode)
            assert torch.equal(generation.tokens, expected[:, input_ids.shape[1] :]), mode
            assert torch.allclose(generation.mutual_information, torch.zeros(()), atol=1e-5)


@pytest.mark.parametrize("family", ["granitemoe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_one_sample_with_zero_prior_scales_equals_hf_generate(family, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family)
    expected = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=NEW, do_sample=False)
    zero = SitePrior(point_mass, PriorScale(1.0))
    with patch_routers(model, RouterSites(weight=zero, logits=zero, temperature=zero)) as handle:
        generation = generate(handle, input_ids, attention_mask, max_new_tokens=NEW, num_samples=1)
    assert torch.equal(generation.tokens, expected[:, input_ids.shape[1] :])
    assert torch.equal(generation.stopped, (generation.tokens == model.generation_config.eos_token_id).any(-1))


def recompute_without_cache(handle, recorder, generation, prompt, mode, step, local):
    """Every sample's next-token distribution at ``step`` from one no-cache pass over the whole prefix,
    the global sites at their first recorded draws, the ``local`` (per-token) sites at the recorded draws of
    every position."""
    input_ids, attention_mask = prompt
    batch = input_ids.shape[0]
    ids = torch.cat([input_ids, generation.tokens[:, :step]], -1)
    mask = torch.cat([attention_mask, torch.ones_like(generation.tokens[:, :step])], -1)
    values = dict(recorder.passes[0])
    for name in local:
        parts = [p[name].unflatten(1, (batch, -1)) for p in recorder.passes[: step + 1]]
        values[name] = torch.cat(parts, 2).flatten(1, 2)
    samples = values[recorder.names[0]].shape[0]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with (
        routing_context(mode=mode, local_reparameterization=False),
        pyro.plate("samples", samples, dim=PARTICLE_DIM),
        poutine.condition(data=values),
        torch.no_grad(),
    ):
        logits = handle.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return torch.softmax(logits[:, -1].unflatten(0, (-1, batch)), -1)


@pytest.mark.parametrize(
    ("family", "sites", "mode", "layers"),
    [
        ("granitemoe", {"weight": 0.5, "temperature": {"per": "token", "scale": 0.5}}, "model-average", "all"),
        ("qwen3_moe", {"logits": 2.0, "temperature": {"per": "expert", "scale": 0.5}}, "model-average", "all"),
        # the dense and MoE layers in front of the Bayesian one run once for all samples, their cache unfolded
        ("qwen2_moe", {"logits": 2.0, "weight": 0.3}, "model-average", [2]),
        ("mixtral", {"weight": 0.5, "temperature": {"per": "token", "scale": 0.5}}, "routing-average", "all"),
        # caches of other kinds: linear attention and Mamba states, sliding windows, latent attention
        ("granitemoehybrid", {"logits": 2.0}, "model-average", "all"),
        ("qwen3_next", {"logits": 2.0}, "model-average", [1]),
        ("minimax", {"weight": 0.5}, "model-average", "all"),
        ("gpt_oss", {"logits": 2.0}, "model-average", "all"),
        ("deepseek_v3", {"logits": 2.0}, "model-average", [2]),
    ],
)
def test_cached_steps_equal_no_cache_recomputation_with_the_same_draws(family, sites, mode, layers, batch):
    model = tiny_model(family)
    handle = patch_routers(model, sites, layers=layers)
    recorder = DrawRecorder(handle.site_names)
    kinds = RouterSites.parse(sites).local_kinds
    with recorder:
        generation = generate(
            handle,
            *batch,
            max_new_tokens=NEW,
            num_samples=3,
            mode=mode,
            top_k_per_sample=TINY_VOCAB_SIZE,
            local_reparameterization=False,
        )
    assert len(recorder.passes) == generation.tokens.shape[1] == NEW
    for step in range(NEW):
        local = [name for name in handle.site_names if name.rpartition(".")[2] in kinds]
        reference = recompute_without_cache(handle, recorder, generation, batch, mode, step, local)
        torch.testing.assert_close(full_distributions(generation, step), reference, atol=1e-5, rtol=0)
        figures = categorical_figures(reference, generation.tokens[:, step])
        live = generation.generated_mask[:, step]  # a row that stopped has zeros
        for name, value in figures.items():
            torch.testing.assert_close(getattr(generation, name)[:, step], value * live, atol=1e-5, rtol=0)
    # global draws: one per sample, held along the sequence; per-token draws: new at every position
    for name in handle.site_names:
        values = [p[name] for p in recorder.passes]
        if name.rpartition(".")[2] in kinds:
            assert not torch.equal(values[1].unflatten(1, (3, -1))[:, :, -1], values[2].unflatten(1, (3, -1))[:, :, -1])
        else:
            assert all(torch.equal(v, values[0]) for v in values)
            assert not torch.equal(values[0][0], values[0][1])  # the samples differ


def test_expert_weights_are_held_and_cached_steps_equal_recomputation(batch):
    handle = patch_experts(tiny_model("qwen2_moe"), layers=[-1], prior_precision=30.0, router_sites={"logits": 2.0})
    recorder = DrawRecorder(handle.site_names)
    with recorder:
        generation = generate(handle, *batch, max_new_tokens=3, num_samples=2, top_k_per_sample=TINY_VOCAB_SIZE)
    local = [name for name in handle.site_names if name.endswith(".logits")]
    experts = [name for name in handle.site_names if name.endswith(".down_proj")]
    assert len(experts) == 1 and local
    for step in range(3):
        reference = recompute_without_cache(handle, recorder, generation, batch, "model-average", step, local)
        torch.testing.assert_close(full_distributions(generation, step), reference, atol=1e-5, rtol=0)
    draws = [p[experts[0]] for p in recorder.passes]
    assert all(torch.equal(draw, draws[0]) for draw in draws) and not torch.equal(draws[0][0], draws[0][1])


def test_model_average_has_mutual_information_and_routing_average_none(batch):
    handle = patch_routers(tiny_model("olmoe"), {"logits": 3.0})
    averaged = generate(handle, *batch, max_new_tokens=3, num_samples=4, seed=0)
    routed = generate(handle, *batch, max_new_tokens=3, num_samples=4, mode="routing-average", seed=0)
    assert (averaged.mutual_information > 0).all()
    assert averaged.sample_top_k_probs is None
    torch.testing.assert_close(routed.mutual_information, torch.zeros_like(routed.mutual_information))
    torch.testing.assert_close(routed.expected_entropy, routed.predictive_entropy)
    torch.testing.assert_close(averaged.max_mutual_information, averaged.mutual_information.amax(-1))
    torch.testing.assert_close(averaged.mean_mutual_information, averaged.mutual_information.mean(-1))
    torch.testing.assert_close(averaged.log_prob_sum, averaged.token_probs.log().sum(-1))


@pytest.mark.parametrize("mode", ["model-average", "routing-average"])
def test_first_position_answer_letters_equal_predict_for_the_same_draws(mode, batch):
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.5, "logits": 2.0})
    pyro.set_rng_seed(5)
    prediction = predict(handle, *batch, answer_token_ids=ANSWERS, num_samples=4, mode=mode, return_samples=True)
    generation = generate(handle, *batch, max_new_tokens=2, num_samples=4, mode=mode, seed=5, top_k_per_sample=64)
    letters = full_distributions(generation, 0)[..., ANSWERS]
    letters = letters / letters.sum(-1, keepdim=True)
    torch.testing.assert_close(letters, prediction.sample_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(letters.mean(0), prediction.probs, atol=1e-5, rtol=0)


def test_fitted_posterior_holds_its_draws_per_pass_and_matches_its_predict(batch):
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.3, "logits": 1.0})
    posterior = fit(handle, mcqa_batches(2, 4), "mean-field+mfvr", answer_token_ids=ANSWERS, steps=2, progress=False)
    pyro.set_rng_seed(2)
    prediction = posterior.predict(*batch, num_samples=3, max_samples_per_pass=2, return_samples=True)
    recorder = DrawRecorder(handle.site_names)
    with recorder:
        generation = posterior.generate(
            *batch, max_new_tokens=3, num_samples=3, max_samples_per_pass=2, seed=2, top_k_per_sample=64
        )
    letters = full_distributions(generation, 0)[..., ANSWERS]
    torch.testing.assert_close(letters / letters.sum(-1, keepdim=True), prediction.sample_probs, atol=1e-5, rtol=0)
    weight = handle.site_names[0]
    assert weight.endswith(".weight")
    chunks = [p[weight] for p in recorder.passes]  # passes of 2 and 1 samples alternate
    assert [len(v) for v in chunks] == [2, 1] * 3
    assert all(torch.equal(v, chunks[i % 2]) for i, v in enumerate(chunks))
    assert not torch.equal(chunks[0][0], chunks[0][1])


class Tokens:
    """Decodes ids as ``<id>`` words, so that a stop string ``<id>`` is met exactly where the id is."""

    def decode(self, token_ids: list[int]) -> str:
        return "".join(f"<{token}>" for token in token_ids)


def test_eos_and_stop_strings_end_rows_and_pad_them(batch):
    handle = patch_routers(tiny_model("mixtral"), {"logits": 1.0})
    options = dict(max_new_tokens=NEW, num_samples=2)
    with at_prior_mean():
        free = generate(handle, *batch, **options, eos_token_id=[])
        eos, stop = int(free.tokens[0, 1]), int(free.tokens[1, 2])
        ended = generate(handle, *batch, **options, eos_token_id=eos)
        stopped = generate(handle, *batch, **options, eos_token_id=[], stop_strings=[f"<{stop}>"], tokenizer=Tokens())
    assert not free.stopped.any() and free.generated_mask.all()
    for generation, token in ((ended, eos), (stopped, stop)):
        for row in range(3):
            hits = (free.tokens[row] == token).nonzero().flatten().tolist()
            length = hits[0] + 1 if hits else NEW
            assert int(generation.lengths[row]) == length and bool(generation.stopped[row]) == bool(hits)
            assert torch.equal(generation.tokens[row, :length], free.tokens[row, :length])
            assert (generation.tokens[row, length:] == 0).all()  # the model's pad id
            assert (generation.predictive_entropy[row, length:] == 0).all()
            assert not generation.generated_mask[row, length:].any()
    assert ended.lengths[0] == 2 and stopped.lengths[1] <= 3


def test_a_row_generates_the_same_alone_as_in_a_left_padded_batch(batch):
    input_ids, attention_mask = batch
    handle = patch_routers(tiny_model("qwen2_moe"), {"logits": 2.0})
    with at_prior_mean():
        together = generate(handle, input_ids, attention_mask, max_new_tokens=NEW, num_samples=2, eos_token_id=[])
        for row in range(3):
            real = attention_mask[row].bool()
            alone = generate(handle, input_ids[row : row + 1, real], max_new_tokens=NEW, num_samples=2, eos_token_id=[])
            assert torch.equal(alone.tokens[0], together.tokens[row])
            torch.testing.assert_close(alone.predictive_entropy[0], together.predictive_entropy[row], atol=1e-5, rtol=0)


def test_sampling_is_seeded_and_leaves_the_callers_streams_alone(batch):
    handle = patch_routers(tiny_model("granitemoe"), {"logits": 2.0})
    options = dict(max_new_tokens=NEW, num_samples=2, do_sample=True, temperature=1.5, seed=11, eos_token_id=[])
    torch.manual_seed(0)
    first = generate(handle, *batch, **options)
    after = torch.rand(3)
    torch.manual_seed(0)
    second = generate(handle, *batch, **options)
    assert torch.equal(first.tokens, second.tokens) and torch.equal(torch.rand(3), after)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)
    with at_prior_mean():  # the same distributions however the tokens are drawn
        nucleus = generate(handle, *batch, **{**options, "top_p": 1e-6})  # only the most probable token is left
        greedy = generate(handle, *batch, **{**options, "do_sample": False})
    assert torch.equal(nucleus.tokens, greedy.tokens)


def refusals(handle, batch):
    right = batch[1].flip(-1)
    return {
        "no patch": dict(patch=handle.model),
        "S < 1": dict(num_samples=0),
        "unknown mode": dict(mode="average"),
        "max_new_tokens < 1": dict(max_new_tokens=0),
        "right padding": dict(attention_mask=right),
        "stop strings without a tokenizer": dict(stop_strings=["x"]),
        "top_p above 1": dict(top_p=1.5),
        "too long": dict(max_new_tokens=60),
    }


def test_refusals_are_one_line_errors_before_any_work(batch):
    model = tiny_model("granitemoe")
    handle = patch_routers(model, {"logits": 1.0})
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    base = dict(patch=handle, input_ids=batch[0], attention_mask=batch[1], max_new_tokens=2, num_samples=2)
    for reason, change in refusals(handle, batch).items():
        options = {**base, **change}
        with pytest.raises(ConfigurationError) as error:
            generate(options.pop("patch"), options.pop("input_ids"), **options)
        assert "\n" not in str(error.value), reason
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="undone"):
        generate(handle, batch[0], max_new_tokens=2)
    experts = patch_experts(model, layers=[-1])
    with pytest.raises(ConfigurationError, match="model-average only"):
        generate(experts, batch[0], max_new_tokens=2, mode="routing-average")
    assert not calls
