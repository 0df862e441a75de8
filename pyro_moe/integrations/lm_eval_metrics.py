"""Calibration and uncertainty of multiple-choice harness tasks, from the harness's logged samples.

For every question of a ``multiple_choice`` task the harness logs each choice's log-likelihood
(:class:`~pyro_moe.integrations.lm_eval.PyroMoELM`'s posterior predictive ``log p(choice | question)``),
and the model keeps every choice's log-likelihood under every draw ``s``
(:attr:`PyroMoELM.draw_log_likelihoods`). Every draw's **choice distribution** ``p_s`` is the softmax of
its log-likelihoods over the question's choices; the **normalised choice distribution** is their mean
``mean_s p_s``, the model-average predictive of ``pyro-moe evaluate`` (the mean over draws of each draw's
normalised answer distribution; in routing-average or for a plain model there is one draw, and it is the
softmax of the logged log-likelihoods). Its NLL, ECE and Brier score against the gold choice are computed
with :mod:`pyro_moe.evaluation.metrics`, and the **mutual information** between the answer and the draws is
``H[mean_s p_s] - mean_s H[p_s]`` (0 with one draw). Questions of different sizes are padded with choices of
probability 0, which changes none of the figures.

Example::

    results = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], log_samples=True)
    sets = choice_sets(results, lm.draw_log_likelihoods)
    report = choice_report(sets, in_tasks=["arc_easy"], ood_tasks=[])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import calibration_report, mutual_information, ood_auroc, predictive_entropy

__all__ = ["ChoiceSet", "choice_report", "choice_sets", "markdown_table"]


@dataclass(frozen=True)
class ChoiceSet:
    """The questions of one multiple-choice task.

    Attributes:
        probs: ``(questions, choices)`` normalised choice distributions, ``sample_probs.mean(0)`` (0 for a
            question's missing choices).
        sample_probs: ``(draws, questions, choices)`` every draw's normalised choice distribution.
        labels: ``(questions,)`` the gold choice.
        harness_accuracy: the harness's own ``acc`` of the task, if it reported one.
    """

    probs: Tensor
    sample_probs: Tensor
    labels: Tensor
    harness_accuracy: float | None


def _question(sample: Mapping[str, Any], draws: Mapping[tuple[str, str], Tensor]) -> tuple[Tensor, int] | None:
    """``(draws, choices)`` per-draw log-likelihoods of one logged question and its gold index (None: no index)."""
    target = sample["target"]
    if isinstance(target, str) and target.strip().isdigit():
        target = int(target)
    if not isinstance(target, int):
        return None
    rows = []
    for arguments, response in zip(sample["arguments"], sample["resps"], strict=True):
        key = (arguments[0], arguments[1])
        rows.append(draws[key] if key in draws else torch.tensor([float(response[0][0])], dtype=torch.float64))
    width = max(len(row) for row in rows)
    return torch.stack([row.expand(width) for row in rows], -1), target


def choice_sets(results: Mapping[str, Any], draws: Mapping[tuple[str, str], Tensor]) -> dict[str, ChoiceSet]:
    """The :class:`ChoiceSet` of every ``multiple_choice`` task of ``results`` (``simple_evaluate(...,
    log_samples=True)``); ``draws``: :attr:`PyroMoELM.draw_log_likelihoods` (a choice missing there counts
    with its logged log-likelihood as its only draw). Questions whose target is no choice index are left out."""
    if "samples" not in results:
        raise ConfigurationError("the harness results hold no logged samples: run simple_evaluate with log_samples.")
    sets = {}
    for task, samples in results["samples"].items():
        if results["configs"].get(task, {}).get("output_type") != "multiple_choice":
            continue
        questions = [q for q in (_question(sample, draws) for sample in samples) if q is not None]
        if not questions:
            continue
        draws_count = max(q.shape[0] for q, _ in questions)
        choices = max(q.shape[1] for q, _ in questions)
        log_likelihoods = torch.full((draws_count, len(questions), choices), -math.inf, dtype=torch.float64)
        for row, (values, _) in enumerate(questions):
            log_likelihoods[:, row, : values.shape[1]] = values.expand(draws_count, -1)
        sample_probs = log_likelihoods.softmax(-1)  # every draw's choice distribution p_s
        accuracy = results["results"].get(task, {}).get("acc,none")
        sets[task] = ChoiceSet(
            probs=sample_probs.mean(0),  # mean_s p_s, as the MI and pyro-moe evaluate's model-average
            sample_probs=sample_probs,
            labels=torch.tensor([label for _, label in questions]),
            harness_accuracy=None if accuracy is None else float(accuracy),
        )
    return sets


def choice_report(sets: Mapping[str, ChoiceSet], in_tasks: Sequence[str], ood_tasks: Sequence[str]) -> dict[str, Any]:
    """Per task: accuracy, NLL, Brier, ECE, MCE, confidence, count (:func:`calibration_report` of the normalised
    choice distributions), mean mutual information and mean predictive entropy over questions, the harness's
    ``acc``; with ``ood_tasks``: the AUROC of telling their questions from those of ``in_tasks`` by mutual
    information and by predictive entropy."""
    report: dict[str, Any] = {"tasks": {}}
    for task, choice_set in sets.items():
        figures = calibration_report(choice_set.probs.float(), choice_set.labels)
        figures["mean_mutual_information"] = float(mutual_information(choice_set.sample_probs.float()).mean())
        figures["mean_predictive_entropy"] = float(predictive_entropy(choice_set.probs.float()).mean())
        figures["harness_accuracy"] = choice_set.harness_accuracy
        report["tasks"][task] = figures
    in_sets = [sets[t] for t in in_tasks if t in sets]
    ood_sets = [sets[t] for t in ood_tasks if t in sets]
    if in_sets and ood_sets:

        def scores(chosen: list[ChoiceSet], kind: str) -> Tensor:
            if kind == "mutual_information":
                return torch.cat([mutual_information(s.sample_probs.float()) for s in chosen])
            return torch.cat([predictive_entropy(s.probs.float()) for s in chosen])

        report["ood_auroc"] = {
            kind: ood_auroc(scores(in_sets, kind), scores(ood_sets, kind))
            for kind in ("mutual_information", "predictive_entropy")
        }
    return report


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (one row per task), the OoD AUROCs below it."""
    columns = ("count", "accuracy", "harness_accuracy", "nll", "ece", "brier", "mean_mutual_information")
    lines = ["| task | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for task, figures in report["tasks"].items():
        cells = [
            "" if figures[c] is None else f"{figures[c]:.4g}" if isinstance(figures[c], float) else str(figures[c])
            for c in columns
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    for kind, value in report.get("ood_auroc", {}).items():
        lines.append(f"\nOoD AUROC by {kind.replace('_', ' ')}: {value:.4g}")
    return "\n".join(lines) + "\n"
