"""The posterior-family interface: what a family is in the registry and what its guide part does in a fit.

A family is data, a :class:`GuideFamily` in :data:`pyro_moe.guides.registry.GUIDE_FAMILIES`: its
name, the sites it covers, how its part is built and the setup it needs (:class:`FamilyPreset`).
The part it builds is a Pyro guide (an autoguide over the global sites, or a module drawing
per-token sites) and may override the hooks of :class:`PosteriorPart`, each with a default that
does what plain SVI needs, so that ``fit``, ``FittedPosterior`` and the experiments never ask
which family they hold:

==================  ================================================================================
stage               hook
==================  ================================================================================
built from a patch  ``GuideFamily.build(target, **options)``, then :meth:`PosteriorPart.bind` (patch)
trained by SVI      :attr:`~PosteriorPart.trains`, :meth:`~PosteriorPart.check_fit`,
                    :meth:`~PosteriorPart.after_step` (SWAG's snapshots), ``train()``/``eval()`` modes
fitted post hoc     :attr:`~PosteriorPart.post_hoc` (0 SVI steps allowed), :meth:`~PosteriorPart.finish_fit`
                    returns the fitted part (Laplace: the Gaussian at the mode); next to per-token parts
                    the SVI steps train those, the post-hoc part held at its starting point, and
                    ``finish_fit`` sees every per-token site at its prior mean
predicts, exports   every part is a Pyro guide: drawn under the predictive's plate of joint samples;
                    :meth:`~PosteriorPart.normal_marginal` offers a site's diagonal-Normal marginal
                    (mean-field), with which routing-average draws logits by local reparameterisation
saved, loaded       its parameters and buffers; a post-hoc part adds :meth:`~PosteriorPart.fitted_metadata`
                    and its unfitted part rebuilds it, :meth:`~PosteriorPart.restore_fitted`
set up by name      ``GuideFamily.preset(steps)``: sites, selection, fit options for the experiments;
                    ``GuideFamily.check_options(options, steps)`` refuses bad options before any fit
==================  ================================================================================

A new family is one module (its part and its :class:`GuideFamily`) and one registration line::

    class MyFlow(AutoNormalizingFlow, PosteriorPart):
        ...                                  # override only the hooks it needs

    MY_FLOW = GuideFamily("my-flow", GuideScope.GLOBAL, MyFlow, "a normalising flow")
    register_guide(MY_FLOW)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from torch import Tensor

from pyro_moe.distributed import DataParallel
from pyro_moe.errors import ConfigurationError
from pyro_moe.models.likelihoods import LikelihoodKind
from pyro_moe.models.router_patch import RouterPatch

__all__ = ["FamilyPreset", "GuideFamily", "GuideScope", "PostHocData", "PosteriorPart", "hooks_of"]


class GuideScope(StrEnum):
    """Which sites a guide family covers."""

    GLOBAL = "global"
    """Router weights and biases, per-layer or per-expert temperatures, hierarchical prior scales, expert weights."""

    LOGITS = "logits"
    """The per-token router logits."""

    TOKEN_TEMPERATURE = "temperature"
    """The per-token temperatures."""


@dataclass(frozen=True)
class PostHocData:
    """What a post-hoc fit (:meth:`PosteriorPart.finish_fit`) sees. While it runs, the model's per-token
    sites (if any) are at their prior mean (the routing context's local guide).

    Attributes:
        likelihood: the model (``MCQALikelihood``: ``answer_logits``, ``answer_token_ids``; or
            ``NextTokenLikelihood``, for families whose :attr:`GuideFamily.likelihoods` allow it), ``patch``.
        global_model: the likelihood with only the global latent sites exposed (the part's own model).
        batches: every batch (dicts of ``input_ids`` ``(B, L)``, ``attention_mask``, and for MCQA ``labels``
            ``(B,)``) on the model's device; the full data set.
        num_examples: ``N``, the number of examples over all batches.
        progress: show a progress bar.
        data_parallel: the ranks share the batches and reduce once (``None``: one process).
    """

    likelihood: Any
    global_model: Callable[..., Any]
    batches: Sequence[Mapping[str, Tensor]]
    num_examples: int
    progress: bool = True
    data_parallel: DataParallel | None = None


class PosteriorPart:
    """Mixin of guide parts with more to do in a fit than plain SVI; every hook has the plain-SVI default."""

    trains: bool = True
    """Whether the part has anything to optimise; ``False``: ``fit`` does no steps (temperature sampling)."""

    post_hoc: bool = False
    check_options: Callable[[Mapping[str, Any], int], None] | None = None
    """Whether :meth:`finish_fit` turns the trained part into the posterior (Laplace): ``fit`` then accepts
    0 steps (a post-hoc posterior at the model's weights) and a fitted posterior does not resume."""

    def bind(self, patch: RouterPatch) -> None:
        """Called once the part is built, with the patch whose sites it covers."""

    def check_fit(self, patch: RouterPatch, start: int, steps: int, num_particles: int) -> None:
        """Raise :class:`~pyro_moe.errors.ConfigurationError` if ``steps`` more steps from step ``start``
        with ``num_particles`` particles on ``patch`` cannot work; called before any step."""

    def after_step(self, steps_done: int) -> None:
        """Called after every optimisation step with the number of steps done so far (1 after the first)."""

    def normal_marginal(self, site: str) -> tuple[Tensor, Tensor] | None:
        """``loc`` and ``scale`` (the site's value shape) of the part's posterior of ``site`` when it is a
        diagonal Normal independent of every other site (mean-field), so that a router's logits may be
        drawn from their per-token marginal (local reparameterisation); ``None`` otherwise (low-rank,
        full-rank, SWAG, Laplace, point masses, ...: the default)."""
        return None

    def finish_fit(self, data: PostHocData) -> Any:
        """The fitted posterior part (post-hoc families); called after the SVI steps."""
        raise NotImplementedError(f"{type(self).__name__} is not a post-hoc family")

    def fitted_metadata(self) -> dict[str, Any]:
        """JSON-ready data that, with the part's buffers, rebuilds a fitted post-hoc part."""
        return {}

    def restore_fitted(self, buffers: Mapping[str, Tensor], metadata: Mapping[str, Any], data: PostHocData) -> Any:
        """The fitted part saved as ``buffers`` (names without the ``global_guide.`` prefix) and ``metadata``;
        ``data`` holds one dummy batch."""
        raise NotImplementedError(f"{type(self).__name__} is not a post-hoc family")


_PLAIN_SVI = PosteriorPart()


def hooks_of(part: Any) -> PosteriorPart:
    """The hooks of ``part``: itself when it implements them, the plain-SVI defaults otherwise (Pyro's
    own autoguides, or no part at all)."""
    return part if isinstance(part, PosteriorPart) else _PLAIN_SVI


@dataclass(frozen=True)
class FamilyPreset:
    """The setup a family needs when it is fitted by name (experiments, the CLI), beyond the defaults.

    Attributes:
        sites: the sites to patch (as :func:`pyro_moe.patch_routers` takes them, or ``"experts"`` for
            :func:`pyro_moe.patch_experts`), replacing the scope's defaults; ``None``: the defaults.
        extra_sites: options added to whatever router sites are used (MC dropout's ``dropout``).
        user_sites: whether sites given by the user replace :attr:`sites` (``False``: the family's
            sites are its definition, e.g. the experts of ``expert-laplace``).
        selection: ``"top-k"`` or ``"sample-k"``.
        training: :class:`~pyro_moe.inference.options.TrainingOptions` fields over the experiment's.
        guide_options: options of the family's part.
        layers: the family's Bayesian decoder layers (``None``: the experiment's).
        tune: called after the fit as ``tune(posterior, validation_batches, seed)`` to choose
            hyperparameters on validation data (``expert-laplace``'s prior precision); ``None``: nothing.
    """

    sites: Mapping[str, Any] | Sequence[str] | str | None = None
    extra_sites: Mapping[str, Any] = field(default_factory=dict)
    user_sites: bool = True
    selection: str = "top-k"
    training: Mapping[str, Any] = field(default_factory=dict)
    guide_options: Mapping[str, Any] = field(default_factory=dict)
    layers: Sequence[int] | None = None
    tune: Callable[[Any, Sequence[Mapping[str, Tensor]], int], None] | None = None


@dataclass(frozen=True)
class GuideFamily:
    """A named posterior family.

    Attributes:
        name: the registry key (no ``+``).
        scope: the sites it covers.
        build: global: ``build(model, **options) -> part`` (``model``: the likelihood with only the
            global sites exposed); local: ``build(patch, **options) -> module`` with
            ``logits_distribution`` / ``temperature_distribution``.
        description: one line for listings.
        preset: ``preset(steps) -> FamilyPreset``, the setup for a fit of ``steps`` SVI steps.
        post_hoc: its part is fitted post hoc (:attr:`PosteriorPart.post_hoc`; the CLI's ``laplace``
            command lists these families).
        check_options: ``check_options(options, steps)`` refuses, before any fit, part options (and a
            schedule over ``steps`` steps) the part would refuse only once built or trained (SWAG's
            snapshots, the Kronecker families' unknown options); ``steps=None``: the options alone, as
            :class:`~pyro_moe.guides.router_guide.RouterGuide` checks them when it is built (before the
            set-up trace); ``None``: nothing to check early.
        likelihoods: the likelihoods its part can fit (the Kronecker Laplace families' curvature is
            that of the MCQA answer); ``None``: any.
        hierarchical_refusal: global families whose part cannot carry hierarchical prior scales (their
            hyperprior sites are global sites it would have to cover): why, for the error that refuses
            them when the guide is set up; ``None``: it carries them like any other global site.
    """

    name: str
    scope: GuideScope
    build: Callable[..., Any]
    description: str
    preset: Callable[[int], FamilyPreset] = field(default=lambda steps: FamilyPreset())
    post_hoc: bool = False
    check_options: Callable[[Mapping[str, Any], int | None], None] | None = None
    likelihoods: frozenset[LikelihoodKind] | None = None
    hierarchical_refusal: str | None = None

    def check_likelihood(self, kind: LikelihoodKind) -> None:
        """Refuse a fit with the likelihood ``kind`` when the family does not fit it (before any work)."""
        if self.likelihoods is not None and kind not in self.likelihoods:
            accepted = " or ".join(sorted(likelihood.value for likelihood in self.likelihoods))
            raise ConfigurationError(
                f"the guide family {self.name!r} fits the {accepted} likelihood only, not {kind.value}; "
                "choose another family for this data."
            )
