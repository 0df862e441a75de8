"""The generation experiment on tiny splits: the deterministic entropies against a plain greedy loop over
the HF model's forward, the AUROCs and their bootstrap intervals against scikit-learn and NumPy, the posterior's
scores, the report and refusals."""

from __future__ import annotations

import json

import numpy as np
import pyro
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pyro_moe import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings
from pyro_moe.experiments.evaluation import split_batches, write_results
from pyro_moe.experiments.generation import GenerationSettings, generation_experiment
from tests.experiments.tiny_evaluation import tiny_inputs, tiny_posteriors

BOOTSTRAP = BootstrapSettings(resamples=200, seed=3)
SETTINGS = GenerationSettings(
    examples=6, max_new_tokens=3, num_samples=3, batch_size=4, ood_splits=["far_ood"], bootstrap=BOOTSTRAP
)


def direct_bootstrap_aurocs(in_scores: torch.Tensor, ood_scores: torch.Tensor) -> np.ndarray:
    """scikit-learn's AUROC on each of the resamples the bootstrap draws (``BOOTSTRAP``: one chunk of 200; the
    in-distribution questions' indices first, then the OoD ones', from a generator seeded with its seed)."""
    generator = torch.Generator().manual_seed(BOOTSTRAP.seed)
    n_in, n_ood = len(in_scores), len(ood_scores)
    in_index = torch.randint(n_in, (BOOTSTRAP.resamples, n_in), generator=generator).numpy()
    ood_index = torch.randint(n_ood, (BOOTSTRAP.resamples, n_ood), generator=generator).numpy()
    truth = [0] * n_in + [1] * n_ood
    negatives, positives = in_scores.double().numpy(), ood_scores.double().numpy()
    return np.array(
        [
            roc_auc_score(truth, np.concatenate([negatives[i], positives[o]]))
            for i, o in zip(in_index, ood_index, strict=True)
        ]
    )


@torch.no_grad()
def greedy_entropies(model, input_ids, attention_mask, steps: int) -> list[float]:
    """One prompt (its real tokens) at a time: full forwards, the most probable token appended, the mean entropy
    of the next-token distributions up to and including the end-of-sequence id."""
    eos = model.generation_config.eos_token_id
    values = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        sequence, entropies = ids[mask.bool()].unsqueeze(0), []
        for _ in range(steps):
            probs = torch.softmax(model(sequence).logits[0, -1].float(), -1)
            entropies.append(float(-(probs * probs.log()).sum()))
            token = probs.argmax()
            sequence = torch.cat([sequence, token.view(1, 1)], -1)
            if int(token) == eos:
                break
        values.append(sum(entropies) / len(entropies))
    return values


def test_generation_experiment_on_tiny_splits(tmp_path):
    model, tokenizer, splits, letters = tiny_inputs()
    posteriors = tiny_posteriors(model, tokenizer, splits, letters, families=("mfvr",))
    results = generation_experiment(model, tokenizer, splits, posteriors, SETTINGS)

    for split in ("test", "far_ood"):
        batches = split_batches(splits[split], tokenizer, 4, 6)
        reference = [
            value for b in batches for value in greedy_entropies(model, b["input_ids"], b["attention_mask"], 3)
        ]
        deterministic = results.scores[split]["deterministic", "any"]["mean predictive entropy"]
        torch.testing.assert_close(deterministic, torch.tensor(reference), atol=1e-4, rtol=0)
        pyro.set_rng_seed(SETTINGS.seed)
        generations = [
            posteriors["mfvr"].generate(b["input_ids"], b["attention_mask"], max_new_tokens=3, num_samples=3)
            for b in batches
        ]
        information = torch.cat([g.mean_mutual_information for g in generations])
        torch.testing.assert_close(
            results.scores[split]["mfvr", "model-average"]["mean mutual information"], information
        )
    assert "mean mutual information" not in results.scores["test"]["mfvr", "routing-average"]

    for row in results.rows:
        in_scores = results.scores["test"][row["method"], row["mode"]][row["score"]]
        ood_scores = results.scores["far_ood"][row["method"], row["mode"]][row["score"]]
        labels = [0] * len(in_scores) + [1] * len(ood_scores)
        assert row["auroc"] == pytest.approx(roc_auc_score(labels, torch.cat([in_scores, ood_scores]).numpy()))
        # the AUROC's own interval: a NumPy percentile bootstrap of scikit-learn's AUROC on the same resamples
        aurocs = direct_bootstrap_aurocs(in_scores, ood_scores)
        assert [row["auroc_low"], row["auroc_high"]] == pytest.approx(np.quantile(aurocs, [0.025, 0.975]))
        assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]
    # the paired interval of the difference from the deterministic entropy's AUROC, on the same resamples
    assert set(results.comparisons) == {
        ("far_ood", row["method"], row["mode"], row["score"])
        for row in results.rows
        if row["method"] != "deterministic"
    }
    baseline = [
        results.scores[split]["deterministic", "any"]["mean predictive entropy"] for split in ("test", "far_ood")
    ]
    baseline_aurocs = direct_bootstrap_aurocs(*baseline)
    for (_, method, mode, score), comparison in results.comparisons.items():
        scored = [results.scores[split][method, mode][score] for split in ("test", "far_ood")]
        differences = direct_bootstrap_aurocs(*scored) - baseline_aurocs
        assert [comparison.low, comparison.high] == pytest.approx(np.quantile(differences, [0.025, 0.975]))
        assert comparison.difference == pytest.approx(
            results.auroc(method, mode, "far_ood", score)
            - results.auroc("deterministic", "any", "far_ood", "mean predictive entropy")
        )
    assert {(row["method"], row["mode"]) for row in results.rows} == {
        ("deterministic", "any"),
        ("mfvr", "model-average"),
        ("mfvr", "routing-average"),
    }
    paths = write_results(results, tmp_path / "generation")
    report = paths["report"].read_text()
    assert "## far_ood" in report and len(paths["plots"]) == 3
    row = results.rows[-1]
    assert f"{row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]" in report
    assert "mfvr (model-average), mean mutual information against deterministic" in report
    metrics = json.loads(paths["metrics"].read_text())
    kept = {(e["method"], e["mode"], e["score"]): e["values"] for e in metrics["scores"]["far_ood"]}
    assert kept["mfvr", "model-average", "mean mutual information"] == pytest.approx(
        results.scores["far_ood"]["mfvr", "model-average"]["mean mutual information"].tolist()
    )
    assert len(metrics["comparisons"]) == len(results.comparisons)


def test_settings_refused_when_built():
    with pytest.raises(ConfigurationError, match="OoD split"):
        GenerationSettings(ood_splits=["test"])
    with pytest.raises(ConfigurationError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
