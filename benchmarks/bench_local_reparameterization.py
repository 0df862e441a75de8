"""Gradient variance of local reparameterisation against explicit weight draws, side by side.

The embedded benchmark (Granite-MoE hidden 96, 3 layers, 8 experts, top-2, loaded offline) with
router-weight sites in every layer (Normal prior, scale 0.05) and a mean-field posterior fitted for
``--steps`` SVI steps (ELBO, started at the prior's scale). The loss is the routing-average NLL of
one fixed batch of calibration questions, as a function of the guide's parameters:

* ``explicit``: S weight matrices drawn from the guide (reparameterised), the logits ``W_s u``;
* ``local``: every token's S logit vectors drawn from their Normal marginal under the guide
  (``N(u loc^T, (u^2) (scale^2)^T)``, Kingma, Salimans and Welling 2015).

Training (``pyro_moe.fit``) runs the ELBO with model-average particles and has no local
reparameterisation: the two estimators are compared on the routing-average NLL of a batch
directly. With S = 1 routing-average is one draw of the network, so the explicit estimator at
S = 1 is the gradient of a one-particle ELBO's likelihood term (up to the data scale ``N / B``;
the mean-field KL term is analytic, without variance) and the local one what local
reparameterisation would make of it.
The two losses have the same per-token marginals but not the same joint: explicit draws share
each weight matrix across the batch's tokens, local draws make the tokens independent, so their
expected gradients may differ; the table reports that difference against its Monte Carlo error.

For each S and each estimator, ``--draws`` gradients of the same loss on the same batch are taken
(interleaved); per parameter group (the locs, the scales in AutoNormal's unconstrained space),
the variance is the mean over coordinates of the per-coordinate variance over draws. Writes
``runs/bench/local_reparameterization.json`` and ``.md`` and prints the table.

    python benchmarks/bench_local_reparameterization.py [--draws 200] [--samples 1 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_moe import fit, patch_routers
from pyro_moe.core.routing_context import PARTICLE_DIM, routing_context
from pyro_moe.data import mcqa_batches
from pyro_moe.experiments.benchmark_model import load_benchmark

WEIGHT_SCALE = 0.05
ESTIMATORS = {"explicit": False, "local": True}
"""Estimator name: whether local reparameterisation is on."""


def gradient(posterior, batch: dict[str, torch.Tensor], samples: int, local: bool) -> dict[str, torch.Tensor]:
    """The gradient of the routing-average NLL of ``batch`` with ``samples`` draws, per parameter group
    (``locs``, ``scales``: the concatenated gradients of the guide's parameters of that kind)."""
    params = posterior.engine.params
    for param in params.values():
        param.grad = None
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    with (
        routing_context(mode="routing-average", local_reparameterization=local),
        pyro.plate("samples", samples, dim=PARTICLE_DIM),
        posterior.guide.posterior(input_ids, attention_mask),
    ):
        answer_logits = posterior.likelihood.answer_logits(input_ids, attention_mask)[0]  # (batch, choices)
    torch.nn.functional.cross_entropy(answer_logits, batch["labels"]).backward()
    return {
        kind: torch.cat([param.grad.reshape(-1) for name, param in sorted(params.items()) if f".{kind}." in name])
        for kind in ("locs", "scales")
    }


def summarise(draws: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per group: mean per-coordinate variance over the draws, the mean gradient's norm and its Monte Carlo
    standard error (norm of the per-coordinate standard errors)."""
    summary = {}
    for kind in draws[0]:
        stacked = torch.stack([draw[kind] for draw in draws]).double()  # (draws, coordinates)
        variance = stacked.var(0)
        summary[kind] = {
            "variance": float(variance.mean()),
            "mean_norm": float(stacked.mean(0).norm()),
            "standard_error_norm": float((variance / len(draws)).sum().sqrt()),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=200, help="gradients per estimator and S")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 8], help="S, the routing-average draws")
    parser.add_argument("--batch-size", type=int, default=32, help="questions in the batch")
    parser.add_argument("--steps", type=int, default=50, help="SVI steps of the mean-field fit")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for JSON and Markdown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_benchmark()
    calibration = loaded.benchmark.splits["calibration"]
    batches = list(mcqa_batches(calibration[:256], loaded.tokenizer, args.batch_size, shuffle=True, seed=args.seed))
    handle = patch_routers(loaded.model, {"weight": WEIGHT_SCALE})
    posterior = fit(
        handle,
        batches,
        "mean-field",
        answer_token_ids=loaded.answer_token_ids,
        steps=args.steps,
        lr=0.01,
        seed=args.seed,
        guide_options={"mean-field": {"init_scale": WEIGHT_SCALE}},
    )
    batch = batches[0]
    pyro.set_rng_seed(args.seed + 1)
    results = []
    for samples in args.samples:
        draws: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in ESTIMATORS}
        seconds = dict.fromkeys(ESTIMATORS, 0.0)
        for _ in tqdm(range(args.draws), desc=f"gradients, S={samples}"):
            for name, local in ESTIMATORS.items():  # interleaved: the machine's drifts hit both alike
                start = time.process_time()
                draws[name].append(gradient(posterior, batch, samples, local))
                seconds[name] += time.process_time() - start
        summary = {name: summarise(values) for name, values in draws.items()}
        for kind in ("locs", "scales"):
            difference = torch.stack(
                [torch.stack([d[kind] for d in draws[name]]).double().mean(0) for name in ESTIMATORS]
            )
            error = sum(summary[name][kind]["standard_error_norm"] ** 2 for name in ESTIMATORS) ** 0.5
            results.append(
                {
                    "samples": samples,
                    "group": kind,
                    "coordinates": int(draws["local"][0][kind].numel()),
                    "variance_explicit": summary["explicit"][kind]["variance"],
                    "variance_local": summary["local"][kind]["variance"],
                    "variance_ratio": summary["explicit"][kind]["variance"] / summary["local"][kind]["variance"],
                    "mean_gradient_norm": summary["explicit"][kind]["mean_norm"],
                    "mean_difference_norm": float((difference[0] - difference[1]).norm()),
                    "mean_difference_standard_error": error,
                    "cpu_seconds_explicit": seconds["explicit"] / args.draws,
                    "cpu_seconds_local": seconds["local"] / args.draws,
                }
            )

    lines = [
        f"Embedded benchmark (Granite-MoE hidden 96, 3 layers, 8 experts, top-2), router-weight sites in every "
        f"layer (prior scale {WEIGHT_SCALE}), mean-field posterior after {args.steps} SVI steps; gradient of the "
        f"routing-average NLL of one batch of {args.batch_size} calibration questions, {args.draws} draws per "
        f"estimator, CPU ({args.threads} threads). Variance: mean over coordinates of the per-coordinate "
        "variance over draws; scales in AutoNormal's unconstrained space. Mean difference: norm of the "
        "difference of the two mean gradients, beside its Monte Carlo standard error.",
        "",
        "| S | parameters | coordinates | variance, explicit | variance, local | explicit / local | "
        "norm of mean gradient | norm of mean difference | its MC error | CPU s explicit | CPU s local |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['samples']} | {r['group']} | {r['coordinates']} | {r['variance_explicit']:.3e} | "
            f"{r['variance_local']:.3e} | {r['variance_ratio']:.2f} | {r['mean_gradient_norm']:.3e} | "
            f"{r['mean_difference_norm']:.3e} | {r['mean_difference_standard_error']:.3e} | "
            f"{r['cpu_seconds_explicit']:.3f} | {r['cpu_seconds_local']:.3f} |"
            for r in results
        ),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    (args.out / "local_reparameterization.json").write_text(
        json.dumps({"settings": settings, "rows": results}, indent=2)
    )
    (args.out / "local_reparameterization.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
