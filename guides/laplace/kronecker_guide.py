"""The ``kron-laplace`` and ``expert-laplace`` guide families: a MAP stage, then a Kronecker-factored Laplace.

Both start as point masses (:class:`KroneckerMAP`, trained by SVI like ``map``; with ``steps=0`` they
stay at the model's weights: a post-hoc Laplace). :meth:`KroneckerMAP.laplace` then collects the
Kronecker curvature of the likelihood at the point masses (:mod:`~pyro_moe.guides.laplace.kronecker_curvature`)
and returns a :class:`KroneckerLaplaceGuide`, which samples every site from its
:class:`~pyro_moe.guides.laplace.kronecker_posterior.KroneckerLaplace` (precision ``G (x) A + tau I``, ``tau``
and the prior mean read off the model's Normal prior of the site).

* ``kron-laplace``: router-weight sites ``<router>.weight`` (``patch_routers(model, {"weight": s})``; routers
  with MC dropout or Sample-K selection are refused at setup: the masks and the Gumbel noise are no sample
  sites, so the curvature of ``W`` would be that of a mixture over them);
* ``expert-laplace``: expert sites ``<experts>.down_proj`` (:func:`pyro_moe.models.expert_patch.patch_experts`).

Options (``guide_options={"expert-laplace": {...}}``; any other is refused when the guide is built, before
any forward pass): ``rank`` (``None``: full factors), ``fisher``
(``"mc"``, ``"empirical"``, ``"exact"``), ``tokens`` (``"last"``, ``"all"``), ``mc_samples``,
``optimize_prior`` (``None``, or ``"model"``/``"layer"``/``"expert"``: maximise the evidence over the
prior precision of expert sites, which updates the model's prior).

Example::

    handle = patch_experts(model, layers=[-1], prior_precision=1.0, prior_mean="zero")
    posterior = fit(handle, calibration, "expert-laplace", answer_token_ids=ids, steps=0,
                    guide_options={"expert-laplace": {"rank": 10, "optimize_prior": "layer"}})
    posterior.guide.global_guide.log_evidence()
    posterior.predict(input_ids, attention_mask, num_samples=16)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from torch import Tensor, nn

from pyro_moe.core.curvature_targets import CurvatureTarget, TargetKind
from pyro_moe.distributed import DataParallel
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.autoguides import RouterAutoDelta
from pyro_moe.guides.family import PosteriorPart, PostHocData
from pyro_moe.guides.laplace.kronecker_curvature import CurvatureOptions, kronecker_curvature
from pyro_moe.guides.laplace.kronecker_posterior import KroneckerLaplace, log_evidence, optimize_prior_precision
from pyro_moe.models.bayesian_router import Selection
from pyro_moe.models.router_patch import RouterPatch

__all__ = ["KroneckerLaplaceGuide", "KroneckerMAP", "KroneckerNormal", "site_targets"]

_FIELDS = ("mean", "input_vectors", "input_values", "output_vectors", "output_values", "prior_precision", "prior_mean")


class KroneckerNormal(dist.TorchDistribution):
    """A :class:`KroneckerLaplace` as a Pyro distribution with event shape the site's value shape.

    Args:
        posterior: over ``(n, out, in)`` blocks.
        event_shape: the site's shape (``(E, H, I)`` for ``down_proj``, ``(E, H)`` for a router weight).
    """

    arg_constraints: ClassVar[dict] = {}
    has_rsample = True

    def __init__(self, posterior: KroneckerLaplace, event_shape: torch.Size, validate_args: bool | None = None):
        self.posterior = posterior
        super().__init__(torch.Size(), torch.Size(event_shape), validate_args=validate_args)

    @constraints.dependent_property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def mean(self) -> Tensor:
        return self.posterior.mean.reshape(self.event_shape)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        draws = self.posterior.sample(tuple(sample_shape))
        return draws.reshape(*sample_shape, *self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        batch = value.shape[: value.dim() - len(self.event_shape)]
        blocks = value.reshape(*batch, *self.posterior.mean.shape)
        return self.posterior.log_prob(blocks).to(value.dtype)


def site_targets(patch: RouterPatch, names: Sequence[str], covers: str) -> dict[str, CurvatureTarget]:
    """The curvature target of each site in ``names``: expert ``down_proj`` sites (``covers="experts"``)
    or router weights without bias (``covers="router"``); anything else is refused."""
    found, unsupported = {}, []
    experts = getattr(patch, "experts", {})
    for name in names:
        path, _, kind = name.rpartition(".")
        if kind == "down_proj" and path in experts and covers == "experts":
            module = experts[path]
            count, out_features, in_features = module.down_proj.shape
            found[name] = CurvatureTarget(name, module, TargetKind.EXPERTS, count, out_features, in_features)
        elif kind == "weight" and path in patch.routers and covers == "router":
            router = patch.routers[path]
            if isinstance(getattr(router, "bias", None), Tensor):
                unsupported.append(name)
                continue
            out_features, in_features = router.weight.shape
            found[name] = CurvatureTarget(name, router, TargetKind.ROUTER, 1, out_features, in_features)
        else:
            unsupported.append(name)
    if unsupported:
        family, accepted = {
            "router": ("kron-laplace", "router weight sites without bias: patch_routers(model, ['weight'])"),
            "experts": ("expert-laplace", "expert down_proj sites: patch_experts(model)"),
        }[covers]
        raise ConfigurationError(f"{family} covers {accepted}; the model has {unsupported[:4]}.")
    return found


def _normal_prior(site: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """``(loc, per-block precision)`` of a site's Normal prior; refuses other priors."""
    fn = site["fn"]
    while isinstance(fn, dist.Independent | dist.MaskedDistribution | dist.ExpandedDistribution):
        fn = fn.base_dist
    if not isinstance(fn, dist.Normal):
        raise ConfigurationError(
            f"Kronecker Laplace needs a Normal prior with a fixed scale at {site['name']!r}, got {type(fn).__name__}."
        )
    value = site["value"]
    loc, scale = fn.loc.expand(value.shape), fn.scale.expand(value.shape)
    blocks = scale.reshape(-1, *value.shape[-2:]) if value.dim() == 3 else scale.reshape(1, *value.shape[-2:])
    per_block = blocks.reshape(blocks.shape[0], -1)
    if not torch.allclose(per_block, per_block[:, :1].expand_as(per_block)):
        raise ConfigurationError(
            f"Kronecker Laplace needs one prior scale per weight matrix (or per expert) at {site['name']!r}."
        )
    return loc.detach(), per_block[:, 0].detach().double() ** -2


class KroneckerMAP(RouterAutoDelta, PosteriorPart):
    """Point masses for the weight sites, to be turned into a Kronecker Laplace by :meth:`laplace`.

    Args:
        model: the global model (as every global family gets it).
        covers: ``"router"`` (router-weight sites, ``kron-laplace``) or ``"experts"`` (``down_proj``
            sites, ``expert-laplace``).
        rank, fisher, tokens, mc_samples: see :func:`~pyro_moe.guides.laplace.kronecker_curvature.kronecker_curvature`.
        optimize_prior: ``None`` or ``"model"``, ``"layer"``, ``"expert"`` (expert sites only).

    Raises:
        ConfigurationError: an option out of range, at construction: before the MAP stage's first step.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        covers: str,
        *,
        rank: int | None = None,
        fisher: str = "mc",
        tokens: str = "last",
        mc_samples: int = 1,
        optimize_prior: str | None = None,
    ) -> None:
        curvature_options = self.checked_options(
            covers,
            {
                "rank": rank,
                "fisher": fisher,
                "tokens": tokens,
                "mc_samples": mc_samples,
                "optimize_prior": optimize_prior,
            },
        )
        super().__init__(model, init_loc_fn=self._initial_value)
        self.curvature_options = curvature_options
        self.covers, self.optimize_prior = covers, optimize_prior
        self.patch: RouterPatch | None = None

    post_hoc = True

    OPTIONS: ClassVar[tuple[str, ...]] = ("rank", "fisher", "tokens", "mc_samples", "optimize_prior")
    """The guide options (keyword arguments besides ``model`` and ``covers``)."""

    @classmethod
    def checked_options(cls, covers: str, options: Mapping[str, Any]) -> CurvatureOptions:
        """Refuse unknown or bad ``options`` of the family covering ``covers`` (no model needed: called when
        the guide is built, before any forward pass); returns the curvature options."""
        if covers not in ("router", "experts"):
            raise ConfigurationError(f"covers must be 'router' or 'experts', got {covers!r}.")
        family = "kron-laplace" if covers == "router" else "expert-laplace"
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ConfigurationError(f"unknown {family} option(s) {unknown}; accepted: {', '.join(cls.OPTIONS)}.")
        curvature = CurvatureOptions(
            **{key: options[key] for key in ("fisher", "tokens", "rank", "mc_samples") if key in options}
        )
        optimize_prior = options.get("optimize_prior")
        if optimize_prior not in (None, "model", "layer", "expert"):
            raise ConfigurationError(
                f"optimize_prior must be None, 'model', 'layer' or 'expert', got {optimize_prior!r}."
            )
        if optimize_prior is not None and covers == "router":
            raise ConfigurationError(
                "kron-laplace takes the router prior of the model (set its scale in patch_routers); "
                "optimize_prior is for expert-laplace."
            )
        return curvature

    def bind(self, patch: RouterPatch) -> None:
        """The point masses start at the weights of ``patch``'s model; the curvature runs through it."""
        self.patch = patch

    def finish_fit(self, data: PostHocData) -> KroneckerLaplaceGuide:
        """The Kronecker Laplace at the current point masses (:meth:`laplace`)."""
        return self.laplace(data.likelihood, data.batches, data.progress, data.data_parallel)

    def restore_fitted(
        self, buffers: Mapping[str, Tensor], metadata: Mapping[str, Any], data: PostHocData
    ) -> KroneckerLaplaceGuide:
        """The saved :class:`KroneckerLaplaceGuide`, bound to the patch (its prior precisions reach the model)."""
        guide = KroneckerLaplaceGuide.from_buffers(buffers, metadata["site_names"], metadata["shapes"], metadata)
        guide.bind(self.patch)
        return guide

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        targets = self.targets()  # refuses sites and priors it cannot cover, before any training
        dropout = getattr(self.patch.sites, "dropout", 0.0)
        if self.covers == "router" and dropout > 0:
            # The logits are W (m * u) / (1 - p) with a fresh mask m in every pass, and m is no sample site:
            # the likelihood of W is a mixture over masks, whose curvature is not a Kronecker product of one
            # input factor, and prediction would stack the dropout noise on the Laplace draws.
            raise ConfigurationError(
                f"kron-laplace needs a deterministic router input, but the routers have MC dropout (dropout="
                f"{dropout:g}): patch the routers without the 'dropout' option (or use the 'mc-dropout' family)."
            )
        selection = getattr(self.patch.sites, "selection", Selection.TOP_K)
        if self.covers == "router" and selection is Selection.SAMPLE_K:
            # Sample-K draws its experts with Gumbel noise that is no sample site: the likelihood of W would be
            # an expectation over that noise, and prediction would stack it on the Laplace draws.
            raise ConfigurationError(
                "kron-laplace needs deterministic expert selection, but the routers use Sample-K (its Gumbel "
                "noise is no sample site): patch the routers with selection='top-k'."
            )
        weight_prior = getattr(self.patch.sites, "weight", None)
        if weight_prior is not None and weight_prior.scale.mode != "fixed":
            raise ConfigurationError(
                f"Kronecker Laplace needs a fixed prior scale; the router weights' is {weight_prior.scale.mode}."
            )
        for name in targets:
            _normal_prior(self.prototype_trace.nodes[name])

    def _initial_value(self, site: Mapping[str, Any]) -> Tensor:
        """The model's own weights: the router weight's prior centre, or the experts' ``down_proj``."""
        experts = getattr(self.patch, "experts", {})
        path = site["name"].removesuffix(".down_proj")
        if path in experts:
            return experts[path].down_proj.detach().to(site["value"]).clone()
        return site["fn"].mean.detach().clone()

    def targets(self) -> dict[str, CurvatureTarget]:
        """The curvature target of every global site; refuses sites that are not weight matrices."""
        if self.patch is None:
            raise ConfigurationError("the Kronecker MAP guide is not bound to a patch (RouterGuide.setup binds it).")
        return site_targets(self.patch, list(self.prototype_trace.stochastic_nodes), self.covers)

    def laplace(
        self,
        likelihood: Any,
        batches: Sequence[Mapping[str, Tensor]],
        progress: bool = True,
        data_parallel: DataParallel | None = None,
    ):
        """The :class:`KroneckerLaplaceGuide` at the current point masses, curvature over ``batches``
        (``data_parallel``: shared among the ranks and reduced once, the same guide on every rank)."""
        targets = self.targets()
        values = {name: self.locs_value(name).detach().clone() for name in targets}  # no alias of the MAP
        probes = {name: value.clone().requires_grad_(True) for name, value in values.items()}

        def answer_logits(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            with poutine.block(), poutine.condition(data=probes):
                return likelihood.answer_logits(input_ids, attention_mask)[0]

        run = kronecker_curvature(
            likelihood.patch.model,
            list(targets.values()),
            batches,
            likelihood.answer_token_ids,
            answer_logits=answer_logits,
            seed=int(torch.randint(2**31 - 1, ())),  # MC labels follow fit's seed
            progress=progress,
            data_parallel=data_parallel,
            **asdict(self.curvature_options),
        )
        posteriors = {}
        for name in targets:
            prior_mean, precision = _normal_prior(self.prototype_trace.nodes[name])
            posteriors[name] = KroneckerLaplace.from_curvature(
                run.curvature[name], values[name], precision, prior_mean.to(values[name])
            )
        guide = KroneckerLaplaceGuide(
            posteriors, {name: values[name].shape for name in targets}, run.log_likelihood, run.num_examples
        )
        guide.bind(self.patch)
        if self.optimize_prior is not None:
            guide.optimize_prior_precision(self.optimize_prior)
        return guide

    def locs_value(self, name: str) -> Tensor:
        """The point mass of site ``name``."""
        return operator.attrgetter(name)(self.locs)


class _Buffers(nn.Module):
    """The tensors of one site's posterior, as buffers (saved by ``FittedPosterior.save``)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        for field in _FIELDS:
            self.register_buffer(field, tensors[field])


class KroneckerLaplaceGuide(nn.Module, PosteriorPart):
    """Draws every weight site from its Kronecker Laplace posterior; a global guide like any other.

    Args:
        posteriors: per site name, its :class:`KroneckerLaplace`.
        shapes: per site name, the site's value shape.
        log_likelihood: ``log p(D | W_map)`` of the curvature data (NaN without labels).
        num_examples: examples in the curvature data.
    """

    def __init__(
        self,
        posteriors: Mapping[str, KroneckerLaplace],
        shapes: Mapping[str, torch.Size],
        log_likelihood: float,
        num_examples: int,
    ) -> None:
        super().__init__()
        self.site_names = list(posteriors)
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.log_likelihood, self.num_examples = float(log_likelihood), int(num_examples)
        self.sites = nn.ModuleList(
            _Buffers({field: getattr(p, field) for field in _FIELDS}) for p in posteriors.values()
        )
        self.patch: RouterPatch | None = None

    @classmethod
    def from_buffers(
        cls, buffers: Mapping[str, Tensor], site_names: Sequence[str], shapes: Mapping[str, Sequence[int]], meta: dict
    ) -> KroneckerLaplaceGuide:
        """Rebuild from its named buffers (``sites.<i>.<field>``) and :meth:`metadata`."""
        posteriors = {}
        for index, name in enumerate(site_names):
            fields = {field: buffers[f"sites.{index}.{field}"] for field in _FIELDS}
            posteriors[name] = KroneckerLaplace(**fields)
        log_likelihood = meta["log_likelihood"]
        return cls(posteriors, shapes, math.nan if log_likelihood is None else log_likelihood, meta["num_examples"])

    def fitted_metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts :meth:`from_buffers` needs besides the buffers."""
        return {
            "site_names": self.site_names,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
            "log_likelihood": self.log_likelihood if math.isfinite(self.log_likelihood) else None,
            "num_examples": self.num_examples,
        }

    def posteriors(self) -> dict[str, KroneckerLaplace]:
        """The posterior of every site (views of the buffers)."""
        return {
            name: KroneckerLaplace(**{field: getattr(buffers, field) for field in _FIELDS})
            for name, buffers in zip(self.site_names, self.sites, strict=True)
        }

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every site (inside a particle plate: one draw per particle)."""
        return {
            name: pyro.sample(name, KroneckerNormal(posterior, self.shapes[name]))
            for name, posterior in self.posteriors().items()
        }

    def log_evidence(self) -> float:
        """The Laplace log evidence (see :func:`~pyro_moe.guides.laplace.kronecker_posterior.log_evidence`)."""
        return log_evidence(list(self.posteriors().values()), self.log_likelihood)

    def set_prior_precision(self, precisions: Mapping[str, Tensor | float]) -> None:
        """Set ``tau`` (scalar or per block) of expert sites, in the posterior and the model's prior."""
        experts = getattr(self.patch, "experts", None)
        stray = [name for name in precisions if experts is None or name.removesuffix(".down_proj") not in experts]
        if stray:
            raise ConfigurationError(
                f"the prior precision of {stray[:3]} is the model's router prior (set its scale in patch_routers); "
                "only expert sites take a prior precision here."
            )
        for name, tau in precisions.items():
            buffers = self.sites[self.site_names.index(name)]
            posterior = self.posteriors()[name]
            posterior.prior_precision = tau
            buffers.prior_precision = posterior.prior_precision
        self.patch.set_prior_precision(self.prior_precisions())

    def prior_precisions(self) -> dict[str, Tensor]:
        """``tau`` ``(blocks,)`` per site."""
        return {name: buffers.prior_precision for name, buffers in zip(self.site_names, self.sites, strict=True)}

    def bind(self, patch: RouterPatch) -> None:
        """Attach to the patched model; expert sites' priors in the model take this posterior's ``tau``."""
        self.patch = patch
        if getattr(patch, "experts", None):
            patch.set_prior_precision(self.prior_precisions())

    def optimize_prior_precision(self, per: str = "layer") -> dict[str, Tensor]:
        """Maximise the log evidence over the prior precision of the expert sites (``per`` ``"model"``,
        ``"layer"`` or ``"expert"``); returns the chosen ``tau`` per site."""
        posteriors = self.posteriors()
        chosen = optimize_prior_precision(list(posteriors.values()), per=per)
        self.set_prior_precision(dict(zip(posteriors, chosen, strict=True)))
        return self.prior_precisions()
