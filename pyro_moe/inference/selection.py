"""Choosing a prior scale (and the Bayesian layers) by the NLL of the unfitted prior on calibration batches.

Every candidate, a prior scale of one site kind (``logits`` by default) on one set of layers, is
scored by the mean negative log-likelihood of the labels of the calibration batches under the
``model-average`` predictive of the *unfitted* prior at that scale (no guide, no fit): the model is
patched with ``{kind: scale}`` on those layers, ``S`` joint draws per question with the same seed for
every candidate, and unpatched again. The candidate with the lowest NLL wins (the first in grid order
on a tie).

Why the unfitted prior and not a fit per candidate: it costs one ``S``-draw prediction of the
calibration batches per candidate, against a fit each, and on the embedded benchmark the unfitted
logit prior at the scale chosen this way did as well as an ``iwae`` fit with learned scales (docs/experiments.md,
the objective study). The selection then serves as the *starting point* of a fit with learned scales
(:mod:`pyro_moe.inference.recipes`), whose steps only have to move the scales from there.

With ``objective="calibrated"`` the candidates are ranked for the *calibrated* predictive instead (what a
recipe that calibrates ends with): the temperature is cross-fitted, fitted on the first half of the
calibration questions and the calibrated NLL scored on the second half, then the other way round, the
two NLLs averaged by their halves' sizes (so no question is scored under a temperature fitted on it).
The same draws serve both halves. The temperature a recipe finally keeps is refitted on all of them.

The helper receives calibration batches only: whatever split a caller keeps for testing cannot reach it.

Example::

    selection = select_prior(model, calibration_batches, answer_token_ids=letters,
                             scales=(0.3, 0.5, 1.0, 2.0), layer_sets=("all", [2]))
    selection.chosen            # PriorCandidate(scale=1.0, layers='all')
    selection.table()           # [{"scale": 0.3, "layers": "all", "nll": 0.68}, ...]
    select_prior(model, calibration_batches, answer_token_ids=letters, scales=(0.5, 0.75, 1.5), objective="calibrated")
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import negative_log_likelihood
from pyro_moe.evaluation.temperature_scaling import fit_temperature
from pyro_moe.inference.calibration import calibrated_probs, log_probabilities, predictive_nll, predictive_probabilities
from pyro_moe.inference.options import SelectionObjective, selection_objective
from pyro_moe.inference.predictive import predict
from pyro_moe.models.likelihoods import check_batches
from pyro_moe.models.router_patch import patch_routers
from pyro_moe.validation import check_integer, check_number

__all__ = ["PriorCandidate", "PriorSelection", "cross_fitted_nll", "select_prior"]

Layers = str | tuple[int, ...]
"""``"all"`` or decoder-layer indices (as :func:`pyro_moe.patch_routers` takes them)."""


@dataclass(frozen=True)
class PriorCandidate:
    """One candidate of :func:`select_prior`.

    Attributes:
        scale: the prior scale of the site kind.
        layers: the Bayesian decoder layers, ``"all"`` or a tuple of indices.
    """

    scale: float
    layers: Layers

    def to_json(self) -> dict[str, Any]:
        """``{"scale": ..., "layers": "all" or [indices]}``."""
        return {"scale": self.scale, "layers": self.layers if isinstance(self.layers, str) else list(self.layers)}


@dataclass(frozen=True)
class PriorSelection:
    """What :func:`select_prior` returns.

    Attributes:
        chosen: the candidate with the lowest calibration NLL.
        scores: ``{candidate: calibration NLL}`` in grid order (layer sets outer, scales inner): the
            plain predictive's (``objective`` ``raw``) or the cross-fitted calibrated one's (``calibrated``).
        site_kind: the site kind whose scale was chosen.
        num_samples: ``S`` draws per prediction.
        seed: the seed of the draws.
        examples: calibration questions scored.
        objective: ``"raw"`` or ``"calibrated"`` (see the module docstring).
    """

    chosen: PriorCandidate
    scores: dict[PriorCandidate, float]
    site_kind: str
    num_samples: int
    seed: int
    examples: int
    objective: str = SelectionObjective.RAW.value

    def table(self) -> list[dict[str, Any]]:
        """One row per candidate: ``scale``, ``layers``, ``nll``, ``chosen``."""
        return [
            {**candidate.to_json(), "nll": nll, "chosen": candidate == self.chosen}
            for candidate, nll in self.scores.items()
        ]

    def to_json(self) -> dict[str, Any]:
        """The chosen candidate, the table and the settings as JSON-ready data."""
        return {
            "chosen": self.chosen.to_json(),
            "site_kind": self.site_kind,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "examples": self.examples,
            "objective": self.objective,
            "scores": self.table(),
        }


def _layer_sets(layer_sets: Iterable[str | Sequence[int]]) -> list[Layers]:
    if isinstance(layer_sets, str) or not isinstance(layer_sets, Iterable):
        raise ConfigurationError(f"layer_sets must be a list of layer sets ('all' or index lists), got {layer_sets!r}.")
    sets: list[Layers] = []
    for layers in layer_sets:
        if not isinstance(layers, str | Iterable):
            raise ConfigurationError(f"a layer set is 'all' or a list of decoder-layer indices, got {layers!r}.")
        sets.append(layers if isinstance(layers, str) else tuple(layers))
    if not sets:
        raise ConfigurationError("layer_sets must hold at least one layer set ('all' or a list of indices).")
    if len(set(sets)) != len(sets):
        raise ConfigurationError(f"layer_sets must be distinct, got {sets}.")
    return sets


def cross_fitted_nll(probs: Tensor, labels: Tensor) -> float:
    """The calibrated NLL of averaged answer probabilities ``probs`` ``(examples, choices)`` with
    ``labels`` ``(examples,)``, the temperature cross-fitted: fitted on the first half, the NLL of
    ``softmax(log p / T)`` scored on the second half, and the other way round; the two averaged by
    their sizes. A half whose labels are all ranked first has no finite temperature (``T -> 0``):
    the other half is then scored at ``T = 1``.

    Raises:
        ConfigurationError: fewer than 2 examples (no two halves).
    """
    if len(labels) < 2:
        raise ConfigurationError(f"the calibrated objective needs at least 2 calibration questions, got {len(labels)}.")
    middle = len(labels) // 2
    halves = [(slice(0, middle), slice(middle, None)), (slice(middle, None), slice(0, middle))]
    total = 0.0
    for fitted, scored in halves:
        fit_probs, fit_labels = probs[fitted], labels[fitted]
        if bool((fit_probs.argmax(-1) == fit_labels).all()):
            scored_probs = probs[scored]
        else:
            scored_probs = calibrated_probs(probs[scored], fit_temperature(log_probabilities(fit_probs), fit_labels))
        total += negative_log_likelihood(scored_probs, labels[scored]) * len(labels[scored])
    return total / len(labels)


def select_prior(
    model: nn.Module,
    calibration_batches: Iterable[Mapping[str, Tensor]],
    *,
    answer_token_ids: Tensor | Sequence[int],
    scales: Sequence[float],
    layer_sets: Iterable[str | Sequence[int]] = ("all",),
    site_kind: str = "logits",
    num_samples: int = 16,
    seed: int = 0,
    progress: bool = False,
    objective: str = "raw",
) -> PriorSelection:
    """Score every (layer set, scale) candidate by the calibration NLL of the unfitted prior; see the
    module docstring.

    Args:
        model: an unpatched MoE model; it is patched and unpatched once per candidate and returned as it was.
        calibration_batches: held-out batches (dicts of ``input_ids`` ``(B, L)``, ``attention_mask``
            ``(B, L)``, ``labels`` ``(B,)``), never the test split.
        answer_token_ids: ``(choices,)`` token ids of the answer letters.
        scales: candidate prior scales (positive numbers).
        layer_sets: candidate Bayesian layer sets, each ``"all"`` or a list of decoder-layer indices.
        site_kind: the site kind made random (``"logits"``, ``"weight"``, ...), with prior ``{kind: scale}``.
        num_samples: ``S`` joint draws per prediction.
        seed: seeds the draws (the same for every candidate); the caller's random streams are restored.
        progress: show a progress bar over the candidates.
        objective: ``"raw"`` (the plain predictive's NLL) or ``"calibrated"`` (the NLL after a
            cross-fitted temperature, :func:`cross_fitted_nll`).

    Raises:
        ConfigurationError: no scale or a non-positive one, no layer set, a bad ``num_samples`` or
            ``seed``, no batch or a malformed one, a patched model; LayerSelectionError: a layer set the
            model does not have. All before any prediction.
    """
    if isinstance(scales, str) or not isinstance(scales, Sequence) or not scales:
        raise ConfigurationError(f"scales must be a non-empty list of positive prior scales, got {scales!r}.")
    grid = [check_number(f"scales[{index}]", scale) for index, scale in enumerate(scales)]
    if len(set(grid)) != len(grid):
        raise ConfigurationError(f"scales must be distinct, got {list(scales)}.")
    sets = _layer_sets(layer_sets)
    objective = selection_objective(objective)
    check_integer("num_samples", num_samples)
    check_integer("seed", seed, minimum=0)
    answer_token_ids = torch.as_tensor(answer_token_ids).long()
    if answer_token_ids.dim() != 1 or len(answer_token_ids) < 2:
        raise ConfigurationError(
            f"answer_token_ids must be (choices,) token ids of at least two answers, got shape "
            f"{tuple(answer_token_ids.shape)}."
        )
    batches = check_batches(calibration_batches, len(answer_token_ids))
    examples = sum(len(batch["labels"]) for batch in batches)
    if objective is SelectionObjective.CALIBRATED and examples < 2:
        raise ConfigurationError(f"the calibrated objective needs at least 2 calibration questions, got {examples}.")
    candidates = [PriorCandidate(scale, layers) for layers, scale in itertools.product(sets, grid)]
    for candidate in candidates:  # every site option and layer set is refused here, before any prediction
        patch_routers(model, {site_kind: candidate.scale}, layers=candidate.layers).unpatch()
    scores: dict[PriorCandidate, float] = {}
    for candidate in tqdm(candidates, desc="prior selection", disable=not progress):
        patch = patch_routers(model, {site_kind: candidate.scale}, layers=candidate.layers)
        try:

            def averaged(input_ids: Tensor, attention_mask: Tensor, patch: Any = patch) -> Tensor:
                return predict(
                    patch, input_ids, attention_mask, answer_token_ids=answer_token_ids, num_samples=num_samples
                ).probs

            if objective is SelectionObjective.RAW:
                scores[candidate] = predictive_nll(averaged, batches, seed)
            else:
                scores[candidate] = cross_fitted_nll(*predictive_probabilities(averaged, batches, seed))
        finally:
            patch.unpatch()
    chosen = min(scores, key=scores.__getitem__)
    return PriorSelection(chosen, scores, site_kind, num_samples, seed, examples, objective.value)
