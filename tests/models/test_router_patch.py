"""Patching against the unpatched transformers model: exactness, undo, and bad input."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine

import pyro_moe
from pyro_moe import (
    ConfigurationError,
    LayerSelectionError,
    NoMoELayersError,
    UnsupportedFamilyError,
    at_prior_mean,
    patch_routers,
)
from pyro_moe.models import BayesianRouter
from tests.tiny_models import (
    FAMILIES,
    MOE_LAYERS,
    MOE_NUM_EXPERTS,
    tiny_dense_model,
    tiny_model,
    tiny_unsupported_moe_model,
)

ALL_SITES = {"weight": 0.1, "logits": 2.0, "temperature": {"scale": 0.3, "per": "expert"}, "dropout": 0.2}


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a patch could change: module objects, tensors and hooks."""
    return {
        "modules": [(name, id(module), type(module)) for name, module in model.named_modules()],
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "hooks": [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()],
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["hooks"] == before["hooks"]
    assert after["state"].keys() == before["state"].keys()
    for name, tensor in before["state"].items():
        assert torch.equal(after["state"][name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_pinned_at_prior_mean_equals_hf_and_unpatch_is_bitwise(family, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family)
    reference = model(input_ids, attention_mask=attention_mask).logits
    originals = {loc.path: model.get_submodule(loc.path) for loc in pyro_moe.find_moe_routers(model)}
    state_keys = set(model.state_dict())

    handle = patch_routers(model, ALL_SITES, layers="all")
    assert all(isinstance(model.get_submodule(path), BayesianRouter) for path in originals)
    assert set(model.state_dict()) == state_keys  # save_pretrained sees the same keys
    with at_prior_mean():
        pinned = model(input_ids, attention_mask=attention_mask).logits
    assert (pinned - reference).abs().max() <= 1e-5
    sampled = model(input_ids, attention_mask=attention_mask).logits
    assert (sampled - reference).abs().max() > 1e-5  # beyond the exactness tolerance above

    handle.unpatch()
    assert all(model.get_submodule(path) is router for path, router in originals.items())
    assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, reference)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_condition_on_prior_means_of_global_sites_equals_hf(family, batch):
    """``poutine.condition`` at the prior means (pretrained weights, temperature 1) is the HF model."""
    input_ids, attention_mask = batch
    model = tiny_model(family)
    reference = model(input_ids, attention_mask=attention_mask).logits
    handle = patch_routers(model, {"weight": 0.5, "temperature": 0.5})
    data = {}
    for path, router in handle.routers.items():
        data[f"{path}.weight"] = router.weight.detach()
        if "bias" in router._parameters:
            data[f"{path}.bias"] = router.bias.detach()
        data[f"{path}.temperature"] = torch.tensor(1.0)
    assert set(data) == set(handle.site_names)
    pinned = poutine.condition(model, data=data)(input_ids, attention_mask=attention_mask).logits
    assert (pinned - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["granitemoe", "qwen2_moe", "deepseek_v2_grouped", "gpt_oss"])
def test_trace_shows_exactly_the_documented_sites(family, batch):
    input_ids, attention_mask = batch
    model = tiny_model(family)
    hidden, experts = model.config.hidden_size, MOE_NUM_EXPERTS[family]
    layer = MOE_LAYERS[family][-1]
    handle = patch_routers(model, ALL_SITES, layers=[layer])
    (path,) = handle.routers
    assert path.startswith(f"model.layers.{layer}.mlp.") or path.startswith(f"model.layers.{layer}.block_")
    trace = poutine.trace(model).get_trace(input_ids, attention_mask=attention_mask)
    shapes = {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and name != f"{path}.tokens"
    }
    expected = {
        f"{path}.weight": (experts, hidden),
        f"{path}.logits": (input_ids.numel(), experts),
        f"{path}.temperature": (experts,),
    }
    if family == "gpt_oss":
        expected[f"{path}.bias"] = (experts,)
    assert shapes == expected
    assert list(shapes) == handle.site_names


def test_sampling_changes_selected_experts():
    model = tiny_model("qwen3_moe")
    location = pyro_moe.find_moe_routers(model)[0]
    original = model.get_submodule(location.path)
    hidden = torch.randn(200, model.config.hidden_size)
    _, _, hf_index = original(hidden)
    handle = patch_routers(model, {"logits": 1.0}, layers=[location.layer_index])
    _, _, index = handle.routers[location.path](hidden)
    changed = (index.sort(-1).values != hf_index.sort(-1).values).any(-1)
    assert 0 < changed.sum() < len(hidden)


def test_output_router_logits_still_recorded(batch):
    """HF's own output recorders find the Bayesian routers: the auxiliary loss still works."""
    input_ids, attention_mask = batch
    model = tiny_model("mixtral")
    reference = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    with patch_routers(model, ["logits"]), at_prior_mean():
        pinned = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    assert len(pinned.router_logits) == len(reference.router_logits)
    torch.testing.assert_close(pinned.aux_loss, reference.aux_loss)


def test_context_manager_unpatches_on_error(batch):
    model = tiny_model("olmoe")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"), patch_routers(model, ["logits"]):
        raise RuntimeError("boom")
    assert_unchanged(model, before)


def test_failure_while_swapping_restores_the_model(monkeypatch):
    model = tiny_model("granitemoe")
    before = snapshot(model)

    def fail(self):
        raise RuntimeError("hook installation failed")

    monkeypatch.setattr(pyro_moe.RouterPatch, "_install_hooks", fail)
    with pytest.raises(RuntimeError, match="hook installation failed"):
        patch_routers(model, ["logits"])
    assert_unchanged(model, before)


BAD_INPUT = [
    (tiny_dense_model, {"sites": ["logits"]}, NoMoELayersError, r"no Mixture-of-Experts layer.*granitemoe"),
    (
        tiny_unsupported_moe_model,
        {"sites": ["logits"]},
        UnsupportedFamilyError,
        r"phimoe.*supported.*mixtral",
    ),
    (
        lambda: tiny_model("qwen2_moe"),
        {"sites": ["logits"], "layers": [7]},
        LayerSelectionError,
        r"out of range.*3 decoder layers.*MoE layers: \[0, 2\]",
    ),
    (
        lambda: tiny_model("qwen2_moe"),
        {"sites": ["logits"], "layers": [1]},
        LayerSelectionError,
        r"layer 1 has no MoE block.*\[0, 2\]",
    ),
    (lambda: tiny_model("qwen2_moe"), {"sites": ["logits"], "layers": []}, LayerSelectionError, r"no layer"),
    (
        lambda: tiny_model("qwen2_moe"),
        {"sites": ["logits"], "layers": [2, -1]},
        LayerSelectionError,
        r"layers \[2, -1\] name decoder layer 2 more than once",
    ),
    (
        lambda: tiny_model("mixtral"),
        {"sites": ["logit"]},
        ConfigurationError,
        r"unknown site kind.*'logit'.*accepted: weight, logits, temperature, dropout",
    ),
    (
        lambda: tiny_model("mixtral"),
        {"sites": {"logits": 0.0}},
        ConfigurationError,
        r"prior scale must be a positive.*0\.0",
    ),
    (lambda: tiny_model("mixtral"), {"sites": {"weight": -1}}, ConfigurationError, r"positive.*-1"),
    (lambda: tiny_model("mixtral"), {"sites": {"dropout": 1.0}}, ConfigurationError, r"\[0, 1\)"),
    (
        lambda: tiny_model("mixtral"),
        {"sites": ["logits"], "selection": "top-p"},
        ConfigurationError,
        r"unknown selection.*top-k, sample-k",
    ),
    (
        lambda: tiny_model("mixtral"),
        {"sites": {"temperature": {"per": "sample"}}},
        ConfigurationError,
        r"'per' must be one of layer, expert, token",
    ),
    (lambda: tiny_model("mixtral"), {"sites": {"logits": {"scales": 1}}}, ConfigurationError, r"unknown logits option"),
]


@pytest.mark.parametrize(("build", "kwargs", "error", "message"), BAD_INPUT)
def test_bad_input_raises_and_leaves_the_model_as_it_was(build, kwargs, error, message):
    model = build()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        patch_routers(model, **kwargs)
    assert_unchanged(model, before)


def test_patching_twice_is_refused_and_unpatch_is_idempotent():
    model = tiny_model("mixtral")
    handle = patch_routers(model, ["logits"])
    before = snapshot(model)
    with pytest.raises(ConfigurationError, match="already Bayesian"):
        patch_routers(model, ["weight"])
    assert_unchanged(model, before)
    handle.unpatch()
    handle.unpatch()
    assert not handle.active


def test_negative_layer_counts_from_the_end():
    model = tiny_model("deepseek_v3")
    handle = patch_routers(model, ["logits"], layers=[-1])
    assert [loc.layer_index for loc in handle.locations] == [2]
