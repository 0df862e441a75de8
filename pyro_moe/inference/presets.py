"""Families fitted by name: each guide name becomes a :class:`FamilySpec` (sites, selection, fit
options, layers) from its scopes' default sites and the family's own
:class:`~pyro_moe.guides.family.FamilyPreset`, and :func:`fit_families` patches and fits them.

Nothing here knows a family by name: SWAG's schedule, the ensemble's particles, MC dropout's
dropout, temperature sampling's Sample-K and the expert Laplace's sites and prior-precision choice
are their families' presets.

Example::

    specs = family_specs(["mean-field", "mfvr", "swag"], steps=200)          # default sites and setups
    posteriors = fit_families(model, train_batches, specs, answer_token_ids=letters, steps=200)
    on_text = fit_families(model, text_batches, family_specs(["mfvr"], steps=200), answer_token_ids=None)
    posteriors["swag"].predict(input_ids, attention_mask, num_samples=16)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.family import GuideScope
from pyro_moe.guides.registry import GUIDE_FAMILIES, parse_guide
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.resume import CheckpointOptions
from pyro_moe.models.expert_patch import patch_experts
from pyro_moe.models.likelihoods import likelihood_kind
from pyro_moe.models.router_patch import patch_routers

__all__ = ["DEFAULT_SITES", "FamilySpec", "default_family", "family_specs", "fit_families"]

DEFAULT_SITES: dict[GuideScope, dict[str, Any]] = {
    GuideScope.GLOBAL: {"weight": 0.05},
    GuideScope.LOGITS: {"logits": 2.0},
    GuideScope.TOKEN_TEMPERATURE: {"temperature": {"per": "token", "scale": 0.3}},
}
"""Sites (as :func:`pyro_moe.patch_routers` takes them) a family gets for each scope it covers when
none are given: router weights with prior scale 0.05 (the benchmark's router weights have standard
deviation 0.035), per-token logits with prior scale 2 (the design brief's calibrating setting),
per-token temperatures with scale 0.3."""


@dataclass(frozen=True)
class FamilySpec:
    """How one family is patched and fitted.

    Attributes:
        name: the label in tables and plots.
        guide: the guide's name (see :mod:`pyro_moe.guides.registry`).
        sites: the router sites (as :func:`pyro_moe.patch_routers` takes them), or ``"experts"``
            for the expert ``down_proj`` sites of :func:`pyro_moe.models.expert_patch.patch_experts`.
        selection: ``"top-k"`` or ``"sample-k"`` (router sites).
        options: further keyword arguments of :func:`pyro_moe.fit` (``guide_options`` and
            :class:`~pyro_moe.inference.options.TrainingOptions` fields such as ``steps``,
            ``num_particles``, ``lr``), over the experiment's own.
        layers: the family's Bayesian decoder layers; ``None``: the experiment's.
        tune: after the fit, ``tune(posterior, validation_batches, seed)`` chooses hyperparameters on
            validation data (``expert-laplace``'s prior precision); ``None``: nothing to choose.
    """

    name: str
    guide: str
    sites: Mapping[str, Any] | Sequence[str] | str
    selection: str = "top-k"
    options: Mapping[str, Any] = field(default_factory=dict)
    layers: str | Sequence[int] | None = None
    tune: Callable[[Any, Sequence[Mapping[str, Tensor]], int], None] | None = None


def default_family(guide: str, steps: int, sites: Mapping[str, Any] | None = None) -> FamilySpec:
    """The :class:`FamilySpec` of a guide name: ``sites`` (default: its scopes' :data:`DEFAULT_SITES`)
    with what its families' presets add (``steps`` sets SWAG's schedule); a family whose sites define it
    (``expert-laplace``) keeps its own.

    Raises:
        ConfigurationError: an unknown guide name (the message lists the registered ones).
    """
    scopes = parse_guide(guide)
    chosen: Mapping[str, Any] | Sequence[str] | str | None = None if sites is None else dict(sites)
    if chosen is None:
        chosen = {}
        for scope in scopes:
            if scope not in DEFAULT_SITES:
                raise ConfigurationError(
                    f"no default sites for the {scope.value} scope of {guide!r}: give a FamilySpec."
                )
            chosen.update(DEFAULT_SITES[scope])
    selection, options, layers, tune, extra = "top-k", {}, None, None, {}
    guide_options: dict[str, dict[str, Any]] = {}
    for family in scopes.values():
        preset = family.preset(steps)
        if preset.sites is not None and (sites is None or not preset.user_sites):
            chosen = preset.sites
        extra.update(preset.extra_sites)
        selection = preset.selection if preset.selection != "top-k" else selection
        options.update(preset.training)
        if preset.guide_options:
            guide_options[family.name] = dict(preset.guide_options)
        layers = preset.layers if preset.layers is not None else layers
        tune = preset.tune or tune
    if extra and isinstance(chosen, Mapping):
        chosen = {**chosen, **extra}
    if guide_options:
        options["guide_options"] = guide_options
    return FamilySpec(guide, guide, chosen, selection=selection, options=options, layers=layers, tune=tune)


def family_specs(
    families: Sequence[str | FamilySpec], sites: Mapping[str, Any] | None = None, steps: int = 200
) -> list[FamilySpec]:
    """One :class:`FamilySpec` per family, checked against the guide registry before anything is fitted.

    Args:
        families: guide names (``"mean-field"``, ``"map+mfvr"``, ``"swag"``, ...) or complete specs.
        sites: the router sites of every named family instead of the scopes' defaults (families add
            what they need, e.g. MC dropout's dropout; the expert Laplace keeps its expert sites).
        steps: the SVI steps the families will get (SWAG's schedule follows them).

    Raises:
        ConfigurationError: an unknown guide name, no family, two families of the same name, or 0 steps
            for a family that trains by SVI (:func:`check_steps`).
    """
    if isinstance(families, str) or not families:
        raise ConfigurationError(f"families must be a non-empty list of guide names or FamilySpecs, got {families!r}.")
    specs = []
    for family in families:
        if isinstance(family, FamilySpec):
            parse_guide(family.guide)
            specs.append(family)
        else:
            specs.append(default_family(family, steps, sites))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"family names must be distinct, got {names}.")
    check_steps(specs, steps)
    return specs


def check_steps(specs: Sequence[FamilySpec], steps: int) -> None:
    """Refuse 0 SVI steps (``steps``, or a spec's own) for a spec that trains by SVI: only the post-hoc
    families (the Laplace ones, fitted at the model's weights) take 0 steps."""
    for spec in specs:
        if spec.options.get("steps", steps) == 0 and not all(f.post_hoc for f in parse_guide(spec.guide).values()):
            post_hoc = ", ".join(name for name, family in GUIDE_FAMILIES.items() if family.post_hoc)
            raise ConfigurationError(
                f"steps must be a positive integer, got 0, for {spec.name} (it trains by SVI); 0 steps fit the "
                f"post-hoc families alone ({post_hoc})."
            )


def fit_families(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    specs: Sequence[FamilySpec],
    *,
    answer_token_ids: Tensor | None,
    layers: str | Sequence[int] = "all",
    steps: int = 200,
    seed: int = 0,
    progress: bool = True,
    validation_batches: Sequence[Mapping[str, Tensor]] | None = None,
    in_place: bool = False,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, FittedPosterior]:
    """Fit every spec with :func:`pyro_moe.fit` on ``batches``; returns ``{spec name: FittedPosterior}``.

    Args:
        model: the model; each spec is fitted on a deep copy of it (``model`` itself stays unpatched),
            or, with ``in_place`` (one spec only), on ``model`` itself (no second copy in memory).
        batches: the fit's batches.
        specs: from :func:`family_specs`.
        answer_token_ids: ``(choices,)`` answer-letter token ids (MCQA batches), or ``None`` (text
            batches, the next-token likelihood), as in :func:`pyro_moe.fit`.
        layers: the Bayesian decoder layers of specs that do not choose their own.
        steps, seed, progress: as in :func:`pyro_moe.fit` (a spec's options override them).
        validation_batches: held-out batches for the specs that ``tune`` hyperparameters after the fit.
        checkpoint: run checkpoints (and resuming one) of the fit, as in :func:`pyro_moe.fit`; one spec only.

    Raises:
        ConfigurationError: options a family refuses (``GuideFamily.check_options``: SWAG's schedule),
            a family that does not fit the likelihood, tuned specs without validation batches; before any fit.
    """
    kind = likelihood_kind(answer_token_ids)
    check_steps(specs, steps)
    for spec in specs:  # every family's likelihood and options, before any fit
        for family in parse_guide(spec.guide).values():
            family.check_likelihood(kind)
            if family.check_options is not None:
                options = spec.options.get("guide_options", {}).get(family.name, {})
                family.check_options(options, spec.options.get("steps", steps))
    tuned = [spec.name for spec in specs if spec.tune is not None]
    if tuned and not validation_batches:
        raise ConfigurationError(f"{tuned} choose hyperparameters on validation data: give validation_batches.")
    if in_place and len(specs) != 1:
        raise ConfigurationError(f"in_place fits one family on the model itself, got {len(specs)} families.")
    if checkpoint is not None and len(specs) != 1:
        raise ConfigurationError(f"a checkpoint folder holds one fit, got {len(specs)} families.")
    posteriors = {}
    for spec in tqdm(specs, desc="families", disable=not progress or len(specs) < 2):
        target = model if in_place else copy.deepcopy(model)
        family_layers = layers if spec.layers is None else spec.layers
        if spec.sites == "experts":
            patch = patch_experts(target, layers=family_layers)
        else:
            patch = patch_routers(target, spec.sites, layers=family_layers, selection=spec.selection)
        options = {"steps": steps, "seed": seed, "progress": progress, "checkpoint": checkpoint, **spec.options}
        try:
            posterior = fit(patch, batches, spec.guide, answer_token_ids=answer_token_ids, **options)
        except BaseException:
            patch.unpatch()  # in place: the user's model is left as it was given
            raise
        if spec.tune is not None:
            spec.tune(posterior, validation_batches, seed)
        posteriors[spec.name] = posterior
    return posteriors
