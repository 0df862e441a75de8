"""Held-out perplexity experiment: the perplexity of text under the deterministic model and under
every posterior, in each predictive mode it has (:func:`pyro_moe.inference.perplexity.perplexity`).

The deterministic model (every router at its prior mean, the HF model) draws nothing: it appears
once, with mode ``"any"``. Lower is better; a posterior whose perplexity is above the deterministic
model's spends its routing noise where the text does not want it.

Example::

    batches = list(text_batches(load_text("held_out.txt"), tokenizer, batch_size=8))
    results = perplexity_experiment(model, batches, {"mfvr": fitted_on_text})
    results.rows                     # one dict per method and mode: perplexity, nll, tokens
    write_results(results, "runs/perplexity")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
from torch import Tensor, nn

from pyro_moe.experiments.evaluation import (
    DETERMINISTIC,
    PredictionSettings,
    check_posteriors,
    markdown_table,
    posterior_modes,
)
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.inference.perplexity import Perplexity, perplexity
from pyro_moe.models.likelihoods import check_text_batches

__all__ = ["COLUMNS", "PerplexityResults", "perplexity_experiment"]

COLUMNS = ("method", "mode", "perplexity", "nll", "tokens")
BASELINE_MODE = "any"
"""The mode column of the deterministic model (it draws no samples)."""


@dataclass
class PerplexityResults:
    """What :func:`perplexity_experiment` returns.

    Attributes:
        rows: one per method and mode (:data:`COLUMNS`): ``perplexity``, ``nll`` (mean per scored
            token, nats) and ``tokens`` (scored tokens); the deterministic model once, mode ``"any"``.
        documents: number of documents (rows of the batches) measured.
        num_samples: S per prediction.
    """

    rows: list[dict[str, Any]]
    documents: int
    num_samples: int

    def row(self, method: str, mode: str = BASELINE_MODE) -> dict[str, Any]:
        """The row of ``method`` in ``mode``."""
        for row in self.rows:
            if row["method"] == method and row["mode"] == mode:
                return row
        raise KeyError((method, mode))

    def to_json(self) -> dict[str, Any]:
        """Settings and rows."""
        return {
            "experiment": "perplexity",
            "documents": self.documents,
            "num_samples": self.num_samples,
            "rows": self.rows,
        }

    def to_markdown(self) -> str:
        """One table, the deterministic model first."""
        return "\n".join(
            [
                "# Held-out perplexity",
                "",
                f"{self.documents} documents, {self.rows[0]['tokens']} scored tokens (every real token after a "
                f"real token); S = {self.num_samples} samples; NLL in nats per token; lower is better.",
                "",
                markdown_table(self.rows, COLUMNS),
            ]
        )

    def plot(self, folder: str | Path) -> list[Path]:
        """No figures: the table is the result."""
        return []


def perplexity_experiment(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    posteriors: Mapping[str, FittedPosterior],
    settings: PredictionSettings | None = None,
) -> PerplexityResults:
    """Perplexity of the text ``batches`` under the deterministic model and ``posteriors``.

    Args:
        model: the (unpatched, or patched at its prior mean) model the posteriors were fitted on.
        batches: text batches (``input_ids``, ``attention_mask``), e.g. from :func:`pyro_moe.data.text_batches`.
        posteriors: ``{name: fitted posterior}`` (fitted on text or on MCQA questions).
        settings: samples, modes and seed (``batch_size`` is the batches'); default :class:`PredictionSettings`.

    Raises:
        ConfigurationError: batches that are not text batches, a posterior without ``predict``; before
            any prediction.
    """
    settings = PredictionSettings() if settings is None else settings
    batches = check_text_batches(batches)
    posteriors = check_posteriors(posteriors)
    rows = [{"method": DETERMINISTIC, "mode": BASELINE_MODE, **_row(perplexity(model, batches))}]
    for name, posterior in posteriors.items():
        for mode in posterior_modes(posterior, settings.modes):
            pyro.set_rng_seed(settings.seed)
            measured = perplexity(posterior, batches, num_samples=settings.num_samples, mode=mode)
            rows.append({"method": name, "mode": mode, **_row(measured)})
    documents = sum(len(batch["input_ids"]) for batch in batches)
    return PerplexityResults(rows=rows, documents=documents, num_samples=settings.num_samples)


def _row(measured: Perplexity) -> dict[str, Any]:
    return {"perplexity": measured.value, "nll": measured.nll, "tokens": measured.tokens}
