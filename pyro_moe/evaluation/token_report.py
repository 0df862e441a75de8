"""Reports of generated text token by token: the terminal text with uncertain tokens marked, a JSONL
file, an HTML page with every token shaded by its mutual information, and a PNG of the entropies
along each sequence.

A token is *uncertain* when its mutual information (nats) is positive and at least the run's
threshold, by default the 0.9-quantile of the mutual information of all generated tokens
(:func:`uncertainty_threshold`).

Example::

    texts = [GeneratedText(prompt, pieces, ids, probs, entropy, expected, mutual_information, stopped=True)]
    threshold = uncertainty_threshold(texts, quantile=0.9)
    print(terminal_text(texts[0], threshold, colour=sys.stdout.isatty()))
    write_jsonl(texts, "out/generations.jsonl")
    write_html(texts, "out/generations.html")
    plot_token_uncertainty(texts, "out/generations.png")
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pyro_moe.atomic_files import write_atomically, write_text_atomically
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.plots import DPI

__all__ = [
    "MAX_PLOTTED",
    "GeneratedText",
    "plot_token_uncertainty",
    "terminal_text",
    "uncertainty_threshold",
    "write_html",
    "write_jsonl",
]

MAX_PLOTTED = 12
"""The PNG shows the first this many sequences (one panel each)."""

_ANSI_UNCERTAIN, _ANSI_RESET = "\033[1;31m", "\033[0m"
_PLAIN_OPEN, _PLAIN_CLOSE = "[[", "]]"


@dataclass(frozen=True)
class GeneratedText:
    """One prompt's generation, token by token (all lists have one entry per generated token).

    Attributes:
        prompt: the prompt's text.
        pieces: the text each token adds (their concatenation is the generated text).
        token_ids: the generated ids.
        probs: each token's averaged probability.
        predictive_entropy: ``H[mean_s p_s]`` per token (nats).
        expected_entropy: ``mean_s H[p_s]`` per token (nats).
        mutual_information: their difference per token (nats).
        stopped: the row ended at an end-of-sequence id or a stop string (else at the token limit).
    """

    prompt: str
    pieces: list[str]
    token_ids: list[int]
    probs: list[float]
    predictive_entropy: list[float]
    expected_entropy: list[float]
    mutual_information: list[float]
    stopped: bool

    def __post_init__(self) -> None:
        lengths = {
            len(getattr(self, name))
            for name in ("pieces", "token_ids", "probs", "predictive_entropy", "expected_entropy", "mutual_information")
        }
        if len(lengths) != 1:
            raise ConfigurationError(f"a GeneratedText needs one entry per token in every list, got lengths {lengths}.")

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(self.pieces)

    def summary(self) -> dict[str, float]:
        """Sequence figures: mean and max mutual information, mean predictive entropy, sum of log-probabilities."""
        count = max(len(self.pieces), 1)
        return {
            "mean_mutual_information": sum(self.mutual_information) / count,
            "max_mutual_information": max(self.mutual_information, default=0.0),
            "mean_predictive_entropy": sum(self.predictive_entropy) / count,
            "log_prob_sum": sum(math.log(max(p, 1e-300)) for p in self.probs),
        }

    def to_json(self) -> dict[str, Any]:
        """The JSONL record: prompt, text, ``stopped``, the summary and one entry per token."""
        tokens = [
            {
                "id": token,
                "text": piece,
                "prob": prob,
                "predictive_entropy": entropy,
                "expected_entropy": expected,
                "mutual_information": information,
            }
            for token, piece, prob, entropy, expected, information in zip(
                self.token_ids,
                self.pieces,
                self.probs,
                self.predictive_entropy,
                self.expected_entropy,
                self.mutual_information,
                strict=True,
            )
        ]
        return {"prompt": self.prompt, "text": self.text, "stopped": self.stopped, **self.summary(), "tokens": tokens}


def uncertainty_threshold(texts: Sequence[GeneratedText], quantile: float = 0.9) -> float:
    """The ``quantile`` of the mutual information of every generated token of ``texts`` (0 without tokens)."""
    if not 0.0 <= quantile <= 1.0:
        raise ConfigurationError(f"the uncertainty quantile must be in [0, 1], got {quantile!r}.")
    values = [value for text in texts for value in text.mutual_information]
    return float(np.quantile(values, quantile)) if values else 0.0


def _uncertain(value: float, threshold: float) -> bool:
    return value > 0.0 and value >= threshold


def terminal_text(text: GeneratedText, threshold: float, colour: bool) -> str:
    """The generated text with every uncertain token marked: bold red with ``colour`` (a terminal), else
    between ``[[`` and ``]]``."""
    opening, closing = (_ANSI_UNCERTAIN, _ANSI_RESET) if colour else (_PLAIN_OPEN, _PLAIN_CLOSE)
    return "".join(
        f"{opening}{piece}{closing}" if _uncertain(value, threshold) else piece
        for piece, value in zip(text.pieces, text.mutual_information, strict=True)
    )


def write_jsonl(texts: Sequence[GeneratedText], path: str | Path) -> Path:
    """One JSON record per text (:meth:`GeneratedText.to_json`), written atomically."""
    lines = "".join(json.dumps(text.to_json(), ensure_ascii=False) + "\n" for text in texts)
    return write_text_atomically(path, lines)


def _title(text: GeneratedText, index: int) -> str:
    return (
        f"token {index}: id {text.token_ids[index]}, p {text.probs[index]:.4f}, "
        f"predictive entropy {text.predictive_entropy[index]:.4g}, "
        f"expected entropy {text.expected_entropy[index]:.4g}, "
        f"mutual information {text.mutual_information[index]:.4g} nats"
    )


def write_html(texts: Sequence[GeneratedText], path: str | Path, *, threshold: float | None = None) -> Path:
    """A page with every prompt (grey) and its generated tokens, each shaded red in proportion to its
    mutual information over the run's largest (uncertain tokens, at or above ``threshold``, underlined);
    hovering a token shows its figures. Every text is HTML-escaped."""
    largest = max((value for text in texts for value in text.mutual_information), default=0.0)
    sections = []
    for text in texts:
        spans = []
        for index, (piece, value) in enumerate(zip(text.pieces, text.mutual_information, strict=True)):
            alpha = value / largest if largest > 0 else 0.0
            underline = "text-decoration:underline;" if threshold is not None and _uncertain(value, threshold) else ""
            spans.append(
                f'<span style="background-color:rgba(220,50,47,{alpha:.3f});{underline}" '
                f'title="{html.escape(_title(text, index), quote=True)}">{html.escape(piece)}</span>'
            )
        summary = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in text.summary().items())
        sections.append(
            f'<div class="generation"><span class="prompt">{html.escape(text.prompt)}</span>{"".join(spans)}'
            f'<div class="summary">{html.escape(summary)}{"" if text.stopped else " (token limit)"}</div></div>'
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Generations</title><style>'
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".generation{white-space:pre-wrap;font-family:monospace;margin:1em 0;padding:.5em;border:1px solid #ddd}"
        ".prompt{color:#888}.summary{color:#555;font-family:sans-serif;font-size:small;margin-top:.5em}"
        "</style></head><body>\n<h1>Generations</h1>\n"
        f"<p>Tokens shaded by mutual information (largest {largest:.4g} nats); hover a token for its figures.</p>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return write_text_atomically(path, page)


def plot_token_uncertainty(texts: Sequence[GeneratedText], path: str | Path) -> Path:
    """Per sequence (the first :data:`MAX_PLOTTED`), a panel of the predictive and expected entropy and,
    under it on the same positions, a panel of the mutual information (on its own scale: often orders
    of magnitude below the entropies), against the generated position; one legend below; written as a PNG."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigurationError(f"plots are written as PNG: the path must end in .png, got {str(path)!r}.")
    if not texts:
        raise ConfigurationError("no generated text to plot.")
    shown = list(texts[:MAX_PLOTTED])
    figure = Figure(figsize=(7.5, 1.6 + 3.0 * len(shown)), layout="constrained")
    axes = figure.subplots(2 * len(shown), 1, height_ratios=(2, 1) * len(shown), squeeze=False)[:, 0]
    for number, text in enumerate(shown):
        entropies, information = axes[2 * number], axes[2 * number + 1]
        information.sharex(entropies)
        positions = np.arange(len(text.pieces))
        entropies.plot(positions, text.predictive_entropy, marker=".", color="C0", label="predictive entropy")
        entropies.plot(
            positions, text.expected_entropy, marker=".", linestyle="--", color="C1", label="expected entropy"
        )
        information.plot(positions, text.mutual_information, marker=".", color="C3", label="mutual information")
        prompt = text.prompt if len(text.prompt) <= 60 else text.prompt[:57] + "..."
        entropies.set(ylabel="entropy (nats)", title=f"{number}: {prompt}")
        entropies.title.set_fontsize("small")
        entropies.tick_params(labelbottom=False)
        information.set(ylabel="MI (nats)", xlabel="generated position")
        for axis in (entropies, information):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
            axis.grid(alpha=0.3)
    figure.legend(*_legend_entries(axes[:2]), loc="outside lower center", ncols=3, fontsize="small")
    more = f" (first {MAX_PLOTTED} of {len(texts)})" if len(texts) > MAX_PLOTTED else ""
    figure.suptitle(f"Uncertainty along each generated sequence{more}")
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    return write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=DPI))


def _legend_entries(axes: Sequence[Any]) -> tuple[list[Any], list[str]]:
    """The lines and labels of ``axes``, in order."""
    lines = [line for axis in axes for line in axis.get_lines()]
    return lines, [line.get_label() for line in lines]
