"""Both predictive modes against explicit loops over the same random draws."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.messenger import Messenger

import pyro_moe
from pyro_moe import ConfigurationError, at_prior_mean, patch_routers, predict
from tests.tiny_models import FAMILIES, tiny_model

ANSWERS = torch.tensor([4, 5, 6, 7])
SAMPLES = 5
GLOBAL = (".weight", ".bias", ".temperature")


def site_values(trace) -> dict[str, torch.Tensor]:
    return {
        name: site["value"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not name.endswith(".tokens") and name != "samples"
    }


def readout(logits: torch.Tensor) -> torch.Tensor:
    """MCQA readout of full-sequence logits with left padding: last position, answer letters."""
    return torch.softmax(logits[:, -1, ANSWERS].float(), dim=-1)


@pytest.mark.parametrize(
    ("family", "sites"),
    [
        ("granitemoe", {"logits": 2.0, "temperature": {"scale": 0.5, "per": "expert"}}),
        ("deepseek_v3", {"logits": 1.0}),
        ("mixtral", {"weight": 0.3}),
        ("gpt_oss", {"weight": 0.3, "temperature": 0.5}),
    ],
)
def test_routing_average_equals_explicit_loop_over_the_same_draws(family, sites, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family)
    handle = patch_routers(model, sites)
    with poutine.trace() as tracer:
        prediction = predict(
            handle,
            input_ids,
            attention_mask,
            answer_token_ids=ANSWERS,
            num_samples=SAMPLES,
            mode="routing-average",
            return_router_logits=True,
            local_reparameterization=False,  # S weight matrices drawn (tests/models/test_local_reparameterization.py)
        )
    draws = site_values(tracer.trace)
    locations = {loc.path: loc for loc in handle.locations}
    handle.unpatch()

    def explicit_router(path):
        family_of_router = locations[path].family

        def hook(router, args, output):
            hidden = args[0].reshape(-1, router.weight.shape[-1])
            rule = family_of_router.rule(router)
            total = 0
            for s in range(SAMPLES):
                weight = draws.get(f"{path}.weight", router.weight[None, None])[
                    s % len(draws.get(f"{path}.weight", [0]))
                ]
                bias = draws[f"{path}.bias"][s] if f"{path}.bias" in draws else getattr(router, "bias", None)
                logits = (
                    draws[f"{path}.logits"][s]
                    if f"{path}.logits" in draws
                    else family_of_router.logits(
                        hidden,
                        weight.reshape(router.weight.shape),
                        None if bias is None else bias.reshape(-1),
                    )
                )
                if f"{path}.temperature" in draws:
                    logits = logits / draws[f"{path}.temperature"][s].reshape(-1)
                total = total + rule.score(logits)
            weights, index = rule.select(total / SAMPLES)
            return output[0], weights.to(output[1].dtype), index

        return hook

    hooks = [model.get_submodule(path).register_forward_hook(explicit_router(path)) for path in locations]
    try:
        expected = readout(model(input_ids, attention_mask=attention_mask).logits)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(prediction.probs, expected, rtol=1e-5, atol=1e-6)
    for logits in prediction.router_logits.values():
        assert logits.shape == (SAMPLES, *input_ids.shape, model.config.num_local_experts)


@pytest.mark.parametrize(
    ("family", "sites", "layers"),
    [
        ("qwen2_moe", {"logits": 2.0, "temperature": {"scale": 0.5, "per": "expert"}}, [2]),
        ("deepseek_v2_grouped", {"weight": 0.3, "logits": 1.0}, "all"),
        ("gpt_oss", {"weight": 0.3}, [1]),
        ("granitemoeshared", {"temperature": 0.5}, "all"),
    ],
)
def test_model_average_equals_loop_of_forward_passes_and_prefix_sharing_changes_nothing(family, sites, layers, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family)
    handle = patch_routers(model, sites, layers=layers)
    with poutine.trace() as tracer:
        shared = predict(
            handle,
            input_ids,
            attention_mask,
            answer_token_ids=ANSWERS,
            num_samples=SAMPLES,
            return_samples=True,
        )
    draws = site_values(tracer.trace)
    assert draws and all(value.shape[0] == SAMPLES for value in draws.values())

    per_sample = []
    for s in range(SAMPLES):
        data = {
            name: value[s].squeeze(0) if value.dim() > 2 and value.shape[1] == 1 else value[s]
            for name, value in draws.items()
        }
        data = {
            name: (value.squeeze(0) if name.endswith((".temperature", ".bias")) and value.dim() else value)
            for name, value in data.items()
        }
        logits = poutine.condition(model, data=data)(input_ids, attention_mask=attention_mask).logits
        per_sample.append(readout(logits))
    per_sample = torch.stack(per_sample)
    torch.testing.assert_close(shared.sample_probs, per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.probs, per_sample.mean(0), rtol=1e-5, atol=1e-6)

    with poutine.condition(data=draws):
        unshared = predict(
            handle,
            input_ids,
            attention_mask,
            answer_token_ids=ANSWERS,
            num_samples=SAMPLES,
            share_prefix=False,
            return_samples=True,
        )
    torch.testing.assert_close(unshared.sample_probs, shared.sample_probs, rtol=1e-5, atol=1e-6)


def test_prefix_layers_run_once_and_bayesian_layers_on_the_folded_batch(batch):
    input_ids, attention_mask = batch
    model = tiny_model("deepseek_v3")  # layer 0 dense, MoE layers 1 and 2
    handle = patch_routers(model, ["logits"], layers=[2])
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: seen[i].append(o.shape[0])) for i in seen]
    predict(handle, input_ids, attention_mask, num_samples=SAMPLES)
    predict(handle, input_ids, attention_mask, num_samples=SAMPLES, share_prefix=False)
    for hook in hooks:
        hook.remove()
    batch_size = input_ids.shape[0]
    assert seen == {
        0: [batch_size, SAMPLES * batch_size],
        1: [batch_size, SAMPLES * batch_size],
        2: [SAMPLES * batch_size, SAMPLES * batch_size],
    }


def test_routing_average_runs_the_experts_once_on_the_batch(batch):
    input_ids, attention_mask = batch
    model = tiny_model("olmoe")
    handle = patch_routers(model, ["logits"])
    rows = []
    hooks = [
        model.get_submodule(loc.path.rpartition(".")[0]).experts.register_forward_hook(
            lambda m, a, o: rows.append(a[0].shape[0])
        )
        for loc in handle.locations
    ]
    predict(handle, input_ids, attention_mask, num_samples=32, mode="routing-average")
    for hook in hooks:
        hook.remove()
    assert rows == [input_ids.numel()] * len(handle.locations)


def test_padded_positions_are_masked_out_of_the_logit_log_density(batch):
    input_ids, attention_mask = batch
    model = tiny_model("qwen3_moe")
    location = pyro_moe.find_moe_routers(model)[0]  # first MoE layer: its input is deterministic
    captured = {}

    def capture(module, args, output):
        captured["logits"] = output[0].float()

    hook = model.get_submodule(location.path).register_forward_hook(capture)
    model(input_ids, attention_mask=attention_mask)
    hook.remove()
    handle = patch_routers(model, {"logits": 1.5}, layers=[location.layer_index])
    trace = poutine.trace(model).get_trace(input_ids, attention_mask=attention_mask)
    trace.compute_log_prob()
    site = trace.nodes[f"{location.path}.logits"]
    real = attention_mask.reshape(-1).bool()
    expected = torch.distributions.Normal(captured["logits"], 1.5).log_prob(site["value"]).sum(-1)
    assert torch.all(site["log_prob"][~real] == 0)
    torch.testing.assert_close(site["log_prob"][real], expected[real])
    torch.testing.assert_close(trace.log_prob_sum(), expected[real].sum())
    handle.unpatch()


def test_deterministic_prediction_is_the_hf_readout(batch):
    input_ids, attention_mask = batch
    model = tiny_model("mixtral")
    reference = readout(model(input_ids, attention_mask=attention_mask).logits)
    handle = patch_routers(model, ["weight", "logits", "dropout"])
    with at_prior_mean():
        for mode in ("model-average", "routing-average"):
            prediction = predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, num_samples=4, mode=mode)
            torch.testing.assert_close(prediction.probs, reference, rtol=1e-5, atol=1e-6)


def test_right_padding_reads_the_last_real_token():
    model = tiny_model("olmoe")
    input_ids = torch.randint(4, 60, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    logits = model(input_ids, attention_mask=attention_mask).logits
    reference = torch.softmax(logits[torch.arange(2), torch.tensor([3, 5])][:, ANSWERS], dim=-1)
    handle = patch_routers(model, ["logits"])
    with at_prior_mean():
        prediction = predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, num_samples=3)
    torch.testing.assert_close(prediction.probs, reference, rtol=1e-5, atol=1e-6)


def test_predict_rejects_bad_input(batch):
    input_ids, attention_mask = batch
    model = tiny_model("olmoe")
    handle = patch_routers(model, ["logits"])
    with pytest.raises(ConfigurationError, match=r"unknown predictive mode 'bma'.*routing-average, model-average"):
        predict(handle, input_ids, attention_mask, mode="bma")
    with pytest.raises(ConfigurationError, match="num_samples must be a positive integer"):
        predict(handle, input_ids, attention_mask, num_samples=0)
    with pytest.raises(ConfigurationError, match="attention_mask shape"):
        predict(handle, input_ids, attention_mask[:, 1:])
    handle.unpatch()
    with pytest.raises(ConfigurationError, match="active RouterPatch"):
        predict(handle, input_ids, attention_mask)


def test_pyro_predictive_parallel_draws_joint_samples(batch):
    """Pyro's own vectorised Predictive runs a patched model: S joint samples in one batch."""
    input_ids, attention_mask = batch
    model = tiny_model("mixtral")
    handle = patch_routers(model, {"logits": 1.0, "weight": 0.1})
    samples = Predictive(model, num_samples=SAMPLES, parallel=True, return_sites=handle.site_names)(
        input_ids, attention_mask=attention_mask
    )
    experts, hidden = model.config.num_local_experts, model.config.hidden_size
    for name, value in samples.items():
        expected = (SAMPLES, 1, experts, hidden) if name.endswith(".weight") else (SAMPLES, input_ids.numel(), experts)
        assert value.shape == expected


class ReplayByChunk(Messenger):
    """Feeds each pass of a chunked prediction its slice of draws recorded in one pass."""

    def __init__(self, draws: dict[str, torch.Tensor], chunk: int) -> None:
        super().__init__()
        self.draws, self.chunk, self.seen = draws, chunk, Counter()

    def _pyro_sample(self, msg):
        if msg["name"] in self.draws:
            start = self.seen[msg["name"]] * self.chunk
            self.seen[msg["name"]] += 1
            msg["value"] = self.draws[msg["name"]][start : start + self.chunk]


@pytest.mark.parametrize(("layers", "share_prefix"), [("all", True), ([1], True), ([1], False)])
def test_max_samples_per_pass_splits_the_samples_and_changes_nothing_else(batch, layers, share_prefix):
    """Chunked model-average equals one pass over all S samples, with and without prefix sharing."""
    input_ids, attention_mask = batch
    model = tiny_model("qwen3_moe")
    handle = patch_routers(model, {"weight": 0.2, "logits": 1.0}, layers=layers)
    options = dict(answer_token_ids=ANSWERS, num_samples=6, return_samples=True, return_router_logits=True)
    options["share_prefix"] = share_prefix
    with poutine.trace() as tracer:
        one_pass = predict(handle, input_ids, attention_mask, **options)
    rows = []
    first = model.model.layers[0] if layers == "all" or not share_prefix else model.model.layers[1]
    hook = first.register_forward_hook(lambda m, a, o: rows.append(o.shape[0]))
    with ReplayByChunk(site_values(tracer.trace), chunk=4):
        chunked = predict(handle, input_ids, attention_mask, max_samples_per_pass=4, **options)
    hook.remove()
    assert rows == [4 * input_ids.shape[0], 2 * input_ids.shape[0]]
    torch.testing.assert_close(chunked.sample_probs, one_pass.sample_probs, rtol=1e-5, atol=1e-6)
    for path, logits in one_pass.router_logits.items():
        torch.testing.assert_close(chunked.router_logits[path], logits)
    with pytest.raises(ConfigurationError, match="max_samples_per_pass must be a positive integer"):
        predict(handle, input_ids, attention_mask, max_samples_per_pass=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_questions_prediction_does_not_depend_on_its_batch(family):
    """At the prior mean (deterministic routing) each of three questions of 5, 8 and 3 tokens gets the
    same answer probabilities alone as inside their left-padded batch, in both predictive modes, and
    those of the unpatched HF model on the question alone."""
    generator = torch.Generator().manual_seed(4)
    questions = [torch.randint(4, 60, (length,), generator=generator) for length in (5, 8, 3)]
    model = tiny_model(family)
    with torch.no_grad():
        reference = [torch.softmax(model(ids[None]).logits[0, -1, ANSWERS], -1) for ids in questions]
    input_ids = torch.zeros(3, 8, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(questions):
        input_ids[row, 8 - len(ids) :], attention_mask[row, 8 - len(ids) :] = ids, 1
    handle = patch_routers(model, {"weight": 0.2, "logits": 1.0}, layers="all")
    with at_prior_mean():
        for mode in ("model-average", "routing-average"):
            batched = predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, num_samples=2, mode=mode)
            for row, ids in enumerate(questions):
                alone = predict(handle, ids[None], answer_token_ids=ANSWERS, num_samples=2, mode=mode).probs[0]
                torch.testing.assert_close(batched.probs[row], alone, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(alone, reference[row], rtol=1e-5, atol=1e-5)
    handle.unpatch()


def test_the_mcqa_forward_gets_each_rows_own_positions(batch):
    """The readout gives the model the positions each row has alone (HF's forward would count from the
    first column, shifting left-padded rows): ``0 .. n - 1`` over a row's ``n`` real tokens."""
    input_ids, attention_mask = batch
    model = tiny_model("olmoe")
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"]), with_kwargs=True
    )
    handle = patch_routers(model, ["logits"])
    with at_prior_mean():
        predict(handle, input_ids, attention_mask, answer_token_ids=ANSWERS, num_samples=2)
    hook.remove()
    (positions,) = seen
    real = attention_mask.bool()
    for row in range(len(input_ids)):
        assert positions[row][real[row]].tolist() == list(range(int(real[row].sum())))
    handle.unpatch()
