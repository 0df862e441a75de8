"""One process of a data-parallel test run, started by ``tests/test_distributed.py`` as torchrun would
start it (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment)::

    python -m tests.distributed_worker SCENARIO OUT TIMEOUT

The recipes (``svi_fit``, ``laplace_fit``) are the ones the test runs in one process for reference.
Scenarios: ``fits`` (SVI with elbo and joint iwae, a local-site fit, resume of a one-process
checkpoint, the Laplace families), ``killed`` (rank 1 is killed at step 1), ``hung`` (rank 1 stops
answering at step 1). A :class:`~pyro_moe.errors.DistributedError` ends the process with exit code 3.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import save_file

from pyro_moe import FittedPosterior, fit, patch_experts, patch_routers
from pyro_moe.distributed import init_distributed
from pyro_moe.errors import DistributedError
from pyro_moe.inference.svi import SVIEngine
from tests.helpers import mcqa_batches
from tests.tiny_models import tiny_model

ANSWERS = torch.tensor([4, 5, 6, 7])
ROUTER_SITES = {"weight": 0.2, "temperature": 0.3}
"""Global sites only: with the same draws on every rank, two processes equal one."""
EXIT_DISTRIBUTED = 3
STEPS = 4


def global_batches() -> list[dict[str, torch.Tensor]]:
    """Three synthetic MCQA batches of 5 rows: shards of 3 and 2 rows on two processes."""
    return mcqa_batches(count=3, size=5)


def svi_fit(objective: str, steps: int, sites: dict | None = None, guide: str | None = None) -> FittedPosterior:
    """The SVI recipe: router weight and temperature sites of two layers of a tiny Granite-MoE."""
    patch = patch_routers(tiny_model("granitemoe"), sites or ROUTER_SITES, layers=[0, 1])
    guide = guide or ("mean-field" if objective == "elbo" else "low-rank")
    options = {"objective": objective, "num_particles": 3, "lr": 0.05, "seed": 1, "progress": False}
    return fit(patch, global_batches(), guide, answer_token_ids=ANSWERS, steps=steps, **options)


def laplace_fit(name: str) -> FittedPosterior:
    """The Laplace recipes: ``expert`` (full factors, MC Fisher, evidence-optimised tau per layer),
    ``expert-low-rank`` (the streaming factors at rank >= dim) and ``dense`` (MAP by SVI, then the Hessian)."""
    if name == "dense":
        patch = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
        options = {"steps": 3, "lr": 0.05, "optimizer": "sgd", "progress": False}  # Adam would magnify rounding
        return fit(patch, global_batches(), "laplace", answer_token_ids=ANSWERS, **options)
    patch = patch_experts(tiny_model("granitemoe"), layers=[1], prior_precision=50.0, prior_mean="zero")
    options = {"fisher": "mc", "mc_samples": 2, "optimize_prior": "layer", "rank": 64 if "low-rank" in name else None}
    return fit(
        patch,
        global_batches(),
        "expert-laplace",
        answer_token_ids=ANSWERS,
        steps=0,
        guide_options={"expert-laplace": options},
    )


def parameters(posterior: FittedPosterior) -> dict[str, torch.Tensor]:
    """The trained parameters (unconstrained, by name)."""
    return {k: v.contiguous() for k, v in posterior.engine.state_tensors().items() if k.startswith("param/")}


def _fits(out: Path, rank: int) -> None:
    for objective in ("elbo", "iwae"):
        posterior = svi_fit(objective, STEPS // 2)
        posterior.save(out / f"{objective}-half")
        posterior.train(global_batches(), STEPS // 2, progress=False)
        save_file(parameters(posterior), out / f"{objective}-rank{rank}.safetensors")
        posterior.save(out / f"{objective}-from-rank{rank}")  # only rank 0's folder appears
        posterior.patch.unpatch()
    local = svi_fit("elbo", 3, sites={"logits": 1.0}, guide="mfvr")
    save_file(parameters(local), out / f"local-rank{rank}.safetensors")
    losses = torch.tensor([record["loss"] for record in local.history])
    save_file({"loss": losses}, out / f"local-history-rank{rank}.safetensors")
    resumed = FittedPosterior.load(out / "single-elbo-half", tiny_model("granitemoe"))
    resumed.train(global_batches(), STEPS // 2, progress=False)
    resumed.save(out / "resumed-on-two")
    for name in ("expert", "expert-low-rank", "dense"):
        laplace_fit(name).save(out / f"laplace-{name}")


def _fail_at_step_one(action: str) -> None:
    """Rank 1 is killed (``killed``) or stops answering (``hung``) when it reaches step 1."""
    step = SVIEngine.step

    def failing_step(engine: SVIEngine, batch: dict) -> dict:
        if engine.step_count == 1:
            if action == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return step(engine, batch)

    SVIEngine.step = failing_step


def main(scenario: str, out: Path, timeout: float) -> int:
    torch.set_num_threads(1)
    parallel = init_distributed(timeout=timeout)
    assert parallel is not None and parallel.world_size == int(os.environ["WORLD_SIZE"])
    try:
        if scenario == "fits":
            _fits(out, parallel.rank)
        else:
            if parallel.rank == 1:
                _fail_at_step_one(scenario)
            svi_fit("elbo", STEPS)
    except DistributedError as error:
        print(f"DistributedError: {error}", file=sys.stderr, flush=True)
        return EXIT_DISTRIBUTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])))
