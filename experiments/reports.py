"""The experiments' reports: Markdown tables, the cells and verdict lines of the paired bootstrap
comparisons against a named baseline (the intervals come from :mod:`pyro_moe.evaluation.bootstrap`),
and the writing of ``metrics.json``, ``report.md`` and the PNGs of a :class:`Results`.

Example::

    print(markdown_table(rows, ["method", "nll", "ece"]))
    paths = write_results(results, "runs/calibration")   # {"metrics": ..., "report": ..., "plots": [...]}
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pyro_moe.atomic_files import write_text_atomically
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.bootstrap import BootstrapSettings, PairedComparison

__all__ = [
    "Results",
    "interval_cells",
    "interval_note",
    "markdown_table",
    "slug",
    "verdict_line",
    "write_results",
]


def slug(text: str) -> str:
    """``text`` as a file-name part: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` with ``columns`` (numbers right-aligned, floats to 3 decimals)."""
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) and bool(rows) for c in columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def interval_cells(row: Mapping[str, Any], comparisons: Mapping[str, PairedComparison] | None) -> dict[str, Any]:
    """``row`` with every compared metric's cell as ``'0.526 (-0.016 [-0.024, -0.009])'`` (its value,
    its difference from the baseline and the interval of that difference); ``row`` itself when it
    has no comparisons (the baseline's own row)."""
    if not comparisons:
        return dict(row)
    return {**row, **{metric: comparison.format() for metric, comparison in comparisons.items()}}


def interval_note(baseline: str, bootstrap: BootstrapSettings, questions: str) -> str:
    """The sentence under a report's title that says how to read the intervals; ``questions`` says
    which, e.g. ``"300 test questions"``."""
    return (
        f"Each metric of the other rows shows its difference from **{baseline}** on the same {questions} "
        f"and the paired bootstrap {bootstrap.level:.0%} interval of that difference ({bootstrap.resamples} "
        "resamples of the questions, percentile method); the verdicts come from the intervals: an interval that "
        "holds 0 is a tie."
    )


def verdict_line(label: str, comparisons: Mapping[str, PairedComparison]) -> str:
    """``'mfvr (model-average) against temperature scaling: beats on nll, ece; ties on accuracy.'``:
    the verdicts of the intervals (never of the point estimates), one clause per verdict."""
    if not comparisons:
        raise ConfigurationError(f"no comparisons for {label!r}: nothing to give a verdict on.")
    baseline = next(iter(comparisons.values())).baseline
    clauses = []
    for verdict in ("beats", "ties", "loses"):
        metrics = [metric for metric, comparison in comparisons.items() if comparison.verdict == verdict]
        if metrics:
            clauses.append(f"{verdict} on {', '.join(metrics)}")
    return f"{label} against {baseline}: {'; '.join(clauses)}."


class Results(Protocol):
    """What every experiment returns."""

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""

    def to_markdown(self) -> str:
        """The tables (``report.md``)."""

    def plot(self, folder: str | Path) -> list[Path]:
        """Write the PNG figures into ``folder``; returns their paths."""


def _json_ready(value: Any) -> Any:
    """NaN becomes ``None`` (JSON has no NaN); containers are converted recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def write_results(results: Results, folder: str | Path) -> dict[str, Path | list[Path]]:
    """Write ``metrics.json``, ``report.md`` and the PNGs of ``results`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metrics, report = folder / "metrics.json", folder / "report.md"
    write_text_atomically(metrics, json.dumps(_json_ready(results.to_json()), indent=2) + "\n")
    write_text_atomically(report, results.to_markdown())
    return {"metrics": metrics, "report": report, "plots": results.plot(folder)}
