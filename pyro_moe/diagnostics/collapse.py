"""The posterior-collapse report: does a fitted router posterior still say anything?

Two failures make a Bayesian router useless while training looks fine:

* **collapse to deterministic**: the posterior's spread (or the temperature) shrinks towards 0,
  and the router silently routes deterministically again;
* **collapse to the prior**: ``KL(q || p)`` goes towards 0, the guide learns nothing (the plain
  ELBO's failure with amortized logit guides); and, for temperatures, **runaway temperature**:
  ``T`` grows until the routing is uniform.

:func:`collapse_report` measures, per site (and chain):

* global sites (weights, biases, temperatures, hierarchical prior scales), from ``S`` joint
  draws of the guide and the prior at each draw: the posterior and prior standard deviations
  per dimension and their ratio (for priors of infinite variance the prior's spread is its
  interquartile range / 1.349, the standard deviation of a Normal with that range); ``KL(q_d ||
  p_d)`` per dimension ``d``, by Monte Carlo with ``q_d`` the Normal matching the draws' mean and
  variance in the site's unconstrained space (exact for the Gaussian autoguides; MAP guides give
  ``inf``); the site's KL is the sum over dimensions, which for a correlated guide is a lower
  bound (it leaves out the guide's total correlation);
* per-token sites (logits, per-token temperatures), on held-out ``batches``, over the real
  tokens: ``KL(q(. | u) || p(. | u))`` per token (closed form where registered, else Monte
  Carlo) and per dimension (Normal marginals of ``q``), the mean predicted standard deviation
  ``mean_predicted_scale`` and its ratio to the prior's, and the fraction of active units
  (Burda et al., 2016): experts whose guide mean moves with the token,
  ``Var_tokens(E_q[l] - E_p[l]) / Var_p(l) > active_unit_variance``;
* temperatures: mean, median and 5 % / 95 % quantiles of the drawn (global) or predicted
  (per-token, the guide's mean) temperatures.

Flags (thresholds in :class:`CollapseThresholds`): ``deterministic`` when the standard-deviation
ratio falls below ``deterministic_ratio`` or the median temperature below ``cold_temperature``;
``prior_collapse`` when the KL per dimension falls below ``prior_kl_per_dimension`` and, for a
site whose prior scale is learned (empirical Bayes), so does the KL per dimension to the prior at
its initial scale (``initial_prior_kl_per_dimension``): a posterior that follows a prior the data
moved has learned from the data;
``runaway_temperature`` when the median temperature exceeds ``hot_temperature``.

Example::

    report = collapse_report([fit_a, fit_b], held_out_batches)
    report.table[["site", "sd_ratio", "kl_per_dimension", "deterministic", "prior_collapse"]]
    report.flagged("prior_collapse")                 # [(chain, site), ...]
    report.plot("runs/collapse.png")
    report.summary                                   # az.summary: ess_bulk, ess_tail, r_hat across chains
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Distribution, biject_to, kl_divergence

from pyro_moe.atomic_files import write_atomically
from pyro_moe.diagnostics.arviz_export import SiteLayout, posterior_summary, selected_sites, to_inference_data
from pyro_moe.diagnostics.draws import draw_global_sites, elementwise, fit_parameters, run_with_draws
from pyro_moe.errors import ConfigurationError
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.models.likelihoods import check_batches
from pyro_moe.validation import check_number

__all__ = ["FLAGS", "CollapseReport", "CollapseThresholds", "collapse_report"]

FLAGS = ("deterministic", "prior_collapse", "runaway_temperature")
"""The flags of the report, one boolean column each."""

_MONTE_CARLO_DRAWS = 64


class _InitialPriorScales(Messenger):
    """Reads every learned prior scale (``pyro.param`` ``<site>.prior_scale``) at its initial value:
    under it the model's priors are the unfitted ones. ``replaced`` counts the scales it replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.replaced = 0

    def _pyro_param(self, msg: dict) -> None:
        name, initial = msg["args"][0], msg["args"][1] if len(msg["args"]) > 1 else None
        if name.endswith(".prior_scale") and isinstance(initial, Tensor):
            msg["value"], msg["done"] = initial, True
            self.replaced += 1


@dataclass(frozen=True)
class CollapseThresholds:
    """Where the flags of the report switch on.

    Attributes:
        deterministic_ratio: posterior-to-prior standard-deviation ratio (global sites) or mean
            predicted to prior standard deviation (per-token sites) below which a site has
            collapsed to deterministic.
        prior_kl_per_dimension: ``KL(q || p)`` per dimension (nats) below which a site has
            collapsed to its prior.
        cold_temperature: median temperature below which routing is deterministic (argmax).
        hot_temperature: median temperature above which routing is near uniform (runaway).
        active_unit_variance: a per-token unit is active when the variance across tokens of its
            guide mean's shift exceeds this fraction of the prior variance.
    """

    deterministic_ratio: float = 1e-3
    prior_kl_per_dimension: float = 1e-2
    cold_temperature: float = 0.05
    hot_temperature: float = 20.0
    active_unit_variance: float = 0.01

    def __post_init__(self) -> None:
        for name in ("deterministic_ratio", "prior_kl_per_dimension", "cold_temperature", "active_unit_variance"):
            check_number(name, getattr(self, name))
        if check_number("hot_temperature", self.hot_temperature) <= self.cold_temperature:
            raise ConfigurationError(
                f"hot_temperature ({self.hot_temperature}) must exceed cold_temperature ({self.cold_temperature})."
            )


@dataclass
class CollapseReport:
    """What :func:`collapse_report` returns.

    Attributes:
        table: one row per chain and site: ``chain, site, variable, layer, scope, dimensions,
            posterior_sd, prior_sd, sd_ratio, kl, kl_per_dimension, initial_prior_kl_per_dimension
            (NaN unless the prior scale is learned), active_fraction,
            mean_predicted_scale, temperature_mean, temperature_median, temperature_q05,
            temperature_q95`` and the boolean :data:`FLAGS`.
        kl_per_dimension: per ``(chain, site)``, the KL of each dimension: the site's event shape
            (global sites) or ``(experts,)`` averaged over tokens (per-token logits).
        summary: ``az.summary`` of the exported posterior (mean, sd, HDI, ESS, ``r_hat`` across
            chains).
        thresholds: the thresholds used.
    """

    table: pd.DataFrame
    kl_per_dimension: dict[tuple[int, str], np.ndarray]
    summary: pd.DataFrame
    thresholds: CollapseThresholds = field(default_factory=CollapseThresholds)

    def flagged(self, flag: str) -> list[tuple[int, str]]:
        """``(chain, site)`` of the rows with ``flag`` set."""
        if flag not in FLAGS:
            raise ConfigurationError(f"unknown flag {flag!r}; accepted: {', '.join(FLAGS)}.")
        rows = self.table[self.table[flag]]
        return list(zip(rows["chain"].tolist(), rows["site"].tolist(), strict=True))

    def plot(self, path: str | Path) -> Path:
        """A PNG of the standard-deviation ratio and the KL per dimension of every site and chain
        (log scales), with the thresholds and the flagged sites marked; returns its path."""
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ConfigurationError(f"the plot is written as PNG: the path must end in .png, got {str(path)!r}.")
        table = self.table
        labels = [f"{row.variable} L{row.layer} c{row.chain}" for row in table.itertuples()]
        positions = np.arange(len(table))
        status = np.where(
            table["deterministic"],
            "deterministic",
            np.where(table["prior_collapse"], "collapsed to the prior", "not collapsed"),
        )
        colours = {"deterministic": "tab:red", "collapsed to the prior": "tab:orange", "not collapsed": "tab:blue"}
        figure = Figure(figsize=(11, 0.35 * len(table) + 3.0), layout="constrained")
        figure.suptitle("Posterior collapse per site (rows: variable, layer, chain)")
        panels = figure.subplots(1, 2, sharey=True)
        columns = (
            ("sd_ratio", "posterior / prior standard deviation", "deterministic below"),
            ("kl_per_dimension", "KL(q || p) per dimension", "collapsed to the prior below"),
        )
        lines = (self.thresholds.deterministic_ratio, self.thresholds.prior_kl_per_dimension)
        for axis, (column, title, meaning), line in zip(panels, columns, lines, strict=True):
            values = table[column].to_numpy(dtype=float)
            shown = np.clip(np.nan_to_num(values, nan=np.nan, posinf=1e6), 1e-12, 1e6)
            for name, colour in colours.items():
                chosen = status == name
                if chosen.any():
                    axis.barh(positions[chosen], shown[chosen], color=colour, label=name)
            axis.axvline(line, color="black", linestyle="--", label="threshold")
            axis.set_xscale("log")
            axis.set_title(f"{title}\n({meaning} {line:g})", fontsize="medium")
            axis.set_xlabel(f"{column} (log scale)")
        panels[0].set_yticks(positions, labels)
        panels[0].set_ylabel("site")
        handles = {}
        for axis in panels:  # each status once, below the panels where it covers no bar
            for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles))
        path.parent.mkdir(parents=True, exist_ok=True)
        FigureCanvasAgg(figure)
        write_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
        return path


def _prior_spread(prior: Distribution) -> Tensor:
    """Per-element standard deviation of ``prior``, or IQR / 1.349 where the variance is infinite."""
    spread = prior.stddev
    if torch.isfinite(spread).all():
        return spread
    draws = prior.sample((max(1, 2000 // prior.batch_shape[0]),)).flatten(0, 1)  # (k * S, ...) per element
    quartiles = torch.quantile(draws.double(), torch.tensor([0.25, 0.75], dtype=torch.float64), dim=0)
    robust = ((quartiles[1] - quartiles[0]) / 1.349).to(spread.dtype).expand_as(spread)
    return torch.where(torch.isfinite(spread), spread, robust)


def _global_kl_per_dimension(values: Tensor, prior: Distribution) -> Tensor:
    """``KL(q_d || p_d)`` per dimension from draws ``(S, ...)`` with ``q_d`` the Normal moment match
    in the unconstrained space of ``prior.support``; ``inf`` where the draws do not vary."""
    transform = biject_to(prior.support)
    unconstrained = transform.inv(values)
    mean, sd = unconstrained.mean(0), unconstrained.std(0)
    log_q = torch.distributions.Normal(mean, sd.clamp(min=1e-30)).log_prob(unconstrained)
    log_q = log_q - transform.log_abs_det_jacobian(unconstrained, values)
    kl = (log_q - prior.log_prob(values)).mean(0)
    return torch.where(sd > 0, kl, torch.full_like(kl, math.inf))


def _quantiles(values: Tensor) -> dict[str, float]:
    flat = values.double().flatten()
    q05, q50, q95 = torch.quantile(flat, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {
        "temperature_mean": float(flat.mean()),
        "temperature_median": q50,
        "temperature_q05": q05,
        "temperature_q95": q95,
    }


def _global_rows(
    chain: FittedPosterior, sites: Sequence[str], num_draws: int, reference: tuple[Tensor, Tensor]
) -> tuple[list[dict], dict[str, np.ndarray]]:
    values = draw_global_sites(chain, num_draws, *reference).values
    draws = run_with_draws(chain, values, *reference)
    with _InitialPriorScales() as initial_scales:
        initial = run_with_draws(chain, values, *reference).global_priors
    rows, per_dimension = [], {}
    for site in sites:
        value, prior = values[site].squeeze(1).double(), draws.global_priors[site]  # (S, *event), batch (S, 1, *event)
        posterior_sd = value.std(0)
        prior_sd = _prior_spread(prior).squeeze(1).double().mean(0)
        kl = _global_kl_per_dimension(values[site], prior).squeeze(0).double()
        per_dimension[site] = kl.cpu().numpy()
        row = {
            "scope": "global",
            "dimensions": int(value[0].numel()),
            "posterior_sd": float(posterior_sd.mean()),
            "prior_sd": float(prior_sd.mean()),
            "sd_ratio": float((posterior_sd / prior_sd).mean()),
            "kl": float(kl.sum()),
            "kl_per_dimension": float(kl.mean()),
            "initial_prior_kl_per_dimension": (
                float(_global_kl_per_dimension(values[site], initial[site]).double().mean())
                if initial_scales.replaced
                else math.nan
            ),
        }
        if site.endswith(".temperature"):
            row.update(_quantiles(value))
        rows.append(row)
    return rows, per_dimension


def _kl(guide: Distribution, prior: Distribution, draws: int = _MONTE_CARLO_DRAWS) -> Tensor:
    """``KL(guide || prior)`` over their shared batch shape: closed form if registered, else Monte Carlo."""
    try:
        return kl_divergence(guide, prior)
    except NotImplementedError:
        samples = guide.sample((draws,))
        return (guide.log_prob(samples) - prior.log_prob(samples)).mean(0)


class _TokenStatistics:
    """Sums over the real tokens of one per-token site across batches."""

    def __init__(self) -> None:
        self.count = 0
        self.sums: dict[str, Tensor | float] = {}
        self.temperatures: list[Tensor] = []

    def _add(self, key: str, value: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value.double().sum(0)

    def add(
        self,
        guide: Distribution,
        prior: Distribution,
        mask: Tensor,
        is_temperature: bool,
        initial_prior: Distribution | None = None,
    ) -> None:
        """One batch: ``guide``, ``prior`` batch ``(S, tokens)``; ``mask`` ``(tokens,)``;
        ``initial_prior``: the prior at its initial scale when the scale is learned."""
        real = mask.to(guide.mean.device)
        total = _kl(guide, prior)[:, real].flatten()  # (S * real tokens,)
        if initial_prior is not None:
            self._add("initial_kl", _kl(guide, initial_prior)[:, real].flatten())
        guide_marginal, prior_marginal = elementwise(guide), elementwise(prior)
        per_dimension = _kl(guide_marginal, prior_marginal)[:, real]
        guide_sd, prior_sd = guide_marginal.stddev[:, real], prior_marginal.stddev[:, real]
        shift = (guide_marginal.mean - prior_marginal.mean)[:, real]
        flat = {"kl": total, "kl_dimension": per_dimension, "guide_sd": guide_sd, "prior_sd": prior_sd}
        flat |= {"shift": shift, "shift_squared": shift**2, "prior_variance": prior_sd**2}
        for key, value in flat.items():
            self._add(key, value.reshape(-1, *value.shape[2:]) if key != "kl" else value)
        self.count += int(total.numel())
        if is_temperature:
            self.temperatures.append(guide_marginal.mean[:, real].flatten().cpu())

    def row(self, thresholds: CollapseThresholds) -> tuple[dict, np.ndarray]:
        mean = {key: value / self.count for key, value in self.sums.items()}
        shift_variance = (mean["shift_squared"] - mean["shift"] ** 2).clamp(min=0)
        active = shift_variance / mean["prior_variance"] > thresholds.active_unit_variance
        guide_sd = torch.as_tensor(mean["guide_sd"])
        row = {
            "scope": "per-token",
            "dimensions": int(guide_sd.numel()),
            "posterior_sd": float(guide_sd.mean()),
            "prior_sd": float(torch.as_tensor(mean["prior_sd"]).mean()),
            "sd_ratio": float((guide_sd / torch.as_tensor(mean["prior_sd"])).mean()),
            "kl": float(mean["kl"]),
            "kl_per_dimension": float(mean["kl"]) / int(guide_sd.numel()),
            "initial_prior_kl_per_dimension": (
                float(mean["initial_kl"]) / int(guide_sd.numel()) if "initial_kl" in mean else math.nan
            ),
            "active_fraction": float(torch.as_tensor(active, dtype=torch.float64).mean()),
            "mean_predicted_scale": float(guide_sd.mean()),
        }
        if self.temperatures:
            row.update(_quantiles(torch.cat(self.temperatures)))
        return row, torch.as_tensor(mean["kl_dimension"]).reshape(-1).cpu().numpy()


def _local_rows(
    chain: FittedPosterior,
    sites: Sequence[str],
    batches: list[dict[str, Tensor]],
    num_draws: int,
    thresholds: CollapseThresholds,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    values = draw_global_sites(chain, num_draws, batches[0]["input_ids"], batches[0]["attention_mask"]).values
    statistics = {site: _TokenStatistics() for site in sites}
    for batch in batches:
        device = chain.patch.model.get_input_embeddings().weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            draws = run_with_draws(chain, values, batch["input_ids"], batch["attention_mask"], num_draws)
        with _InitialPriorScales() as initial_scales:  # the same token draws again, at the initial prior scales
            initial = run_with_draws(chain, values, batch["input_ids"], batch["attention_mask"], num_draws)
        for site in sites:
            statistics[site].add(
                draws.local_guides[site],
                draws.local_priors[site],
                draws.token_mask,
                site.endswith(".temperature"),
                initial.local_priors[site] if initial_scales.replaced else None,
            )
    rows, per_dimension = [], {}
    for site in sites:
        row, per_dimension[site] = statistics[site].row(thresholds)
        rows.append(row)
    return rows, per_dimension


def _flags(table: pd.DataFrame, thresholds: CollapseThresholds) -> pd.DataFrame:
    median = table["temperature_median"]
    table["deterministic"] = (table["sd_ratio"] < thresholds.deterministic_ratio) | (
        median < thresholds.cold_temperature
    )
    initial = table["initial_prior_kl_per_dimension"]
    table["prior_collapse"] = (table["kl_per_dimension"] < thresholds.prior_kl_per_dimension) & ~(
        initial >= thresholds.prior_kl_per_dimension
    )
    table["runaway_temperature"] = median > thresholds.hot_temperature
    return table


def collapse_report(
    posteriors: FittedPosterior | Sequence[FittedPosterior],
    batches: Iterable[Mapping[str, Tensor]] | None = None,
    *,
    num_draws: int = 500,
    local_draws: int = 8,
    summary_draws: int = 100,
    sites: Sequence[str] | None = None,
    thresholds: CollapseThresholds | None = None,
    seed: int = 0,
) -> CollapseReport:
    """The posterior-collapse report of one fit or several fits of the same model (chains); see
    the module docstring.

    Args:
        posteriors: the fit(s); each chain in its own parameter-store scope (see
            :mod:`pyro_moe.diagnostics.draws`).
        batches: held-out batches (``input_ids``, ``attention_mask``, ``labels``); needed for the
            per-token sites, which are left out without them.
        num_draws: joint draws of the global sites per chain (the KL estimate's bias is about
            ``1 / num_draws`` nats per dimension).
        local_draws: draws of the global sites under which the per-token statistics are averaged.
        summary_draws: draws per chain for ``az.summary``.
        sites: restrict to these site names (default every site).
        thresholds: where the flags switch on.
        seed: seeds chain ``c`` with ``seed + c``.

    Raises:
        ConfigurationError: no fit, fits of different sites, no draws, per-token sites only and
            no batches; ``UnknownSiteError`` for a site that is not in the model.
    """
    thresholds = thresholds or CollapseThresholds()
    chains = [posteriors] if isinstance(posteriors, FittedPosterior) else list(posteriors)
    if not chains or not all(isinstance(chain, FittedPosterior) for chain in chains):
        raise ConfigurationError("give a FittedPosterior or a non-empty list of them (the chains).")
    global_sites, local_sites = selected_sites(chains[0], sites)
    if batches is not None:
        batches = check_batches(batches, chains[0].likelihood.num_choices)
    elif local_sites:
        if not global_sites:
            raise ConfigurationError("the selected sites are per-token only: give held-out batches to report on them.")
        local_sites = []
    layout = SiteLayout(chains[0].patch)
    rows, per_dimension = [], {}
    for index, chain in enumerate(chains):
        pyro.set_rng_seed(seed + index)
        with fit_parameters(chain):
            reference = (
                (batches[0]["input_ids"][:1], batches[0]["attention_mask"][:1])
                if batches
                else (torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
            )
            global_rows, global_kl = (
                _global_rows(chain, global_sites, num_draws, reference) if global_sites else ([], {})
            )
            local_rows, local_kl = (
                _local_rows(chain, local_sites, batches, local_draws, thresholds) if local_sites else ([], {})
            )
        for site, row in zip(global_sites + local_sites, global_rows + local_rows, strict=True):
            variable, layer = layout.variable(site)
            rows.append({"chain": index, "site": site, "variable": variable, "layer": layer, **row})
        per_dimension |= {(index, site): kl for site, kl in (global_kl | local_kl).items()}
    columns = [
        "chain",
        "site",
        "variable",
        "layer",
        "scope",
        "dimensions",
        "posterior_sd",
        "prior_sd",
        "sd_ratio",
        "kl",
        "kl_per_dimension",
        "initial_prior_kl_per_dimension",
        "active_fraction",
        "mean_predicted_scale",
        "temperature_mean",
        "temperature_median",
        "temperature_q05",
        "temperature_q95",
    ]
    table = _flags(pd.DataFrame(rows, columns=columns), thresholds)
    idata = to_inference_data(chains, batches, num_draws=summary_draws, sites=global_sites + local_sites, seed=seed)
    return CollapseReport(table, per_dimension, posterior_summary(idata), thresholds)
