"""Generation experiment: does the uncertainty of a generated answer tell in-distribution questions from OoD ones?

After every question of the in-distribution split (``test``) and of the OoD splits (``near_ood``,
``far_ood``) the model generates up to ``max_new_tokens`` tokens (greedy,
:meth:`pyro_moe.FittedPosterior.generate`); every sequence is scored (higher means more OoD) by

* ``mean mutual information`` and ``max mutual information`` over its generated tokens
  (``model-average`` only: ``routing-average`` has one next-token distribution, MI 0);
* ``mean predictive entropy`` over its generated tokens.

The deterministic model has the last one, from HF's own ``model.generate`` (greedy, its raw logits).
AUROC and AUPRC (OoD the positive class) as in :mod:`pyro_moe.experiments.ood`; one ROC figure per OoD
split and method.

The per-question scores are kept (:attr:`GenerationResults.scores`, and ``scores`` in ``metrics.json``).
Every AUROC carries its bootstrap 95% interval (``auroc_low``, ``auroc_high``;
:func:`pyro_moe.evaluation.bootstrap.bootstrap_interval`: the in-distribution and the OoD questions
resampled separately, the AUROC recomputed on every resample), and every AUROC but the baseline's its
difference from the AUROC of the deterministic model's mean predictive entropy on the same questions with
the paired bootstrap interval of that difference (:func:`pyro_moe.evaluation.bootstrap.compare_auroc`, as
:mod:`pyro_moe.experiments.ood` does); the report's verdict lines say "beats", "ties" or "loses" from
those intervals.

Example::

    results = generation_experiment(model, tokenizer, benchmark.splits, {"mfvr": fitted_mfvr})
    results.auroc("mfvr", "model-average", "far_ood", "mean mutual information")
    results.comparisons["far_ood", "mfvr", "model-average", "mean mutual information"].format()
    write_results(results, "runs/generation")

    python -m pyro_moe.experiments.generation --out runs/generation      # on the embedded benchmark
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.routing_context import PredictiveMode
from pyro_moe.data import MCQAExample
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import (
    BootstrapSettings,
    PairedComparison,
)
from pyro_moe.experiments.evaluation import (
    DEFAULT_FAMILIES,
    DETERMINISTIC,
    FitSettings,
    PredictionSettings,
    check_count,
    check_splits,
    default_answer_token_ids,
    fit_named_families,
    interval_note,
    markdown_table,
    posterior_modes,
    split_batches,
    verdict_line,
)
from pyro_moe.experiments.ood import RocResults, auroc_rows, comparisons_json
from pyro_moe.experiments.runner import experiment_command
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.generation import Generation
from pyro_moe.inference.presets import FamilySpec
from pyro_moe.validation import check_integer

__all__ = [
    "SCORES",
    "GenerationResults",
    "GenerationSettings",
    "deterministic_entropy",
    "generation_experiment",
    "main",
    "run_generation",
    "sequence_scores",
]

SCORES = ("mean mutual information", "max mutual information", "mean predictive entropy")
"""The sequence scores, in table order."""

COLUMNS = ("ood_split", "method", "mode", "score", "auroc", "auprc", "in_examples", "ood_examples")
BASELINE_MODE = "any"
BASELINE = (DETERMINISTIC, BASELINE_MODE, "mean predictive entropy")
"""The row every AUROC is compared with: the deterministic model's mean predictive entropy."""
AGAINST_BASELINE = f"against {DETERMINISTIC}, mean predictive entropy"
"""The report's column of the paired intervals against :data:`BASELINE`."""


@dataclass(frozen=True, kw_only=True)
class GenerationSettings(PredictionSettings):
    """The splits and generation lengths of :func:`generation_experiment`, besides the prediction settings
    it inherits (``num_samples``, ``modes``, ``batch_size``, ``seed``); checked when built.

    Attributes:
        in_split: the in-distribution split.
        ood_splits: the OoD splits (at least one, not ``in_split``), a tuple once built.
        examples: use the first this many questions of each split (``None``: all).
        max_new_tokens: tokens generated after each question at most.
        bootstrap: resamples, level and seed of the AUROCs' intervals and of the paired intervals.
    """

    num_samples: int = 8
    in_split: str = "test"
    ood_splits: Sequence[str] = ("near_ood", "far_ood")
    examples: int | None = None
    max_new_tokens: int = 8
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        ood_splits = (self.ood_splits,) if isinstance(self.ood_splits, str) else tuple(self.ood_splits)
        if not ood_splits or self.in_split in ood_splits:
            raise ConfigurationError(
                f"give at least one OoD split other than the in-distribution split {self.in_split!r}, "
                f"got {list(ood_splits)}."
            )
        object.__setattr__(self, "ood_splits", ood_splits)
        check_count("examples", self.examples)
        check_integer("max_new_tokens", self.max_new_tokens)
        if not isinstance(self.bootstrap, BootstrapSettings):
            raise ConfigurationError(f"bootstrap must be BootstrapSettings, got {type(self.bootstrap).__name__}.")


def sequence_scores(generation: Generation) -> dict[str, Tensor]:
    """The scores ``{name: (batch,)}`` of a generation (see :data:`SCORES`), on the CPU."""
    scores = {"mean predictive entropy": generation.mean_predictive_entropy}
    if generation.mode is PredictiveMode.MODEL_AVERAGE:
        scores["mean mutual information"] = generation.mean_mutual_information
        scores["max mutual information"] = generation.max_mutual_information
    return {name: value.float().cpu() for name, value in scores.items()}


@torch.no_grad()
def deterministic_entropy(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], max_new_tokens: int) -> Tensor:
    """Mean predictive entropy ``(examples,)`` of the tokens HF's greedy ``model.generate`` generates after
    every prompt of ``batches`` (its raw logits; the tokens up to and including a row's end-of-sequence id)."""
    device = model.get_input_embeddings().weight.device
    eos = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=device)
    entropies = []
    for batch in tqdm(batches, desc="deterministic generations", leave=False):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits = torch.stack(output.logits, 1).float()  # (batch, new, vocab)
        entropy = torch.distributions.Categorical(logits=logits).entropy()
        tokens = output.sequences[:, input_ids.shape[1] :]
        ended = torch.isin(tokens, eos).long().cumsum(-1)
        generated = (ended - torch.isin(tokens, eos).long()) == 0  # up to and including the first end
        entropies.append(((entropy * generated).sum(-1) / generated.sum(-1).clamp_min(1)).cpu())
    return torch.cat(entropies)


@dataclass
class GenerationResults(RocResults):
    """What :func:`generation_experiment` returns.

    Attributes:
        rows: one per OoD split, method, mode and score (``COLUMNS``, with ``auroc_low`` and ``auroc_high``,
            the AUROC's bootstrap interval).
        scores: ``{split: {(method, mode): {score: (examples,)}}}``: the per-question scores (ROC curves,
            intervals; ``scores`` in the JSON).
        in_split: the in-distribution split.
        num_samples: S per generation.
        max_new_tokens: tokens generated per question at most.
        comparisons: ``{(ood split, method, mode, score): PairedComparison}`` of every row's AUROC but the
            baseline's (:data:`BASELINE`) against the baseline's AUROC on the same questions.
        bootstrap: the settings of the intervals.
    """

    num_samples: int
    max_new_tokens: int
    comparisons: dict[tuple[str, str, str, str], PairedComparison] = field(default_factory=dict)
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)

    roc_prefix: ClassVar[str] = "generation_roc"
    roc_title: ClassVar[str] = "OoD detection from generations"

    def to_json(self) -> dict[str, Any]:
        """Settings, rows, the paired comparisons and the per-question scores."""
        return {
            "experiment": "generation",
            "in_split": self.in_split,
            "ood_splits": self.ood_splits,
            "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens,
            "rows": self.rows,
            "baseline": {"method": BASELINE[0], "score": BASELINE[2]},
            **comparisons_json(self.comparisons, self.bootstrap),
            "scores": {
                split: [
                    {"method": method, "mode": mode, "score": score, "values": values.tolist()}
                    for (method, mode), found in by_method.items()
                    for score, values in found.items()
                ]
                for split, by_method in self.scores.items()
            },
        }

    def _cells(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with its AUROC as ``'0.892 [0.870, 0.912]'`` and its paired interval against the baseline."""
        key = (row["ood_split"], row["method"], row["mode"], row["score"])
        found = self.comparisons.get(key)
        against = "" if found is None else f"{found.difference:+.3f} [{found.low:+.3f}, {found.high:+.3f}]"
        return {**row, "auroc": f"{row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]"} | {
            AGAINST_BASELINE: against
        }

    def to_markdown(self) -> str:
        """One table per OoD split with the AUROCs' intervals and verdict lines; the best AUROC of each split
        is named under it."""
        columns = (*COLUMNS[:5], AGAINST_BASELINE, *COLUMNS[5:])
        lines = [
            "# OoD detection from generated answers",
            "",
            f"In-distribution split `{self.in_split}`; OoD is the positive class; greedy generation of up to "
            f"{self.max_new_tokens} tokens after each question; S = {self.num_samples}. Scores over each generated "
            "sequence: mean and max mutual information (model-average only), mean predictive entropy. Each AUROC "
            f"shows its bootstrap {self.bootstrap.level:.0%} interval ({self.bootstrap.resamples} resamples). "
            + interval_note(
                f"{BASELINE[0]}, {BASELINE[2]}",
                self.bootstrap,
                f"{self.in_split} and OoD questions (each group resampled on its own)",
            ),
            "",
        ]
        for split in self.ood_splits:
            rows = [row for row in self.rows if row["ood_split"] == split]
            best = max(rows, key=lambda row: row["auroc"])
            lines += [f"## {split}", "", markdown_table([self._cells(row) for row in rows], columns)]
            lines += [f"Best AUROC: {best['auroc']:.3f} ({best['method']}, {best['mode']}, {best['score']}).", ""]
            lines += [
                f"- {verdict_line(f'{method} ({mode}), {score}', {'auroc': comparison})}"
                for (row_split, method, mode, score), comparison in self.comparisons.items()
                if row_split == split
            ] + [""]
            lines += [
                f"![ROC {split} {method} {mode}]({self._roc_name(split, method, mode)})"
                for method, mode in self.scores[split]
            ]
            lines.append("")
        return "\n".join(lines)


def generation_experiment(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    posteriors: Mapping[str, FittedPosterior],
    settings: GenerationSettings = GenerationSettings(),
) -> GenerationResults:
    """AUROC and AUPRC of every sequence score, method and mode; see the module docstring.

    Args:
        model: the unpatched model the posteriors were fitted on (copies of it).
        tokenizer: its tokenizer.
        splits: ``{split name: questions}``.
        posteriors: ``{name: fitted posterior}``.
        settings: the splits, sizes, samples, modes and generation length.

    Raises:
        ConfigurationError: an unknown or empty split, a posterior without ``generate``; before any generation.
    """
    in_split, ood_splits = settings.in_split, settings.ood_splits
    check_splits(splits, [in_split, *ood_splits])
    for name, posterior in posteriors.items():
        if name == DETERMINISTIC or not callable(getattr(posterior, "generate", None)):
            raise ConfigurationError(f"posterior {name!r} must be a fitted posterior (with generate) not named so.")
    scores: dict[str, dict[tuple[str, str], dict[str, Tensor]]] = {}
    for split in [in_split, *ood_splits]:
        batches = split_batches(splits[split], tokenizer, settings.batch_size, settings.examples)
        entropy = deterministic_entropy(model, batches, settings.max_new_tokens)
        scores[split] = {(DETERMINISTIC, BASELINE_MODE): {"mean predictive entropy": entropy}}
        for name, posterior in posteriors.items():
            for mode in posterior_modes(posterior, settings.modes):
                pyro.set_rng_seed(settings.seed)
                parts: dict[str, list[Tensor]] = {}
                for batch in tqdm(batches, desc=f"generations, {name}, {mode}", leave=False):
                    generation = posterior.generate(
                        batch["input_ids"],
                        batch["attention_mask"],
                        max_new_tokens=settings.max_new_tokens,
                        num_samples=settings.num_samples,
                        mode=mode,
                    )
                    for score, value in sequence_scores(generation).items():
                        parts.setdefault(score, []).append(value)
                scores[split][name, mode] = {score: torch.cat(values) for score, values in parts.items()}
    rows, comparisons = auroc_rows(scores, in_split, ood_splits, SCORES, BASELINE, settings.bootstrap, intervals=True)
    return GenerationResults(
        rows,
        scores,
        in_split,
        settings.num_samples,
        settings.max_new_tokens,
        comparisons=comparisons,
        bootstrap=settings.bootstrap,
    )


def run_generation(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec] = DEFAULT_FAMILIES,
    *,
    settings: GenerationSettings = GenerationSettings(),
    fitting: FitSettings = FitSettings(),
    answer_token_ids: Tensor | None = None,
) -> GenerationResults:
    """Fit ``families`` by name as ``fitting`` says (each on a copy of ``model``, on the MCQA answers), then
    run :func:`generation_experiment` with ``settings``; the splits are checked before anything is fitted."""
    check_splits(splits, [settings.in_split, *settings.ood_splits])
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[settings.in_split])
    posteriors = fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=answer_token_ids)
    return generation_experiment(model, tokenizer, splits, posteriors, settings)


@experiment_command("python -m pyro_moe.experiments.generation", GenerationSettings)
def main(parser: argparse.ArgumentParser) -> Callable[..., GenerationResults]:
    """OoD detection (AUROC, AUPRC, ROC curves) from generated answers: mean and max mutual information and mean
    predictive entropy of the generated tokens, against the deterministic model's entropy, test against near_ood
    and far_ood of the embedded benchmark."""
    parser.set_defaults(samples=8)
    parser.add_argument("--examples", type=int, default=None, help="questions per split (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per question (default 8)")
    parser.add_argument(
        "--ood-splits", nargs="+", default=["near_ood", "far_ood"], help="OoD splits (default near_ood far_ood)"
    )
    return run_generation


if __name__ == "__main__":
    main()
