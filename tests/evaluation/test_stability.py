"""Jaccard stability: hand-computed similarities, the router inputs against HF's own router logits,
the per-layer table on tiny models, Bayesian routers under handlers, and susceptible layers."""

from __future__ import annotations

import pytest
import torch

import pyro_moe
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.stability import (
    DEFAULT_GAMMA,
    GAMMAS,
    RoutingStability,
    jaccard,
    router_inputs,
    routing_stability,
    susceptible_layers,
)
from tests.tiny_models import tiny_dense_model, tiny_model


def _batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for rows, length in ((3, 9), (2, 6)):
        input_ids = torch.randint(4, 60, (rows, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, :3] = 0  # left padding
        batches.append({"input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask})
    return batches


def test_jaccard_identical_sets_is_one() -> None:
    sets = torch.tensor([[0, 3], [5, 1], [2, 7]])
    torch.testing.assert_close(jaccard(sets, sets), torch.ones(3))
    torch.testing.assert_close(jaccard(sets, sets.flip(-1)), torch.ones(3))  # order does not matter


def test_jaccard_hand_computed() -> None:
    a = torch.tensor([[0, 1], [2, 3], [0, 1]])
    b = torch.tensor([[1, 0], [3, 4], [2, 3]])
    torch.testing.assert_close(jaccard(a, b), torch.tensor([1.0, 1 / 3, 0.0]))  # {2,3} vs {3,4}: 1 of 3
    torch.testing.assert_close(jaccard(torch.tensor([[0, 1, 2]]), torch.tensor([[2, 5]])), torch.tensor([0.25]))


def test_jaccard_bad_input() -> None:
    with pytest.raises(ConfigurationError, match=r"integer tensor \(tokens, k\)"):
        jaccard(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ConfigurationError, match="same number of tokens"):
        jaccard(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


@pytest.mark.parametrize("family", ["mixtral", "granitemoe"])
def test_router_inputs_reproduce_the_hf_router_logits(family: str) -> None:
    model = tiny_model(family)
    batch = _batches()[0]
    inputs = router_inputs(model, batch["input_ids"], batch["attention_mask"])
    reference = model(**batch, output_router_logits=True).router_logits  # HF's, every token of every layer
    keep = batch["attention_mask"].reshape(-1).bool()
    assert list(inputs) == [loc.path for loc in pyro_moe.find_moe_routers(model)]
    for (path, hidden), hf_logits in zip(inputs.items(), reference, strict=True):
        assert hidden.shape == (int(keep.sum()), 32)
        logits = model.get_submodule(path)(hidden)[0]
        torch.testing.assert_close(logits, hf_logits[keep].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("family", "layers"), [("granitemoe", (0, 1)), ("qwen2_moe", (0, 2)), ("deepseek_v3", (1, 2))])
def test_per_layer_table(family: str, layers: tuple[int, ...]) -> None:
    model = tiny_model(family)
    batches = _batches()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    result = routing_stability(model, batches, gammas=(0.0, 0.01, 10.0))
    assert result.layers == layers
    assert result.paths == tuple(loc.path for loc in pyro_moe.find_moe_routers(model))
    assert result.values.shape == (len(layers), 3, tokens)
    assert ((result.values >= 0) & (result.values <= 1)).all()
    assert (result.values[:, 0] == 1).all()  # gamma = 0: every token keeps its experts
    assert (result.mean[:, 2] < 1).all()  # large noise changes some expert sets
    records = result.records()
    assert len(records) == len(layers) * 3
    assert records[2] == {
        "layer": layers[0],
        "router": result.paths[0],
        "gamma": 10.0,
        "mean": pytest.approx(result.values[0, 2].mean().item()),
        "std": pytest.approx(result.values[0, 2].std(correction=0).item()),
        "min": pytest.approx(result.values[0, 2].min().item()),
        "tokens": tokens,
    }
    again = routing_stability(model, batches, gammas=(0.0, 0.01, 10.0))
    assert torch.equal(again.values, result.values)  # seeded noise


def test_default_gammas_are_the_thesis_grid() -> None:
    result = routing_stability(tiny_model("granitemoe"), _batches()[:1])
    assert result.gammas == GAMMAS == (0.001, 0.002, 0.005, 0.01, 0.05)


def test_bayesian_router_follows_the_handlers_in_force() -> None:
    model = tiny_model("granitemoe")
    batches = _batches()
    plain = routing_stability(model, batches, gammas=(0.0, 0.05))
    handle = pyro_moe.patch_routers(model, {"logits": 1.0}, layers=[1])
    try:
        with pyro_moe.at_prior_mean():
            pinned = routing_stability(model, batches, gammas=(0.0, 0.05))
        sampled = routing_stability(model, batches, gammas=(0.0,))
    finally:
        handle.unpatch()
    torch.testing.assert_close(pinned.values, plain.values)  # at the prior mean: the HF routing
    assert (sampled.values[0] == 1).all()  # layer 0 stays deterministic
    assert sampled.mean[1, 0] < 1  # layer 1 draws its logits afresh in every call


def _result(means: list[float]) -> RoutingStability:
    values = torch.tensor(means)[:, None, None].expand(-1, 2, 4).clone()
    values[:, 0] = 1.0  # gamma 0.001 is stable everywhere
    return RoutingStability(
        layers=tuple(range(0, 2 * len(means), 2)),
        paths=tuple(f"model.layers.{2 * i}.mlp.gate" for i in range(len(means))),
        gammas=(0.001, DEFAULT_GAMMA),
        values=values,
    )


def test_susceptible_layers_picks_the_lowest() -> None:
    result = _result([0.9, 0.5, 0.7, 0.5])  # layers 0, 2, 4, 6
    assert susceptible_layers(result, k=2) == [2, 6]
    assert susceptible_layers(result, k=1) == [2]  # a tie goes to the earlier layer
    assert susceptible_layers(result, k=3) == [2, 4, 6]
    assert susceptible_layers(result, threshold=0.75) == [2, 4, 6]
    assert susceptible_layers(result, threshold=0.5) == []
    assert susceptible_layers(result, threshold=0.95, gamma=0.001) == []


def test_susceptible_layers_bad_arguments() -> None:
    result = _result([0.9, 0.5])
    with pytest.raises(ConfigurationError, match="exactly one of threshold"):
        susceptible_layers(result)
    with pytest.raises(ConfigurationError, match="exactly one of threshold"):
        susceptible_layers(result, threshold=0.5, k=1)
    with pytest.raises(ConfigurationError, match=r"gamma 0.01 was not measured; measured: \[0.001, 0.05\]"):
        susceptible_layers(result, k=1, gamma=0.01)
    with pytest.raises(ConfigurationError, match=r"k must be an integer in \[1, 2\]"):
        susceptible_layers(result, k=3)


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({"gammas": (0.01, -0.1)}, r"gammas\[1\] must be a finite number >= 0, got -0.1"),
        ({"gammas": (float("nan"),)}, r"gammas\[0\] must be a finite number >= 0, got nan"),
        ({"gammas": (True,)}, r"gammas\[0\] must be a finite number >= 0, got True"),
        ({"gammas": ("0.1",)}, r"gammas\[0\] must be a finite number >= 0"),
        ({"gammas": ()}, "gammas must be a non-empty list"),
        ({"gammas": 0.1}, "gammas must be a non-empty list"),
        ({"seed": -1}, "seed must be a non-negative integer, got -1"),
        ({"seed": "3"}, "seed must be a non-negative integer"),
        ({"batches": []}, "batches is empty"),
        ({"batches": {"input_ids": torch.zeros(1, 2, dtype=torch.long)}}, "got a single mapping"),
        ({"batches": "second without input_ids"}, r"batch 1: every batch must be a mapping with 'input_ids'"),
        ({"batches": "second 1-D"}, r"batch 1: input_ids must be a \(batch, length\) tensor"),
        ({"batches": "second short mask"}, r"batch 1: attention_mask shape \(2, 5\) differs from input_ids \(2, 6\)"),
    ],
)
def test_routing_stability_refuses_bad_arguments_before_any_forward_pass(arguments, match) -> None:
    """Each bad argument gets an error naming it and what it got, before the model runs at all (a bad second
    batch is not found after the first one's forward pass)."""
    model = tiny_model("granitemoe")
    batches = _batches()
    change = arguments.get("batches")
    if change == "second without input_ids":
        batches[1] = {"ids": batches[1]["input_ids"]}
    elif change == "second 1-D":
        batches[1]["input_ids"] = batches[1]["input_ids"][0]
    elif change == "second short mask":
        batches[1]["attention_mask"] = batches[1]["attention_mask"][:, 1:]
    elif change is not None:
        batches = change
    options = {k: v for k, v in arguments.items() if k != "batches"}
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ConfigurationError, match=match):
        routing_stability(model, batches, **options)
    hook.remove()
    assert calls == []


def test_routing_stability_of_a_dense_model_is_refused() -> None:
    with pytest.raises(pyro_moe.NoMoELayersError):
        routing_stability(tiny_dense_model(), _batches())
