"""Efficiency experiment: latency, peak memory and FLOPs per token of every family's prediction
against the deterministic model.

Every method predicts the answers of the same batch (the first ``batch_size`` questions of a split):

* **latency**: median wall-clock time of ``repeats`` calls after one warm-up call (CUDA
  synchronised around each call);
* **peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during the call minus the memory
  allocated before it; on CPU, the peak of the running total of the allocations and frees the
  PyTorch profiler records (``profile_memory=True``, its ``[memory]`` events in time order) above
  the start: the tensors PyTorch's CPU allocator holds, not the process's resident set;
* **FLOPs per token**: ``torch.utils.flop_counter.FlopCounterMode`` over one call (it counts the
  matrix products, convolutions and attention kernels), divided by the batch's real tokens.

The deterministic model runs with every router at its prior mean; each family runs
``posterior.predict`` with S samples in each predictive mode. The fit does not change the cost,
so the CLI fits with few steps.

Example::

    results = efficiency_experiment(model, tokenizer, benchmark.splits, {"mfvr": fitted_mfvr})
    results.rows                           # latency_ms, peak_memory_mib, mflops_per_token and ratios
    results = efficiency_experiment(model, tokenizer, benchmark.splits, posteriors, EfficiencySettings(repeats=10))
    write_results(results, "runs/efficiency")

    python -m pyro_moe.experiments.efficiency --out runs/efficiency      # on the embedded benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from pyro_moe.data import MCQAExample
from pyro_moe.evaluation.plots import plot_efficiency_bars
from pyro_moe.experiments.evaluation import (
    DEFAULT_FAMILIES,
    DETERMINISTIC,
    FitSettings,
    Posterior,
    PredictionSettings,
    check_posteriors,
    check_splits,
    default_answer_token_ids,
    deterministic_logits,
    fit_named_families,
    markdown_table,
    posterior_modes,
    split_batches,
)
from pyro_moe.experiments.runner import experiment_command
from pyro_moe.inference.presets import FamilySpec
from pyro_moe.validation import check_integer

__all__ = [
    "COST_FIT",
    "EfficiencyResults",
    "EfficiencySettings",
    "count_flops",
    "efficiency_experiment",
    "main",
    "measure_latency",
    "measure_peak_memory",
    "run_efficiency",
]

COLUMNS = (
    "method",
    "mode",
    "latency_ms",
    "latency_ratio",
    "peak_memory_mib",
    "memory_ratio",
    "mflops_per_token",
    "flops_ratio",
)
BASELINE_MODE = "any"
MIB = 2**20

COST_FIT = FitSettings(examples=64, steps=10)
"""The fit :func:`run_efficiency` makes by default: few steps on few questions (the cost does not depend on the fit)."""


@dataclass(frozen=True, kw_only=True)
class EfficiencySettings(PredictionSettings):
    """What :func:`efficiency_experiment` measures, besides the prediction settings it inherits
    (``num_samples``, ``modes``, ``batch_size``: the questions of the measured batch, ``seed``);
    checked when built.

    Attributes:
        split: where the measured batch comes from (its first ``batch_size`` questions).
        repeats: timed calls per method.
    """

    split: str = "test"
    repeats: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integer("repeats", self.repeats)


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``call`` after one warm-up call."""
    call()
    _synchronise(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        _synchronise(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure_peak_memory(call: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by PyTorch during ``call`` above what was allocated before it (see the
    module docstring for the CUDA and CPU measures)."""
    if device.type == "cuda":
        _synchronise(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        _synchronise(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    events.sort(key=lambda event: event.start_ns())
    return max(0, max(itertools.accumulate(event.nbytes() for event in events), default=0))


@contextlib.contextmanager
def _inference_only(models: Sequence[nn.Module]) -> Iterator[None]:
    """No tensor the predictions read requires grad (the models' parameters and Pyro's parameter
    store, restored afterwards): FlopCounterMode's module tracker hooks the gradients of module
    inputs that require them, which fails on point-mass guide values under ``no_grad``."""
    tensors = [param for model in models for param in model.parameters()]
    tensors += [param for _, param in pyro.get_param_store().named_parameters()]
    flags = [(tensor, tensor.requires_grad) for tensor in tensors]
    for tensor, _ in flags:
        tensor.requires_grad_(False)
    try:
        yield
    finally:
        for tensor, flag in flags:
            tensor.requires_grad_(flag)


def count_flops(call: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``call`` (``FlopCounterMode``)."""
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


@dataclass
class EfficiencyResults:
    """What :func:`efficiency_experiment` returns.

    Attributes:
        rows: one per method and mode (``COLUMNS``); ratios are against the deterministic model.
        device: where the model ran.
        memory_measure: how peak memory was measured.
        batch_shape: ``(questions, length)`` of the measured batch; tokens: its real tokens.
        num_samples: S per prediction; repeats: timed calls per method.
    """

    rows: list[dict[str, Any]]
    device: str
    memory_measure: str
    batch_shape: tuple[int, int]
    tokens: int
    num_samples: int
    repeats: int

    def to_json(self) -> dict[str, Any]:
        """Settings and rows."""
        return {
            "experiment": "efficiency",
            "device": self.device,
            "memory_measure": self.memory_measure,
            "batch_shape": list(self.batch_shape),
            "tokens": self.tokens,
            "num_samples": self.num_samples,
            "repeats": self.repeats,
            "rows": self.rows,
        }

    def to_markdown(self) -> str:
        """The cost table."""
        return "\n".join(
            [
                "# Efficiency",
                "",
                f"One batch of {self.batch_shape[0]} questions x {self.batch_shape[1]} positions ({self.tokens} real "
                f"tokens) on {self.device}; S = {self.num_samples}; latency is the median of {self.repeats} calls; "
                f"peak memory: {self.memory_measure}; FLOPs from FlopCounterMode (matrix products and attention); "
                "ratios against the deterministic model.",
                "",
                markdown_table(self.rows, COLUMNS),
                "![efficiency](efficiency.png)",
                "",
            ]
        )

    def plot(self, folder: str | Path) -> list[Path]:
        """``efficiency.png``: bars of latency, peak memory and FLOPs per token per method."""
        figures = {
            row["method"] if row["mode"] == BASELINE_MODE else f"{row['method']}, {row['mode']}": {
                "latency (ms per batch)": row["latency_ms"],
                "peak memory (MiB)": row["peak_memory_mib"],
                "MFLOPs per token": row["mflops_per_token"],
            }
            for row in self.rows
        }
        title = f"Prediction cost against the deterministic model (S = {self.num_samples}, {self.device})"
        return [plot_efficiency_bars(figures, Path(folder) / "efficiency.png", baseline=DETERMINISTIC, title=title)]


def efficiency_experiment(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    posteriors: Mapping[str, Posterior],
    settings: EfficiencySettings = EfficiencySettings(),
    *,
    answer_token_ids: Tensor | None = None,
) -> EfficiencyResults:
    """Latency, peak memory and FLOPs per token of every method; see the module docstring.

    Args:
        model: the (unpatched, or patched at its prior mean) model.
        tokenizer: its tokenizer.
        splits: ``{split name: questions}``.
        posteriors: ``{name: fitted posterior}``.
        settings: the batch, S, the modes and the timed calls.
        answer_token_ids: ``(choices,)`` ids of the answer letters; default the tokenizer's ``A, B, ...``.

    Raises:
        ConfigurationError: an unknown or empty split, a posterior without ``predict``; before any
            measurement.
    """
    split, batch_size, num_samples, repeats = (
        settings.split,
        settings.batch_size,
        settings.num_samples,
        settings.repeats,
    )
    check_splits(splits, [split])
    posteriors = check_posteriors(posteriors)
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[split])
    (batch,) = split_batches(splits[split][:batch_size], tokenizer, batch_size)
    device = model.get_input_embeddings().weight.device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    tokens = int(attention_mask.sum())

    calls: dict[tuple[str, str], Callable[[], Any]] = {
        (DETERMINISTIC, BASELINE_MODE): lambda: deterministic_logits(model, [batch], answer_token_ids)
    }
    for name, posterior in posteriors.items():
        for mode in posterior_modes(posterior, settings.modes):
            calls[name, mode] = lambda posterior=posterior, mode=mode: posterior.predict(
                input_ids, attention_mask, num_samples=num_samples, mode=mode
            )
    rows = []
    pyro.set_rng_seed(settings.seed)
    models = [model, *(posterior.patch.model for posterior in posteriors.values() if hasattr(posterior, "patch"))]
    with _inference_only(models):
        for (method, mode), call in calls.items():
            rows.append(
                {
                    "method": method,
                    "mode": mode,
                    "latency_ms": 1e3 * measure_latency(call, device, repeats),
                    "peak_memory_mib": measure_peak_memory(call, device) / MIB,
                    "mflops_per_token": count_flops(call) / tokens / 1e6,
                }
            )
    baseline = rows[0]
    for row in rows:
        row["latency_ratio"] = row["latency_ms"] / baseline["latency_ms"]
        row["memory_ratio"] = row["peak_memory_mib"] / baseline["peak_memory_mib"]
        row["flops_ratio"] = row["mflops_per_token"] / baseline["mflops_per_token"]
    measure = (
        "torch.cuda.max_memory_allocated above the start"
        if device.type == "cuda"
        else "peak of the PyTorch profiler's CPU allocation events above the start"
    )
    return EfficiencyResults(rows, str(device), measure, tuple(input_ids.shape), tokens, num_samples, repeats)


def run_efficiency(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec] = DEFAULT_FAMILIES,
    *,
    settings: EfficiencySettings = EfficiencySettings(),
    fitting: FitSettings = COST_FIT,
    answer_token_ids: Tensor | None = None,
) -> EfficiencyResults:
    """Fit ``families`` by name as ``fitting`` says (by default :data:`COST_FIT`, few steps: the
    cost does not depend on the fit), each on a copy of ``model``, then run
    :func:`efficiency_experiment` with ``settings``. The numbers (when the settings were built), the
    families, SWAG's schedule and the split are checked before anything is fitted."""
    check_splits(splits, [settings.split])
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[settings.split])
    posteriors = fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=answer_token_ids)
    return efficiency_experiment(model, tokenizer, splits, posteriors, settings, answer_token_ids=answer_token_ids)


@experiment_command(
    "python -m pyro_moe.experiments.efficiency",
    EfficiencySettings,
    steps=COST_FIT.steps,
    fit_examples=COST_FIT.examples,
)
def main(parser: argparse.ArgumentParser) -> Callable[..., EfficiencyResults]:
    """Latency, peak memory and FLOPs per token of Bayesian guide families' predictions (both predictive modes)
    against the deterministic model, on the embedded benchmark."""
    parser.add_argument("--split", default="test", help="split the measured batch comes from (default test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (default 5)")
    return run_efficiency


if __name__ == "__main__":
    main()
