"""Cost of the Kronecker-factored Laplace against the dense one, and memory of the expert posterior.

Two measurements, on random models built in code (CPU, no hub):

1. **Fit time on all router weights.** Granite-MoE, hidden 64, 4 layers, 8 experts (2,048 router
   parameters), eager attention, router-weight sites (prior scale 0.1) in every layer, 4 batches of
   8 random MCQA prompts of 16 tokens. Both families run the same MAP stage (``--steps`` SVI steps),
   then their Laplace step: ``laplace`` (Pyro's ``AutoLaplaceApproximation`` mode, dense Hessian of the
   full-data loss by double backward) and ``kron-laplace`` (K-FAC factors per router, full rank, MC
   Fisher). The Laplace step is timed on its own (``RouterGuide.finish_post_hoc``), fastest of ``--repeats``.

2. **Memory of the expert posterior** of a Qwen1.5-MoE-A2.7B-shaped layer (60 experts, hidden 2048,
   intermediate 1408) with rank r = 10: computed (floats kept per expert: ``H r + I r + 2 r + r^2``;
   full factors: ``H^2 + I^2``), and measured on a scaled-down layer (60 experts, hidden 256,
   intermediate 176; 1 decoder layer): the bytes of the eigenpairs the fitted posterior holds, low
   rank and full, beside the same formulas, and the peak bytes PyTorch allocated while collecting
   (profiler allocation events; forward and backward passes included).

Writes ``runs/bench/laplace.json`` and ``runs/bench/laplace.md`` and prints the tables.

    python benchmarks/bench_laplace.py [--repeats 2] [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

from pyro_moe import fit, patch_routers
from pyro_moe.core.curvature_targets import expert_targets
from pyro_moe.experiments.efficiency import measure_peak_memory
from pyro_moe.guides.laplace.kronecker_curvature import kronecker_curvature
from pyro_moe.guides.laplace.kronecker_posterior import KroneckerLaplace
from pyro_moe.guides.router_guide import RouterGuide

ANSWER_IDS = torch.tensor([10, 11, 12, 13])
QWEN = {"experts": 60, "hidden": 2048, "intermediate": 1408, "rank": 10}
SCALED = {"experts": 60, "hidden": 256, "intermediate": 176, "rank": 10}
FLOAT_BYTES = 8  # the factors are kept in float64


def granite(hidden: int, layers: int, experts: int, intermediate: int, seed: int = 0) -> GraniteMoeForCausalLM:
    config = GraniteMoeConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = GraniteMoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.block_sparse_moe.router.weight.normal_(0.0, 0.5)
    return model


def mcqa_batches(count: int, size: int, length: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(14, 64, (size, length), generator=generator)
        batches.append(
            {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids[:, -1] % 4}
        )
    return batches


def laplace_step_seconds(family: str, steps: int) -> float:
    """Seconds of the Laplace step alone, after ``steps`` MAP steps."""
    model = granite(hidden=64, layers=4, experts=8, intermediate=64)
    batches = mcqa_batches(4, 8, 16)
    handle = patch_routers(model, {"weight": 0.1}, layers="all")
    seconds = []
    original = RouterGuide.finish_post_hoc

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        original(self, *args, **kwargs)
        seconds.append(time.perf_counter() - start)

    RouterGuide.finish_post_hoc = timed
    try:
        pyro.clear_param_store()
        fit(handle, batches, family, answer_token_ids=ANSWER_IDS, steps=steps, progress=False)
    finally:
        RouterGuide.finish_post_hoc = original
        handle.unpatch()
    return seconds[0]


def posterior_floats(experts: int, hidden: int, intermediate: int, rank: int | None) -> int:
    """Floats of the eigenpairs (and the rank x rank eigenvalue products) of one layer's posterior."""
    if rank is None:
        return experts * (hidden * hidden + intermediate * intermediate + hidden + intermediate)
    return experts * (hidden * rank + intermediate * rank + 2 * rank + rank * rank)


def measured_bytes(rank: int | None) -> tuple[int, int]:
    """Bytes of the eigenpairs the fitted posterior of the scaled-down layer holds, and the peak bytes
    PyTorch allocated while the factors were collected (forward and backward passes included)."""
    model = granite(SCALED["hidden"], 1, SCALED["experts"], SCALED["intermediate"])
    targets = expert_targets(model)
    runs = []

    def collect() -> None:
        runs.append(kronecker_curvature(model, targets, mcqa_batches(4, 16, 16), ANSWER_IDS, rank=rank, progress=False))

    peak = measure_peak_memory(collect, torch.device("cpu"))
    (curvature,) = runs[0].curvature.values()
    posterior = KroneckerLaplace.from_curvature(curvature, targets[0].parameter.detach(), prior_precision=1.0)
    held = [posterior.input_vectors, posterior.input_values, posterior.output_vectors, posterior.output_values]
    products = posterior.eigenvalue_products() if rank is not None else torch.empty(0)
    return sum(t.numel() * t.element_size() for t in held) + products.numel() * products.element_size(), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, kron = [], []
    for _ in range(args.repeats):  # interleaved
        dense.append(laplace_step_seconds("laplace", args.steps))
        kron.append(laplace_step_seconds("kron-laplace", args.steps))
    timing = {"laplace (dense Hessian)": min(dense), "kron-laplace (K-FAC, full rank)": min(kron)}
    ratio = min(dense) / min(kron)
    memory = {}
    for label, shape in (("Qwen1.5-MoE-A2.7B layer", QWEN), ("scaled-down layer", SCALED)):
        for rank in (shape["rank"], None):
            floats = posterior_floats(shape["experts"], shape["hidden"], shape["intermediate"], rank)
            memory[f"{label}, {'rank ' + str(rank) if rank else 'full factors'}"] = {
                "computed MB": floats * FLOAT_BYTES / 1e6
            }
    for rank in (SCALED["rank"], None):
        held, peak = measured_bytes(rank)
        key = f"scaled-down layer, {'rank ' + str(rank) if rank else 'full factors'}"
        memory[key].update({"measured MB": held / 1e6, "peak MB while collecting": peak / 1e6})
    dense_floats = QWEN["hidden"] * QWEN["intermediate"]
    memory["Qwen1.5-MoE-A2.7B layer, dense precision"] = {
        "computed MB": QWEN["experts"] * dense_floats**2 * FLOAT_BYTES / 1e6
    }
    lines = [
        f"Laplace step on all router weights (Granite-MoE hidden 64, 4 layers, 8 experts: 2,048 parameters; "
        f"{args.steps} MAP steps first), CPU ({args.threads} threads), fastest of {args.repeats}.",
        "",
        "| family | seconds |",
        "| --- | ---: |",
        *(f"| {name} | {seconds:.3f} |" for name, seconds in timing.items()),
        "",
        f"dense / kron-laplace (target >= 100): **{ratio:.0f}x**",
        "",
        "Expert posterior memory (float64 eigenpairs and rank x rank eigenvalue products; one layer).",
        "",
        "| layer | computed MB | measured MB | peak MB while collecting |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name} | {row['computed MB']:.4g} | {row['measured MB']:.4g} | {row['peak MB while collecting']:.4g} |"
            if "measured MB" in row
            else f"| {name} | {row['computed MB']:.4g} | | |"
            for name, row in memory.items()
        ),
    ]
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "laplace.json").write_text(
        json.dumps({"timing": timing, "ratio": ratio, "memory": memory, "threads": args.threads}, indent=2)
    )
    (out / "laplace.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
