"""The posterior options' meaning, shared by the commands that fit guides: ``--sites`` with ``--prior``,
``--layers`` (``susceptible``: ranked by routing stability), ``--steps``, and the guides fitted by name."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyro_moe.cli.errors import BadInput
from pyro_moe.cli.options import DEFAULT_STEPS
from pyro_moe.cli.settings import DataOptions, FittingOptions

if TYPE_CHECKING:
    from pyro_moe.cli.inputs import Inputs
    from pyro_moe.experiments.stability import StabilityResults
    from pyro_moe.inference.fitting import FittedPosterior
    from pyro_moe.inference.resume import CheckpointOptions

__all__ = [
    "check_guides",
    "deterministic_stability",
    "fit_guides",
    "fixed_layers",
    "guide_steps",
    "parse_sites",
    "resolve_layers",
]

logger = logging.getLogger("pyro_moe.cli")


def parse_sites(options: FittingOptions) -> dict[str, Any] | None:
    """``--sites`` (JSON, or comma-separated kinds) with ``--prior`` as the family of every sampled site."""
    sites: dict[str, Any] | None = None
    if options.sites is not None:
        text = options.sites.strip()
        try:
            parsed = json.loads(text) if text.startswith("{") else {kind.strip(): None for kind in text.split(",")}
        except json.JSONDecodeError as error:
            raise BadInput(
                f"--sites is not valid JSON ({error}); e.g. '{{\"logits\": 2.0}}' or logits,weight."
            ) from None
        sites = dict(parsed)
    if options.prior is not None:
        from pyro_moe.models.priors import prior_family

        prior_family(options.prior)  # unknown names: ConfigurationError listing PRIOR_FAMILIES
        if sites is None:
            raise BadInput("--prior needs --sites (the sites whose prior family it sets), e.g. --sites logits.")
        for kind, option in sites.items():
            if kind == "dropout":
                continue
            option = dict(option) if isinstance(option, dict) else ({} if option is None else {"scale": option})
            if "scale" not in option:
                from pyro_moe.models.bayesian_router import DEFAULT_SCALES, SiteKind

                option["scale"] = DEFAULT_SCALES[SiteKind(kind)]
            sites[kind] = {**option, "family": options.prior}
    return sites


def guide_steps(options: FittingOptions) -> int:
    """The SVI steps of a guide fitted by name: ``--steps``, or :data:`DEFAULT_STEPS` (``fit``'s ``--steps``
    defaults to none, so that ``--recipe`` keeps its recipe's own)."""
    return DEFAULT_STEPS if options.steps is None else options.steps


def check_guides(names: Sequence[str]) -> list[str]:
    """Every guide name parses against the registry (errors list the registered names)."""
    from pyro_moe.guides.registry import parse_guide

    for name in names:
        parse_guide(name)
    return list(names)


def deterministic_stability(inputs: Inputs, data: DataOptions, k: int, seed: int) -> StabilityResults:
    """The deterministic model's routing stability on the first ``--examples`` calibration questions (the
    layer choice is a modelling choice, which the test split must not make) and
    its ``k`` (``--susceptible-k``) susceptible layers, by the library's rule at its default noise level
    (:func:`pyro_moe.evaluation.stability.susceptible_layers`,
    :data:`~pyro_moe.evaluation.stability.DEFAULT_GAMMA`): what ``stability`` reports and
    ``--layers susceptible`` picks."""
    from pyro_moe.experiments.stability import StabilitySettings, stability_experiment

    settings = StabilitySettings(examples=data.examples, k=k, batch_size=data.batch_size, seed=seed)
    return stability_experiment(inputs.model, inputs.tokenizer, inputs.splits, {}, settings)


def fixed_layers(options: FittingOptions) -> str | list[int]:
    """``--layers`` where there are no MCQA questions to rank the layers on (``fit --text``, ``generate``):
    ``all`` or distinct indices; ``susceptible`` is refused."""
    if options.layers == ("all",):
        return "all"
    if options.layers == ("susceptible",):
        raise BadInput(
            "--layers susceptible ranks the layers' routing stability on MCQA questions; with --text give "
            "all or layer indices."
        )
    try:
        layers = [int(layer) for layer in options.layers]
    except ValueError:
        raise BadInput(
            f"--layers takes 'all', 'susceptible' or layer indices, got {' '.join(options.layers)}."
        ) from None
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise BadInput(f"--layers {' '.join(options.layers)} names layer(s) {repeated} more than once; give each once.")
    return layers


def resolve_layers(options: FittingOptions, inputs: Inputs, data: DataOptions, seed: int) -> str | list[int]:
    """``--layers``: ``all``, indices, or ``susceptible`` (the layers :func:`deterministic_stability` picks on
    the MCQA ``inputs``)."""
    if options.layers == ("susceptible",):
        result = deterministic_stability(inputs, data, options.susceptible_k, seed)
        logger.info("susceptible layers: %s", result.susceptible)
        return result.susceptible
    return fixed_layers(options)


def fit_guides(
    inputs: Inputs,
    guides: Sequence[str],
    layers: Any,
    options: FittingOptions,
    data: DataOptions,
    seed: int,
    in_place: bool = False,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, FittedPosterior]:
    """The ``guides`` fitted as the options say: ``evaluate`` and ``compare`` fit every family on its own
    copy of the model (the deterministic model is measured beside them); ``fit`` and ``laplace`` patch
    the loaded model itself (``in_place``: the command owns it, so no second copy of the MoE is made)
    and write run checkpoints (``checkpoint``)."""
    from pyro_moe.experiments.evaluation import FitSettings, fit_named_families

    fitting = FitSettings(
        examples=options.fit_examples,
        sites=parse_sites(options),
        layers=layers,
        steps=guide_steps(options),
        batch_size=data.batch_size,
        seed=seed,
        validation_examples=data.examples,
        checkpoint=checkpoint,
    )
    return fit_named_families(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        guides,
        fitting,
        answer_token_ids=inputs.answer_token_ids,
        in_place=in_place,
    )
