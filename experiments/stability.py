"""Stability experiment: per-layer Jaccard similarity of the Top-K expert sets under router-input
noise, for the deterministic model and every fitted posterior, and the susceptible layers.

:func:`pyro_moe.evaluation.stability.routing_stability` adds ``N(0, gamma^2 I)`` to each router's input and
compares the Top-K sets of the clean and noisy inputs token by token. The deterministic model is
measured at its prior mean; a posterior is measured with its routers drawing from the posterior
under the thesis' ``routing-average`` rule (S samples of the scores averaged, one selection). The clean
and the noisy pass of a batch share the posterior's global draws (router weights, per-layer or
per-expert temperatures: drawn once per batch), but whatever a router draws per call is drawn afresh
(per-token logits and temperatures, MC dropout masks, Sample-K noise), so the Jaccard also counts the
disagreement of those draws. The ``gamma = 0`` column measures that part alone: it is 1 for a family
with weight sites only (a router agrees with itself) and below 1 where per-call draws remain.
The susceptible layers are the deterministic model's least stable ones at the chosen ``gamma`` (default
:data:`pyro_moe.evaluation.stability.DEFAULT_GAMMA`), by the library's one rule
(:func:`pyro_moe.evaluation.stability.susceptible_layers`): the ``k`` lowest, or those below a ``threshold``.
The susceptible layers are a modelling choice, so they are measured on the calibration split by default
(``StabilitySettings.split``), never the test split.

Example::

    results = stability_experiment(model, tokenizer, benchmark.splits, {"mfvr": fitted_mfvr}, StabilitySettings(k=2))
    results.susceptible                                      # e.g. [0, 2]
    write_results(results, "runs/stability")

    python -m pyro_moe.experiments.stability --out runs/stability      # on the embedded benchmark
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.core.handlers import at_prior_mean
from pyro_moe.core.routing_context import PARTICLE_DIM, PredictiveMode, routing_context
from pyro_moe.data import MCQAExample
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.plots import plot_stability_violins
from pyro_moe.evaluation.stability import (
    DEFAULT_GAMMA,
    GAMMAS,
    RoutingStability,
    routing_stability,
    susceptible_layers,
)
from pyro_moe.experiments.evaluation import (
    DEFAULT_FAMILIES,
    DETERMINISTIC,
    MODES,
    FitSettings,
    check_count,
    check_posteriors,
    check_splits,
    default_answer_token_ids,
    fit_named_families,
    markdown_table,
    posterior_modes,
    slug,
    split_batches,
)
from pyro_moe.experiments.runner import experiment_command
from pyro_moe.inference.presets import FamilySpec
from pyro_moe.validation import check_integer, check_number

__all__ = [
    "StabilityResults",
    "StabilitySettings",
    "main",
    "posterior_stability",
    "run_stability",
    "stability_experiment",
]

ROUTING_AVERAGE = PredictiveMode.ROUTING_AVERAGE.value


@dataclass(frozen=True, kw_only=True)
class StabilitySettings:
    """What :func:`stability_experiment` measures; checked when built.

    Attributes:
        split: the split measured (default ``calibration``: the susceptible layers are a modelling
            choice, which the test split must not make).
        examples: its first this many questions (``None``: all).
        gammas: the noise levels (numbers >= 0, a tuple of floats once built; must include ``gamma``).
        gamma: the noise level of the susceptible-layer selection and the violins.
        threshold: susceptible layers are those whose mean Jaccard is below this level in [0, 1] ...
        k: ... or the ``k`` least stable (default ``k = 1`` when neither is given); give at most one.
        num_samples: S of the posteriors' routing-average selection.
        batch_size: questions per batch.
        seed: seed of the noise and the sampling.
    """

    split: str = "calibration"
    examples: int | None = 200
    gammas: Sequence[float] = (0.0, *GAMMAS)
    gamma: float = DEFAULT_GAMMA
    threshold: float | None = None
    k: int | None = None
    num_samples: int = 16
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_count("examples", self.examples)
        if isinstance(self.gammas, str) or not isinstance(self.gammas, Sequence) or not self.gammas:
            raise ConfigurationError(f"gammas must be a non-empty list of noise levels >= 0, got {self.gammas!r}.")
        gammas = tuple(check_number("gammas", g, inclusive=True) for g in self.gammas)
        object.__setattr__(self, "gammas", gammas)
        check_number("gamma", self.gamma, inclusive=True)
        if not any(abs(g - self.gamma) < 1e-12 for g in gammas):
            raise ConfigurationError(f"gamma {self.gamma!r} must be one of the measured gammas {list(gammas)}.")
        if self.threshold is not None and self.k is not None:
            raise ConfigurationError("give at most one of threshold (a Jaccard level) and k (a number of layers).")
        if self.threshold is not None and check_number("threshold", self.threshold, inclusive=True) > 1:
            raise ConfigurationError(f"threshold must be a Jaccard similarity in [0, 1], got {self.threshold!r}.")
        if self.k is not None:
            check_integer("k", self.k)
        check_integer("num_samples", self.num_samples)
        check_integer("batch_size", self.batch_size)
        check_integer("seed", self.seed, minimum=0)


@dataclass
class StabilityResults:
    """What :func:`stability_experiment` returns.

    Attributes:
        stability: ``{method: RoutingStability}``, the deterministic model first.
        susceptible: the deterministic model's susceptible decoder layers.
        gamma: the noise level of the selection and the violins.
        threshold: the Jaccard level separating susceptible layers (given, or halfway between the
            ``k``-th lowest layer mean and the next; ``None`` when every layer is susceptible).
        k: the number of layers asked for, if selected by number.
        split: the split measured.
        num_samples: S of the posteriors' routing-average selection.
        skipped: posteriors without a routing-average selection (expert-weight sites), not measured.
    """

    stability: dict[str, RoutingStability]
    susceptible: list[int]
    gamma: float
    threshold: float | None
    k: int | None
    split: str
    num_samples: int
    skipped: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One per method, layer and gamma: mean, std and min Jaccard over tokens, token count."""
        return [{"method": method, **row} for method, result in self.stability.items() for row in result.records()]

    def to_json(self) -> dict[str, Any]:
        """Settings, susceptible layers and rows."""
        return {
            "experiment": "stability",
            "split": self.split,
            "gamma": self.gamma,
            "threshold": self.threshold,
            "k": self.k,
            "num_samples": self.num_samples,
            "susceptible_layers": self.susceptible,
            "skipped": self.skipped,
            "rows": self.rows(),
        }

    def to_markdown(self) -> str:
        """A table of mean Jaccard per method, layer and gamma; the susceptible layers."""
        gammas = next(iter(self.stability.values())).gammas
        columns = ["method", "layer", *[f"gamma {gamma:g}" for gamma in gammas]]
        table = []
        for method, result in self.stability.items():
            for i, layer in enumerate(result.layers):
                table.append(
                    {"method": method, "layer": layer}
                    | {f"gamma {gamma:g}": result.mean[i, j].item() for j, gamma in enumerate(gammas)}
                )
        rule = f"the {self.k} least stable" if self.k is not None else f"mean Jaccard below {self.threshold:g}"
        lines = [
            "# Routing stability",
            "",
            f"Mean Jaccard similarity of each token's Top-K experts between clean and noisy router inputs "
            f"(x + N(0, gamma^2 I)), split `{self.split}`, {next(iter(self.stability.values())).values.shape[-1]} "
            f"tokens. Posteriors select with routing-average (S = {self.num_samples}); the clean and noisy passes "
            "share their global draws (router weights, per-layer temperatures), so their gamma 0 column is 1 for "
            "weight-site families and otherwise the agreement of the per-call draws (per-token logits or "
            "temperatures, dropout masks, Sample-K noise).",
            "",
            markdown_table(table, columns),
            f"Susceptible layers of the deterministic model at gamma {self.gamma:g} ({rule}): **{self.susceptible}**.",
            "",
        ]
        if self.skipped:
            skipped = ", ".join(self.skipped)
            lines += [f"Not measured (expert-weight sites, no routing-average selection): {skipped}.", ""]
        lines += [f"![stability {method}]({self._plot_name(method)})" for method in self.stability]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _plot_name(method: str) -> str:
        return f"stability_{slug(method)}.png"

    def plot(self, folder: str | Path) -> list[Path]:
        """``stability_<method>.png``: per-layer violins at :attr:`gamma` with the threshold line."""
        return [
            plot_stability_violins(
                result,
                Path(folder) / self._plot_name(method),
                gamma=self.gamma,
                threshold=self.threshold,
                title=f"{method}: routing stability, gamma = {self.gamma:g}",
            )
            for method, result in self.stability.items()
        ]


def posterior_stability(
    posterior: Any,
    batches: Sequence[Mapping[str, Tensor]],
    gammas: Sequence[float],
    num_samples: int,
    seed: int = 0,
) -> RoutingStability:
    """:func:`pyro_moe.evaluation.stability.routing_stability` of a fitted posterior's model with its routers
    drawing from the posterior (``routing-average``, S = ``num_samples``), batch by batch.

    Args:
        posterior: a :class:`pyro_moe.FittedPosterior` (its ``patch.model`` and ``guide.posterior``).
        batches: mappings with ``input_ids`` and ``attention_mask`` ``(batch, length)``.
    """
    pyro.set_rng_seed(seed)
    model = posterior.patch.model
    device = model.get_input_embeddings().weight.device
    parts = []
    for number, batch in enumerate(tqdm(batches, desc="posterior stability", leave=False)):
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with (
            routing_context(mode=PredictiveMode.ROUTING_AVERAGE),
            pyro.plate("samples", num_samples, dim=PARTICLE_DIM),
            posterior.guide.posterior(input_ids, attention_mask),
        ):
            batch_input = [{"input_ids": input_ids, "attention_mask": attention_mask}]
            parts.append(routing_stability(model, batch_input, gammas, seed=seed + number))
    first = parts[0]
    return RoutingStability(first.layers, first.paths, first.gammas, torch.cat([part.values for part in parts], -1))


def _threshold_between(result: RoutingStability, chosen: Sequence[int], gamma: float) -> float | None:
    """The level halfway between the highest mean of the chosen layers and the lowest of the others (4 decimals)."""
    means = dict(zip(result.layers, result.mean[:, result.gamma_index(gamma)].tolist(), strict=True))
    others = [mean for layer, mean in means.items() if layer not in chosen]
    if not others:
        return None
    return round((max(means[layer] for layer in chosen) + min(others)) / 2, 4)


def stability_experiment(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    posteriors: Mapping[str, Any],
    settings: StabilitySettings = StabilitySettings(),
) -> StabilityResults:
    """Routing stability of the deterministic model and ``posteriors``; see the module docstring.

    Args:
        model: the (unpatched, or patched at its prior mean) model.
        tokenizer: its tokenizer.
        splits: ``{split name: questions}``.
        posteriors: ``{name: FittedPosterior}`` (each on its own patched copy of the model).
        settings: the split, the noise levels, the selection of the susceptible layers, S.

    Raises:
        ConfigurationError: an unknown or empty split, a posterior that is not a fitted posterior;
            before any work.
    """
    split, gammas, gamma, threshold, k = settings.split, settings.gammas, settings.gamma, settings.threshold, settings.k
    num_samples, seed = settings.num_samples, settings.seed
    check_splits(splits, [split])
    posteriors = check_posteriors(posteriors)
    for name, posterior in posteriors.items():
        if not hasattr(posterior, "patch") or not hasattr(getattr(posterior, "guide", None), "posterior"):
            raise ConfigurationError(f"posterior {name!r} must be a FittedPosterior (with .patch and .guide).")
    skipped = [
        name for name, posterior in posteriors.items() if ROUTING_AVERAGE not in posterior_modes(posterior, MODES)
    ]
    if threshold is None and k is None:
        k = 1
    batches = split_batches(splits[split], tokenizer, settings.batch_size, settings.examples)
    with torch.no_grad(), at_prior_mean():
        deterministic = routing_stability(model, batches, gammas, seed=seed)
    chosen = susceptible_layers(deterministic, threshold=threshold, k=k, gamma=gamma)
    line = threshold if threshold is not None else _threshold_between(deterministic, chosen, gamma)
    stability = {DETERMINISTIC: deterministic}
    for name, posterior in posteriors.items():
        if name not in skipped:
            stability[name] = posterior_stability(posterior, batches, gammas, num_samples, seed)
    return StabilityResults(stability, chosen, gamma, line, k, split, num_samples, skipped)


def run_stability(
    model: nn.Module,
    tokenizer: Any,
    splits: Mapping[str, Sequence[MCQAExample]],
    families: Sequence[str | FamilySpec] = DEFAULT_FAMILIES,
    *,
    settings: StabilitySettings = StabilitySettings(),
    fitting: FitSettings = FitSettings(),
    answer_token_ids: Tensor | None = None,
) -> StabilityResults:
    """Fit ``families`` by name as ``fitting`` says, each on a copy of ``model``, then run
    :func:`stability_experiment` with ``settings``. The numbers (when the settings were built), the
    families, SWAG's schedule and the split are checked before anything is fitted."""
    check_splits(splits, [settings.split])
    if answer_token_ids is None:
        answer_token_ids = default_answer_token_ids(tokenizer, splits[settings.split])
    posteriors = fit_named_families(model, tokenizer, splits, families, fitting, answer_token_ids=answer_token_ids)
    return stability_experiment(model, tokenizer, splits, posteriors, settings)


@experiment_command("python -m pyro_moe.experiments.stability", StabilitySettings)
def main(parser: argparse.ArgumentParser) -> Callable[..., StabilityResults]:
    """Per-layer Jaccard stability of the Top-K experts under router-input noise for the deterministic model and
    Bayesian guide families, and the susceptible layers, on the embedded benchmark."""
    parser.add_argument("--split", default="calibration", help="split to measure (default calibration)")
    parser.add_argument("--examples", type=int, default=200, help="questions of the split (default 200)")
    parser.add_argument(
        "--gamma", type=float, default=DEFAULT_GAMMA, help=f"noise level of the selection (default {DEFAULT_GAMMA})"
    )
    selection = parser.add_mutually_exclusive_group()
    selection.add_argument("--threshold", type=float, default=None, help="susceptible: mean Jaccard below this")
    selection.add_argument("--k", type=int, default=None, help="susceptible: the k least stable layers (default 1)")
    return run_stability


if __name__ == "__main__":
    main()
