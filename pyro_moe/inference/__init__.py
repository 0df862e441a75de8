"""Fitting and using posteriors: the SVI engine, ``fit`` and :class:`FittedPosterior`, the
predictive, checkpoints and named family presets. Builds on core, models and guides."""
