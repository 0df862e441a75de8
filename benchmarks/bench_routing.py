"""Cost of Bayesian routing against the deterministic HF forward, measured side by side.

Granite-MoE, hidden 256, 8 layers, 32 experts, top-4, a batch of 8 x 128 tokens, CPU, random
weights built in code. Every case reads out the last position (as ``predict`` does):

* ``deterministic``: the unpatched HF forward;
* ``routing-average``: S=32 logit samples in every MoE layer, scores averaged, one pass;
* ``routing-average, weight sites``: S=32 draws of every router's weight (prior scale 0.05), by
  explicit draws (S weight matrices times u) and by local reparameterisation (each token's logits
  from their Normal marginal), from the prior and from a mean-field posterior;
* ``separate passes``: S=32 ordinary forward passes of the patched model, one per sample;
* ``model-average``: S=16 joint samples in one batch, all layers Bayesian;
* ``model-average, last 2``: S=16, only the last two layers Bayesian, the prefix shared;
* both model-average cases again with 4 samples folded per pass (``max_samples_per_pass=4``);
* one Bayesian router alone (weight sites, routing-average, S=32) at three shapes, explicit draws
  against local reparameterisation: explicit draws cost ``S E H`` normal draws and ``S T H E``
  multiply-adds, local ones ``S T E`` draws and ``2 T H E``, so local wins as the hidden size grows
  against the tokens of the batch.

Writes ``runs/bench/routing.json`` and ``runs/bench/routing.md`` and prints the table.

    python benchmarks/bench_routing.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

from pyro_moe import fit, patch_routers, predict
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context

SAMPLES_ROUTING = 32
SAMPLES_MODEL = 16
PER_PASS = 4
WEIGHT_SCALE = 0.05
ROUTER_SHAPES = ((256, 32, 1024), (1024, 64, 1024), (2048, 64, 512))
"""(hidden, experts, tokens) of the router-alone cases: the model above's, then wider routers."""


def build_model() -> GraniteMoeForCausalLM:
    torch.manual_seed(0)
    config = GraniteMoeConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=32,
        num_experts_per_tok=4,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return GraniteMoeForCausalLM(config).eval()


def router_cases(hidden_size: int, experts: int, tokens: int) -> dict[str, Callable[[], object]]:
    """One patched Granite-MoE router (weight sites) on ``tokens`` random inputs, routing-average, S=32:
    explicit draws and local reparameterisation."""
    config = GraniteMoeConfig(
        vocab_size=64,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=4,
    )
    handle = patch_routers(GraniteMoeForCausalLM(config).eval(), {"weight": WEIGHT_SCALE})
    router = next(iter(handle.routers.values()))
    inputs = torch.randn(tokens, hidden_size, generator=torch.Generator().manual_seed(2))

    def route(local: bool) -> Callable[[], object]:
        def run() -> object:
            with (
                routing_context(mode="routing-average", local_reparameterization=local),
                pyro.plate("samples", SAMPLES_ROUTING, dim=PARTICLE_DIM),
            ):
                return router(inputs)

        return run

    shape = f"router alone, hidden {hidden_size}, {experts} experts, {tokens} tokens"
    return {f"{shape}, explicit draws": route(False), f"{shape}, local reparameterisation": route(True)}


def best_seconds(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest wall time of every case over ``repeats`` rounds (as ``timeit`` advises: slower
    runs measure the machine's other load, not the code); the cases are interleaved round-robin
    after one warm-up round, so that drifts of the machine hit them all alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats + 1):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (fastest counts)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON and Markdown")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    all_layers, last_two, weights = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    all_handle = patch_routers(all_layers, {"logits": 1.0})
    last_handle = patch_routers(last_two, {"logits": 1.0}, layers=[layers - 2, layers - 1])
    weight_handle = patch_routers(weights, {"weight": WEIGHT_SCALE})
    input_ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    forward = dict(attention_mask=mask, use_cache=False, logits_to_keep=1)
    with torch.enable_grad():  # one SVI step: a mean-field posterior over every router weight
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.zeros(8, dtype=torch.long)}
        mean_field = fit(
            weight_handle, [batch], "mean-field", answer_token_ids=torch.arange(4), steps=1, progress=False
        )

    def weight_sites(local: bool, posterior: bool) -> Callable[[], object]:
        options = dict(num_samples=SAMPLES_ROUTING, mode="routing-average", local_reparameterization=local)
        if posterior:
            return lambda: mean_field.predict(input_ids, mask, **options)
        return lambda: predict(weight_handle, input_ids, mask, **options)

    weight_cases = {
        f"routing-average, S={SAMPLES_ROUTING}, weight sites, {source}, {how}": weight_sites(local, posterior)
        for source, posterior in (("prior", False), ("mean-field", True))
        for how, local in (("explicit draws", False), ("local reparameterisation", True))
    }

    routers = best_seconds(
        {name: run for shape in ROUTER_SHAPES for name, run in router_cases(*shape).items()}, args.repeats
    )
    cases = best_seconds(
        {
            "deterministic HF forward": lambda: model(input_ids, **forward),
            f"routing-average, S={SAMPLES_ROUTING}, all layers": lambda: predict(
                all_handle, input_ids, mask, num_samples=SAMPLES_ROUTING, mode="routing-average"
            ),
            **weight_cases,
            f"{SAMPLES_ROUTING} separate full passes": lambda: [
                all_layers(input_ids, **forward) for _ in range(SAMPLES_ROUTING)
            ],
            f"{SAMPLES_MODEL} separate full passes": lambda: [
                all_layers(input_ids, **forward) for _ in range(SAMPLES_MODEL)
            ],
            f"model-average, S={SAMPLES_MODEL}, all layers": lambda: predict(
                all_handle, input_ids, mask, num_samples=SAMPLES_MODEL
            ),
            f"model-average, S={SAMPLES_MODEL}, all layers, {PER_PASS} samples per pass": lambda: predict(
                all_handle, input_ids, mask, num_samples=SAMPLES_MODEL, max_samples_per_pass=PER_PASS
            ),
            f"model-average, S={SAMPLES_MODEL}, last 2 layers, prefix shared": lambda: predict(
                last_handle, input_ids, mask, num_samples=SAMPLES_MODEL
            ),
            f"model-average, S={SAMPLES_MODEL}, last 2 layers, prefix shared, {PER_PASS} samples per pass": (
                lambda: predict(last_handle, input_ids, mask, num_samples=SAMPLES_MODEL, max_samples_per_pass=PER_PASS)
            ),
        },
        args.repeats,
    )

    base = cases["deterministic HF forward"]
    rows = [{"case": name, "seconds": t, "ratio": t / base} for name, t in cases.items()]
    routing = cases[f"routing-average, S={SAMPLES_ROUTING}, all layers"]
    targets = {
        "routing-average / deterministic (target <= 1.15)": routing / base,
        "separate passes / routing-average (target >= 20)": cases[f"{SAMPLES_ROUTING} separate full passes"] / routing,
    }
    for source in ("prior", "mean-field"):
        stem = f"routing-average, S={SAMPLES_ROUTING}, weight sites, {source}"
        explicit, local = cases[f"{stem}, explicit draws"], cases[f"{stem}, local reparameterisation"]
        targets[f"routing-average, weight sites, {source}, explicit / deterministic"] = explicit / base
        targets[f"routing-average, weight sites, {source}, local / deterministic (target <= 1.05)"] = local / base
        targets[f"routing-average, weight sites, {source}, local / explicit"] = local / explicit
    for hidden_size, experts, tokens in ROUTER_SHAPES:
        shape = f"router alone, hidden {hidden_size}, {experts} experts, {tokens} tokens"
        explicit, local = routers[f"{shape}, explicit draws"], routers[f"{shape}, local reparameterisation"]
        targets[f"{shape}: explicit / local"] = explicit / local
    separate = cases[f"{SAMPLES_MODEL} separate full passes"]
    for suffix in ("", f", {PER_PASS} samples per pass"):
        all_layers_time = cases[f"model-average, S={SAMPLES_MODEL}, all layers{suffix}"]
        last_two_time = cases[f"model-average, S={SAMPLES_MODEL}, last 2 layers, prefix shared{suffix}"]
        targets[f"model-average all{suffix} / separate passes (target <= 1)"] = all_layers_time / separate
        targets[f"model-average last 2{suffix} / (S x deterministic) (target <= 0.35)"] = last_two_time / (
            SAMPLES_MODEL * base
        )
    lines = [
        f"Granite-MoE hidden 256, 8 layers, 32 experts, top-4, batch 8 x 128, CPU "
        f"({torch.get_num_threads()} threads), fastest of {args.repeats} interleaved rounds.",
        "",
        "| case | seconds | x deterministic |",
        "| --- | ---: | ---: |",
        *(f"| {r['case']} | {r['seconds']:.3f} | {r['ratio']:.2f} |" for r in rows),
        "",
        f"One Bayesian router alone (weight sites, routing-average, S={SAMPLES_ROUTING}), fastest of {args.repeats}:",
        "",
        "| case | milliseconds |",
        "| --- | ---: |",
        *(f"| {name} | {1000 * seconds:.2f} |" for name, seconds in routers.items()),
        "",
        "| ratio | value |",
        "| --- | ---: |",
        *(f"| {name} | {value:.2f} |" for name, value in targets.items()),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps({"cases": rows, "routers": routers, "ratios": targets}, indent=2))
    (args.out / "routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
