"""Cost of SVI over router sites, measured side by side.

Two measurements, on random models built in code (CPU, no hub):

1. **SVI step against a plain PyTorch training step.** Granite-MoE, hidden 256, 8 layers, 32 experts,
   top-2, a batch of 8 x 64 random tokens with MCQA labels in [0, 4) and 4 answer-letter ids:

   * ``plain PyTorch step``: the unpatched HF model, only the router weights trainable, cross-entropy
     of the answer logits (next-token logits at the last position restricted to the answer ids),
     backward, Adam step;
   * ``SVI step``: the same model patched with router-weight sites on all MoE layers, guide
     ``mean-field``, one particle, ``elbo``, built and stepped as :func:`pyro_moe.fit` does
     (``MCQALikelihood``, ``RouterGuide``, ``guide.setup``, ``SVIEngine.step``, backbone frozen);
   * ``SVI loss + backward``, ``model trace + backward``: the same step without the engine's
     checks, clipping and Adam, and the bare patched forward under ``poutine.trace``, to place any gap.

2. **Per-token cost of the amortized logit guides** ``mfvr``, ``low-rank-logits`` (rank 4) and
   ``fcvr`` as the number of experts E grows (8, 32, 64, 128): building ``q(l | u)`` from the router
   inputs ``u`` of 4096 tokens (hidden 256, encoder width 64), drawing one reparameterised sample and
   its log-density, with and without the backward pass to the encoder; plus the encoder outputs per
   token (2E, E + E(E+1)/2, 2E + E r) and the bytes autograd keeps for the backward pass per token.

Every timed step starts from the untrained parameters (see :func:`restoring`). Every case is timed
in the same run, interleaved round-robin, fastest of ``--step-repeats`` (steps) or ``--repeats``
(guides) rounds; the steps also report CPU time and the median of the per-round SVI / plain ratios,
which are steadier than wall times when other processes share the CPU. Writes
``runs/bench/svi.json`` and ``runs/bench/svi.md`` and prints the tables.

    python benchmarks/bench_svi.py [--repeats 7] [--step-repeats 15] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch
from pyro import poutine
from torch import Tensor
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

from pyro_moe import patch_routers
from pyro_moe.guides.amortized import AmortizedLogitGuide
from pyro_moe.guides.router_guide import RouterGuide
from pyro_moe.inference.fitted_posterior import _frozen
from pyro_moe.inference.options import TrainingOptions
from pyro_moe.inference.svi import SVIEngine
from pyro_moe.models.likelihoods import MCQALikelihood

HIDDEN, LAYERS, EXPERTS, TOP_K, BATCH, LENGTH, VOCAB = 256, 8, 32, 2, 8, 64, 1024
ANSWER_IDS = torch.tensor([10, 11, 12, 13])
NUM_EXAMPLES = 64
GUIDE_TOKENS, GUIDE_WIDTH, RANK = 4096, 64, 4
GUIDE_EXPERTS = (8, 32, 64, 128)
COVARIANCES = {"mfvr": "diagonal", "low-rank-logits": "low-rank", "fcvr": "full"}


def build_model(experts: int = EXPERTS, layers: int = LAYERS) -> GraniteMoeForCausalLM:
    torch.manual_seed(0)
    config = GraniteMoeConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=experts,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    return GraniteMoeForCausalLM(config).eval()


def timed_rounds(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Wall time and CPU time (``process_time``: all threads of this process, less sensitive to other
    processes on the machine) of every case in each of ``repeats`` rounds, the cases interleaved
    round-robin after one warm-up round (as in ``bench_routing.py``)."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for round_index in range(repeats + 1):
        for name, run in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            if round_index:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def fastest(times: list[tuple[float, float]]) -> tuple[float, float]:
    """Fastest wall and fastest CPU time (as ``timeit`` advises: slower rounds measure the machine's
    other load, not the code)."""
    return min(wall for wall, _ in times), min(cpu for _, cpu in times)


def restoring(step: Callable[[], object], params: list[Tensor], saved: list[Tensor]) -> Callable[[], None]:
    """``step`` followed by putting ``params`` back to ``saved``, their values before training.
    Training moves the router weights, and with them the routing: within a few Adam steps at
    ``lr = 1e-2`` the plain model sends its tokens to half as many experts, and its step gets faster.
    Every timed step therefore starts from the untrained parameters (copying them back costs
    microseconds)."""

    def run() -> None:
        step()
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)

    return run


def svi_step_cases() -> dict[str, Callable[[], object]]:
    """The plain PyTorch step, the SVI step and two partial SVI steps, ready to time."""
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, VOCAB, (BATCH, LENGTH), generator=generator),
        "attention_mask": torch.ones(BATCH, LENGTH, dtype=torch.long),
        "labels": torch.randint(0, len(ANSWER_IDS), (BATCH,), generator=generator),
    }
    plain = build_model()
    patched = copy.deepcopy(plain)

    # plain PyTorch: router weights trainable, nothing else
    plain.requires_grad_(False)
    routers = [layer.block_sparse_moe.router.weight for layer in plain.model.layers]
    for weight in routers:
        weight.requires_grad_(True)
    optimizer = torch.optim.Adam(routers, lr=1e-2)
    plain_start = [weight.detach().clone() for weight in routers]

    def plain_step() -> float:
        logits = plain(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=1)
        answer_logits = logits.logits[:, -1, ANSWER_IDS].float()
        loss = torch.nn.functional.cross_entropy(answer_logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    # SVI as fit builds and runs it (fit's defaults: elbo, one particle, lr 1e-2, clip_norm 10)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    handle = patch_routers(patched, {"weight": 0.05})
    likelihood = MCQALikelihood(handle, ANSWER_IDS)
    guide = RouterGuide(likelihood, "mean-field")
    svi_batch = {**batch, "num_examples": NUM_EXAMPLES}
    guide.setup(**svi_batch)
    engine = SVIEngine(likelihood, guide, TrainingOptions(lr=1e-2, clip_norm=10.0), nll=lambda: likelihood.last_nll)

    def svi_step() -> dict[str, float]:
        with _frozen(patched):
            return engine.step(svi_batch)

    engine._start(svi_batch)  # what the first step does first: collect the guide's parameters, build Adam
    svi_start = [param.detach().clone() for param in engine.params.values()]

    def svi_loss_backward() -> None:
        with _frozen(patched):
            loss = engine.loss(svi_batch)
            loss.backward()

    def model_trace_backward() -> None:
        with _frozen(patched):
            values = {name: site.detach().requires_grad_() for name, site in guide.global_guide().items()}
            trace = poutine.trace(poutine.condition(likelihood, data=values)).get_trace(**svi_batch)
            trace.nodes["answer"]["fn"].log_prob(batch["labels"]).sum().neg().backward()

    return {
        "plain PyTorch step (HF model, router weights trainable, Adam)": restoring(plain_step, routers, plain_start),
        "SVI step (weight sites, mean-field, 1 particle)": restoring(svi_step, list(engine.params.values()), svi_start),
        "SVI loss + backward (no checks, clipping, Adam)": svi_loss_backward,
        "patched forward under poutine.trace + backward": model_trace_backward,
    }


def saved_bytes(run: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass while ``run`` builds its graph
    (distinct storages counted once)."""
    storages: dict[int, torch.UntypedStorage] = {}  # held, so that no address is reused meanwhile

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storage.nbytes() for storage in storages.values())


def guide_cases(
    experts_list: Sequence[int] = GUIDE_EXPERTS,
    tokens: int = GUIDE_TOKENS,
    build: Callable[[int], torch.nn.Module] = lambda experts: build_model(experts, layers=1),
) -> tuple[dict[str, Callable[[], object]], dict[str, dict[str, float]]]:
    """Forward and forward + backward of every amortized logit guide at every E in ``experts_list`` on
    ``tokens`` router inputs of the one-layer model ``build(E)``, and their sizes: cases named
    ``"<guide>, E=<E>, forward"`` and ``"..., forward + backward"``, sizes by ``"<guide>, E=<E>"``."""
    cases: dict[str, Callable[[], object]] = {}
    sizes: dict[str, dict[str, float]] = {}
    for experts in experts_list:
        handle = patch_routers(build(experts), {"logits": 1.0})
        router = next(iter(handle.routers.values()))
        u = torch.randn(tokens, router.weight.shape[1], generator=torch.Generator().manual_seed(experts))
        loc = (u @ router.weight.detach().T).float()
        for name, covariance in COVARIANCES.items():
            torch.manual_seed(0)
            guide = AmortizedLogitGuide(handle, covariance=covariance, rank=RANK, width=GUIDE_WIDTH)

            def draw(
                guide: AmortizedLogitGuide = guide, router: torch.nn.Module = router, u: Tensor = u, loc: Tensor = loc
            ) -> Tensor:
                q = guide.logits_distribution(router, u, loc)
                sample = q.rsample()
                return q.log_prob(sample).sum() + sample.sum()

            def draw_backward(guide: AmortizedLogitGuide = guide, draw: Callable[[], Tensor] = draw) -> None:
                guide.zero_grad(set_to_none=True)
                draw().backward()

            key = f"{name}, E={experts}"
            cases[f"{key}, forward"] = lambda draw=draw: torch.no_grad()(draw)()
            cases[f"{key}, forward + backward"] = draw_backward
            outputs = next(iter(guide.encoders.values())).head.out_features
            sizes[key] = {"outputs": outputs, "saved_bytes_per_token": saved_bytes(draw) / tokens}
    return cases, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the guides (fastest counts)")
    parser.add_argument("--step-repeats", type=int, default=15, help="timed rounds of the training steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON and Markdown")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    rounds = timed_rounds(svi_step_cases(), args.step_repeats)
    steps = {name: fastest(times) for name, times in rounds.items()}
    plain_name, svi_name = list(steps)[:2]
    (base_wall, base_cpu), (svi_wall, svi_cpu) = steps[plain_name], steps[svi_name]
    step_rows = [
        {"case": name, "seconds": wall, "ratio": wall / base_wall, "cpu_seconds": cpu, "cpu_ratio": cpu / base_cpu}
        for name, (wall, cpu) in steps.items()
    ]
    ratio, cpu_ratio = svi_wall / base_wall, svi_cpu / base_cpu
    # the same ratio paired within each round (both steps ran seconds apart), median over the rounds
    pairs = zip(rounds[svi_name], rounds[plain_name], strict=True)
    paired = statistics.median(svi[0] / plain[0] for svi, plain in pairs)

    cases, sizes = guide_cases()
    guide_times = {name: fastest(times) for name, times in timed_rounds(cases, args.repeats).items()}
    guide_rows = []
    for experts in GUIDE_EXPERTS:
        for name in COVARIANCES:
            key = f"{name}, E={experts}"
            guide_rows.append(
                {
                    "guide": name,
                    "experts": experts,
                    "outputs_per_token": int(sizes[key]["outputs"]),
                    "forward_us_per_token": 1e6 * guide_times[f"{key}, forward"][0] / GUIDE_TOKENS,
                    "forward_backward_us_per_token": 1e6 * guide_times[f"{key}, forward + backward"][0] / GUIDE_TOKENS,
                    "saved_kib_per_token": sizes[key]["saved_bytes_per_token"] / 1024,
                }
            )
    low, high = GUIDE_EXPERTS[1], GUIDE_EXPERTS[-1]
    by_key = {(r["guide"], r["experts"]): r for r in guide_rows}
    growth = {
        name: {
            field: by_key[(name, high)][field] / by_key[(name, low)][field]
            for field in ("outputs_per_token", "forward_us_per_token", "forward_backward_us_per_token")
        }
        for name in COVARIANCES
    }

    lines = [
        f"Granite-MoE hidden {HIDDEN}, {LAYERS} layers, {EXPERTS} experts, top-{TOP_K}, batch {BATCH} x {LENGTH}, "
        f"MCQA loss on 4 answer letters, CPU ({threads} threads), fastest of {args.step_repeats} interleaved rounds.",
        "",
        "| case | seconds | x plain step | CPU seconds | x plain step (CPU) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['case']} | {r['seconds']:.3f} | {r['ratio']:.2f} | {r['cpu_seconds']:.3f} | {r['cpu_ratio']:.2f} |"
            for r in step_rows
        ),
        "",
        f"SVI step / plain PyTorch step (target <= 1.3): **{ratio:.2f}** (CPU time: {cpu_ratio:.2f}; "
        f"median of the {args.step_repeats} per-round ratios: {paired:.2f})",
        "",
        f"Amortized logit guides: q(l | u) built from u, one reparameterised sample and its log-density, "
        f"{GUIDE_TOKENS} tokens, hidden {HIDDEN}, encoder width {GUIDE_WIDTH}, low-rank rank {RANK}; "
        f"microseconds per token (fastest of {args.repeats} interleaved rounds), encoder outputs per token "
        "(mfvr 2E, fcvr E + E(E+1)/2, low-rank 2E + E r) and KiB autograd keeps for the backward pass per token.",
        "",
        "| guide | E | outputs / token | forward us / token | fwd + bwd us / token | saved KiB / token |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['guide']} | {r['experts']} | {r['outputs_per_token']} | {r['forward_us_per_token']:.2f} | "
            f"{r['forward_backward_us_per_token']:.2f} | {r['saved_kib_per_token']:.1f} |"
            for r in guide_rows
        ),
        "",
        f"| growth from E={low} to E={high} ({high // low}x experts) | outputs | forward | fwd + bwd |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name} | {g['outputs_per_token']:.1f}x | {g['forward_us_per_token']:.1f}x | "
            f"{g['forward_backward_us_per_token']:.1f}x |"
            for name, g in growth.items()
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "model": {"hidden": HIDDEN, "layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "batch": [BATCH, LENGTH]},
        "threads": threads,
        "svi_step": step_rows,
        "ratio_svi_over_plain": ratio,
        "cpu_ratio_svi_over_plain": cpu_ratio,
        "median_paired_ratio_svi_over_plain": paired,
        "guides": guide_rows,
        "guide_growth": {"from_experts": low, "to_experts": high, "factors": growth},
    }
    (args.out / "svi.json").write_text(json.dumps(report, indent=2))
    (args.out / "svi.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
