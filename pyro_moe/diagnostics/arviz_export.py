"""ArviZ export of fitted router posteriors: ``InferenceData`` with named dims and coords.

:func:`to_inference_data` turns one :class:`~pyro_moe.inference.fitting.FittedPosterior`, or several
independent fits of the same model (the chains), into an ``arviz.InferenceData``:

========================  ==================================================================
group                     content
========================  ==================================================================
``posterior``             draws of every global site from the guide, stacked over layers:
                          ``weight`` ``(chain, draw, layer, expert, hidden)``, expert
                          ``down_proj`` ``(..., layer, expert, hidden, intermediate)``, ``bias``
                          ``(..., layer, expert)``, ``temperature`` ``(..., layer)`` or
                          ``(..., layer, expert)``, hierarchical prior scales
                          ``<kind>_prior_scale``; with ``batches``, per-token sites summarised
                          per layer and draw over the held-out real tokens:
                          ``<kind>_scale`` (mean predicted standard deviation) and
                          ``<kind>_shift_spread`` (standard deviation across tokens of the
                          guide's mean minus the prior's mean, averaged over experts), or with
                          ``per_token=True`` the drawn values ``<kind>`` ``(..., layer, token,
                          expert)`` (the real tokens of the batches, in order)
``prior``                 draws of the same global sites from their priors
``log_likelihood``        ``answer`` ``(chain, draw, example)``: ``log p(y_i | draw s)``, the
                          per-sample answer probabilities of ``model-average`` predictions with
                          the global sites at the posterior draws
``posterior_predictive``  ``answer`` (a drawn answer index) and ``answer_probs``
                          ``(chain, draw, example, choice)``
``observed_data``         ``answer`` ``(example,)``: the labels
``sample_stats``          the ELBO trace ``loss``, ``nll``, ``kl``, ``beta`` ``(chain, step)``
                          (NaN past a chain's last step); for models without per-token sites
                          and with ``batches``, ``lp`` ``(chain, draw)``, the log joint
                          ``log p(theta_s) + sum_i log p(y_i | theta_s)`` over the batches,
                          and ``log_q``, the guide's ``log q(theta_s)``: the importance ratios of
                          :func:`loo` with ``importance_corrected=True``
========================  ==================================================================

Coordinates: ``layer`` holds the decoder-layer indices, ``expert``, ``hidden``, ``intermediate``,
``example``, ``choice``, ``token`` and ``step`` count from 0; every dim is named (none is left to
ArviZ's ``<variable>_dim_<i>``). Post-hoc posteriors (``laplace``, ``kron-laplace``, ``expert-laplace``,
also fitted with ``steps=0`` and no trained parameter) export like the others. The ``posterior``
group's ``sites`` attribute maps every variable to its site names (JSON). All ArviZ calls of pyro-moe
live in this module, so that the arviz 1.x ``DataTree`` API can be added here; the file is plain netCDF.

Example::

    idata = to_inference_data([fit_a, fit_b], held_out_batches, num_draws=200)
    posterior_summary(idata, var_names=["temperature"])        # mean, sd, hdi, ess, r_hat
    idata.to_netcdf("runs/posterior.nc")                       # az.from_netcdf reads it back
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
import pyro
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torch.distributions import Distribution

from pyro_moe.atomic_files import write_atomically
from pyro_moe.diagnostics.draws import draw_global_sites, draw_prior_global_sites, fit_parameters, run_with_draws
from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.models.likelihoods import check_batches
from pyro_moe.models.router_patch import RouterPatch

__all__ = [
    "SiteLayout",
    "UnknownSiteError",
    "compare",
    "loo",
    "plot_forest",
    "posterior_summary",
    "to_inference_data",
]

HISTORY_FIELDS = ("loss", "nll", "kl", "beta")
"""ELBO-trace fields stored in ``sample_stats``."""


class UnknownSiteError(ConfigurationError):
    """A requested site is not a sample site of the fitted model."""


class SiteLayout:
    """Where each site of a patched model goes in ``InferenceData``: the variable (the site kind,
    dots replaced by underscores, e.g. ``weight`` or ``logits_prior_scale``) and the layer.

    Example::

        layout = SiteLayout(patch)
        layout.variable("model.layers.3.mlp.gate.weight")    # ("weight", 3)
    """

    def __init__(self, patch: RouterPatch) -> None:
        self.layers = {location.path: location.layer_index for location in patch.site_locations}

    def variable(self, site: str) -> tuple[str, int]:
        """``(variable name, layer index)`` of ``site``."""
        for path, layer in self.layers.items():
            if site.startswith(f"{path}."):
                return site.removeprefix(f"{path}.").replace(".", "_"), layer
        raise UnknownSiteError(f"{site!r} is not a site of any patched router ({', '.join(self.layers)}).")

    def group(self, sites: Iterable[str]) -> dict[str, list[tuple[int, str]]]:
        """Sites grouped by variable: ``{variable: [(layer, site), ...]}`` in layer order."""
        grouped: dict[str, list[tuple[int, str]]] = {}
        for site in sites:
            name, layer = self.variable(site)
            grouped.setdefault(name, []).append((layer, site))
        return {name: sorted(entries) for name, entries in grouped.items()}


EVENT_DIMS: dict[str, tuple[str, ...]] = {"down_proj": ("expert", "hidden", "intermediate")}
"""The names of a variable's per-draw dims; every other variable's are a prefix of ``(expert, hidden)``
(``weight``, ``bias``, per-expert ``temperature`` and prior scales, per-token ``logits``)."""


def _event_dims(variable: str, shape: Sequence[int]) -> list[str]:
    """The dims of ``variable``'s value ``shape`` (per draw, without the layer)."""
    names = EVENT_DIMS.get(variable, ("expert", "hidden"))
    if len(shape) > len(names):
        raise ConfigurationError(
            f"the site variable {variable!r} has {len(shape)} dims {tuple(shape)}; the export names at most "
            f"{len(names)} ({', '.join(names)})."
        )
    return list(names[: len(shape)])


def _check_posteriors(posteriors: FittedPosterior | Sequence[FittedPosterior]) -> list[FittedPosterior]:
    chains = [posteriors] if isinstance(posteriors, FittedPosterior) else list(posteriors)
    if not chains:
        raise ConfigurationError("no fit given: pass a FittedPosterior or a non-empty list of them (the chains).")
    for chain in chains:
        if not isinstance(chain, FittedPosterior):
            raise ConfigurationError(f"every chain must be a FittedPosterior, got {type(chain).__name__}.")
        if (chain.guide.global_sites, chain.guide.local_sites) != (
            chains[0].guide.global_sites,
            chains[0].guide.local_sites,
        ):
            raise ConfigurationError(
                "the chains must be fits of the same model sites; got "
                f"{chains[0].guide.global_sites + chains[0].guide.local_sites} and "
                f"{chain.guide.global_sites + chain.guide.local_sites}."
            )
    return chains


def selected_sites(posterior: FittedPosterior, sites: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The global and per-token sites of ``posterior`` named in ``sites`` (default all); an
    unknown name raises :class:`UnknownSiteError` listing the model's sites."""
    global_sites, local_sites = posterior.guide.global_sites, posterior.guide.local_sites
    if sites is None:
        return list(global_sites), list(local_sites)
    known = global_sites + local_sites
    unknown = [site for site in sites if site not in known]
    if unknown:
        raise UnknownSiteError(f"unknown site(s) {unknown}; the model's sites are: {', '.join(known)}.")
    return [s for s in global_sites if s in sites], [s for s in local_sites if s in sites]


def _reference_inputs(posterior: FittedPosterior, batches: list[dict[str, Tensor]] | None) -> tuple[Tensor, Tensor]:
    if batches:
        return batches[0]["input_ids"], batches[0]["attention_mask"]
    device = posterior.patch.model.get_input_embeddings().weight.device
    return torch.zeros(1, 2, dtype=torch.long, device=device), torch.ones(1, 2, dtype=torch.long, device=device)


def _by_layer(arrays: Mapping[int, np.ndarray], layers: Sequence[int]) -> np.ndarray:
    """Stack per-layer arrays ``(S, ...)`` on axis 1 over ``layers`` (NaN where a layer has none)."""
    template = next(iter(arrays.values()))
    missing = np.full_like(template, np.nan, dtype=np.float64)
    return np.stack([arrays.get(layer, missing) for layer in layers], axis=1)


def _stack(
    values: Mapping[str, Tensor], layout: SiteLayout, sites: Sequence[str], layers: Sequence[int]
) -> dict[str, np.ndarray]:
    """``{site: (S, 1, *event)}`` -> ``{variable: (S, layer, *event)}``."""
    return {
        name: _by_layer({layer: values[site].squeeze(1).double().cpu().numpy() for layer, site in entries}, layers)
        for name, entries in layout.group(sites).items()
    }


class _LocalSummary:
    """Running per-draw sums over the real tokens of one per-token site: the guide's predicted
    standard deviation and its mean minus the prior's mean (and the drawn values if kept)."""

    def __init__(self, keep_values: bool) -> None:
        self.keep_values = keep_values
        self.count, self.scale, self.shift, self.shift_squared = 0, 0.0, 0.0, 0.0
        self.values: list[np.ndarray] = []

    def add(self, guide: Distribution, prior: Distribution, values: Tensor, mask: Tensor) -> None:
        """Add one batch: ``guide`` and ``prior`` with batch ``(S, tokens)``, ``values``
        ``(S, tokens, *event)``, ``mask`` ``(tokens,)`` True for real tokens."""
        real = mask.to(values.device)
        stddev, shift = guide.stddev[:, real], (guide.mean - prior.mean)[:, real]  # (S, real tokens, *event)
        if stddev.dim() == 2:
            stddev, shift = stddev.unsqueeze(-1), shift.unsqueeze(-1)
        self.count += int(real.sum())
        self.scale = self.scale + stddev.double().sum((1, 2))
        self.shift = self.shift + shift.double().sum(1)
        self.shift_squared = self.shift_squared + (shift.double() ** 2).sum(1)
        if self.keep_values:
            self.values.append(values[:, real].double().cpu().numpy())

    def token_values(self) -> np.ndarray:
        """``(S, real tokens, *event)`` drawn values over all batches."""
        return np.concatenate(self.values, 1)

    def scale_mean(self) -> np.ndarray:
        """``(S,)`` mean predicted standard deviation over real tokens and experts."""
        return (self.scale / (self.count * self.shift.shape[-1])).cpu().numpy()

    def shift_spread(self) -> np.ndarray:
        """``(S,)`` standard deviation across real tokens of the mean shift, averaged over experts."""
        mean = self.shift / self.count
        variance = (self.shift_squared / self.count - mean**2).clamp(min=0)
        return variance.sqrt().mean(-1).cpu().numpy()


def _history(chains: list[FittedPosterior]) -> dict[str, np.ndarray]:
    steps = max((len(chain.history) for chain in chains), default=0)
    stats = {field: np.full((len(chains), steps), np.nan) for field in HISTORY_FIELDS}
    for index, chain in enumerate(chains):
        for step, record in enumerate(chain.history):
            for field in HISTORY_FIELDS:
                stats[field][index, step] = record.get(field, math.nan)
    return stats


def to_inference_data(
    posteriors: FittedPosterior | Sequence[FittedPosterior],
    batches: Iterable[Mapping[str, Tensor]] | None = None,
    *,
    num_draws: int = 100,
    sites: Sequence[str] | None = None,
    per_token: bool = False,
    seed: int = 0,
) -> az.InferenceData:
    """Export fitted posteriors as ``arviz.InferenceData``; see the module docstring.

    Args:
        posteriors: one fit, or several independent fits of the same model (one chain each;
            fit each in its own parameter-store scope, see :mod:`pyro_moe.diagnostics.draws`).
        batches: held-out batches (``input_ids``, ``attention_mask``, ``labels``) for the
            ``log_likelihood``, ``posterior_predictive``, ``observed_data`` groups and the
            per-token summaries; without them only ``posterior``, ``prior`` and ``sample_stats``.
        num_draws: draws per chain.
        sites: restrict to these site names (default every site).
        per_token: store the drawn per-token values instead of per-layer summaries.
        seed: seeds chain ``c`` with ``seed + c``.

    Raises:
        ConfigurationError: no fit, fits of different sites, no draws (``num_draws < 1``, or
            nothing to export), bad batches; :class:`UnknownSiteError` for a site not in the model.
    """
    chains = _check_posteriors(posteriors)
    first = chains[0]
    global_sites, local_sites = selected_sites(first, sites)
    if batches is not None:
        batches = check_batches(batches, first.likelihood.num_choices)
    if not global_sites and not (local_sites and batches):
        raise ConfigurationError(
            "nothing to draw: the selected sites are per-token only; give held-out batches to summarise them."
        )
    layout = SiteLayout(first.patch)
    layers = sorted({layout.variable(site)[1] for site in global_sites + local_sites})
    dims: dict[str, list[str]] = {}
    posterior: dict[str, list[np.ndarray]] = {}
    prior: dict[str, list[np.ndarray]] = {}
    data: dict[str, list[np.ndarray]] = {}
    importance: dict[str, list[np.ndarray]] = {}
    for index, chain in enumerate(chains):
        pyro.set_rng_seed(seed + index)
        with fit_parameters(chain):
            reference = _reference_inputs(chain, batches)
            global_draws = draw_global_sites(chain, num_draws, *reference)
            values = global_draws.values
            for name, array in _stack(values, layout, global_sites, layers).items():
                posterior.setdefault(name, []).append(array)
                dims[name] = ["layer", *_event_dims(name, array.shape[2:])]
            prior_values = draw_prior_global_sites(chain, num_draws, *reference)
            for name, array in _stack(prior_values, layout, global_sites, layers).items():
                prior.setdefault(name, []).append(array)
            if batches:
                summaries = {site: _LocalSummary(per_token) for site in local_sites}
                held_out = _held_out(chain, values, batches, num_draws, summaries)
                log_prior = held_out.pop("log_prior")
                for name, array in held_out.items():
                    data.setdefault(name, []).append(array)
                if not chain.guide.local_sites:  # the joint density of a draw is known
                    importance.setdefault("lp", []).append(log_prior + held_out["log_likelihood"].sum(-1))
                    importance.setdefault("log_q", []).append(global_draws.log_density.double().cpu().numpy())
                for name, (array, variable_dims) in _local_variables(summaries, layout, layers, per_token).items():
                    posterior.setdefault(name, []).append(array)
                    dims[name] = variable_dims
    site_names = {
        name: [site for _, site in entries] for name, entries in layout.group(global_sites + local_sites).items()
    }
    attrs = {"sites": json.dumps(site_names), "guides": json.dumps([chain.guide.spec for chain in chains])}
    groups = {
        "posterior": _dataset(posterior, {"layer": layers}, dims, attrs),
        "sample_stats": az.dict_to_dataset(
            {**_history(chains), **{name: np.stack(arrays) for name, arrays in importance.items()}},
            library=pyro,
            dims={field: ["chain", "step"] for field in HISTORY_FIELDS}
            | {"lp": ["chain", "draw"], "log_q": ["chain", "draw"]},
            default_dims=[],
        ),
    }
    if prior:
        groups["prior"] = _dataset(prior, {"layer": layers}, dims, attrs)
    if batches:
        groups.update(_data_groups(data, batches))
    return az.InferenceData(**groups)


def _held_out(
    chain: FittedPosterior,
    values: Mapping[str, Tensor],
    batches: list[dict[str, Tensor]],
    num_draws: int,
    summaries: Mapping[str, _LocalSummary],
) -> dict[str, np.ndarray]:
    """Run every held-out batch at the global draws ``values``; returns ``log_prior`` ``(S,)``
    (the global sites' prior log-density), ``log_likelihood`` ``(S, examples)``, ``answer``
    ``(S, examples)`` and ``answer_probs`` ``(S, examples, choices)`` and feeds the per-token
    ``summaries``."""
    log_likelihood, answers, probs, log_prior = [], [], [], None
    for batch in batches:
        draws = run_with_draws(chain, values, batch["input_ids"], batch["attention_mask"], num_draws)
        if log_prior is None:
            log_prior = sum(
                prior.log_prob(values[site]).reshape(num_draws, -1).sum(1).double()
                for site, prior in draws.global_priors.items()
            )
        log_probs = torch.log_softmax(draws.answer_logits, -1)  # (S, batch, choices)
        labels = batch["labels"].to(log_probs.device).expand(num_draws, -1)
        log_likelihood.append(log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        answers.append(torch.distributions.Categorical(logits=log_probs).sample())
        probs.append(log_probs.exp())
        for site, summary in summaries.items():
            summary.add(draws.local_guides[site], draws.local_priors[site], draws.local_values[site], draws.token_mask)
    return {
        "log_prior": torch.as_tensor(log_prior if log_prior is not None else 0.0).cpu().numpy(),
        "log_likelihood": torch.cat(log_likelihood, 1).double().cpu().numpy(),
        "answer": torch.cat(answers, 1).cpu().numpy(),
        "answer_probs": torch.cat(probs, 1).double().cpu().numpy(),
    }


def _local_variables(
    summaries: Mapping[str, _LocalSummary], layout: SiteLayout, layers: Sequence[int], per_token: bool
) -> dict[str, tuple[np.ndarray, list[str]]]:
    """Per-token sites as posterior variables with their dims: the drawn values
    ``(S, layer, token, *event)`` or the summaries ``<kind>_scale`` and ``<kind>_shift_spread``
    ``(S, layer)``."""
    variables = {}
    for name, entries in layout.group(summaries).items():
        if per_token:
            arrays = {layer: summaries[site].token_values() for layer, site in entries}
            event = next(iter(arrays.values())).shape[2:]
            variables[name] = (_by_layer(arrays, layers), ["layer", "token", *_event_dims(name, event)])
            continue
        scale = {layer: summaries[site].scale_mean() for layer, site in entries}
        spread = {layer: summaries[site].shift_spread() for layer, site in entries}
        variables[f"{name}_scale"] = (_by_layer(scale, layers), ["layer"])
        variables[f"{name}_shift_spread"] = (_by_layer(spread, layers), ["layer"])
    return variables


def _dataset(
    arrays: Mapping[str, list[np.ndarray]], coords: dict, dims: dict[str, list[str]], attrs: dict
) -> az.InferenceData:
    """A ``(chain, draw, ...)`` dataset from per-chain arrays ``(draw, ...)``."""
    stacked = {name: np.stack(chains) for name, chains in arrays.items()}
    return az.dict_to_dataset(stacked, library=pyro, coords=coords, dims=dims, attrs=attrs)


def _data_groups(data: Mapping[str, list[np.ndarray]], batches: list[dict[str, Tensor]]) -> dict:
    """The ``log_likelihood``, ``posterior_predictive`` and ``observed_data`` groups."""
    labels = torch.cat([batch["labels"] for batch in batches]).cpu().numpy()
    stacked = {name: np.stack(chains) for name, chains in data.items()}
    return {
        "log_likelihood": az.dict_to_dataset(
            {"answer": stacked["log_likelihood"]}, library=pyro, dims={"answer": ["example"]}
        ),
        "posterior_predictive": az.dict_to_dataset(
            {"answer": stacked["answer"], "answer_probs": stacked["answer_probs"]},
            library=pyro,
            dims={"answer": ["example"], "answer_probs": ["example", "choice"]},
        ),
        "observed_data": az.dict_to_dataset(
            {"answer": labels}, library=pyro, dims={"answer": ["example"]}, default_dims=[]
        ),
    }


def posterior_summary(
    idata: az.InferenceData, var_names: Sequence[str] | None = None, group: str = "posterior"
) -> pd.DataFrame:
    """``az.summary`` of ``group``: mean, sd, HDI, MCSE, bulk and tail ESS and ``r_hat`` (which
    needs at least two chains; NaN with one)."""
    if var_names is not None:
        unknown = [name for name in var_names if name not in idata[group].data_vars]
        if unknown:
            raise UnknownSiteError(
                f"unknown variable(s) {unknown} in the {group} group; it holds {', '.join(idata[group].data_vars)}."
            )
    with np.errstate(invalid="ignore", divide="ignore"):
        return az.summary(idata, var_names=list(var_names) if var_names else None, group=group)


def loo(idata: az.InferenceData, importance_corrected: bool = False) -> az.ELPDData:
    """PSIS-LOO of the pointwise ``log_likelihood`` (``az.loo``, pointwise, with Pareto ``k``).

    The draws of a variational posterior come from ``q``, not from ``p(theta | y)``. With
    ``importance_corrected=True`` the leave-one-out importance ratios are
    ``log p(theta_s, y) - log q(theta_s) - log p(y_i | theta_s)`` (``lp`` and ``log_q`` of
    ``sample_stats``; Pareto-smoothed per example by ``az.psislw``, relative efficiency 1 as the
    draws are independent), which makes the estimate target the exact posterior's LOO; Pareto
    ``k`` then also measures how far ``q`` is from the posterior. Without it, ``q`` is treated as
    the posterior (the ratios are ``-log p(y_i | theta_s)``, as for MCMC draws).

    Raises:
        ConfigurationError: no ``log_likelihood`` group, or a correction without ``lp``/``log_q``
            (models with per-token sites have no tractable joint density per draw).
    """
    if "log_likelihood" not in idata.groups():
        raise ConfigurationError("LOO needs the log_likelihood group: export the fit with batches.")
    with np.errstate(invalid="ignore", divide="ignore"):
        plain = az.loo(idata, pointwise=True)
    if not importance_corrected:
        return plain
    stats = idata["sample_stats"] if "sample_stats" in idata.groups() else {}
    if "lp" not in stats or "log_q" not in stats:
        raise ConfigurationError(
            "the importance correction needs lp and log_q in sample_stats: a model without per-token sites, "
            "exported with batches."
        )
    log_likelihood = idata.log_likelihood["answer"].stack(sample=("chain", "draw")).transpose("example", "sample")
    ratio = (stats["lp"] - stats["log_q"]).stack(sample=("chain", "draw")).values  # (S,)
    log_ratios = ratio[None, :] - log_likelihood.values  # (examples, S)
    log_weights, pareto_k = az.psislw(log_ratios, reff=1.0)
    pointwise = _logsumexp(log_weights + log_likelihood.values)
    full = ratio - _logsumexp(ratio[None, :])  # self-normalised weights of the whole posterior
    lppd = _logsumexp(full[None, :] + log_likelihood.values).sum()
    corrected = plain.copy()
    corrected["elpd_loo"] = float(pointwise.sum())
    corrected["se"] = float(np.sqrt(len(pointwise) * np.var(pointwise)))
    corrected["p_loo"] = float(lppd - pointwise.sum())
    corrected["loo_i"] = plain["loo_i"].copy(data=pointwise)
    corrected["pareto_k"] = plain["pareto_k"].copy(data=np.asarray(pareto_k))
    corrected["warning"] = bool((np.asarray(pareto_k) > plain["good_k"]).any())
    return corrected


def _logsumexp(values: np.ndarray) -> np.ndarray:
    """``log sum exp`` over the last axis."""
    top = values.max(-1, keepdims=True)
    return (top + np.log(np.exp(values - top).sum(-1, keepdims=True))).squeeze(-1)


def compare(elpds: Mapping[str, az.ELPDData | az.InferenceData]) -> pd.DataFrame:
    """``az.compare`` of several fits (PSIS-LOO, stacking weights): one row per name, best first,
    with ``rank``, ``elpd_loo``, ``p_loo``, ``elpd_diff``, ``weight``, ``se``, ``dse``, ``warning``."""
    if len(elpds) < 2:
        raise ConfigurationError(f"compare needs at least two fits, got {len(elpds)}.")
    with np.errstate(invalid="ignore", divide="ignore"):
        return az.compare(dict(elpds), ic="loo")


def plot_forest(idatas: Mapping[str, az.InferenceData], path: str | Path, var_names: Sequence[str], title: str) -> Path:
    """``az.plot_forest`` of the same variables across several exports (one colour per name,
    94 % HDI), written as a PNG with ``title``; returns its path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigurationError(f"the forest plot is written as PNG: the path must end in .png, got {str(path)!r}.")
    for name, idata in idatas.items():
        missing = [var for var in var_names if var not in idata.posterior.data_vars]
        if missing:
            raise UnknownSiteError(f"{name!r} has no posterior variable(s) {missing}.")
    figure = Figure(figsize=(8, 6.5), layout="constrained")
    axis = figure.add_subplot()
    az.plot_forest(list(idatas.values()), model_names=list(idatas), var_names=list(var_names), combined=True, ax=axis)
    axis.set_title(title)
    axis.set_xlabel("value (94 % HDI)")
    legend = axis.get_legend()  # ArviZ puts it over the top intervals: below the axes instead
    if legend is not None:
        handles, labels = legend.legend_handles, [text.get_text() for text in legend.get_texts()]
        legend.remove()
        figure.legend(handles[::-1], labels[::-1], loc="outside lower center", ncols=min(len(labels), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
    return path
