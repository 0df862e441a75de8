"""Fitting and using posteriors: the SVI engine, ``fit`` and :class:`FittedPosterior`, the
predictive, generation with per-token uncertainty, the perplexity of text, checkpoints and named
family presets. Builds on core, models and guides."""
