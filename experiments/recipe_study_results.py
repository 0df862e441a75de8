"""The results of the recipe study (:func:`pyro_moe.experiments.recipes.run_recipe_study`): the table of
every method and mode with its paired bootstrap comparisons against temperature scaling, the spread over the
fit seeds, the verdict drawn from the intervals, each recipe against its starting prior and the calibration-half
fits against the train fits; its JSON, report and plots.

Example::

    study.table                  # one row per method and mode
    study.verdict                # which recipe beats temperature scaling, if any (from the intervals)
    study.seed_spread["mfvr-iwae-layer", "model-average"]["nll"].format()   # with several fit seeds: mean (min, max)
    study.write("runs/recipes")  # metrics.json, report.md, scales_<recipe>.png, calibration/, ood/
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyro_moe.evaluation.bootstrap import PairedComparison
from pyro_moe.experiments.calibration import CalibrationResults
from pyro_moe.experiments.evaluation import (
    MODES,
    TEMPERATURE_SCALING,
    interval_cells,
    interval_note,
    markdown_table,
    slug,
    verdict_line,
    write_results,
)
from pyro_moe.experiments.ood import OoDResults
from pyro_moe.experiments.recipe_study_settings import RecipeStudySettings
from pyro_moe.inference.recipe_fit import RecipeFit

__all__ = [
    "COLUMNS",
    "OOD_SCORES",
    "OOD_SPLITS",
    "RecipeStudy",
    "SeedSpread",
    "merged_comparisons",
    "merged_rows",
    "spread_over_seeds",
]

OOD_SPLITS = ("near_ood", "far_ood")
"""The OoD splits every row's AUROCs are measured against (the test questions the negatives)."""

OOD_SCORES = ("predictive entropy", "mutual information")
"""The uncertainty scores whose AUROCs the table shows."""

COLUMNS = (
    "method",
    "mode",
    "accuracy",
    "nll",
    "ece",
    "brier",
    *(f"auroc {split}, {score}" for split in OOD_SPLITS for score in OOD_SCORES),
)
"""The table's columns, in order."""


@dataclass(frozen=True)
class SeedSpread:
    """One compared column of one recipe row over the fit seeds: the metric and its difference from
    temperature scaling under each seed (each from that seed's paired comparison on the same questions).

    Attributes:
        metric: the column (e.g. ``"nll"``, ``"auroc far_ood, mutual information"``).
        seeds: the fit seeds, in order.
        values: the metric under each seed.
        differences: its difference from temperature scaling under each seed.
    """

    metric: str
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    differences: tuple[float, ...]

    @staticmethod
    def _summary(values: Sequence[float]) -> dict[str, float]:
        return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}

    @property
    def value(self) -> dict[str, float]:
        """``{"mean", "min", "max"}`` of the metric over the seeds."""
        return self._summary(self.values)

    @property
    def difference(self) -> dict[str, float]:
        """``{"mean", "min", "max"}`` of the difference from temperature scaling over the seeds."""
        return self._summary(self.differences)

    def format(self, digits: int = 3) -> str:
        """``'0.530 (0.525, 0.534); -0.012 (-0.015, -0.010)'``: the metric's mean (min, max), then its
        difference's mean (min, max)."""
        v, d = self.value, self.difference
        return (
            f"{v['mean']:.{digits}f} ({v['min']:.{digits}f}, {v['max']:.{digits}f}); "
            f"{d['mean']:+.{digits}f} ({d['min']:+.{digits}f}, {d['max']:+.{digits}f})"
        )

    def to_json(self) -> dict[str, Any]:
        """The per-seed figures and their summaries."""
        return {
            "metric": self.metric,
            "seeds": list(self.seeds),
            "values": list(self.values),
            "differences": list(self.differences),
            "value": self.value,
            "difference": self.difference,
        }


_STATUS = {
    "both": "beats it on NLL and ECE",
    "nll": "beats it on NLL alone",
    "none": "does not beat it on NLL",
}
"""The verdict classes of a calibrated recipe row against temperature scaling."""


def _status(found: dict[str, PairedComparison]) -> str:
    """A row's verdict class (:data:`_STATUS`) from its intervals."""
    if found["nll"].verdict == found["ece"].verdict == "beats" and found["accuracy"].verdict != "loses":
        return "both"
    return "nll" if found["nll"].verdict == "beats" else "none"


@dataclass
class RecipeStudy:
    """What :func:`~pyro_moe.experiments.recipes.run_recipe_study` returns.

    Attributes:
        settings: what was run.
        table: one row per method and mode (:data:`COLUMNS`), the recipes' rows those of the first fit seed;
            with several fit seeds, every recipe row also holds ``"over fit seeds"``: ``{column: spread}``.
        fits: every recipe's :class:`~pyro_moe.inference.recipe_fit.RecipeFit` (selection, kept step,
            scale trajectories, temperatures), by row name, every fit seed's.
        calibration: the calibration experiment (reliability diagrams), every fit seed's rows.
        ood: the OoD experiment (ROC curves), every fit seed's rows.
        comparisons: ``{(method, mode): {column: PairedComparison}}`` of every row but temperature
            scaling's against it (the calibration metrics and the AUROC columns), every fit seed's rows.
        fit_against_prior: ``{(recipe, mode): {metric: PairedComparison}}``: each calibrated recipe row
            (every fit seed's) against its calibrated starting prior on the same test questions (does the fit
            add anything?).
        seed_names: ``{row name: {fit seed: row name under that seed}}`` of every recipe row of the table
            (the first seed's name is the row's own).
        seed_spread: ``{(row name, mode): {column: SeedSpread}}`` of every recipe row of the table.
        fit_data_comparison: ``{(half-fit row, mode): {metric: PairedComparison}}``: each calibrated
            calibration-half fit (first fit seed) against the train fit of the same recipe (empty unless
            ``fit_data`` holds both).
    """

    settings: RecipeStudySettings
    table: list[dict[str, Any]]
    fits: dict[str, RecipeFit]
    calibration: CalibrationResults
    ood: OoDResults
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]]
    fit_against_prior: dict[tuple[str, str], dict[str, PairedComparison]]
    seed_names: dict[str, dict[int, str]]
    seed_spread: dict[tuple[str, str], dict[str, SeedSpread]]
    fit_data_comparison: dict[tuple[str, str], dict[str, PairedComparison]]

    def _row(self, method: str, mode: str) -> dict[str, Any]:
        return next(row for row in self.table if row["method"] == method and row["mode"] == mode)

    def _recipe_rows(self) -> dict[tuple[str, str], dict[str, PairedComparison]]:
        """The comparisons of the calibrated recipe rows of the table (the first fit seed's)."""
        first = [name for name in self.seed_names if name in self.fits]
        return {key: found for key, found in self.comparisons.items() if key[0] in first}

    @property
    def verdict(self) -> str:
        """Which calibrated recipe rows beat temperature scaling on test NLL and ECE without losing
        accuracy, or, if none, on NLL alone, from the paired intervals (the first fit seed's rows); then
        whether that holds for every fit seed."""
        calibrated = self._recipe_rows()

        def described(key: tuple[str, str], metrics: Sequence[str]) -> str:
            figures = ", ".join(f"{metric.upper()} {calibrated[key][metric].format()}" for metric in metrics)
            return f"{key[0]} ({key[1]}): {figures}"

        statuses = {key: _status(found) for key, found in calibrated.items()}
        both = [key for key, status in statuses.items() if status == "both"]
        nll_only = [key for key, status in statuses.items() if status == "nll"]
        if both:
            names = "; ".join(described(key, ("nll", "ece", "accuracy")) for key in both)
            found = f"Beats temperature scaling on NLL and ECE (intervals below 0, accuracy not worse): {names}."
        elif nll_only:
            names = "; ".join(described(key, ("nll", "ece", "accuracy")) for key in nll_only)
            found = f"No recipe beats temperature scaling on both NLL and ECE; on NLL alone: {names}."
        else:
            best = min(calibrated, key=lambda key: calibrated[key]["nll"].estimate)
            found = (
                "No recipe beats temperature scaling on NLL (every interval holds 0 or lies above it); the best "
                f"calibrated recipe row is {described(best, ('nll', 'ece'))}."
            )
        return f"{found} {self._seed_verdict(statuses)}"

    def _seed_verdict(self, statuses: dict[tuple[str, str], str]) -> str:
        """Whether every calibrated recipe row is in the same verdict class under every fit seed."""
        seeds = self.settings.fit_seeds
        if len(seeds) == 1:
            return f"One fit seed ({seeds[0]}): whether this holds across fit seeds is not measured (--fit-seeds)."
        changed = []
        for key in statuses:
            by_seed = {seed: _status(self.comparisons[self.seed_names[key[0]][seed], key[1]]) for seed in seeds}
            if len(set(by_seed.values())) > 1:
                classes = [
                    f"{_STATUS[status]} under fit seed(s) {', '.join(str(s) for s in seeds if by_seed[s] == status)}"
                    for status in dict.fromkeys(by_seed.values())
                ]
                changed.append(f"{key[0]} ({key[1]}) {'; '.join(classes)}")
        listed = ", ".join(map(str, seeds))
        if not changed:
            return f"This holds for every fit seed ({listed}): every recipe row is in the same class under each."
        return f"This does not hold for every fit seed ({listed}): " + "; ".join(changed) + "."

    def to_json(self) -> dict[str, Any]:
        measured = merged_rows(self.calibration, self.ood)  # every fit seed's rows
        return {
            "settings": asdict(self.settings),
            "table": self.table,
            "comparisons": [
                {"method": method, "mode": mode, "column": column, **comparison.to_json()}
                for (method, mode), found in self.comparisons.items()
                for column, comparison in found.items()
            ],
            "verdict": self.verdict,
            "fit_against_prior": [
                {"recipe": recipe, "mode": mode, **comparison.to_json()}
                for (recipe, mode), found in self.fit_against_prior.items()
                for comparison in found.values()
            ],
            "fit_data_comparison": [
                {"method": method, "mode": mode, **comparison.to_json()}
                for (method, mode), found in self.fit_data_comparison.items()
                for comparison in found.values()
            ],
            "seed_rows": [
                {**row, "row": name, "fit_seed": seed}
                for name, seeds in self.seed_names.items()
                for seed, seed_name in seeds.items()
                for row in measured
                if row["method"] == seed_name
            ],
            "seed_spread": [
                {"method": method, "mode": mode, **spread.to_json()}
                for (method, mode), found in self.seed_spread.items()
                for spread in found.values()
            ],
            "recipes": {name: fit.to_json() for name, fit in self.fits.items()},
        }

    def _data_note(self) -> str:
        parts = []
        if "train" in self.settings.fit_data:
            parts.append(
                f"on {self.settings.fit_examples} train questions, their scale, kept step and temperatures chosen "
                f"on {self.settings.calibration_examples or 'all'} calibration questions"
            )
        if "calibration-halves" in self.settings.fit_data:
            parts.append(
                "on one half of those calibration questions, everything chosen on the other half, then swapped "
                "(rows `fit on calibration half A` / `B`)"
            )
        seeds = ", ".join(map(str, self.settings.fit_seeds))
        return f"Recipes fitted {' and '.join(parts)}; fit seed(s) {seeds}, the table's rows the first one's."

    def to_markdown(self) -> str:
        lines = [
            "# Recipes against temperature scaling (embedded benchmark)",
            "",
            f"Test questions: {self.settings.test_examples or 'all'}; S = {self.settings.num_samples}. "
            f"{self._data_note()} AUROC against the OoD splits, the test questions the negatives. "
            + interval_note(
                TEMPERATURE_SCALING,
                self.settings.bootstrap,
                f"{self.calibration.labels.shape[0]} test questions (AUROC: against its predictive entropy, on the "
                "same test and OoD questions)",
            ),
            "",
            markdown_table(
                [interval_cells(row, self.comparisons.get((row["method"], row["mode"]))) for row in self.table],
                COLUMNS,
            ),
            "",
            f"**Verdict.** {self.verdict}",
            "",
            *(
                f"- {verdict_line(f'{method} ({mode})' if mode != 'any' else method, self.comparisons[method, mode])}"
                for method, mode in ((row["method"], row["mode"]) for row in self.table)
                if (method, mode) in self.comparisons
            ),
            "",
        ]
        if len(self.settings.fit_seeds) > 1:
            lines += [
                f"**Over the fit seeds** ({', '.join(map(str, self.settings.fit_seeds))}). Each cell: the mean of "
                "the metric over the fit seeds (its min, max); then the mean of its difference from temperature "
                "scaling (min, max). The bootstrap intervals above are the first seed's.",
                "",
                markdown_table(
                    [
                        {
                            "method": method,
                            "mode": mode,
                            **{column: spread.format() for column, spread in found.items()},
                        }
                        for (method, mode), found in self.seed_spread.items()
                    ],
                    COLUMNS,
                ),
                "",
            ]
        lines += [
            "**Does the fit add anything?** Each recipe (with its temperatures) against its own starting prior "
            "(the unfitted prior at the scale it chose, with temperatures fitted the same way):",
            "",
            *(
                f"- {verdict_line(f'{recipe} ({mode})', found)}"
                for (recipe, mode), found in self.fit_against_prior.items()
            ),
            "",
        ]
        if self.fit_data_comparison:
            lines += [
                "**Which data should a fit use?** Each fit on a calibration half (questions the backbone never "
                "saw; everything chosen on the other half) against the same recipe fitted on the train split, both "
                "with their temperatures, first fit seed:",
                "",
                *(
                    f"- {verdict_line(f'{method} ({mode})', found)} "
                    f"NLL {found['nll'].format()}, ECE {found['ece'].format()}"
                    for (method, mode), found in self.fit_data_comparison.items()
                ),
                "",
            ]
        for name, fit in self.fits.items():
            lines += [f"## {name}", "", fit.to_markdown(), ""]
        return "\n".join(lines)

    def plot(self, folder: str | Path) -> list[Path]:
        """Every recipe's learned-scale trajectories (``scales_<recipe>.png``)."""
        return [fit.plot(Path(folder) / f"scales_{slug(name)}.png") for name, fit in self.fits.items()]

    def write(self, folder: str | Path) -> dict[str, Any]:
        """``metrics.json``, ``report.md`` and the plots into ``folder``, the calibration and OoD
        experiments' own files into ``calibration/`` and ``ood/``."""
        folder = Path(folder)
        written = write_results(self, folder)
        written["calibration"] = write_results(self.calibration, folder / "calibration")
        written["ood"] = write_results(self.ood, folder / "ood")
        return written


def merged_comparisons(
    calibration: CalibrationResults, ood: OoDResults
) -> dict[tuple[str, str], dict[str, PairedComparison]]:
    """``{(method, mode): {column: PairedComparison}}``: the calibration metrics' and the AUROC
    columns' intervals against temperature scaling (the AUROCs against its predictive entropy)."""
    merged: dict[tuple[str, str], dict[str, PairedComparison]] = {}
    for key, found in calibration.comparisons.items():
        merged[key] = {metric: found[metric] for metric in ("accuracy", "nll", "ece", "brier")}
    for (split, method, mode, score), comparison in ood.comparisons.items():
        if score in OOD_SCORES:
            merged.setdefault((method, mode), {})[f"auroc {split}, {score}"] = comparison
    return merged


def merged_rows(calibration: CalibrationResults, ood: OoDResults) -> list[dict[str, Any]]:
    """One row per method and mode: the calibration figures and the entropy / MI AUROCs (``nan``
    where a method has no such score, e.g. the mutual information of one network)."""
    table = []
    for row in calibration.rows:
        merged = {key: row[key] for key in ("method", "mode", "accuracy", "nll", "ece", "brier")}
        for split in OOD_SPLITS:
            for score in OOD_SCORES:
                found = [
                    r["auroc"]
                    for r in ood.rows
                    if (r["method"], r["mode"], r["ood_split"], r["score"])
                    == (row["method"], row["mode"], split, score)
                ]
                merged[f"auroc {split}, {score}"] = found[0] if found else math.nan
        table.append(merged)
    return table


def spread_over_seeds(
    comparisons: dict[tuple[str, str], dict[str, PairedComparison]],
    seed_names: dict[str, dict[int, str]],
) -> dict[tuple[str, str], dict[str, SeedSpread]]:
    """``{(row, mode): {column: SeedSpread}}`` of every recipe row measured in a mode."""
    return {
        (name, mode): {
            column: SeedSpread(
                column,
                tuple(seeds),
                tuple(comparisons[seeds[seed], mode][column].estimate for seed in seeds),
                tuple(comparisons[seeds[seed], mode][column].difference for seed in seeds),
            )
            for column in comparisons[name, mode]
        }
        for name, seeds in seed_names.items()
        for mode in MODES
        if (name, mode) in comparisons
    }
