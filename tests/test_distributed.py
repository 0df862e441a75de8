"""Data-parallel fits on torch.distributed (gloo, two CPU processes) against one process.

The two-process runs start ``tests/distributed_worker.py`` with the environment torchrun sets; one
run of its ``fits`` scenario serves the comparisons (process start-up dominates their cost).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from safetensors.torch import load_file

from pyro_moe import ConfigurationError, FittedPosterior, cli, fit, patch_experts, patch_routers
from pyro_moe.distributed import DataParallel, RankRandomness, data_parallel, init_distributed
from pyro_moe.errors import DistributedError
from tests.distributed_worker import (
    ANSWERS,
    EXIT_DISTRIBUTED,
    STEPS,
    global_batches,
    laplace_fit,
    parameters,
    svi_fit,
)
from tests.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD = 600
"""Seconds after which a launch counts as hung (a failure, not a measurement)."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(
    scenario: str, out: Path, timeout: float = 60.0, world_size: int = 2, stop_after_rank_zero: bool = False
) -> list[tuple[int, str]]:
    """Start ``world_size`` worker processes; returns each rank's exit code and standard error
    (with ``stop_after_rank_zero``, the others are killed once rank 0 has ended)."""
    port = _free_port()
    processes = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, "-m", "tests.distributed_worker", scenario, str(out), str(timeout)]
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for process in processes:
            if stop_after_rank_zero and process is not processes[0]:
                process.kill()
            _, stderr = process.communicate(timeout=HANG_GUARD)
            results.append((process.returncode, stderr))
    finally:
        for process in processes:
            process.kill()
    return results


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The ``fits`` scenario on two processes (after writing the one-process checkpoint it resumes)."""
    out = tmp_path_factory.mktemp("two-processes")
    pyro.clear_param_store()
    half = svi_fit("elbo", STEPS // 2)
    half.save(out / "single-elbo-half")
    half.patch.unpatch()
    for rank, (code, stderr) in enumerate(launch("fits", out)):
        assert code == 0, f"rank {rank} failed:\n{stderr[-3000:]}"
    return out


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_two_processes_step_as_one_process_on_the_same_global_batches(two_processes, objective):
    """elbo: the gradient average is exact; iwae with global sites: the joint bound of the whole batch."""
    single = parameters(svi_fit(objective, STEPS))
    for rank in (0, 1):
        shared = load_file(two_processes / f"{objective}-rank{rank}.safetensors")
        assert shared.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(shared[name], value, rtol=1e-4, atol=1e-5)


def test_only_rank_zero_writes_and_every_rank_ends_with_the_same_parameters(two_processes):
    assert (two_processes / "elbo-from-rank0" / "config.json").exists()
    assert not (two_processes / "elbo-from-rank1").exists()
    first, second = (load_file(two_processes / f"local-rank{rank}.safetensors") for rank in (0, 1))
    for name, value in first.items():  # per-token sites: each rank draws its own, the update is shared
        assert torch.equal(value, second[name]), name
    histories = [load_file(two_processes / f"local-history-rank{rank}.safetensors")["loss"] for rank in (0, 1)]
    assert torch.equal(*histories) and torch.isfinite(histories[0]).all()


def test_a_checkpoint_resumes_under_another_number_of_processes(two_processes):
    single = parameters(svi_fit("elbo", STEPS))
    resumed_on_one = FittedPosterior.load(two_processes / "elbo-half", tiny_model("granitemoe"))  # two -> one
    resumed_on_one.train(global_batches(), STEPS // 2, progress=False)
    resumed_on_two = FittedPosterior.load(two_processes / "resumed-on-two", tiny_model("granitemoe"))  # one -> two
    for resumed in (resumed_on_one, resumed_on_two):
        assert resumed.engine.step_count == STEPS
        for name, value in parameters(resumed).items():
            torch.testing.assert_close(value, single[name], rtol=1e-4, atol=1e-5)
    steps = [record["step"] for record in resumed_on_one.history]
    assert steps == list(range(STEPS))


def _dense_factors(tensors: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """``(blocks, d, d)`` factors ``V diag(l) V^T`` from a saved Kronecker posterior (eigenvectors
    of equal eigenvalues are not unique; the matrices are)."""
    (vectors,) = [v for k, v in tensors.items() if k.endswith(f"{kind}_vectors")]
    (values,) = [v for k, v in tensors.items() if k.endswith(f"{kind}_values")]
    return (vectors * values[:, None, :]) @ vectors.transpose(-1, -2)


@pytest.mark.parametrize("name", ["expert", "expert-low-rank", "dense"])
def test_laplace_from_two_processes_equals_one_process(two_processes, name, tmp_path):
    """Kronecker factors (full and streaming), the evidence-optimised prior precision, the dense Hessian."""
    laplace_fit(name).save(tmp_path / "single")
    single = load_file(tmp_path / "single" / "tensors.safetensors")
    shared = load_file(two_processes / f"laplace-{name}" / "tensors.safetensors")
    assert shared.keys() == single.keys()
    if name == "dense":
        for key, value in single.items():
            if key.startswith("buffer/"):
                torch.testing.assert_close(shared[key], value, rtol=1e-4, atol=1e-5)
        return
    for kind in ("input", "output"):
        reference = _dense_factors(single, kind)
        torch.testing.assert_close(
            _dense_factors(shared, kind), reference, rtol=1e-9, atol=1e-9 * reference.abs().max()
        )
    for key in (".prior_precision", ".mean"):
        (field,) = [k for k in single if k.endswith(key)]
        torch.testing.assert_close(shared[field], single[field], rtol=1e-8, atol=0)


@pytest.mark.parametrize("scenario", ["killed", "hung"])
def test_a_dead_or_silent_rank_makes_the_others_fail_with_a_clear_error(scenario, tmp_path):
    """Rank 1 is killed (or stops answering) at step 1: rank 0 stops within the timeout instead of hanging."""
    (code, stderr), *_ = launch(scenario, tmp_path, timeout=10.0, stop_after_rank_zero=True)
    assert code == EXIT_DISTRIBUTED, stderr[-3000:]
    assert "DistributedError: rank 0 of 2: the all-reduce" in stderr
    assert "another process died, failed or did not answer within the timeout of 10 s" in stderr


def test_rank_randomness_shares_global_draws_and_keeps_per_token_draws_apart():
    def model():
        pyro.sample("weight", pyro.distributions.Normal(0.0, 1.0).expand([3]).to_event(1))
        with pyro.plate("tokens", 5, dim=-1):
            pyro.sample("logits", pyro.distributions.Normal(0.0, 1.0))
        pyro.sample("weight_again", pyro.distributions.Normal(0.0, 1.0))

    start = torch.get_rng_state()
    traces, after = [], []
    for rank in (0, 1):
        torch.set_rng_state(start)
        with RankRandomness(rank, step=7):
            traces.append(poutine.trace(model).get_trace())
        after.append(torch.get_rng_state())
    for name in ("weight", "weight_again"):  # what one process alone would draw, on both ranks
        assert torch.equal(traces[0].nodes[name]["value"], traces[1].nodes[name]["value"])
    assert not torch.equal(traces[0].nodes["logits"]["value"], traces[1].nodes["logits"]["value"])
    torch.set_rng_state(start)
    alone = [torch.randn(3), torch.randn(())]
    assert torch.equal(traces[0].nodes["weight"]["value"], alone[0])
    assert torch.equal(traces[0].nodes["weight_again"]["value"], alone[1])
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], torch.get_rng_state())


def test_shards_cover_every_row_once():
    rows = torch.arange(7)
    shards = [DataParallel(rank, 3).shard_rows({"input_ids": rows, "num_examples": 70}) for rank in range(3)]
    assert [s["input_ids"].tolist() for s in shards] == [[0, 1, 2], [3, 4], [5, 6]]
    assert all(s["num_examples"] == 70 for s in shards)
    assert [i for i, _ in DataParallel(1, 3).shard_batches(list("abcdefg"))] == [1, 4]
    with pytest.raises(ConfigurationError, match="batch 1 has 2 rows, fewer than the 3 processes"):
        DataParallel(0, 3).check_batch_sizes([5, 2])


def test_bad_input_before_any_work(monkeypatch):
    with pytest.raises(ConfigurationError, match="distributed=True needs an initialised process group"):
        data_parallel(True)
    with pytest.raises(ConfigurationError, match="distributed must be None"):
        data_parallel("yes")
    for timeout in (0, -1, True, "10"):
        with pytest.raises(ConfigurationError, match="timeout must be a positive number"):
            init_distributed(timeout=timeout)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="RANK, MASTER_ADDR, MASTER_PORT not set"):
        init_distributed()
    model = tiny_model("granitemoe")
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    patch = patch_routers(model, {"weight": 0.2}, layers=[1])
    with pytest.raises(ConfigurationError, match="distributed=True"):
        fit(patch, global_batches(), "mean-field", answer_token_ids=ANSWERS, steps=1, distributed=True)
    patch.unpatch()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name])


def test_distributed_error_is_not_an_input_error():
    assert issubclass(DistributedError, RuntimeError) and not issubclass(DistributedError, ValueError)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("fit", ["--guide", "mean-field", "--sites", "weight", "--steps", "2"]),
        ("laplace", ["--guide", "expert-laplace", "--examples", "20"]),
    ],
)
def test_the_command_line_under_torchrun_equals_one_process(command, options, tmp_path):
    """``torchrun --nproc_per_node=2 -m pyro_moe fit|laplace ...`` on the embedded benchmark, unchanged."""
    arguments = [command, *options, "--layers", "-1", "--fit-examples", "24", "--batch-size", "8", "--seed", "3"]
    assert cli.main([*arguments, "--out", str(tmp_path / "one")]) == 0
    torchrun = [Path(sys.executable).with_name("torchrun"), "--standalone", "--nproc_per_node=2", "-m", "pyro_moe"]
    run = subprocess.run(
        [*map(str, torchrun), *arguments, "--out", str(tmp_path / "two")],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "two" / cli.LOG_NAME).read_text()
    assert log.count(f"pyro-moe {command}") == 1  # rank 0 alone keeps the log
    summaries = [json.loads((tmp_path / run / "fit.json").read_text()) for run in ("one", "two")]
    assert [summary["processes"] for summary in summaries] == [1, 2] and summaries[1]["layers"] == [2]
    one, two = (load_file(tmp_path / run / "posterior" / "tensors.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name, value in one.items():
        if name.startswith(("param/", "buffer/")) and not name.endswith("_vectors"):
            torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-6, msg=name)
    if command == "laplace":
        for kind in ("input", "output"):
            torch.testing.assert_close(_dense_factors(two, kind), _dense_factors(one, kind), rtol=1e-6, atol=1e-9)


def test_other_commands_refuse_to_run_under_a_launcher(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["diagnose", "--posterior", str(tmp_path), "--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    assert "diagnose runs in one process, but WORLD_SIZE is 2" in capsys.readouterr().err
    assert cli.main(["fit", "--device-map", "auto", "--out", str(tmp_path / "out")]) == cli.EXIT_BAD_INPUT
    assert "--device-map spreads one model over every GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_spread_over_two_gpus_keeps_each_layers_sites_and_factors_on_its_device(tmp_path):
    """``device_map``: the guide's parameters and the Kronecker posteriors stay where their layer is."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    tiny_model("granitemoe").save_pretrained(tmp_path)
    reference = tiny_model("granitemoe")
    layers = len(reference.model.layers)
    device_map = {f"model.{name}": 0 for name, _ in reference.model.named_children() if name != "layers"}
    device_map |= {f"model.layers.{i}": int(i >= layers // 2) for i in range(layers)} | {"lm_head": 0}

    def layer_device(name: str) -> torch.device:
        index = int(name.split("layers.")[1].split(".")[0])
        return next(model.model.layers[index].parameters()).device

    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map)
    patch = patch_routers(model, {"weight": 0.2}, layers="all")
    posterior = fit(patch, global_batches(), "mean-field", answer_token_ids=ANSWERS, steps=2, progress=False)
    devices = {param.device for param in posterior.engine.params.values()}
    assert len(devices) == 2
    for name, param in posterior.engine.params.items():
        assert param.device == layer_device(name), name
    patch.unpatch()
    experts = patch_experts(model, layers="all")
    laplace = fit(experts, global_batches(), "expert-laplace", answer_token_ids=ANSWERS, steps=0, progress=False)
    for name, site in laplace.guide.global_guide.posteriors().items():
        assert site.mean.device == site.input_vectors.device == layer_device(name), name
