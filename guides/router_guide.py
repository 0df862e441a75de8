"""The guide of a patched model: a global autoguide and amortized per-token guides in one.

Global sites (router weights, biases, per-layer or per-expert temperatures, hierarchical prior
scales) get a Pyro autoguide over the likelihood with everything else hidden. Per-token sites
depend on the hidden state at their router, which exists only while the network runs: the guide
therefore runs the network itself, with the global sites at the values it drew and the routers
drawing their per-token sites from the amortized encoders. ``Trace_ELBO`` then replays the model
on the guide's values, as for any Pyro guide.

A post-hoc global part (a Laplace) next to per-token parts: each part is fitted with the other's
sites at the deterministic model's values. The SVI steps train the per-token parts with the global
sites held at the global part's starting point (the Laplace families' point masses: the model's
weights); the post-hoc stage then fits the global part with every per-token site at its prior mean
(the logits at ``W u``: the model's own routing). So ``expert-laplace+mfvr`` is the Laplace of
``p(W_experts | D, l = W u)`` next to the ``mfvr`` fitted with the experts at their weights: what
fitting the two on separate patches gives; at prediction the two parts draw independently, jointly
per sample.

Example::

    guide = RouterGuide(MCQALikelihood(handle, letter_ids), "low-rank+mfvr", {"low-rank": {"rank": 4}})
    guide.setup(input_ids, attention_mask, labels=labels)  # builds the autoguide, checks coverage
    svi = pyro.infer.SVI(guide.likelihood, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyro_moe.core.handlers import LocalSitesAtPriorMean
from pyro_moe.core.routing_context import routing_context
from pyro_moe.distributed import DataParallel
from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.amortized import LocalGuides
from pyro_moe.guides.family import GuideScope, PostHocData, hooks_of
from pyro_moe.guides.registry import GUIDE_FAMILIES, parse_guide
from pyro_moe.models.likelihoods import Likelihood, data_scale
from pyro_moe.models.priors import is_hyperprior_site, learned_scale_name

__all__ = ["RouterGuide", "is_local_site"]


def is_local_site(msg: Mapping[str, Any]) -> bool:
    """Whether a sample message belongs to a per-token site (or is a token plate)."""
    return msg["name"].endswith(".tokens") or any(frame.name.endswith(".tokens") for frame in msg["cond_indep_stack"])


_GUIDE_NUMBERS = itertools.count()


class _PosteriorDraws(Messenger):
    """Renames sample sites to ``posterior/<name>``: the guide's draws for prediction stay apart
    from the model sites they condition, in any outer trace (unlike ``block``, the enclosing
    particle plate still broadcasts them)."""

    def _pyro_sample(self, msg: dict) -> None:
        msg["name"] = f"posterior/{msg['name']}"


def _is_global_site(msg: Mapping[str, Any]) -> bool:
    return msg["type"] == "sample" and not msg["is_observed"] and not is_local_site(msg) and not site_is_subsample(msg)


class RouterGuide(nn.Module):
    """A guide for a likelihood over a patched model; see the module docstring.

    Args:
        likelihood: the model (``MCQALikelihood`` or ``NextTokenLikelihood``).
        spec: the guide's name, ``"global+local..."`` (see :mod:`pyro_moe.guides.registry`).
        options: keyword options per family name, e.g. ``{"low-rank": {"rank": 4}}``.
    """

    def __init__(
        self,
        likelihood: Likelihood,
        spec: str,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.likelihood = likelihood
        self.patch = likelihood.patch
        self.name = likelihood.param_prefix.rstrip("/") or f"pyro_moe.guide{next(_GUIDE_NUMBERS)}"
        self.spec = spec
        self.families = parse_guide(spec)
        for family in self.families.values():
            family.check_likelihood(likelihood.kind)
        self.options = {name: dict(values) for name, values in (options or {}).items()}
        named = {family.name for family in self.families.values()}
        stray = sorted(set(self.options) - named)
        if stray:
            raise ConfigurationError(f"options given for {stray}, which the guide {spec!r} does not use.")
        for family in self.families.values():  # options a part refuses, before the set-up trace
            if family.check_options is not None:
                family.check_options(self.options.get(family.name, {}), None)
        self.global_guide: nn.Module | None = None
        self.local_guide: LocalGuides | None = None
        self.global_sites: list[str] = []
        self.local_sites: list[str] = []
        self._learned_scales: dict[str, tuple[Tensor, Any]] = {}

    @property
    def param_prefix(self) -> str:
        """Prefix of every Pyro parameter of this guide (the likelihood's, when it has one), so that
        several fits live side by side in Pyro's global parameter store."""
        return f"{self.name}/"

    def _build(self, scope: GuideScope, *args: Any) -> Any:
        family = self.families[scope]
        part = family.build(*args, **self.options.get(family.name, {}))
        if isinstance(part, PyroModule):  # its parameters are named <name>/<class>.<attribute>
            part._pyro_name = f"{self.param_prefix}{part._pyro_name}"
        return part

    def _global_model(self, *args: Any, **kwargs: Any) -> Any:
        """The likelihood with every site but the global latent ones hidden."""
        with poutine.block(expose_fn=_is_global_site):
            return self.likelihood(*args, **kwargs)

    def setup(self, *args: Any, **kwargs: Any) -> None:
        """Trace the model once on a batch, check that the guide covers exactly its sites, and build
        the parts. Raises ``ConfigurationError`` naming the uncovered or unused parts."""
        with torch.no_grad(), poutine.block():
            trace = poutine.trace(self.likelihood).get_trace(*args, **kwargs)
        self._keep_learned_scales()
        self.global_sites = [name for name, site in trace.nodes.items() if _is_global_site(site)]
        self.local_sites = [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and is_local_site(site) and not name.endswith(".tokens")
        ]
        local_kinds = {GuideScope(name.rpartition(".")[2]) for name in self.local_sites}
        needed = ({GuideScope.GLOBAL} if self.global_sites else set()) | local_kinds
        missing, unused = needed - set(self.families), set(self.families) - needed
        if missing or unused:
            raise ConfigurationError(
                f"the guide {self.spec!r} does not fit the model's sites: "
                + "; ".join(
                    [self._missing_family(scope) for scope in sorted(missing)]
                    + [f"the model has no {scope.value} sites for {self.families[scope].name}" for scope in unused]
                )
                + f" (global sites: {self.global_sites[:4]}, per-token sites: {self.local_sites[:4]})."
            )
        self._check_hierarchical_scales()
        sites = self.patch.sites
        if local_kinds and (sites.dropout > 0 or sites.selection.value == "sample-k"):
            raise ConfigurationError(
                "per-token guides run the network themselves, and MC dropout masks and Sample-K noise are not "
                "sample sites that the model could replay: use dropout or sample-k without per-token sites."
            )
        if self.global_sites:
            self.global_guide = self._build(GuideScope.GLOBAL, self._global_model)
            hooks_of(self.global_guide).bind(self.patch)
            with torch.no_grad(), poutine.block():
                self.global_guide(*args, **kwargs)  # creates the autoguide's parameters
        if local_kinds:
            self.local_guide = LocalGuides(
                self._build(GuideScope.LOGITS, self.patch) if GuideScope.LOGITS in local_kinds else None,
                self._build(GuideScope.TOKEN_TEMPERATURE, self.patch)
                if GuideScope.TOKEN_TEMPERATURE in local_kinds
                else None,
            )
            self._register_local_guide()

    def _keep_learned_scales(self) -> None:
        """Hold this fit's learned prior scales (the ``pyro.param`` s the set-up trace declared): the
        unconstrained tensors the optimiser trains and checkpoints save, with their constraints."""
        store, prefix = pyro.get_param_store(), self.likelihood.param_prefix
        names = [learned_scale_name(site, prefix) for site in self.patch.learned_scale_sites]
        self._learned_scales = {
            name: (store._params[name], store._constraints[name]) for name in names if name in store
        }

    def restore_learned_scales(self) -> None:
        """Put this fit's learned prior scales back in Pyro's parameter store where they are missing or
        were replaced (after ``pyro.clear_param_store()``): the very tensors the optimiser trains, so a
        live posterior keeps its fitted scales instead of meeting fresh ones at their initial value
        (the guide's own parameters live in its modules, which Pyro registers again by itself)."""
        store = pyro.get_param_store()
        for name, (unconstrained, constraint) in self._learned_scales.items():
            if store._params.get(name) is not unconstrained:
                store._params[name] = unconstrained
                store._param_to_name[unconstrained] = name
                store._constraints[name] = constraint

    def _check_hierarchical_scales(self) -> None:
        """Refuse hierarchical prior scales (their hyperprior sites) under a global family that cannot
        carry them (:attr:`~pyro_moe.guides.family.GuideFamily.hierarchical_refusal`)."""
        family = self.families.get(GuideScope.GLOBAL)
        hyperpriors = [name for name in self.global_sites if is_hyperprior_site(name)]
        if family is None or family.hierarchical_refusal is None or not hyperpriors:
            return
        able = sorted(
            name
            for name, other in GUIDE_FAMILIES.items()
            if other.scope is GuideScope.GLOBAL and other.hierarchical_refusal is None
        )
        raise ConfigurationError(
            f"the guide family {family.name!r} cannot carry hierarchical prior scales ({family.hierarchical_refusal}); "
            f"the model has {hyperpriors[:3]}. Give those sites a 'fixed' or 'learned' prior scale, or fit them "
            f"with a family that carries them: {', '.join(able)}."
        )

    def _missing_family(self, scope: GuideScope) -> str:
        """Name the registered families of ``scope`` and the guide specs that would add one."""
        names = sorted(name for name, family in GUIDE_FAMILIES.items() if family.scope is scope)
        specs = ", ".join(repr("+".join([*(f.name for f in self.families.values()), name])) for name in names)
        return f"no family for the {scope.value} sites (accepted: {specs})"

    def _register_local_guide(self) -> None:
        """Put the encoders' parameters in Pyro's parameter store (and take them back from it)."""
        pyro.module(f"{self.param_prefix}local_guide", self.local_guide, update_module_params=True)

    @property
    def post_hoc(self) -> bool:
        """The global part is fitted post hoc after its SVI steps (:meth:`finish_post_hoc`): a Laplace."""
        return hooks_of(self.global_guide).post_hoc

    def _run_network_with_local_guide(self, values: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor):
        """The network's pass as the likelihood runs it (the same positions), the global sites at ``values``."""
        self._register_local_guide()
        network = poutine.condition(lambda: self.likelihood.network_logits(input_ids, attention_mask), data=values)
        return poutine.block(network, hide_fn=lambda msg: msg["type"] == "sample" and not is_local_site(msg))()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **observed: Any) -> dict[str, Tensor]:
        """The guide for SVI: draws the global sites, then runs the network drawing the per-token
        sites from the amortized encoders; returns the global values. A post-hoc global part next to
        per-token parts stays at its starting point (its draws carry no gradient). ``observed``: the
        rest of the likelihood's keyword arguments (``labels`` of MCQA, ``num_examples``)."""
        if not self.global_sites and self.local_guide is None:
            raise ConfigurationError("the guide is not set up: call setup(batch) or fit() first.")
        self.restore_learned_scales()
        held = self.post_hoc and self.local_guide is not None
        with torch.no_grad() if held else contextlib.nullcontext():
            values = self.global_guide(input_ids, attention_mask, **observed) if self.global_guide else {}
        if self.local_guide is not None:
            scale = data_scale(input_ids.shape[0], observed.get("num_examples"))
            prefix = self.likelihood.param_prefix
            with routing_context(local_guide=self.local_guide, local_scale=scale, param_prefix=prefix):
                self._run_network_with_local_guide(values, input_ids, attention_mask)
        return values

    @contextlib.contextmanager
    def posterior(self, input_ids: Tensor, attention_mask: Tensor) -> Iterator[None]:
        """Within the current plate of joint samples, make a forward pass of the patched model draw
        its global sites from the global guide and its per-token sites from the local guides.

        The global part is also the routing context's ``posterior_marginals``: under routing-average
        with local reparameterisation, the routers draw their logits from the marginals it offers
        (:meth:`~pyro_moe.guides.family.PosteriorPart.normal_marginal`: mean-field) and from the drawn
        weights otherwise."""
        self.restore_learned_scales()
        values, marginals = {}, None
        if self.global_guide is not None:
            with _PosteriorDraws():  # seen by the particle plate, renamed apart from the model's sites
                values = self.global_guide(input_ids, attention_mask)
            marginals = hooks_of(self.global_guide)
        with (
            poutine.condition(data=values),
            routing_context(
                local_guide=self.local_guide,
                param_prefix=self.likelihood.param_prefix,
                posterior_marginals=marginals,
            ),
        ):
            yield

    @property
    def min_steps(self) -> int:
        """The fewest SVI steps a fit takes: 0 when every part is fitted post hoc (a Laplace alone at the
        model's weights), else 1 (per-token parts and plain global parts train)."""
        return 0 if self.post_hoc and self.local_guide is None else 1

    def _post_hoc_data(
        self,
        batches: Sequence[Mapping[str, Tensor]],
        num_examples: int,
        progress: bool = True,
        data_parallel: DataParallel | None = None,
    ) -> PostHocData:
        return PostHocData(self.likelihood, self._global_model, batches, num_examples, progress, data_parallel)

    @contextlib.contextmanager
    def _local_sites_at_prior_mean(self) -> Iterator[None]:
        """The post-hoc stage's view of the per-token sites: their prior mean (the model's own routing)."""
        with routing_context(local_guide=LocalSitesAtPriorMean()) if self.local_guide else contextlib.nullcontext():
            yield

    def finish_post_hoc(
        self,
        batches: Sequence[Mapping[str, Tensor]],
        num_examples: int,
        progress: bool = True,
        data_parallel: DataParallel | None = None,
    ) -> None:
        """Replace the trained global part by its post-hoc posterior (a Laplace at the mode, the curvature
        of the full-data loss summed over ``batches``, per-token sites at their prior mean);
        ``data_parallel``: the ranks share the batches."""
        if not self.post_hoc:
            raise ConfigurationError(f"the guide {self.spec!r} has no post-hoc stage.")
        data = self._post_hoc_data(batches, num_examples, progress, data_parallel)
        with self._local_sites_at_prior_mean():
            self.global_guide = hooks_of(self.global_guide).finish_fit(data)

    def restore_post_hoc(
        self, buffers: Mapping[str, Tensor], metadata: Mapping[str, Any], batch: Mapping[str, Any]
    ) -> None:
        """Make the global part the saved post-hoc posterior: ``buffers`` without the ``global_guide.``
        prefix, ``metadata`` from its ``fitted_metadata()``, ``batch`` a dummy batch with ``num_examples``."""
        plain = {key: value for key, value in batch.items() if key != "num_examples"}
        data = self._post_hoc_data([plain], batch["num_examples"], progress=False)
        with self._local_sites_at_prior_mean():
            self.global_guide = hooks_of(self.global_guide).restore_fitted(buffers, metadata, data)
