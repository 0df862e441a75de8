"""Cost per MoE layer of every method at the papers' model widths, and what it means at full depth.

Random-initialised transformers models built in code (no hub) with the real widths, experts, top-k
and (Qwen) shared expert, the depth cut to 2 decoder layers and the vocabulary to 1,024 tokens
(``logits_to_keep=1``: the head is one position; the real vocabularies enter the full-depth
extrapolation analytically):

* Granite-3.0-3B-A800M: hidden 1536, 24 heads (8 KV), 40 experts, top-8, expert width 512;
* Qwen1.5-MoE-A2.7B: hidden 2048, 16 heads, 60 experts, top-4, expert width 1408, shared expert 5632.

A batch of 4 x 256 tokens with MCQA labels over 4 answer letters, CPU. Cases (fp32 unless said):

* ``deterministic``: the HF forward (fp32 and bf16);
* ``routing-average``: S = 32 logit samples in every layer, scores averaged, one pass (fp32 and bf16);
  its memory per sample is the slope of the peak between S = 32 and S = 1,024 (profiled, not timed);
* ``model-average``: S = 8 joint logit samples folded into the batch, (a) both layers Bayesian,
  (a') the same in chunks of 2 samples per pass (``max_samples_per_pass``: memory bounded, any S fits),
  (b) the last layer Bayesian with the prefix shared, (c) the same without prefix sharing;
* ``SVI step``: one step of ``mean-field`` (router-weight sites) and of ``mfvr``, ``fcvr`` and
  ``low-rank-logits`` (logit sites), every layer Bayesian, built by ``pyro_moe.fit`` and stepped by
  its ``SVIEngine``;
* ``curvature``: the expert-Laplace Kronecker pass (``kronecker_curvature`` on
  ``expert_targets``, MC Fisher, last token) over one layer's experts at rank 10, 50 and full factors.

**Per layer.** Times are the 2-layer time halved (the embedding of 1,024 tokens and the
one-position head are negligible beside a layer); a non-Bayesian layer in front of a Bayesian one
costs ``T(last layer Bayesian) - T(one Bayesian layer)``, with and without prefix sharing. The
curvature cases run on the last layer alone (the model cut to it), so they are per layer as
measured. Times are ratios to the deterministic layer in the same dtype, every case timed in the
same run, interleaved, fastest of ``--repeats`` rounds (the memory run is the warm-up round).

**Memory.** On CPU there is no CUDA allocator: the peak is read from the PyTorch profiler's
allocation events (``measure_peak_memory``: every tensor allocated by PyTorch during the call,
net of frees, above what was allocated before it; the weights, built before, are not included,
Python objects and allocator caching are not counted). For inference the peak is one layer's
temporaries (activations are freed layer by layer); for an SVI step it is what autograd keeps
for both layers plus the backward's temporaries. Beside it the tensors' sizes are computed:
weights per layer, the folded hidden states ``S B T H``, the router logits ``S B T E`` (fp32),
the Kronecker factors. bf16 on this CPU (no bf16 instructions) runs slower than fp32 (1.4-4.6x
seen), so only ``deterministic`` and ``routing-average`` run in bf16; the other cases' bf16 memory is the fp32
peak halved (computed, not measured; routing stays fp32).

The amortized guides' per-token cost is measured as in ``bench_svi.py`` at Qwen's hidden size
(2048) for E = 16, 32, 60, 128 experts (encoder width 64, rank 4, 1,024 tokens), with the growth
exponent ``p`` of ``E^p`` between the two largest E.

**Full depth.** Weights of all layers and the real vocabulary in bf16 plus: one layer's measured
temporaries (inference; activations are freed layer by layer), every layer's saved tensors (SVI),
every layer's Kronecker factors plus one layer's temporaries (expert Laplace). The largest S in
80 GB: model-average's peak is proportional to S; routing-average's grows by its measured slope.

Writes ``runs/bench/scale.json`` and ``runs/bench/scale.md`` and prints the tables.

    python benchmarks/bench_scale.py [--repeats 2] [--threads 2] [--quick]

``--quick`` runs the same code on tiny shapes (hidden 64, 8 experts, batch 2 x 16, one round):
a smoke test, not figures.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from bench_svi import COVARIANCES, fastest, guide_cases, timed_rounds
from torch import Tensor, nn
from transformers import GraniteMoeConfig, GraniteMoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from pyro_moe import at_prior_mean, fit, patch_routers, predict
from pyro_moe.core.curvature_targets import expert_targets
from pyro_moe.experiments.efficiency import measure_peak_memory
from pyro_moe.guides.laplace.kronecker_curvature import CurvatureRun, kronecker_curvature
from pyro_moe.inference.fitted_posterior import _frozen, _training
from pyro_moe.models.router_patch import RouterPatch

ANSWER_IDS = torch.tensor([10, 11, 12, 13])
VOCAB = 1024
SAMPLES_ROUTING, SAMPLES_MODEL = 32, 8
SAMPLES_ROUTING_MEMORY = 1024
"""A second routing-average S, profiled only: the slope of the peak between the two is the memory per sample."""
SAMPLES_PER_PASS = 2
"""``max_samples_per_pass`` of the chunked model-average case."""
RANKS = (10, 50, None)
GUIDES = {"mean-field": {"weight": 0.05}, "mfvr": {"logits": 1.0}, "fcvr": {"logits": 1.0}}
GUIDES["low-rank-logits"] = {"logits": 1.0}
GB = 1e9
GPU_BYTES = 80e9


@dataclass(frozen=True)
class Shape:
    """A model shape: the widths of the real model and what the extrapolation needs.

    Attributes:
        name: the model it copies.
        family: ``"granite"`` or ``"qwen"``.
        hidden, heads, kv_heads, experts, top_k, expert_width: the real widths.
        shared_width: the shared expert's width (0: none).
        layers: the real depth (for the extrapolation).
        vocab: the real vocabulary (analytic, for the extrapolation).
        tied: whether the real model ties its embedding and head.
    """

    name: str
    family: str
    hidden: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_width: int
    shared_width: int
    layers: int
    vocab: int
    tied: bool


GRANITE = Shape("Granite-3.0-3B-A800M", "granite", 1536, 24, 8, 40, 8, 512, 0, 32, 49155, True)
QWEN = Shape("Qwen1.5-MoE-A2.7B", "qwen", 2048, 16, 16, 60, 4, 1408, 5632, 24, 151936, False)
TINY = (
    Shape("tiny Granite", "granite", 64, 4, 2, 8, 2, 32, 0, 32, 49155, True),
    Shape("tiny Qwen", "qwen", 64, 4, 4, 12, 4, 48, 96, 24, 151936, False),
)


def build_model(shape: Shape, layers: int = 2) -> nn.Module:
    """The shape's model, random weights, ``layers`` decoder layers, vocabulary 1,024, SDPA, eval mode."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_experts_per_tok=shape.top_k,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    if shape.family == "granite":
        config = GraniteMoeConfig(**common, intermediate_size=shape.expert_width, num_local_experts=shape.experts)
        return GraniteMoeForCausalLM(config).eval()
    config = Qwen2MoeConfig(
        **common,
        num_experts=shape.experts,
        moe_intermediate_size=shape.expert_width,
        shared_expert_intermediate_size=shape.shared_width,
        intermediate_size=shape.shared_width,
    )
    return Qwen2MoeForCausalLM(config).eval()


def mcqa_batch(size: int, length: int) -> dict[str, Tensor]:
    """Random prompts with labels in ``[0, 4)``."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(14, VOCAB, (size, length), generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.randint(0, len(ANSWER_IDS), (size,), generator=generator),
    }


@contextlib.contextmanager
def patched(model: nn.Module, sites: dict, layers: str | list[int] = "all") -> Iterator[RouterPatch]:
    """``patch_routers`` for the duration of the block."""
    handle = patch_routers(model, sites, layers=layers)
    try:
        yield handle
    finally:
        handle.unpatch()


def measure(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict[str, float]]:
    """Peak bytes of every case (one profiled run each, which is also the warm-up round), then the
    fastest wall time of ``repeats`` rounds, the cases interleaved round-robin."""
    peaks = {name: measure_peak_memory(run, torch.device("cpu")) for name, run in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: {"seconds": min(times[name]), "peak_bytes": peaks[name]} for name in cases}


def deterministic(handle: RouterPatch, batch: dict[str, Tensor]) -> Callable[[], object]:
    """The patched model at its prior mean: exactly the HF forward (one-position head)."""

    def run() -> object:
        with at_prior_mean():
            return handle.model(
                batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=1
            )

    return run


@torch.no_grad()
def inference(model: nn.Module, batch: dict[str, Tensor], repeats: int, folded: bool) -> dict[str, dict[str, float]]:
    """Deterministic and routing-average (every layer Bayesian); with ``folded`` the three
    model-average cases too. Two groups, each with its own deterministic run: every layer patched,
    then the last layer only."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with patched(model, {"logits": 1.0}) as every:
        cases = {
            "deterministic": deterministic(every, batch),
            "routing-average": lambda: predict(every, ids, mask, num_samples=SAMPLES_ROUTING, mode="routing-average"),
        }
        if folded:
            cases["model-average, all layers"] = lambda: predict(every, ids, mask, num_samples=SAMPLES_MODEL)
            cases[f"model-average, all layers, {SAMPLES_PER_PASS} samples per pass"] = lambda: predict(
                every, ids, mask, num_samples=SAMPLES_MODEL, max_samples_per_pass=SAMPLES_PER_PASS
            )
        results = measure(cases, repeats)
        many = measure_peak_memory(
            lambda: predict(every, ids, mask, num_samples=SAMPLES_ROUTING_MEMORY, mode="routing-average"),
            torch.device("cpu"),
        )
        results["routing-average"]["peak_bytes_per_sample"] = (many - results["routing-average"]["peak_bytes"]) / (
            SAMPLES_ROUTING_MEMORY - SAMPLES_ROUTING
        )
    if not folded:
        return results
    with patched(model, {"logits": 1.0}, layers=[-1]) as last:
        cases = {
            "deterministic": deterministic(last, batch),
            "model-average, last layer, prefix shared": lambda: predict(last, ids, mask, num_samples=SAMPLES_MODEL),
            "model-average, last layer, prefix not shared": lambda: predict(
                last, ids, mask, num_samples=SAMPLES_MODEL, share_prefix=False
            ),
        }
        second = measure(cases, repeats)
    results["deterministic (second group)"] = second.pop("deterministic")
    results.update(second)
    return results


def svi_steps(model: nn.Module, batch: dict[str, Tensor], repeats: int) -> dict[str, dict[str, float]]:
    """One SVI step of every guide family, every layer Bayesian, with the deterministic forward of
    the patched model in the same interleaved rounds (ratio base of this group)."""
    results = {}
    for guide, sites in GUIDES.items():
        pyro.clear_param_store()
        with patched(model, sites) as handle:
            # Adam at a step size of 1e-6: every timed step costs the same, and repeated steps on the
            # random-initialised model cannot drive a guide to a non-finite loss
            posterior = fit(handle, [batch], guide, answer_token_ids=ANSWER_IDS, steps=1, lr=1e-6, progress=False)
            step_batch = {**batch, "num_examples": len(batch["labels"])}

            def step(posterior=posterior, step_batch=step_batch) -> None:
                with _frozen(posterior.patch.model), _training(posterior.guide):
                    posterior.engine.step(step_batch)

            measured = measure({"deterministic": torch.no_grad()(deterministic(handle, batch)), guide: step}, repeats)
            results[f"SVI step, {guide}"] = {
                **measured[guide],
                "deterministic_seconds": measured["deterministic"]["seconds"],
            }
            del posterior, step
        gc.collect()
    return results


def factor_bytes(run: CurvatureRun) -> int:
    """Bytes of the eigenpairs the run holds, plus the ``r x r`` eigenvalue products of a low-rank posterior."""
    total = 0
    for curvature in run.curvature.values():
        for factors in (curvature.input_factors, curvature.output_factors):
            total += sum(
                f.vectors.numel() * f.vectors.element_size() + f.values.numel() * f.values.element_size()
                for f in factors
            )
        ranks = [
            (a.values.numel(), g.values.numel())
            for a, g in zip(curvature.input_factors, curvature.output_factors, strict=True)
        ]
        if any(a < curvature.target.in_features for a, _ in ranks):
            total += sum(a * g for a, g in ranks) * 8
    return total


def curvature_cases(model: nn.Module, batch: dict[str, Tensor], repeats: int) -> dict[str, dict[str, float]]:
    """The Kronecker curvature pass over the last layer's experts (the model cut to that layer),
    at every rank in :data:`RANKS`; bytes held by the factors beside the profiler's peak. Full
    factors are measured once (memory), not timed."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList([layers[-1]])
    try:
        targets = expert_targets(model)
        held: dict[str, int] = {}

        def case(rank: int | None) -> Callable[[], None]:
            def run() -> None:
                result = kronecker_curvature(model, targets, [batch], ANSWER_IDS, rank=rank, progress=False)
                held[label(rank)] = factor_bytes(result)

            return run

        timed = {label(rank): case(rank) for rank in RANKS if rank is not None}
        results = measure(
            {
                "deterministic": torch.no_grad()(lambda: model(batch["input_ids"], use_cache=False, logits_to_keep=1)),
                **timed,
            },
            repeats,
        )
        base = results.pop("deterministic")["seconds"]
        full = label(None)
        results[full] = {"seconds": float("nan"), "peak_bytes": measure_peak_memory(case(None), torch.device("cpu"))}
        for name in results:
            results[name].update(held_bytes=held[name], deterministic_seconds=base)
        return results
    finally:
        model.model.layers = layers


def label(rank: int | None) -> str:
    """The curvature case's name."""
    return f"curvature, {'rank ' + str(rank) if rank else 'full factors'}"


def analytic(shape: Shape, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
    """Tensor sizes in bytes, computed: fp32 weights of one decoder layer, the hidden states of the
    batch (and S-folded), the router logits of S samples (fp32), the posterior floats of one layer."""
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    tokens = batch["input_ids"].numel()
    h, i, e = shape.hidden, shape.expert_width, shape.experts
    sizes = {
        "layer parameters": layer_params,
        "layer weights fp32 bytes": 4 * layer_params,
        "hidden states fp32 bytes": 4 * tokens * h,
        f"hidden states S={SAMPLES_MODEL} fp32 bytes": 4 * SAMPLES_MODEL * tokens * h,
        f"router logits S={SAMPLES_ROUTING} fp32 bytes": 4 * SAMPLES_ROUTING * tokens * e,
    }
    for rank in RANKS:
        floats = e * (h * h + i * i + h + i) if rank is None else e * (h * rank + i * rank + 2 * rank + rank * rank)
        sizes[f"posterior {label(rank)} float64 bytes"] = 8 * floats
    return sizes


def guide_cost(hidden: int, experts_list: tuple[int, ...], tokens: int, repeats: int) -> list[dict[str, float]]:
    """Per-token cost of ``q(l | u)`` (one reparameterised draw and its log-density) of the amortized
    logit guides, ``bench_svi.guide_cases`` at ``hidden`` for every number of experts."""

    def build(experts: int) -> nn.Module:
        return build_model(Shape("router", "granite", hidden, 4, 4, experts, 2, 16, 0, 1, VOCAB, True), layers=1)

    cases, sizes = guide_cases(experts_list, tokens, build)
    times = {name: fastest(rounds)[0] for name, rounds in timed_rounds(cases, repeats).items()}
    return [
        {
            "guide": name,
            "experts": experts,
            "outputs_per_token": sizes[f"{name}, E={experts}"]["outputs"],
            "forward_us_per_token": 1e6 * times[f"{name}, E={experts}, forward"] / tokens,
            "forward_backward_us_per_token": 1e6 * times[f"{name}, E={experts}, forward + backward"] / tokens,
            "saved_kib_per_token": sizes[f"{name}, E={experts}"]["saved_bytes_per_token"] / 1024,
        }
        for experts in experts_list
        for name in COVARIANCES
    ]


def extrapolate(shape: Shape, cases: dict, bf16: dict, sizes: dict, last: int) -> dict[str, dict[str, float]]:
    """Full depth in bf16 on a GPU, from the per-layer figures: time as a multiple of the
    deterministic forward, memory in GB (weights of all layers and the real vocabulary plus the
    measured temporaries), and for the two predictive modes the largest S within 80 GB."""
    layers = shape.layers
    embedding = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    weights = 2 * (layers * sizes["layer parameters"] + embedding)
    det_a, det_b = cases["deterministic"]["seconds"], cases["deterministic (second group)"]["seconds"]
    bayes = cases["model-average, all layers"]["seconds"] / det_a  # one Bayesian layer / one deterministic layer
    prefix = {
        share: 2 * cases[f"model-average, last layer, prefix {share}"]["seconds"] / det_b - bayes
        for share in ("shared", "not shared")
    }
    det_peak, routing = bf16["deterministic"]["peak_bytes"], bf16["routing-average"]
    ma_peak = cases["model-average, all layers"]["peak_bytes"] / 2  # fp32 measured, halved for bf16
    ma_per_sample = ma_peak / SAMPLES_MODEL
    chunked = cases[f"model-average, all layers, {SAMPLES_PER_PASS} samples per pass"]
    rows = {
        "deterministic": {"x deterministic": 1.0, "GB": (weights + det_peak) / GB},
        f"routing-average, S={SAMPLES_ROUTING}, all layers": {
            "x deterministic": cases["routing-average"]["seconds"] / det_a,
            "GB": (weights + routing["peak_bytes"]) / GB,
        },
        f"model-average, S={SAMPLES_MODEL}, all layers": {
            "x deterministic": bayes,
            "GB": (weights + ma_peak) / GB,
            "largest S in 80 GB": int((GPU_BYTES - weights) / ma_per_sample),
        },
        f"model-average, S={SAMPLES_MODEL}, all layers, {SAMPLES_PER_PASS} samples per pass": {
            "x deterministic": chunked["seconds"] / det_a,
            "GB": (weights + chunked["peak_bytes"] / 2) / GB,
            "largest S in 80 GB": "any (time grows with S)",
        },
    }
    if routing["peak_bytes_per_sample"] > 0:  # the peak grows once the S router logits outgrow the experts' temporaries
        room = GPU_BYTES - weights - routing["peak_bytes"]
        rows[f"routing-average, S={SAMPLES_ROUTING}, all layers"]["largest S in 80 GB"] = int(
            SAMPLES_ROUTING + room / routing["peak_bytes_per_sample"]
        )
    for share, cost in prefix.items():
        rows[f"model-average, S={SAMPLES_MODEL}, last {last} layers, prefix {share}"] = {
            "x deterministic": ((layers - last) * cost + last * bayes) / layers,
            "GB": (weights + ma_peak) / GB,
            "largest S in 80 GB": int((GPU_BYTES - weights) / ma_per_sample),
        }
    for guide in GUIDES:
        case = cases[f"SVI step, {guide}"]
        saved = case["peak_bytes"] / 2 / 2  # per layer (2 layers), bf16
        rows[f"SVI step, {guide}, all layers"] = {
            "x deterministic": case["seconds"] / case["deterministic_seconds"],
            "GB": (weights + layers * saved) / GB,
        }
    for rank in RANKS:
        case = cases[label(rank)]
        held = layers * case["held_bytes"]  # every layer's factors, plus one layer's temporaries at a time
        rows[f"expert Laplace {label(rank)}, all layers (posterior GB: {held / GB:.3g})"] = {
            "x deterministic": case["seconds"] / case["deterministic_seconds"],
            "GB": (weights + held + case["peak_bytes"] - case["held_bytes"]) / GB,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the profiled one (fastest counts)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--shapes", nargs="+", default=["granite", "qwen"], help="which models (granite, qwen)")
    parser.add_argument("--last", type=int, default=4, help="Bayesian layers at the end, for the extrapolation")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON and Markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [s for s in (TINY if args.quick else (GRANITE, QWEN)) if s.family in args.shapes]
    repeats = 1 if args.quick else args.repeats
    batch = mcqa_batch(*((2, 16) if args.quick else (4, 256)))
    report: dict = {"threads": args.threads, "repeats": repeats, "batch": list(batch["input_ids"].shape), "models": {}}
    for shape in shapes:
        model = build_model(shape)
        sizes = analytic(shape, model, batch)
        cases = inference(model, batch, repeats, folded=True)
        cases.update(svi_steps(model, batch, repeats))
        cases.update(curvature_cases(model, batch, repeats))
        bf16 = inference(model.to(torch.bfloat16), batch, repeats, folded=False)
        del model
        gc.collect()
        report["models"][shape.name] = {
            "shape": shape.__dict__,
            "fp32": cases,
            "bf16": bf16,
            "computed_bytes": sizes,
            "full_depth": extrapolate(shape, cases, bf16, sizes, args.last),
        }
        write(report, args.out)  # what is measured so far survives a later failure
        print(f"{shape.name} done", flush=True)
    hidden, experts = (64, (16, 32)) if args.quick else (QWEN.hidden, (16, 32, 60, 128))
    report["guides"] = guide_cost(hidden, experts, batch["input_ids"].numel(), max(repeats, 3))
    report["guide_growth"] = growth_exponents(report["guides"])
    write(report, args.out)
    lines = markdown(report)
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write(report: dict, out: Path) -> None:
    """``scale.json`` (everything measured so far) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(report, indent=2))


def markdown(report: dict) -> list[str]:
    """The tables of ``scale.md``."""
    lines = [
        f"CPU ({report['threads']} threads), batch {report['batch'][0]} x {report['batch'][1]}, 2 decoder layers, "
        f"fastest of {report['repeats']} interleaved rounds; memory from the profiler's allocation events.",
        "",
    ]
    for name, result in report["models"].items():
        fp32, bf16 = result["fp32"], result["bf16"]
        det = {"fp32": fp32["deterministic"]["seconds"], "bf16": bf16["deterministic"]["seconds"]}
        lines += [
            f"### {name}: per layer",
            "",
            "| case | dtype | s / layer | x deterministic | peak MB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for dtype, cases in (("fp32", fp32), ("bf16", bf16)):
            for case, row in cases.items():
                base = row.get("deterministic_seconds")
                if case.startswith("curvature"):
                    per_layer, ratio = row["seconds"], row["seconds"] / base
                elif base is not None:
                    per_layer, ratio = row["seconds"] / 2, row["seconds"] / base
                else:
                    ref = fp32["deterministic (second group)"]["seconds"] if "last layer" in case else det[dtype]
                    per_layer, ratio = row["seconds"] / 2, row["seconds"] / ref
                held = f" (held {row['held_bytes'] / 1e6:.4g} MB)" if "held_bytes" in row else ""
                lines.append(
                    f"| {case} | {dtype} | {per_layer:.3f} | {ratio:.2f} | {row['peak_bytes'] / 1e6:.5g}{held} |"
                )
        lines += [
            "",
            "| computed | value |",
            "| --- | ---: |",
            *(f"| {k} | {v:.5g} |" for k, v in result["computed_bytes"].items()),
            "",
        ]
        lines += [
            f"### {name}: full depth ({result['shape']['layers']} layers), bf16, GPU",
            "",
            "| method | x deterministic | GB | largest S in 80 GB |",
            "| --- | ---: | ---: | ---: |",
        ]
        for method, row in result["full_depth"].items():
            lines.append(
                f"| {method} | {row['x deterministic']:.2f} | {row['GB']:.1f} | {row.get('largest S in 80 GB', '')} |"
            )
        lines.append("")
    lines += [
        "### Amortized logit guides, per token",
        "",
        "| guide | E | outputs / token | forward us / token | fwd + bwd us / token | saved KiB / token |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['guide']} | {r['experts']} | {r['outputs_per_token']} | {r['forward_us_per_token']:.2f} | "
            f"{r['forward_backward_us_per_token']:.2f} | {r['saved_kib_per_token']:.1f} |"
            for r in report["guides"]
        ),
        "",
        "Growth of the fwd + bwd cost per token between the two largest E (the exponent p of E^p):",
        "",
        *(f"- {guide}: E^{exponent:.2f}" for guide, exponent in report["guide_growth"].items()),
    ]
    return lines


def growth_exponents(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per guide, ``log(cost_2 / cost_1) / log(E_2 / E_1)`` of the fwd + bwd time per token between the
    two largest numbers of experts: about 1 for a cost linear in E, 2 for a quadratic one."""
    exponents = {}
    for guide in COVARIANCES:
        (e1, c1), (e2, c2) = sorted(
            (r["experts"], r["forward_backward_us_per_token"]) for r in rows if r["guide"] == guide
        )[-2:]
        exponents[guide] = math.log(c2 / c1) / math.log(e2 / e1)
    return exponents


if __name__ == "__main__":
    main()
