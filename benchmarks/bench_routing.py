"""Cost of Bayesian routing against the deterministic HF forward, measured side by side.

Granite-MoE, hidden 256, 8 layers, 32 experts, top-4, a batch of 8 x 128 tokens, CPU, random
weights built in code. Every case reads out the last position (as ``predict`` does):

* ``deterministic``: the unpatched HF forward;
* ``routing-average``: S=32 logit samples in every MoE layer, scores averaged, one pass;
* ``separate passes``: S=32 ordinary forward passes of the patched model, one per sample;
* ``model-average``: S=16 joint samples in one batch, all layers Bayesian;
* ``model-average, last 2``: S=16, only the last two layers Bayesian, the prefix shared.

Writes ``runs/bench/routing.json`` and ``runs/bench/routing.md`` and prints the table.

    python benchmarks/bench_routing.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

from pyro_moe import patch_routers, predict

SAMPLES_ROUTING = 32
SAMPLES_MODEL = 16


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


def seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON and Markdown")
    args = parser.parse_args()

    model = build_model()
    input_ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    forward = dict(attention_mask=mask, use_cache=False, logits_to_keep=1)
    last_layers = [model.config.num_hidden_layers - 2, model.config.num_hidden_layers - 1]

    cases: dict[str, float] = {}
    cases["deterministic HF forward"] = seconds(lambda: model(input_ids, **forward), args.repeats)
    with patch_routers(model, {"logits": 1.0}) as handle:
        cases[f"routing-average, S={SAMPLES_ROUTING}, all layers"] = seconds(
            lambda: predict(handle, input_ids, mask, num_samples=SAMPLES_ROUTING, mode="routing-average"),
            args.repeats,
        )
        cases[f"{SAMPLES_ROUTING} separate full passes"] = seconds(
            lambda: [model(input_ids, **forward) for _ in range(SAMPLES_ROUTING)], max(1, args.repeats // 2)
        )
        cases[f"{SAMPLES_MODEL} separate full passes"] = seconds(
            lambda: [model(input_ids, **forward) for _ in range(SAMPLES_MODEL)], max(1, args.repeats // 2)
        )
        cases[f"model-average, S={SAMPLES_MODEL}, all layers"] = seconds(
            lambda: predict(handle, input_ids, mask, num_samples=SAMPLES_MODEL), max(1, args.repeats // 2)
        )
    with patch_routers(model, {"logits": 1.0}, layers=last_layers) as handle:
        cases[f"model-average, S={SAMPLES_MODEL}, last 2 layers, prefix shared"] = seconds(
            lambda: predict(handle, input_ids, mask, num_samples=SAMPLES_MODEL), args.repeats
        )

    base = cases["deterministic HF forward"]
    rows = [{"case": name, "seconds": t, "ratio": t / base} for name, t in cases.items()]
    routing = cases[f"routing-average, S={SAMPLES_ROUTING}, all layers"]
    targets = {
        "routing-average / deterministic (target <= 1.15)": routing / base,
        "separate passes / routing-average (target >= 20)": cases[f"{SAMPLES_ROUTING} separate full passes"] / routing,
        "model-average all / separate passes (target <= 1)": cases[f"model-average, S={SAMPLES_MODEL}, all layers"]
        / cases[f"{SAMPLES_MODEL} separate full passes"],
        "model-average last 2 / (S x deterministic) (target <= 0.35)": cases[
            f"model-average, S={SAMPLES_MODEL}, last 2 layers, prefix shared"
        ]
        / (SAMPLES_MODEL * base),
    }
    lines = [
        f"Granite-MoE hidden 256, 8 layers, 32 experts, top-4, batch 8 x 128, CPU "
        f"({torch.get_num_threads()} threads), median of {args.repeats} runs.",
        "",
        "| case | seconds | x deterministic |",
        "| --- | ---: | ---: |",
        *(f"| {r['case']} | {r['seconds']:.3f} | {r['ratio']:.2f} |" for r in rows),
        "",
        "| ratio | value |",
        "| --- | ---: |",
        *(f"| {name} | {value:.2f} |" for name, value in targets.items()),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps({"cases": rows, "ratios": targets}, indent=2))
    (args.out / "routing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
