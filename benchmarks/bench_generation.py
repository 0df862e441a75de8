"""Time per generated token of ``pyro_moe.generate`` against HF's greedy ``model.generate``, side by side.

Granite-MoE, hidden 256, 8 layers, 32 experts, top-4, random weights built in code, CPU; a batch of 4
prompts of 64 tokens, 32 new tokens each (no early stop: HF with ``min_new_tokens``, ours without
end-of-sequence ids). Cases, all greedy with HF's KV cache:

* ``HF generate``: the unpatched model;
* ``model-average, S=8, all layers``: per-token logit sites (scale 1) in every layer, 8 samples folded
  into the batch;
* ``model-average, S=8, last 2 layers, prefix shared``: the first 6 layers run once for all samples;
* ``model-average, S=8, all layers, 4 samples per pass``: two passes, each with its own cache;
* ``routing-average, S=8, all layers``: one pass per step, the routers averaging their draws.

The ratio is the case's time per generated token over HF's. Writes ``runs/bench/generation.json`` and
``runs/bench/generation.md`` and prints the table.

    python benchmarks/bench_generation.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from bench_routing import best_seconds  # the benchmarks run as scripts from their folder
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

from pyro_moe import generate, patch_routers

SAMPLES = 8
PER_PASS = 4
BATCH, PROMPT, NEW = 4, 64, 32


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


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (fastest counts)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON and Markdown")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    all_layers, last_two = copy.deepcopy(model), copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    all_handle = patch_routers(all_layers, {"logits": 1.0})
    last_handle = patch_routers(last_two, {"logits": 1.0}, layers=[layers - 2, layers - 1])
    input_ids = torch.randint(0, 1024, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    ours = dict(max_new_tokens=NEW, num_samples=SAMPLES, eos_token_id=[])

    cases = best_seconds(
        {
            "HF generate": lambda: model.generate(
                input_ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
            ),
            f"model-average, S={SAMPLES}, all layers": lambda: generate(all_handle, input_ids, mask, **ours),
            f"model-average, S={SAMPLES}, last 2 layers, prefix shared": lambda: generate(
                last_handle, input_ids, mask, **ours
            ),
            f"model-average, S={SAMPLES}, all layers, {PER_PASS} samples per pass": lambda: generate(
                all_handle, input_ids, mask, **ours, max_samples_per_pass=PER_PASS
            ),
            f"routing-average, S={SAMPLES}, all layers": lambda: generate(
                all_handle, input_ids, mask, **ours, mode="routing-average"
            ),
        },
        args.repeats,
    )
    tokens = BATCH * NEW
    base = cases["HF generate"] / tokens
    rows = [
        {"case": name, "seconds": seconds, "ms_per_token": 1000 * seconds / tokens, "ratio": seconds / tokens / base}
        for name, seconds in cases.items()
    ]
    lines = [
        f"Granite-MoE hidden 256, 8 layers, 32 experts, top-4, batch {BATCH} x {PROMPT} prompt tokens, {NEW} new "
        f"tokens each, greedy with the KV cache, CPU ({torch.get_num_threads()} threads), fastest of {args.repeats} "
        "interleaved rounds.",
        "",
        "| case | seconds | ms per generated token | x HF generate |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {r['case']} | {r['seconds']:.3f} | {r['ms_per_token']:.2f} | {r['ratio']:.2f} |" for r in rows),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps({"cases": rows}, indent=2))
    (args.out / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
