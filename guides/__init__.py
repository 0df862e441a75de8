"""Guide families (variational posteriors) over the router sample sites."""

__all__: list[str] = []
