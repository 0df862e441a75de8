"""Hooks through which a global guide takes part in the fit loop beyond plain SVI steps.

Most guide families are trained by SVI steps on their parameters and nothing else. The
weight-space baselines need a little more from the loop of :meth:`pyro_moe.FittedPosterior.train`:

* :meth:`FitHooks.check_fit` refuses, before any step, a run the guide cannot do (SWAG: too few
  snapshots for its rank; ensemble: not one particle per member; temperature sampling: a Top-K patch);
* :meth:`FitHooks.after_step` runs after every optimisation step (SWAG collects its snapshots);
* :attr:`FitHooks.trains` is ``False`` for a guide with nothing to optimise (temperature sampling):
  ``fit`` then does no steps.

The loop also puts the guide in training mode (``guide.train()``) while it steps and in
evaluation mode (``guide.eval()``) afterwards, as PyTorch modules are; SWAG is its SGD iterate in
training mode and its Gaussian in evaluation mode.

Example::

    class MyGuide(AutoDelta, FitHooks):
        def after_step(self, steps_done: int) -> None:
            ...  # record the iterate
"""

from __future__ import annotations

from typing import Any

from pyro_moe.models.router_patch import RouterPatch

__all__ = ["FitHooks", "fit_hooks"]


class FitHooks:
    """Mixin of global guides with steps of their own in the fit loop; every hook does nothing by default."""

    trains: bool = True
    """Whether the guide has anything to optimise; ``False``: ``fit`` does no steps."""

    def check_fit(self, patch: RouterPatch, start: int, steps: int, num_particles: int) -> None:
        """Raise :class:`~pyro_moe.errors.ConfigurationError` if training ``steps`` more steps from
        step ``start`` with ``num_particles`` particles on ``patch`` cannot work; called before any step."""

    def after_step(self, steps_done: int) -> None:
        """Called after every optimisation step with the number of steps done so far (1 after the first)."""


_NO_HOOKS = FitHooks()


def fit_hooks(global_guide: Any) -> FitHooks:
    """The hooks of ``global_guide`` (the no-op hooks when it has none, or when there is none)."""
    return global_guide if isinstance(global_guide, FitHooks) else _NO_HOOKS
