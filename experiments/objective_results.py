"""The results of the objective study (:func:`pyro_moe.experiments.objectives.run_objective_study`):
the predictors' table with its paired bootstrap comparisons against the deterministic model, the scale
selection, the fits and their collapse reports; its report and files.

Example::

    study.table                      # one row per predictor: accuracy, nll, ece, brier, OoD AUROC, flags
    study.selected_scale             # the grid scale with the lowest selection-part NLL
    study.write("runs/objectives")   # metrics.json, report.md, elbo.png, collapse_<case>.png
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from pyro_moe.atomic_files import write_text_atomically
from pyro_moe.diagnostics.collapse import CollapseReport
from pyro_moe.evaluation.bootstrap import PairedComparison
from pyro_moe.experiments.evaluation import DETERMINISTIC, interval_note, verdict_line
from pyro_moe.experiments.guide_comparison import plot_elbo_curves
from pyro_moe.experiments.objective_settings import ObjectiveStudySettings
from pyro_moe.inference.fitting import FittedPosterior

__all__ = ["ObjectiveStudy"]


@dataclass
class ObjectiveStudy:
    """What :func:`run_objective_study` returns.

    Attributes:
        table: one row per predictor (``deterministic``, ``prior``, ``prior (selected scale)``,
            ``elbo``, ``iwae``): ``accuracy, nll, ece, mce, brier, confidence`` on the test
            questions, ``near_ood_auroc_mi`` and ``far_ood_auroc_mi`` (AUROC of the mutual
            information, test against each OoD split; missing (NaN) for the deterministic model,
            whose mutual information is 0), the ``prior_scales`` (per layer), and for the fits the
            smallest ``kl_per_dimension`` over the sites and the collapse flags
            ``prior_collapse`` and ``deterministic`` (any site).
        selection_nll: ``{grid scale: NLL of the unfitted prior at that scale on the selection part}``.
        posteriors: the two fits, each on its own copy of the model (still patched).
        collapse: the collapse report of each fit on the first test batches.
        settings: the settings of the run.
        comparisons: ``{predictor: {column: PairedComparison}}`` of every predictor but the
            deterministic model against it (:data:`COMPARED` and the ``*_auroc_mi`` columns).
        probs: ``{predictor: (examples, choices)}`` the test probabilities.
        labels: ``(examples,)`` the test labels.
    """

    table: pd.DataFrame
    selection_nll: dict[float, float]
    posteriors: dict[str, FittedPosterior]
    collapse: dict[str, CollapseReport]
    settings: ObjectiveStudySettings
    comparisons: dict[str, dict[str, PairedComparison]]
    probs: dict[str, Tensor]
    labels: Tensor

    @property
    def selected_scale(self) -> float:
        """The grid scale with the lowest selection-part NLL (the first of the grid on a tie)."""
        return min(self.selection_nll, key=self.selection_nll.__getitem__)

    def to_json(self) -> dict[str, Any]:
        """The table, the settings and the collapse tables as plain JSON values."""
        return {
            "settings": dataclasses.asdict(self.settings),
            "selection": {
                "scales": list(self.selection_nll),
                "nll": list(self.selection_nll.values()),
                "selected_scale": self.selected_scale,
            },
            "predictors": json.loads(self.table.to_json(orient="index")),
            "comparisons": [
                {"predictor": name, "column": column, **comparison.to_json()}
                for name, found in self.comparisons.items()
                for column, comparison in found.items()
            ],
            "collapse": {
                case: json.loads(report.table.to_json(orient="records")) for case, report in self.collapse.items()
            },
        }

    def to_markdown(self) -> str:
        """The predictors' table as Markdown (figures to three decimals) and the scale selection under it."""
        columns = [
            "accuracy",
            "nll",
            "ece",
            "brier",
            "near_ood_auroc_mi",
            "far_ood_auroc_mi",
            "kl_per_dimension",
            "prior_collapse",
            "prior_scales",
        ]
        lines = ["| predictor | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
        for name, row in self.table.iterrows():
            cells = []
            for column in columns:
                value = row[column]
                if column in self.comparisons.get(name, {}):
                    cells.append(self.comparisons[name][column].format())
                elif value is None or (isinstance(value, float) and math.isnan(value)):
                    cells.append("")
                elif isinstance(value, float):
                    cells.append(f"{value:.3f}")
                elif isinstance(value, list):
                    cells.append(", ".join(f"{v:.2f}" for v in value))
                else:
                    cells.append(str(value))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        grid = ", ".join(f"{scale:g}: {nll:.3f}" for scale, nll in self.selection_nll.items())
        questions = f"{self.labels.shape[0]} test questions (the AUROCs: against its predictive entropy's)"
        lines += ["", interval_note(DETERMINISTIC, self.settings.bootstrap, questions), ""]
        lines += [f"- {verdict_line(name, found)}" for name, found in self.comparisons.items()]
        lines += [
            "",
            f"Prior scale selected on the last {self.settings.selection_examples} calibration questions "
            f"(not fitted on): {self.selected_scale:g}; selection NLL per scale: {grid}.",
        ]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``metrics.json``, ``report.md``, ``elbo.png`` (both fits' loss curves) and
        ``collapse_<case>.png`` into ``folder``; returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"metrics": folder / "metrics.json", "report": folder / "report.md"}
        write_text_atomically(paths["metrics"], json.dumps(self.to_json(), indent=2) + "\n")
        title = "# Plain ELBO against the importance-weighted bound with learned prior scales\n\n"
        write_text_atomically(paths["report"], title + self.to_markdown())
        paths["elbo"] = plot_elbo_curves(
            {case: posterior.history for case, posterior in self.posteriors.items()}, folder / "elbo.png"
        )
        for case, report in self.collapse.items():
            paths[f"collapse_{case}"] = report.plot(folder / f"collapse_{case}.png")
        return paths
