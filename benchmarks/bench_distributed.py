"""Wall time of data-parallel SVI and Laplace fits with one and two processes (gloo, CPU), side by side.

The model is built in code (no hub): Granite-MoE, hidden 256, 4 layers, 16 experts, top-2,
intermediate 256, eager attention; the data are random MCQA prompts of 64 tokens.

* **SVI**: router-weight sites (prior scale 0.1) in every layer, guide ``mean-field``, ``elbo``, one
  particle; after ``fit`` with one step (the guide's setup, a forward pass on a whole batch, and the
  first step), the time of ``--steps`` more steps (``FittedPosterior.train``) on global batches of
  ``--batch-size`` prompts (each process steps on its half of every batch, the gradients all-reduced);
* **Laplace**: ``expert-laplace`` on the last layer's experts (full Kronecker factors, MC Fisher) over
  ``--laplace-batches`` batches (dealt round-robin, the factors reduced once).

Configurations, each started by ``torchrun --standalone`` in turn: one process with one thread, one
process with two threads (all cores to one process), two processes with one thread each. Every
process loads the model before the clock starts; the time is rank 0's wall time between two
barriers, fastest of ``--repeats`` rounds (the configurations interleaved). On a CPU the processes
share the cores and the memory bandwidth, so the speed-up is bounded by the cores; on GPUs each
process has its own device. Writes ``runs/bench/distributed.json`` and ``.md`` and prints the table.

    python benchmarks/bench_distributed.py [--steps 10] [--batch-size 32] [--laplace-batches 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_laplace import granite, mcqa_batches

from pyro_moe import fit, patch_experts, patch_routers
from pyro_moe.distributed import init_distributed

ANSWER_IDS = torch.tensor([10, 11, 12, 13])
CONFIGURATIONS = [(1, 1), (1, 2), (2, 1)]
"""(processes, threads per process)."""


def model():
    return granite(hidden=256, layers=4, experts=16, intermediate=256)


def timed(run, parallel) -> float:
    """Rank 0's wall seconds of ``run()`` between two barriers (every rank starts together)."""
    if parallel is not None:
        dist.barrier()
    start = time.perf_counter()
    run()
    if parallel is not None:
        dist.barrier()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration: time the SVI and the Laplace fit; rank 0 writes the seconds."""
    torch.set_num_threads(args.threads)
    parallel = init_distributed(timeout=600)
    svi_patch = patch_routers(model(), {"weight": 0.1}, layers="all")
    svi_batches = mcqa_batches(args.steps, args.batch_size, 64)
    laplace_patch = patch_experts(model(), layers=[-1])
    laplace_batches = mcqa_batches(args.laplace_batches, args.batch_size, 64, seed=1)
    options = {"answer_token_ids": ANSWER_IDS, "progress": False}
    posterior = fit(svi_patch, svi_batches, "mean-field", steps=1, **options)
    seconds = {
        "svi": timed(lambda: posterior.train(svi_batches, args.steps, progress=False), parallel),
        "laplace": timed(lambda: fit(laplace_patch, laplace_batches, "expert-laplace", steps=0, **options), parallel),
    }
    if parallel is None or parallel.is_main:
        Path(args.result).write_text(json.dumps(seconds))
    if parallel is not None:
        dist.destroy_process_group()


def launch(processes: int, threads: int, args: argparse.Namespace, result: Path) -> dict[str, float]:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", f"--nproc_per_node={processes}", __file__, "--worker"]
    command += ["--threads", str(threads), "--result", str(result), "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--laplace-batches", str(args.laplace_batches)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, env=env)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--laplace-batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rounds: dict[tuple[int, int], list[dict[str, float]]] = {configuration: [] for configuration in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for processes, threads in CONFIGURATIONS:
                result = Path(folder) / f"{processes}x{threads}.json"
                rounds[processes, threads].append(launch(processes, threads, args, result))
    base = {kind: min(r[kind] for r in rounds[1, 1]) for kind in ("svi", "laplace")}
    rows = []
    for (processes, threads), results in rounds.items():
        row = {"processes": processes, "threads_per_process": threads}
        for kind in ("svi", "laplace"):
            fastest = min(r[kind] for r in results)
            row[f"{kind}_seconds"] = fastest
            row[f"{kind}_speedup"] = base[kind] / fastest
        rows.append(row)
    out = Path("runs/bench")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "laplace_batches": args.laplace_batches}
    (out / "distributed.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = [
        f"SVI: {args.steps} steps after the first, global batch {args.batch_size}; "
        f"Laplace: the expert-laplace fit over {args.laplace_batches} batches; "
        f"fastest of {args.repeats}; speed-up against one process with one thread.",
        "",
        "| processes x threads | SVI s | SVI speed-up | Laplace s | Laplace speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['processes']} x {row['threads_per_process']} | {row['svi_seconds']:.2f} | "
            f"{row['svi_speedup']:.2f} | {row['laplace_seconds']:.2f} | {row['laplace_speedup']:.2f} |"
        )
    (out / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
