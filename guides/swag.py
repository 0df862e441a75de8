"""SWAG: a Gaussian over the global sites from the moments of the SGD iterates (Maddox et al., 2019).

Training starts at the pretrained point (the prior mean, as ``map`` does) and moves the point
``theta`` (all global sites, unconstrained and flattened, ``D`` numbers) by the fit loop's
optimiser; SWAG's own recipe is SGD at a constant learning rate (``fit(..., optimizer="sgd")``).
After ``burn_in`` steps, every ``every`` steps, the iterate is a snapshot ``theta_i``; SWAG keeps

* the running mean ``theta_bar = mean_i theta_i`` ``(D,)`` and variance ``mean_i theta_i^2 - theta_bar^2``
  ``(D,)`` (updated as Welford's, not as the difference of the two moments, which float32 rounds away);
* the deviations ``theta_i - theta_bar_i`` (running mean at the time) of the last ``rank`` snapshots,
  the rows of ``Dev`` ``(rank, D)``.

The posterior is ``N(theta_bar, scale * (diag(variance) + Dev^T Dev / (rank - 1)))``
(``scale`` 1/2 in the paper), a :class:`~pyro.distributions.LowRankMultivariateNormal`; constrained
sites (temperatures) are transformed from it as Pyro's ``AutoContinuous`` guides do.

As a module the guide is the iterate (a point mass) in training mode and the SWAG Gaussian in
evaluation mode; the fit loop switches (see :mod:`pyro_moe.guides.family`).

Example::

    posterior = fit(handle, batches, "swag", answer_token_ids=letters, steps=300, optimizer="sgd", lr=1e-3,
                    guide_options={"swag": {"rank": 10, "burn_in": 100, "every": 5}})
    posterior.predict(input_ids, attention_mask, num_samples=16)     # draws from the SWAG Gaussian
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoContinuous, init_to_mean
from torch import nn

from pyro_moe.errors import ConfigurationError
from pyro_moe.guides.family import FamilyPreset, GuideFamily, GuideScope, PosteriorPart
from pyro_moe.models.router_patch import RouterPatch
from pyro_moe.validation import check_integer, check_number

__all__ = ["SWAG", "SWAG_FAMILY"]


class SWAG(AutoContinuous, PosteriorPart):
    """SWAG over the global sites of ``model``; see the module docstring.

    Args:
        model: the Pyro model (its global sites).
        rank: number of deviation columns kept (SWAG's ``K``), at least 2.
        burn_in: optimisation steps before the first snapshot.
        every: steps between snapshots (SWAG's ``c``).
        scale: factor on the covariance (1/2 in the paper).
        init_loc_fn: where the iterate starts (default the prior mean: the pretrained router).

    Attributes (buffers, saved with the posterior):
        snapshot_mean: ``(D,)`` mean of the snapshots (unconstrained).
        snapshot_variance: ``(D,)`` their variance (``mean_i theta_i^2 - theta_bar^2``).
        deviations: ``(rank, D)`` deviations of the last ``rank`` snapshots (a ring buffer).
        num_snapshots: ``()`` number of snapshots collected.
    """

    VARIANCE_FLOOR = 1e-30
    """Lower bound of the diagonal variances (a coordinate no snapshot moved has variance 0)."""

    def __init__(
        self,
        model: Any,
        rank: int = 10,
        burn_in: int = 100,
        every: int = 5,
        scale: float = 0.5,
        init_loc_fn: Any = init_to_mean,
    ) -> None:
        check_integer("SWAG's rank", rank, minimum=2)
        check_integer("SWAG's burn_in", burn_in, minimum=0)
        check_integer("SWAG's every", every)
        check_number("SWAG's scale", scale)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.rank, self.burn_in, self.every, self.scale = rank, burn_in, every, float(scale)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()
        self.loc = nn.Parameter(loc)
        self.register_buffer("snapshot_mean", torch.zeros_like(loc))
        self.register_buffer("snapshot_variance", torch.zeros_like(loc))
        self.register_buffer("deviations", loc.new_zeros(self.rank, self.latent_dim))
        self.register_buffer("num_snapshots", torch.zeros((), dtype=torch.long, device=loc.device))

    def snapshots_by(self, steps_done: int) -> int:
        """How many snapshots the schedule has collected after ``steps_done`` steps."""
        return max(0, (steps_done - self.burn_in) // self.every)

    def check_fit(self, patch: RouterPatch, start: int, steps: int, num_particles: int) -> None:
        """Refuse a run after which fewer than ``rank`` snapshots exist."""
        self.check_schedule(steps, start, int(self.num_snapshots))

    def check_schedule(self, steps: int, start: int = 0, collected: int = 0) -> None:
        """Refuse ``steps`` steps from step ``start`` with ``collected`` snapshots already taken
        after which fewer than ``rank`` snapshots exist. It reads the schedule only, so it can run
        before any fit, on a guide built for a model that never runs."""
        collected += self.snapshots_by(start + steps) - self.snapshots_by(start)
        if collected < self.rank:
            needed = self.burn_in + self.rank * self.every
            raise ConfigurationError(
                f"SWAG rank {self.rank} needs at least {self.rank} snapshots, but {steps} steps from step {start} "
                f"(burn_in {self.burn_in}, a snapshot every {self.every} steps) leave {collected}: train to at least "
                f"step {needed}, or lower the rank, burn_in or every."
            )

    def after_step(self, steps_done: int) -> None:
        """Collect a snapshot when the schedule says so."""
        if steps_done > self.burn_in and (steps_done - self.burn_in) % self.every == 0:
            self.collect()

    @torch.no_grad()
    def collect(self) -> None:
        """Add the current iterate as a snapshot: update the mean, the variance and the deviation ring buffer."""
        iterate, count = self.loc.detach(), int(self.num_snapshots)
        previous = iterate - self.snapshot_mean
        self.snapshot_mean.add_(previous / (count + 1))
        deviation = iterate - self.snapshot_mean
        self.snapshot_variance.mul_(count).add_(previous * deviation).div_(count + 1)
        self.deviations[count % self.rank] = deviation
        self.num_snapshots += 1

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TorchDistribution:
        """Training mode: the point mass at the iterate; evaluation mode: the SWAG Gaussian, event ``(D,)``."""
        if self.training:
            return dist.Delta(self.loc, event_dim=1)
        count = int(self.num_snapshots)
        if count < self.rank:
            raise ConfigurationError(
                f"SWAG has {count} snapshots and needs rank = {self.rank} before it is a posterior; train longer."
            )
        variance = self.snapshot_variance.clamp(min=self.VARIANCE_FLOOR)
        cov_factor = self.deviations.T * math.sqrt(self.scale / (self.rank - 1))
        return dist.LowRankMultivariateNormal(self.snapshot_mean, cov_factor, self.scale * variance)


def _swag_preset(steps: int) -> FamilyPreset:
    """Rank 5, burn-in half the steps, 5 snapshots over the other half."""
    return FamilyPreset(guide_options={"rank": 5, "burn_in": steps // 2, "every": max(1, steps // 10)})


def _check_swag_options(options: Mapping[str, Any], steps: int | None) -> None:
    """SWAG's options and its schedule over ``steps`` steps (``None``: the options alone), before any fit
    (on a guide whose model never runs)."""
    guide = SWAG(lambda *args, **kwargs: None, **options)
    if steps is not None:
        guide.check_schedule(steps)


SWAG_FAMILY = GuideFamily(
    "swag",
    GuideScope.GLOBAL,
    SWAG,
    "SWAG: mean, diagonal and rank-K deviations of the SGD iterates (options rank, burn_in, every, scale)",
    preset=_swag_preset,
    check_options=_check_swag_options,
)
