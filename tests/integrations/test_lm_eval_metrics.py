"""Calibration of logged multiple-choice samples: the normalised choice distribution (the mean over draws of
every draw's choice distribution), its NLL, Brier and accuracy, the mutual information and the OoD AUROC
against computations by hand (NumPy) and scikit-learn, questions of different sizes padded without effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pyro_moe.integrations.lm_eval_metrics import choice_report, choice_sets

DRAWS = 3


def logged(task: str, sizes: list[int], seed: int) -> tuple[list[dict], dict]:
    """Logged samples of questions with ``sizes`` choices and their per-draw log-likelihoods."""
    generator = torch.Generator().manual_seed(seed)
    samples, draws = [], {}
    for question, size in enumerate(sizes):
        arguments = [(f"{task} {question}", f" {choice}") for choice in range(size)]
        per_draw = torch.randn(DRAWS, size, generator=generator, dtype=torch.float64) * 2 - 3
        for choice, key in enumerate(arguments):
            draws[key] = per_draw[:, choice]
        averaged = torch.logsumexp(per_draw, 0) - np.log(DRAWS)
        samples.append(
            {"target": question % size, "arguments": arguments, "resps": [[(float(v), False)] for v in averaged]}
        )
    return samples, draws


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(probs)).sum(-1)


def by_hand(per_draw: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mutual information, predictive entropy and normalised choice distribution ``mean_s p_s`` of one
    question's ``(draws, choices)`` log-likelihoods."""
    probs = np.exp(per_draw - per_draw.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # every draw's choice distribution p_s
    averaged = probs.mean(0)
    return entropy(averaged) - entropy(probs).mean(), entropy(averaged), averaged


def test_mutual_information_and_ood_auroc_by_hand():
    in_samples, in_draws = logged("in", [4, 2, 3, 4, 4], seed=0)
    ood_samples, ood_draws = logged("ood", [3, 4, 4, 2], seed=1)
    results = {
        "samples": {"in": in_samples, "ood": ood_samples},
        "configs": {"in": {"output_type": "multiple_choice"}, "ood": {"output_type": "multiple_choice"}},
        "results": {"in": {"acc,none": 0.5}, "ood": {}},
    }
    report = choice_report(choice_sets(results, {**in_draws, **ood_draws}), ["in"], ["ood"])
    figures = {}
    for task, samples, draws in (("in", in_samples, in_draws), ("ood", ood_samples, ood_draws)):
        figures[task] = [
            by_hand(np.stack([draws[key].numpy() for key in sample["arguments"]], -1)) for sample in samples
        ]
        mi = np.mean([f[0] for f in figures[task]])
        assert report["tasks"][task]["mean_mutual_information"] == pytest.approx(mi, abs=1e-5)
        mean_entropy = np.mean([f[1] for f in figures[task]])
        assert report["tasks"][task]["mean_predictive_entropy"] == pytest.approx(mean_entropy, abs=1e-5)
        answers = [(f[2], sample["target"]) for f, sample in zip(figures[task], samples, strict=True)]
        nll = np.mean([-np.log(probs[target]) for probs, target in answers])
        brier = np.mean([((probs - np.eye(len(probs))[target]) ** 2).sum() for probs, target in answers])
        accuracy = np.mean([probs.argmax() == target for probs, target in answers])
        assert report["tasks"][task]["nll"] == pytest.approx(nll, abs=1e-5)
        assert report["tasks"][task]["brier"] == pytest.approx(brier, abs=1e-5)
        assert report["tasks"][task]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    labels = [0] * 5 + [1] * 4
    for index, kind in enumerate(("mutual_information", "predictive_entropy")):
        scores = [f[index] for f in figures["in"] + figures["ood"]]
        assert report["ood_auroc"][kind] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert report["tasks"]["in"]["harness_accuracy"] == 0.5 and report["tasks"]["in"]["count"] == 5
